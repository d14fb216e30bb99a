"""`cdm_fast.patch.patch_peft`: patched peft LoRA models compute what unpatched peft computes.

Tiny Llama models (hidden 32, 2 layers, vocab 128) on CPU; lora_B is set to random values so that the
adapters change the output. Numerics are compared with lora_dropout=0 (or in eval mode): with dropout the op
draws its own counter-based mask, so patched and unpatched peft then agree only in distribution.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_error
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import cdm_fast.patch.peft_lora
from cdm_fast.patch import QUANTIZED_REASON, PatchReport, is_patched, patch_peft, unpatch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128
# float32 end to end: patched and unpatched differ only in summation order.
TOLERANCE = 1e-5


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def _lora_config(**overrides) -> LoraConfig:
    return LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "lora_dropout": 0.0, **overrides}
    )


def _randomize_lora_B_(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def _peft_llama(**overrides) -> PeftModel:
    model = get_peft_model(_tiny_llama(), _lora_config(**overrides))
    _randomize_lora_B_(model)
    return model


def _input_ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits_and_lora_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    return out.logits.detach(), grads


def _logits(model: nn.Module, input_ids: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_input_ids() if input_ids is None else input_ids).logits


def test_patched_logits_and_every_lora_grad_match_unpatched_peft():
    model = _peft_llama()
    input_ids = _input_ids()
    logits, grads = _logits_and_lora_grads(model, input_ids)
    report = patch_peft(model)
    assert len(report.patched) == 2 * len(TARGETS) and report.skipped == {}
    patched_logits, patched_grads = _logits_and_lora_grads(model, input_ids)
    assert rel_error(patched_logits, logits) <= TOLERANCE
    assert patched_grads.keys() == grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert rel_error(patched_grads[name], grad) <= TOLERANCE, name


def test_patched_layers_call_the_fused_op(monkeypatch):
    model = _peft_llama()
    patch_peft(model)
    calls = []
    real = cdm_fast.patch.peft_lora.lora_linear
    monkeypatch.setattr(
        cdm_fast.patch.peft_lora, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    _logits(model)
    assert len(calls) == 2 * len(TARGETS)


def test_report_lists_skipped_modules_with_reasons_and_patched_rest_stays_exact():
    # q_proj carries two active adapters, embed_tokens a LoRA Embedding: both skipped, the rest patched.
    model = get_peft_model(_tiny_llama(), _lora_config(target_modules=[*TARGETS, "embed_tokens"]))
    model.add_adapter("other", _lora_config(target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "other"])
    _randomize_lora_B_(model)
    reference = _logits(model)
    report = patch_peft(model)
    prefix = "base_model.model.model."
    assert report.skipped == {
        prefix + "embed_tokens": "not a LoRA Linear layer (peft.tuners.lora.layer.Embedding)",
        prefix
        + "layers.0.self_attn.q_proj": "2 active adapters (default, other); the fused op runs exactly one",
        prefix
        + "layers.1.self_attn.q_proj": "2 active adapters (default, other); the fused op runs exactly one",
    }
    assert len(report.patched) == 2 * (len(TARGETS) - 1)
    assert prefix + "layers.0.mlp.down_proj" in report.patched
    assert rel_error(_logits(model), reference) <= TOLERANCE
    text = str(report)
    assert "12 patched, 3 skipped" in text and "skipped: 2 active adapters" in text


def test_dora_modules_are_skipped_with_reason():
    model = _peft_llama(use_dora=True, target_modules=["q_proj", "v_proj"])
    report = patch_peft(model)
    assert report.patched == [] and len(report.skipped) == 4
    assert set(report.skipped.values()) == {"DoRA (use_dora) on adapter 'default'"}


def test_quantized_base_is_skipped_with_issue_reason():
    class Linear4bit(nn.Linear):
        """Stands in for bitsandbytes' class: only the defining package is looked at."""

    Linear4bit.__module__ = "bitsandbytes.nn.modules"
    model = nn.Sequential(nn.Linear(8, 8), Linear4bit(8, 8))
    model = inject_adapter_in_model(_lora_config(target_modules=["0", "1"]), model)
    report = patch_peft(model)
    assert report.patched == ["0"] and report.skipped == {"1": QUANTIZED_REASON}


