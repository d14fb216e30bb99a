"""`cdm_fast.patch.patch_peft` over QLoRA: peft's `lora.bnb.Linear4bit` patched computes what peft computes.

A tiny Llama (hidden 64, 2 layers, vocab 128) whose decoder Linears are replaced by hand with bitsandbytes
`Linear4bit` layers quantised on the CPU (transformers' BitsAndBytesConfig loading wants a GPU), then wrapped
by `peft.get_peft_model`, which detects them and creates `lora.bnb.Linear4bit`. lora_B is set to random
values so that the adapters change the output; lora_dropout=0 so that patched and unpatched agree exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from bitsandbytes import functional  # noqa: E402
from conftest import absmax_float32, rel_error  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model, inject_adapter_in_model  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit  # noqa: E402
from torch import nn  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import cdm_fast.patch.peft_lora  # noqa: E402
from cdm_fast import quant  # noqa: E402
from cdm_fast.patch import EIGHT_BIT_REASON, patch_peft  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 128
# fp32 compute: patched and unpatched differ only in summation order. bf16 compute: peft runs the adapter in
# float32 on the float32 input, the fused op on the input bitsandbytes rounded to bf16 (accumulating in fp32),
# and bitsandbytes' backward rounds dx to bf16 per layer: measured ≤ 0.005 on logits, median 0.007 and max
# 0.013 on the LoRA grads after two layers.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
GRAD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _linear_4bit(
    linear: nn.Linear, quant_type: str, double_quant: bool, compute_dtype, keep_layout: bool = True
) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        quant_type=quant_type,
        compress_statistics=double_quant,
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data,
        requires_grad=False,
        quant_type=quant_type,
        compress_statistics=double_quant,
        module=layer,
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    if keep_layout:
        # On AVX512-BF16 CPUs bitsandbytes' eval forward would repack the weight with bf16 scales: unpatched
        # peft would then compute with other scales than the ones both sides start from. That layout has its
        # own tests below.
        quant.keep_standard_layout(layer)
    # The first .to(device) quantises (Params4bit._quantize): standard layout, quant_state set.
    return layer.to("cpu")


def _qlora_llama(
    quant_type: str = "nf4",
    double_quant: bool = True,
    compute_dtype=torch.float32,
    seed: int = 0,
    keep_layout: bool = True,
) -> PeftModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_bias=True,  # q/k/v/o carry a bias: bitsandbytes' bias cast is exercised
    )
    model = LlamaForCausalLM(config)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    quantized = _linear_4bit(child, quant_type, double_quant, compute_dtype, keep_layout)
                    setattr(parent, name, quantized)
    model.is_loaded_in_4bit = True  # what peft reads to dispatch bitsandbytes layers to lora.bnb
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def _input_ids(seed: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _logits_and_lora_grads(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=input_ids)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if "lora_" in name}
    return out.logits.detach(), grads


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_input_ids()).logits


@pytest.mark.parametrize(
    "quant_type, double_quant, compute_dtype",
    [
        ("nf4", True, torch.float32),
        ("nf4", False, torch.float32),
        ("fp4", True, torch.float32),
        ("fp4", False, torch.bfloat16),
        ("nf4", True, torch.bfloat16),
    ],
)
def test_patched_qlora_logits_and_every_lora_grad_match_unpatched_peft(
    quant_type, double_quant, compute_dtype
):
    model = _qlora_llama(quant_type, double_quant, compute_dtype)
    input_ids = _input_ids()
    logits, grads = _logits_and_lora_grads(model, input_ids)
    report = patch_peft(model)
    lora_modules = [name for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert report.patched == lora_modules and len(lora_modules) == 2 * len(TARGETS)
    assert report.skipped == {}
    patched_logits, patched_grads = _logits_and_lora_grads(model, input_ids)
    assert patched_logits.dtype == logits.dtype
    tolerance = TOLERANCE[compute_dtype]
    assert rel_error(patched_logits, logits) <= tolerance
    assert patched_grads.keys() == grads.keys() and len(grads) == 4 * len(TARGETS)
    for name, grad in grads.items():
        assert rel_error(patched_grads[name], grad) <= GRAD_TOLERANCE[compute_dtype], name


def test_patched_4bit_layers_call_the_fused_op_with_the_packed_weight(monkeypatch):
    model = _qlora_llama()
    reference = _logits(model)
    patch_peft(model)
    weights = []
    real = cdm_fast.patch.peft_lora.lora_linear
    monkeypatch.setattr(
        cdm_fast.patch.peft_lora,
        "lora_linear",
        lambda x, weight, *a, **k: weights.append(weight) or real(x, weight, *a, **k),
    )
    assert rel_error(_logits(model), reference) <= TOLERANCE[torch.float32]
    assert len(weights) == 2 * len(TARGETS)
    assert all(isinstance(weight, bnb.nn.Params4bit) for weight in weights)


def test_weight_the_fused_op_cannot_read_falls_back_to_peft_per_call(monkeypatch):
    model = _qlora_llama()
    reference = _logits(model)
    report = patch_peft(model)
    layer = model.get_submodule(report.patched[0]).base_layer
    # bitsandbytes can lose the parameter's quant_state (FSDP) and restores it from the module in forward;
    # at call time the fused path cannot read the weight, so peft's own forward runs (and restores it).
    layer.weight.quant_state = None
    calls = []
    real = cdm_fast.patch.peft_lora.lora_linear
    monkeypatch.setattr(
        cdm_fast.patch.peft_lora, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    assert rel_error(_logits(model), reference) <= TOLERANCE[torch.float32]
    assert len(calls) == 2 * len(TARGETS) - 1


def _base_weight(model: nn.Module, name: str):
    return model.get_submodule(name).base_layer.weight


def test_cpu_repacked_4bit_weight_is_read_and_patched():
    # bitsandbytes' repack is plain torch, so the layout its AVX512-BF16 eval forward makes is made here, on
    # any CPU, for one layer.
    model = _qlora_llama()
    name = next(name for name, m in model.named_modules() if isinstance(m, LoraLinear4bit))
    weight = _base_weight(model, name)
    codes, state = weight.data.clone(), copy.deepcopy(weight.quant_state)
    repacked = functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)
    weight.data, weight.quant_state = repacked
    report = patch_peft(model)
    assert report.skipped == {} and len(report.patched) == 2 * len(TARGETS)
    repacked_logits = _logits(model)
    # The same codes in the standard layout, with the scales rounded to bf16 as the repack stores them.
    state.absmax, state.nested = absmax_float32(state).bfloat16().float(), False
    weight.data, weight.quant_state = codes, state
    assert torch.equal(_logits(model), repacked_logits)


@pytest.mark.skipif(
    not functional.has_avx512bf16(), reason="bitsandbytes repacks in its forward only on AVX512-BF16 CPUs"
)
def test_layers_bitsandbytes_repacked_in_its_eval_forward_are_patched_on_this_cpu():
    model = _qlora_llama(keep_layout=False).eval()
    unpatched_logits = _logits(model)  # bitsandbytes repacks every layer here, and computes in bf16
    names = [name for name, m in model.named_modules() if isinstance(m, LoraLinear4bit)]
    assert all(_base_weight(model, name).quant_state.packing_format_for_cpu for name in names)
    report = patch_peft(model)
    assert report.skipped == {} and sorted(report.patched) == sorted(names)
    assert rel_error(_logits(model), unpatched_logits) <= TOLERANCE[torch.bfloat16]


def test_adapters_saved_after_patching_load_in_plain_peft_with_equal_outputs(tmp_path):
    model = _qlora_llama()
    patch_peft(model)
    patched_logits = _logits(model)
    model.save_pretrained(tmp_path)
    fresh = _qlora_llama(seed=0)
    base = fresh.unload()
    base.is_loaded_in_4bit = True
    loaded = PeftModel.from_pretrained(base, tmp_path)
    assert rel_error(_logits(loaded), patched_logits) <= TOLERANCE[torch.float32]


def test_8bit_base_is_skipped_with_reason_and_4bit_beside_it_is_patched():
    torch.manual_seed(0)
    linear8bit = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to("cpu")
    linear4bit = _linear_4bit(nn.Linear(64, 64), "nf4", True, torch.float32)
    model = nn.Sequential(linear8bit, linear4bit)
    model.is_loaded_in_8bit = model.is_loaded_in_4bit = True
    model = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0", "1"]), model)
    assert type(model[0]).__name__ == "Linear8bitLt" and isinstance(model[1], LoraLinear4bit)
    report = patch_peft(model)
    assert report.patched == ["1"] and report.skipped == {"0": EIGHT_BIT_REASON}
