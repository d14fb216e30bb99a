"""`cdm_fast.nn.FusedLoraLinear`: an nn.Linear plus a LoRA adapter, against the same math written by hand."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_error
from torch import nn

from cdm_fast.nn import FusedLoraLinear

# Odd sizes and a leading batch dim, small enough for the Triton interpreter.
IN_FEATURES, OUT_FEATURES, RANK = 13, 11, 3


def _layer(
    dtype: torch.dtype = torch.float64, bias: bool = True, **kwargs
) -> tuple[nn.Linear, FusedLoraLinear]:
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)
    layer = FusedLoraLinear(base, RANK, lora_alpha=6, **kwargs)
    with torch.no_grad():
        # lora_B starts at zero; random values make the adapter term matter.
        layer.lora_B.normal_()
    return base, layer


def _manual(base: nn.Linear, layer: FusedLoraLinear, x: torch.Tensor) -> torch.Tensor:
    return base(x) + layer.scaling * (x @ layer.lora_A.T) @ layer.lora_B.T


def test_forward_matches_linear_plus_manual_lora_float64():
    base, layer = _layer()
    x = torch.randn(2, 5, IN_FEATURES, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (2, 5, OUT_FEATURES) and y.dtype == torch.float64
    assert rel_error(y, _manual(base, layer, x)) <= 1e-12


def test_forward_without_bias_matches_manual_float64():
    base, layer = _layer(bias=False)
    x = torch.randn(7, IN_FEATURES, dtype=torch.float64)
    assert rel_error(layer(x), _manual(base, layer, x)) <= 1e-12


def test_grad_lora_A_lora_B_and_x_match_manual_float64():
    base, layer = _layer()
    x = torch.randn(2, 5, IN_FEATURES, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(2, 5, OUT_FEATURES, dtype=torch.float64)
    layer(x).backward(grad_y)
    fused = {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}

    leaves = {name: t.detach().clone().requires_grad_() for name, t in (("x", x), *layer.named_parameters())}
    manual = (
        leaves["x"] @ base.weight.T
        + base.bias
        + layer.scaling * (leaves["x"] @ leaves["lora_A"].T) @ leaves["lora_B"].T
    )
    manual.backward(grad_y)
    for name, grad in fused.items():
        assert rel_error(grad, leaves[name].grad) <= 1e-12, name


def test_frozen_base_gets_no_grad():
    base, layer = _layer()
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [name for name, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    layer(torch.randn(4, IN_FEATURES, dtype=torch.float64)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_fresh_layer_equals_its_base_and_scaling_is_alpha_over_r():
    base = nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=torch.float64)
    layer = FusedLoraLinear.from_linear(base, 4, lora_alpha=8)
    assert layer.scaling == 2.0 and FusedLoraLinear(base, 4).scaling == 1.0
    assert torch.count_nonzero(layer.lora_B) == 0 and torch.count_nonzero(layer.lora_A) > 0
    x = torch.randn(3, IN_FEATURES, dtype=torch.float64)
    assert rel_error(layer(x), base(x)) <= 1e-12


def test_half_precision_base_keeps_float32_adapter_like_peft():
    layer = FusedLoraLinear(nn.Linear(IN_FEATURES, OUT_FEATURES, dtype=torch.bfloat16), RANK)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert layer(torch.randn(3, IN_FEATURES, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_merged_linear_equals_the_layer_float64():
    _, layer = _layer()
    x = torch.randn(6, IN_FEATURES, dtype=torch.float64)
    assert rel_error(layer.merged_linear()(x), layer(x)) <= 1e-12


def test_dropout_applies_in_training_only_and_is_reproducible_under_manual_seed():
    base, layer = _layer(dtype=torch.float32, lora_dropout=0.5)
    x = torch.randn(8, IN_FEATURES)
    layer.eval()
    assert rel_error(layer(x), _manual(base, layer, x)) <= 1e-5
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    torch.manual_seed(0)
    assert torch.equal(layer(x), first)
    assert rel_error(first, _manual(base, layer, x)) > 1e-3


def test_bad_arguments_raise():
    base = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with pytest.raises(TypeError, match="base"):
        FusedLoraLinear(nn.Conv1d(3, 3, 1), RANK)
    with pytest.raises(ValueError, match="r: expected a positive int"):
        FusedLoraLinear(base, 0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoraLinear(base, RANK, lora_dropout=1.0)
    with pytest.raises(ValueError, match="weight: expected"):
        FusedLoraLinear(base, RANK)(torch.randn(2, IN_FEATURES + 1))


def test_extra_repr_names_the_configuration():
    text = repr(FusedLoraLinear(nn.Linear(IN_FEATURES, OUT_FEATURES), 4, lora_alpha=16, lora_dropout=0.1))
    assert "in_features=13, out_features=11, bias=True, r=4, lora_alpha=16, lora_dropout=0.1" in text