def test_module_whose_forward_another_library_overrode_is_skipped():
    model = inject_adapter_in_model(
        _lora_config(target_modules=["0", "1"]), nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    )
    hooked = model[1]
    hooked.forward = lambda x: type(hooked).forward(hooked, x)
    report = patch_peft(model)
    assert report.patched == ["0"]
    assert report.skipped == {"1": "forward already overridden on the instance (e.g. an accelerate hook)"}


def test_deepcopy_of_a_patched_model_runs_on_its_own_modules():
    model = _peft_llama()
    patch_peft(model)
    clone = copy.deepcopy(model)
    layer = clone.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    assert is_patched(layer) and layer.forward.args[0] is layer
    assert torch.equal(_logits(clone), _logits(model))


def test_merged_is_skipped_at_patch_time_and_falls_back_at_call_time():
    model = _peft_llama()
    reference = _logits(model)
    model.merge_adapter()
    report = patch_peft(model)
    assert report.patched == [] and all(
        r.startswith("merged adapter weights") for r in report.skipped.values()
    )
    model.unmerge_adapter()
    assert len(patch_peft(model).patched) == 2 * len(TARGETS)
    model.merge_adapter()
    assert rel_error(_logits(model), reference) <= TOLERANCE
    model.unmerge_adapter()
    assert rel_error(_logits(model), reference) <= TOLERANCE


def test_active_adapter_changes_after_patching_are_respected():
    model = _peft_llama()
    model.add_adapter("other", _lora_config(lora_alpha=4))
    _randomize_lora_B_(model, seed=3)
    expected = {}
    for active in ("default", "other", ["default", "other"]):
        model.base_model.set_adapter(active)
        expected[str(active)] = _logits(model)
    model.base_model.set_adapter("default")
    patch_peft(model)
    for active in ("other", ["default", "other"], "default"):
        model.base_model.set_adapter(active)
        assert rel_error(_logits(model), expected[str(active)]) <= TOLERANCE, active
    assert not torch.allclose(expected["default"], expected["other"])


def test_disable_adapter_gives_the_base_model_output():
    base = _tiny_llama()
    base_logits = _logits(base)
    model = get_peft_model(base, _lora_config())
    _randomize_lora_B_(model)
    patch_peft(model)
    with model.disable_adapter():
        assert rel_error(_logits(model), base_logits) <= TOLERANCE
    assert rel_error(_logits(model), base_logits) > 1e-3


def test_unpatch_restores_and_patching_twice_does_not_double_wrap():
    model = _peft_llama()
    reference = _logits(model)
    first = patch_peft(model)
    second = patch_peft(model, backend="torch")
    assert second.patched == first.patched and second.skipped == {}
    layer = model.get_submodule(first.patched[0])
    assert layer.forward.func is cdm_fast.patch.peft_lora._fused_forward and layer.forward.args[1] == "torch"
    assert rel_error(_logits(model), reference) <= TOLERANCE
    assert unpatch(model) == first.patched
    assert not any(is_patched(m) for m in model.modules()) and "forward" not in layer.__dict__
    assert unpatch(model) == []
    assert patch_peft(model).undo() == first.patched and not is_patched(layer)
    assert torch.equal(_logits(model), reference)


def test_state_dict_unchanged_and_saved_adapter_loads_in_plain_peft(tmp_path):
    base = _tiny_llama()
    base_copy = copy.deepcopy(base)
    model = get_peft_model(base, _lora_config())
    _randomize_lora_B_(model)
    keys = list(model.state_dict())
    patch_peft(model)
    assert list(model.state_dict()) == keys
    patched_logits = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_copy, tmp_path)
    assert not any(is_patched(m) for m in loaded.modules())
    assert rel_error(_logits(loaded), patched_logits) <= TOLERANCE


def test_plain_model_with_injected_adapters():
    model = _tiny_llama()
    model = inject_adapter_in_model(_lora_config(), model)
    _randomize_lora_B_(model)
    input_ids = _input_ids()
    logits, grads = _logits_and_lora_grads(model, input_ids)
    report = patch_peft(model)
    assert len(report.patched) == 2 * len(TARGETS) and report.patched[0] == "model.layers.0.self_attn.q_proj"
    patched_logits, patched_grads = _logits_and_lora_grads(model, input_ids)
    assert rel_error(patched_logits, logits) <= TOLERANCE
    for name, grad in grads.items():
        assert rel_error(patched_grads[name], grad) <= TOLERANCE, name


