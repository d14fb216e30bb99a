"""The transformers drop-in (`cdm_fast.patch.register_hf_attention`) against SDPA and eager attention."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error
from transformers import LlamaConfig, LlamaForCausalLM

from cdm_fast import cdm
from cdm_fast.attention import sliding_window_layout
from cdm_fast.ops.attention import element_mask
from cdm_fast.patch import ATTENTION_NAME, attention_entropy_recorder, register_hf_attention

BLOCK_SIZE = 16
WINDOW_NAME = "cdm_block_sparse_test_window"
# float32 bounds: logits vs SDPA, gradients vs SDPA, entropies vs eager weights, CDM fused vs eager.
LOGITS_TOLERANCE, GRAD_TOLERANCE, ENTROPY_TOLERANCE, CDM_TOLERANCE = 1e-5, 1e-4, 1e-4, 1e-3


def window_layout(seq_len_q: int, seq_len_k: int, config) -> torch.Tensor:
    return sliding_window_layout(seq_len_q, seq_len_k, BLOCK_SIZE, window_blocks=1, global_blocks=1)


@pytest.fixture(scope="module")
def model():
    register_hf_attention(block_size=BLOCK_SIZE)
    register_hf_attention(WINDOW_NAME, layout_fn=window_layout, block_size=BLOCK_SIZE)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def padded_batch(padding_side: str, lengths=(37, 21, 9), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    length = max(lengths)
    input_ids = torch.randint(2, 128, (len(lengths), length), generator=generator)
    mask = torch.zeros_like(input_ids)
    for row, real in enumerate(lengths):
        if padding_side == "left":
            mask[row, length - real :] = 1
        else:
            mask[row, :real] = 1
    input_ids = input_ids.masked_fill(mask == 0, 0)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def run(model, implementation: str, input_ids, mask, position_ids, **kwargs):
    model.set_attn_implementation(implementation)
    try:
        return model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kwargs)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batch_logits_match_sdpa_at_real_tokens(model, padding_side):
    input_ids, mask, position_ids = padded_batch(padding_side)
    with torch.no_grad():
        out = run(model, ATTENTION_NAME, input_ids, mask, position_ids).logits
        ref = run(model, "sdpa", input_ids, mask, position_ids).logits
    real = mask.bool()
    assert rel_error(out[real], ref[real]) <= LOGITS_TOLERANCE


def test_left_padded_training_grads_match_sdpa(model):
    input_ids, mask, position_ids = padded_batch("left", seed=1)
    labels = input_ids.masked_fill(mask == 0, -100)
    grads = {}
    model.train()
    try:
        for implementation in (ATTENTION_NAME, "sdpa"):
            model.zero_grad(set_to_none=True)
            run(model, implementation, input_ids, mask, position_ids, labels=labels).loss.backward()
            grads[implementation] = {name: p.grad.clone() for name, p in model.named_parameters()}
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    for name, ref in grads["sdpa"].items():
        assert rel_error(grads[ATTENTION_NAME][name], ref) <= GRAD_TOLERANCE, name


def test_generate_with_kv_cache_matches_sdpa_tokens(model):
    input_ids, mask, _ = padded_batch("left", lengths=(19, 6), seed=2)
    tokens = {}
    for implementation in (ATTENTION_NAME, "sdpa"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0
        )
    model.set_attn_implementation("sdpa")
    assert torch.equal(tokens[ATTENTION_NAME], tokens["sdpa"])


def test_sliding_window_layout_fn_matches_eager_with_the_equivalent_mask(model):
    input_ids, mask, position_ids = padded_batch("right", lengths=(70, 53), seed=3)
    batch, length = input_ids.shape
    layout = window_layout(length, length, model.config)
    visible = element_mask(layout, batch, 1, length, length, BLOCK_SIZE, True, mask.bool())
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    with torch.no_grad():
        out = run(model, WINDOW_NAME, input_ids, mask, position_ids).logits
        ref = run(model, "eager", input_ids, additive, position_ids).logits
        dense = run(model, "sdpa", input_ids, mask, position_ids).logits
    real = mask.bool()
    assert rel_error(out[real], ref[real]) <= LOGITS_TOLERANCE
    assert rel_error(out[real], dense[real]) > 1e-3  # the window really hides keys


def test_entropy_recorder_matches_eager_weight_entropy_on_real_rows(model):
    input_ids, mask, position_ids = padded_batch("left", seed=4)
    with torch.no_grad(), attention_entropy_recorder() as recorder:
        run(model, ATTENTION_NAME, input_ids, mask, position_ids)
    with torch.no_grad():
        eager = run(model, "eager", input_ids, mask, position_ids, output_attentions=True).attentions
    assert [record.layer_idx for record in recorder.records] == list(range(len(eager)))
    real = mask.bool()
    for record, weights in zip(recorder.records, eager, strict=True):
        weights = weights.double()
        reference = -torch.xlogy(weights, weights).sum(-1)  # (batch, heads, length)
        assert record.entropy.dtype == torch.float32
        got = record.entropy.permute(0, 2, 1)[real]
        assert (got.double() - reference.permute(0, 2, 1)[real]).abs().max() <= ENTROPY_TOLERANCE


def test_recorder_is_inactive_outside_its_context(model):
    input_ids, mask, position_ids = padded_batch("left", lengths=(5, 3), seed=5)
    with attention_entropy_recorder() as recorder:
        pass
    with torch.no_grad():
        run(model, ATTENTION_NAME, input_ids, mask, position_ids)
    assert recorder.records == []


class CharTokenizer:
    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [2 + ord(char) % 126 for char in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(ord("a") + token % 26) for token in ids if not (skip_special_tokens and token < 2))


def test_cdm_score_fused_entropy_matches_eager_weights(model):
    prompts = ["the cat sat", "a", "on the mat, quietly purring"]
    settings = dict(max_new_tokens=6, noise_samples=1, attention_layers="all", batch_size=3, progress=False)
    results = {}
    for implementation in ("eager", ATTENTION_NAME):
        model.set_attn_implementation(implementation)
        results[implementation] = cdm.score(model, CharTokenizer(), prompts, **settings)
    model.set_attn_implementation("sdpa")
    for fused, eager in zip(results[ATTENTION_NAME], results["eager"], strict=True):
        assert fused.completion == eager.completion
        assert abs(fused.attention_sparsity - eager.attention_sparsity) <= CDM_TOLERANCE
        assert abs(fused.cdm - eager.cdm) <= CDM_TOLERANCE


def test_attention_sparsity_from_entropy_matches_from_weights(model):
    input_ids, mask, position_ids = padded_batch("left", seed=6)
    scored = mask.bool() & (torch.arange(input_ids.shape[1]) >= 20)
    with torch.no_grad(), attention_entropy_recorder() as recorder:
        run(model, ATTENTION_NAME, input_ids, mask, position_ids)
    with torch.no_grad():
        eager = run(model, "eager", input_ids, mask, position_ids, output_attentions=True).attentions
    fused = cdm.attention_sparsity_from_entropy([r.entropy for r in recorder.records], mask, scored)
    reference = cdm.attention_sparsity_from_weights(list(eager), mask, scored)
    assert (fused - reference).abs().max() <= CDM_TOLERANCE


def test_registering_twice_keeps_working(model):
    from transformers import AttentionInterface

    assert register_hf_attention(block_size=BLOCK_SIZE) == register_hf_attention(block_size=BLOCK_SIZE)
    assert ATTENTION_NAME in AttentionInterface()
    test_padded_batch_logits_match_sdpa_at_real_tokens(model, "left")


def test_from_pretrained_accepts_the_name(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation=ATTENTION_NAME)
    assert loaded.config._attn_implementation == ATTENTION_NAME


def test_bad_layout_fn_output_raises_naming_layout_fn(model):
    name = "cdm_block_sparse_test_bad"
    register_hf_attention(name, layout_fn=lambda seq_len_q, seq_len_k, config: torch.ones(1, 1, 1, 1))
    input_ids, mask, position_ids = padded_batch("left", seed=7)
    with pytest.raises(ValueError, match="layout_fn: expected a bool tensor"):
        run(model, name, input_ids, mask, position_ids)


def test_attention_dropout_in_training_raises(model):
    input_ids, mask, position_ids = padded_batch("left", lengths=(5, 3), seed=8)
    model.train()
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    try:
        with pytest.raises(ValueError, match="dropout"):
            run(model, ATTENTION_NAME, input_ids, mask, position_ids)
    finally:
        model.eval()
        model.config.attention_dropout = 0.0
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.0
