"""cdm_fast.wgrad: deferred weight gradients land in .grad exactly as the synchronous path puts them."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from conftest import requires_triton
from torch import nn

from cdm_fast import wgrad
from cdm_fast.nn import FourierProjector, FusedLoraLinear
from cdm_fast.wgrad import DeferredLinear, defer_wgrad, deferred

FLOAT32_BOUND = 1e-6


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def mlp(widths: list[int], dtype=torch.float32) -> nn.Sequential:
    layers = []
    for d_in, d_out in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(d_in, d_out, dtype=dtype), nn.GELU()]
    return nn.Sequential(*layers[:-1])


def lora_stack(width: int = 37, depth: int = 3, r: int = 5) -> nn.Sequential:
    layers = []
    for _ in range(depth):
        layer = FusedLoraLinear.from_linear(nn.Linear(width, width), r=r, lora_alpha=2 * r, backend="torch")
        nn.init.normal_(layer.lora_B)
        layers += [layer, nn.Tanh()]
    return nn.Sequential(*layers)


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_grads_match(deferred_model, sync_model, bound=FLOAT32_BOUND):
    got, want = grads(deferred_model), grads(sync_model)
    assert got.keys() == want.keys() and got
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert rel_error(got[name], want[name]) <= bound, name


def test_deferred_linear_matches_nn_linear_and_keeps_state_dict():
    torch.manual_seed(0)
    reference = mlp([23, 45, 17, 9])
    model = copy.deepcopy(reference)
    assert defer_wgrad(model) == ["0", "2", "4"]
    assert all(type(model[i]) is DeferredLinear for i in (0, 2, 4))
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(3, 7, 23)
    with deferred() as wg:
        model(x).square().sum().backward()
        wg.flush()
        assert wg.pending == 0 and wg.tasks == 3
    reference(x).square().sum().backward()
    assert_grads_match(model, reference)


def test_grads_accumulate_over_micro_batches_as_autograd():
    torch.manual_seed(1)
    reference = mlp([19, 33, 5])
    model = copy.deepcopy(reference)
    defer_wgrad(model)
    for _ in range(3):
        x = torch.randn(11, 19)
        with deferred():
            model(x).sum().backward()
        reference(x).sum().backward()
        assert_grads_match(model, reference)
    grad_before = model[0].weight.grad
    with deferred():
        model(torch.randn(4, 19)).sum().backward()
    assert model[0].weight.grad is grad_before  # accumulated in place, as AccumulateGrad does


def test_autocast_bf16_matches_synchronous_path_and_keeps_param_dtype():
    torch.manual_seed(2)
    reference = mlp([21, 34, 13])
    defer_wgrad(reference)
    model = copy.deepcopy(reference)
    x = torch.randn(9, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with deferred():
            model(x).float().sum().backward()
        reference(x).float().sum().backward()
    assert_grads_match(model, reference)
    assert model[0].weight.grad.dtype == torch.float32
    plain = mlp([21, 34, 13])
    plain.load_state_dict(model.state_dict())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain(x).float().sum().backward()
    assert_grads_match(model, plain, bound=1e-2)


def test_lora_stack_grads_match_synchronous_path():
    torch.manual_seed(3)
    reference = lora_stack()
    model = copy.deepcopy(reference)
    x = torch.randn(2, 5, 37, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    for _ in range(2):
        with deferred() as wg:
            model(x).square().sum().backward()
        assert wg.tasks == 3
        reference(x_ref).square().sum().backward()
    assert_grads_match(model, reference)
    assert rel_error(x.grad, x_ref.grad) <= FLOAT32_BOUND


def test_fourier_projector_grads_match_synchronous_path():
    torch.manual_seed(4)
    reference = FourierProjector(13, 29, 7, sigma=0.3, learn_frequencies=True, backend="torch")
    model = copy.deepcopy(reference)
    x = torch.randn(17, 13)
    with deferred() as wg:
        model(x).square().sum().backward()
    assert wg.tasks == 1
    reference(x).square().sum().backward()
    assert_grads_match(model, reference)


def test_post_accumulate_hooks_fire_once_after_the_deferred_accumulation():
    torch.manual_seed(5)
    model = mlp([8, 12, 4])
    defer_wgrad(model)
    seen = []
    for name, param in model.named_parameters():
        param.register_post_accumulate_grad_hook(
            lambda p, name=name: seen.append((name, None if p.grad is None else p.grad.clone()))
        )
    with deferred():
        model(torch.randn(5, 8)).sum().backward()
    assert sorted(name for name, _ in seen) == sorted(name for name, _ in model.named_parameters())
    for name, grad_at_hook in seen:
        assert grad_at_hook is not None and torch.equal(grad_at_hook, model.get_parameter(name).grad)
    seen.clear()
    model(torch.randn(5, 8)).sum().backward()  # the hooks are back in place outside the context
    assert len(seen) == 4


def test_disabled_context_and_frozen_weights_take_the_ordinary_path():
    model = mlp([6, 6])
    defer_wgrad(model)
    with deferred(enabled=False) as wg:
        model(torch.randn(3, 6)).sum().backward()
    assert wg.tasks == 0 and model[0].weight.grad is not None
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    with deferred() as wg:
        model(torch.randn(3, 6, requires_grad=True)).sum().backward()
    assert wg.tasks == 0


def test_auto_is_off_on_cpu():
    with deferred(auto=True) as wg:
        assert not wg.enabled
    assert wgrad.auto_decision() is False or torch.cuda.is_available()


def test_no_memory_growth_over_100_steps():
    torch.manual_seed(6)
    model = mlp([16, 32, 16])
    defer_wgrad(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    refs = []
    for _ in range(100):
        x = torch.randn(8, 16)
        with deferred() as wg:
            y = model(x)
            refs.append(weakref.ref(y))
            y.sum().backward()
            del y
            wg.flush()
            assert wg.pending == 0 and not wg._held_hooks
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        refs.append(weakref.ref(x))
        del x
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_exception_inside_context_leaves_nothing_pending_and_hooks_restored():
    model = mlp([6, 6])
    defer_wgrad(model)
    fired = []
    model[0].weight.register_post_accumulate_grad_hook(lambda p: fired.append(1))
    with pytest.raises(RuntimeError, match="boom"):
        with deferred() as wg:
            model(torch.randn(3, 6)).sum().backward()
            raise RuntimeError("boom")
    assert wg.pending == 0 and not wgrad._active and wgrad.active() is None
    assert len(model[0].weight._post_accumulate_grad_hooks) == 1 and fired == [1]


def test_max_pending_must_be_positive():
    with pytest.raises(ValueError, match="max_pending"):
        with deferred(max_pending=0):
            pass


# ---------------------------------------------------------------- GPU: the overlap really happens


def _kernel_streams(trace_events) -> dict[int, list[tuple[float, float]]]:
    streams: dict[int, list[tuple[float, float]]] = {}
    for event in trace_events:
        if event.device_type == torch.autograd.DeviceType.CUDA and event.time_range.elapsed_us() > 0:
            stream = getattr(event, "stream", None) or 0
            streams.setdefault(stream, []).append((event.time_range.start, event.time_range.end))
    return streams


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_side_stream_kernels_overlap_default_stream_kernels_in_profile():
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(7)
    model = mlp([4096] * 9, dtype=torch.bfloat16).cuda()
    defer_wgrad(model)
    x = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        with deferred():
            model(x).float().sum().backward()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with deferred():
            model(x).float().sum().backward()
        torch.cuda.synchronize()
    intervals = _kernel_streams(prof.events())
    assert len(intervals) >= 2, f"kernels on one stream only: {list(intervals)}"
    main, *sides = sorted(intervals, key=lambda s: -len(intervals[s]))
    overlap = sum(
        max(0.0, min(e1, e2) - max(s1, s2))
        for side in sides
        for s1, e1 in intervals[side]
        for s2, e2 in intervals[main]
    )
    assert overlap > 0, "no side-stream kernel ran concurrently with a default-stream kernel"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_grads_match_synchronous_path_bf16_lora_and_linear():
    torch.manual_seed(8)
    reference = nn.Sequential(
        FusedLoraLinear.from_linear(nn.Linear(257, 257), r=32), nn.Tanh(), nn.Linear(257, 129)
    ).cuda()
    nn.init.normal_(reference[0].lora_B)
    defer_wgrad(reference)
    model = copy.deepcopy(reference)
    x = torch.randn(333, 257, device="cuda")
    for _ in range(2):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            with deferred(max_pending=1):
                model(x).float().square().sum().backward()
            reference(x).float().square().sum().backward()
    torch.cuda.synchronize()
    assert_grads_match(model, reference, bound=FLOAT32_BOUND)


def test_lora_triton_split_backward_matches_synchronous_path():
    from cdm_fast.dispatch import select

    torch.manual_seed(9)
    reference = nn.Sequential(
        FusedLoraLinear.from_linear(nn.Linear(37, 29), r=5, backend="triton"), nn.Tanh()
    )
    nn.init.normal_(reference[0].lora_B)
    x = torch.randn(19, 37, requires_grad=True)
    layer = reference[0]
    reason = None
    try:
        select("lora", "triton", x, layer.weight, layer.lora_A, layer.lora_B, None)
    except Exception as error:  # the Triton backend serves CPU tensors only under TRITON_INTERPRET=1
        reason = str(error)
    if reason is not None:
        pytest.skip(reason)
    model = copy.deepcopy(reference)
    x_ref = x.detach().clone().requires_grad_()
    with deferred():
        model(x).square().sum().backward()
    reference(x_ref).square().sum().backward()
    assert_grads_match(model, reference, bound=1e-5)
    assert rel_error(x.grad, x_ref.grad) <= 1e-5


@requires_triton
def test_projector_triton_split_backward_defers_the_weight_gemms_and_matches_synchronous_path(monkeypatch):
    from cdm_fast.kernels import projection as projection_kernels

    torch.manual_seed(10)
    reference = FourierProjector(13, 29, 7, sigma=0.3, learn_frequencies=True, backend="triton")
    model = copy.deepcopy(reference)
    x = torch.randn(17, 13, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    deferred_calls = []
    weight_grads = projection_kernels.weight_grads

    def recording_weight_grads(*args, **kwargs):
        deferred_calls.append(wgrad.active())
        return weight_grads(*args, **kwargs)

    monkeypatch.setattr(projection_kernels, "weight_grads", recording_weight_grads)
    with deferred() as wg:
        model(x).square().sum().backward()
    assert wg.tasks == 1 and len(deferred_calls) == 1
    reference(x_ref).square().sum().backward()
    assert_grads_match(model, reference, bound=1e-5)
    assert rel_error(x.grad, x_ref.grad) <= 1e-5