def test_bad_input_to_a_patched_layer_raises():
    model = _peft_llama()
    patch_peft(model)
    layer = model.get_submodule("base_model.model.model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="weight: expected"):
        layer(torch.randn(3, 31))
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        layer(torch.ones(3, 32, dtype=torch.int64))


def test_dropout_patched_model_is_reproducible_under_manual_seed_and_trains():
    model = _peft_llama(lora_dropout=0.3)
    input_ids = _input_ids()
    reference = _logits(model.eval())
    patch_peft(model)
    # In eval mode dropout is off, so the patched model is exact.
    assert rel_error(_logits(model), reference) <= TOLERANCE
    model.train()
    torch.manual_seed(0)
    first = _logits(model)
    torch.manual_seed(0)
    assert torch.equal(_logits(model), first)
    assert rel_error(first, reference) > 1e-4
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_bf16_autocast_matches_unpatched_in_value_and_dtype():
    model = _peft_llama()
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    x = torch.randn(2, 5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, layer_reference = _logits(model), layer(x)
        patch_peft(model)
        logits, layer_out = _logits(model), layer(x)
    assert layer_out.dtype == layer_reference.dtype == torch.bfloat16
    assert logits.dtype == reference.dtype
    assert rel_error(layer_out, layer_reference) <= 1e-2 and rel_error(logits, reference) <= 1e-2


def test_report_str_is_a_table():
    report = PatchReport(patched=["a.q_proj"], skipped={"a.embed": "not a LoRA Linear layer (Embedding)"})
    lines = str(report).splitlines()
    assert lines[0] == "cdm_fast.patch_peft: 1 patched, 1 skipped"
    assert lines[3].split() == ["a.q_proj", "patched"]
    assert lines[4].startswith("a.embed ") and lines[4].endswith(
        "skipped: not a LoRA Linear layer (Embedding)"
    )


# ---------------------------------------------------------------- inside trainers


def _token_dataset(num_rows: int = 8, length: int = 12):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(4)
    rows = torch.randint(1, VOCAB, (num_rows, length), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def _training_args(cls, tmp_path, **extra):
    return cls(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        # SGD, not AdamW: Adam's first step is ~lr·sign(grad), which turns rounding-level differences in
        # near-zero gradients into lr-sized ones; the layers, not the optimizer, are under test here.
        optim="sgd",
        learning_rate=0.1,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        # float32 end to end (SFTConfig defaults to bf16 autocast).
        bf16=False,
        report_to=[],
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        **extra,
    )


def _losses_and_adapter(trainer) -> tuple[list[float], dict]:
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    adapter = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if "lora_" in name}
    return losses, adapter


def _assert_same_training(unpatched: tuple[list[float], dict], patched: tuple[list[float], dict]) -> None:
    (losses, adapter), (patched_losses, patched_adapter) = unpatched, patched
    assert len(losses) == 3
    assert rel_error(torch.tensor(patched_losses), torch.tensor(losses)) <= TOLERANCE
    for name, value in adapter.items():
        assert rel_error(patched_adapter[name], value) <= TOLERANCE, name


def test_transformers_trainer_losses_equal_patched_and_unpatched(tmp_path):
    from transformers import Trainer, TrainingArguments

    runs = []
    for patched in (False, True):
        model = _peft_llama()
        if patched:
            assert len(patch_peft(model).patched) == 2 * len(TARGETS)
        args = _training_args(TrainingArguments, tmp_path / str(patched))
        runs.append(_losses_and_adapter(Trainer(model=model, args=args, train_dataset=_token_dataset())))
    _assert_same_training(*runs)


def _char_tokenizer():
    """A character-level fast tokenizer built in memory (no download): pad 0, eos 1, letters after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    vocab.update({chr(ord("a") + i): 3 + i for i in range(26)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def test_trl_sft_trainer_losses_equal_patched_and_unpatched(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    texts = ["thequickbrownfox", "jumpsoverthelazydog", "loraadaptersfuse", "kernelsreadxonce"] * 2
    runs = []
    for patched in (False, True):
        model = _peft_llama()
        if patched:
            patch_peft(model)
        args = _training_args(SFTConfig, tmp_path / str(patched), max_length=24, packing=False)
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": texts}),
            processing_class=_char_tokenizer(),
        )
        runs.append(_losses_and_adapter(trainer))
    _assert_same_training(*runs)
