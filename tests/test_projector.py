"""`FourierProjector`: seeded frequencies, parameter handling, and the op it runs."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_error

from cdm_fast.nn import FourierProjector
from cdm_fast.ops.projection import reference


def test_same_seed_gives_same_frequencies_and_weights():
    a, b = FourierProjector(12, 7, 5, sigma=0.3, seed=3), FourierProjector(12, 7, 5, sigma=0.3, seed=3)
    assert torch.equal(a.freqs, b.freqs) and torch.equal(a.weight, b.weight)
    assert not torch.equal(a.freqs, FourierProjector(12, 7, 5, sigma=0.3, seed=4).freqs)


def test_frequencies_are_a_buffer_unless_learned():
    fixed = FourierProjector(12, 7, 5)
    assert "freqs" in dict(fixed.named_buffers()) and "freqs" not in dict(fixed.named_parameters())
    learned = FourierProjector(12, 7, 5, learn_frequencies=True)
    assert "freqs" in dict(learned.named_parameters())


def test_frequencies_follow_sigma():
    freqs = FourierProjector(256, 3, 512, sigma=0.25, seed=0).freqs
    assert math.isclose(freqs.std().item(), 0.25, rel_tol=0.02)


@pytest.mark.parametrize("learn_frequencies", [False, True])
def test_forward_and_grads_match_float64_reference(learn_frequencies):
    module = FourierProjector(
        13, 5, 9, sigma=0.2, learn_frequencies=learn_frequencies, seed=1, backend="torch"
    )
    x = torch.randn(2, 3, 13, requires_grad=True)
    y = module(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)

    leaves64 = {
        "x": x.detach().double().requires_grad_(),
        "freqs": module.freqs.detach().double().requires_grad_(),
        "weight": module.weight.detach().double().requires_grad_(),
        "bias": module.bias.detach().double().requires_grad_(),
    }
    y64 = reference(*leaves64.values())
    y64.backward(grad_y.double())
    assert y.shape == (2, 3, 5) and y.dtype == x.dtype
    assert rel_error(y, y64) < 1e-5
    grads = {"x": x.grad, "weight": module.weight.grad, "bias": module.bias.grad}
    if learn_frequencies:
        grads["freqs"] = module.freqs.grad
    else:
        assert module.freqs.grad is None
    for name, grad in grads.items():
        assert rel_error(grad, leaves64[name].grad) < 1e-5, name


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"d_in": 0}, "d_in"),
        ({"num_frequencies": -1}, "num_frequencies"),
        ({"sigma": 0.0}, "sigma"),
        ({"precision": "fp4"}, "precision"),
    ],
)
def test_bad_constructor_arguments_raise_naming_the_argument(kwargs, name):
    args = {"d_in": 4, "d_out": 3, "num_frequencies": 2} | kwargs
    with pytest.raises(ValueError, match=name):
        FourierProjector(**args)
