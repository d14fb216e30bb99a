"""Async weight-gradient pipelining: `with cdm_fast.wgrad.deferred() as wg: loss.backward()`.

A layer's backward is two independent halves: dx = dy @ W (on the critical path: the next layer down needs
it) and dW = dyᵀ @ x (needed only by the optimizer). Inside `deferred()`, the package's autograd Functions
return dx at once and hand dW to this module, which launches it on a side CUDA stream ordered by events
(producer on the current stream → event → side stream), so it overlaps the dgrad of the layers below.
Leaving the context (or `wg.flush()`) makes the current stream wait for the side stream.

Covered: `DeferredLinear` (a drop-in `nn.Linear`; `defer_wgrad(model)` swaps a model's Linears in place),
`cdm_fast.ops.lora` (d lora_A, d lora_B: split from dx on the Triton kernels; on the torch backend they are
computed at once and only their accumulation is deferred) and `cdm_fast.ops.projection` (d weight, d bias,
d freqs: computed at once, accumulation deferred). A gradient is deferred only when its tensor is a leaf that
requires grad (a Parameter passed as is, as the `cdm_fast.nn` modules do); anything else (casts, views,
bare non-leaf tensors) takes the ordinary synchronous path.

Semantics kept: the gradient lands in `param.grad` as AccumulateGrad would put it (first write assigns a
tensor of the parameter's dtype and layout, later writes add in place), so micro-batch accumulation, AMP
loss scaling (GradScaler unscales after the flush) and DDP's `no_sync` behave as without deferral.
Post-accumulate-grad hooks (`register_post_accumulate_grad_hook`, as DDP/FSDP use) of a deferred parameter
fire once per backward pass, at its end, after the deferred accumulation (on the side stream, so their
kernels are ordered after it). Limits: use `loss.backward()` (not `torch.autograd.grad`) inside the context;
a parameter's pre-accumulate `register_hook` hooks do not see deferred gradients; hooks placed on the
AccumulateGrad node itself (the C++ DDP reducer's) run when autograd reaches it, before the deferred
accumulation, so wrap DDP's backward in `deferred()` only under `no_sync()` (reduce after the flush);
eager mode only.

On CPU, or with `enabled=False`, nothing is deferred: on CPU the weight gradients are computed and
accumulated at once (same math, same order); `enabled=False` leaves every Function on its ordinary path.
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MAX_PENDING = 32
# auto=True: warm-up uses per mode, then timed uses per mode, before deciding.
_AUTO_WARMUP, _AUTO_TRIALS = 1, 3
# Deferral stays on under auto=True only if it saves at least this fraction of the timed region.
_AUTO_MIN_GAIN = 0.02

_active: list[Deferral] = []
_auto_decisions: dict[tuple[str, str], _AutoCalibration] = {}


class _AutoCalibration:
    """Alternates deferred / synchronous uses of one (device, key), then keeps the faster one."""

    def __init__(self) -> None:
        self.times: dict[bool, list[float]] = {True: [], False: []}
        self.uses = 0
        self.decision: bool | None = None

    def next_mode(self) -> bool:
        return self.decision if self.decision is not None else self.uses % 2 == 0

    def record(self, deferred: bool, ms: float) -> None:
        self.uses += 1
        if self.uses > 2 * _AUTO_WARMUP:
            self.times[deferred].append(ms)
        if min(len(v) for v in self.times.values()) >= _AUTO_TRIALS:
            on, off = (statistics.median(self.times[mode]) for mode in (True, False))
            self.decision = on < (1.0 - _AUTO_MIN_GAIN) * off


class Deferral:
    """The object `deferred()` yields: `flush()` waits for every launched weight-gradient task."""

    def __init__(self, max_pending: int | None, stream: torch.cuda.Stream | None, enabled: bool) -> None:
        if max_pending is not None and max_pending < 1:
            raise ValueError(f"max_pending: expected None or an int ≥ 1, got {max_pending!r}")
        self.max_pending = DEFAULT_MAX_PENDING if max_pending is None else max_pending
        self.enabled = enabled
        self._stream = stream
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[torch.cuda.Event] = []
        self._held_hooks: dict[int, tuple[torch.Tensor, list]] = {}
        self._callback_queued = False
        self.tasks = 0
        self.synchronous_tasks = 0

    @property
    def pending(self) -> int:
        """Launched tasks not yet known complete (0 after `flush()`)."""
        return len(self._pending)

    def wants(self, *params: torch.Tensor | None) -> bool:
        """True when the given weights (None: not requested) can be deferred: leaves that take a `.grad`."""
        given = [p for p in params if p is not None]
        return (
            self.enabled
            and bool(given)
            and all(isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad for p in given)
        )

    def submit(
        self,
        params: Sequence[torch.Tensor | None],
        inputs: Sequence[torch.Tensor],
        compute: Callable[..., Sequence[torch.Tensor | None]],
    ) -> None:
        """Runs `compute(*inputs)` → one gradient per param (None where params[i] is None) and accumulates.

        On CUDA it is launched on the side stream after an event on the current stream; the inputs are
        marked as used by the side stream and released as soon as the launch returns. On CPU, or when
        `max_pending` tasks are still running, it runs at once on the current stream.
        """
        self.tasks += 1
        self._hold_hooks(params)
        device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        if device.type != "cuda":
            self.synchronous_tasks += 1
            _accumulate_all(params, compute(*inputs))
            return
        self._pending = [event for event in self._pending if not event.query()]
        if len(self._pending) >= self.max_pending:
            self.synchronous_tasks += 1
            _accumulate_all(params, compute(*inputs))
            return
        current = torch.cuda.current_stream(device)
        side = self._side_stream(device)
        ready = torch.cuda.Event()
        ready.record(current)
        with torch.cuda.stream(side):
            side.wait_event(ready)
            for tensor in inputs:
                tensor.record_stream(side)
            _accumulate_all(params, compute(*inputs))
            for param in params:
                if param is not None and param.grad is not None:
                    # A first write allocates .grad on the side stream; the optimizer uses it on this one.
                    param.grad.record_stream(current)
            done = torch.cuda.Event()
            done.record(side)
        self._pending.append(done)

    def flush(self) -> None:
        """Makes every current stream wait for the side streams; nothing stays pending."""
        for device, side in self._side.items():
            torch.cuda.current_stream(device).wait_stream(side)
        self._pending.clear()

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side:
            self._side[device] = self._stream if self._stream is not None else torch.cuda.Stream(device)
        return self._side[device]

    def _hold_hooks(self, params: Sequence[torch.Tensor | None]) -> None:
        # AccumulateGrad fires post-accumulate hooks even for a None gradient: move them aside until the
        # end of the backward pass, when the deferred accumulations have been issued.
        for param in params:
            hooks = getattr(param, "_post_accumulate_grad_hooks", None) if param is not None else None
            if hooks and id(param) not in self._held_hooks:
                self._held_hooks[id(param)] = (param, list(hooks.items()))
                hooks.clear()
        if self._held_hooks and not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _restore_hooks(self) -> list[torch.Tensor]:
        params = []
        for param, items in self._held_hooks.values():
            param._post_accumulate_grad_hooks.update(items)
            params.append(param)
        self._held_hooks.clear()
        self._callback_queued = False
        return params

    def _end_of_backward(self) -> None:
        params = self._restore_hooks()
        device = next((p.device for p in params if p.device.type == "cuda"), None)
        context = torch.cuda.stream(self._side[device]) if device in self._side else contextlib.nullcontext()
        with context:
            for param in params:
                for hook in list(param._post_accumulate_grad_hooks.values()):
                    hook(param)

    def _close(self) -> None:
        self.flush()
        self._restore_hooks()


def _accumulate_all(params: Sequence[torch.Tensor | None], grads: Sequence[torch.Tensor | None]) -> None:
    for param, grad in zip(params, grads, strict=True):
        if param is not None and grad is not None:
            accumulate_grad(param, grad)


def accumulate_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """param.grad as AccumulateGrad leaves it: first write a tensor of param's dtype and strides, then +=."""
    with torch.no_grad():
        grad = grad.to(param.dtype)
        if param.grad is None:
            if grad.stride() != param.stride():
                grad = torch.empty_like(param).copy_(grad)
            param.grad = grad
        else:
            param.grad += grad


def active() -> Deferral | None:
    """The innermost enabled `deferred()` context, or None (then every Function runs synchronously)."""
    return _active[-1] if _active and _active[-1].enabled else None


@contextlib.contextmanager
def deferred(
    max_pending: int | None = None,
    stream: torch.cuda.Stream | None = None,
    enabled: bool = True,
    auto: bool | str = False,
) -> Iterator[Deferral]:
    """Defers weight-gradient GEMMs of the package's Functions to a side stream while active.

    Args:
        max_pending: launched tasks allowed in flight (default 32); beyond it a task runs synchronously.
        stream: the side stream (default: a new one per device).
        enabled: False makes the context a no-op (the synchronous path exactly).
        auto: True (or a string naming the workload) calibrates on the first uses of this (device, key):
            alternating deferred and synchronous uses, timing the body with CUDA events, then keeping
            deferral only if it saves ≥ 2%. Off on CPU.

    Yields the `Deferral`; on exit (an exception included) it flushes, so no work stays pending.
    """
    calibration = None
    if enabled and auto:
        if not torch.cuda.is_available():
            enabled = False
        else:
            key = (str(torch.device("cuda", torch.cuda.current_device())), str(auto))
            calibration = _auto_decisions.setdefault(key, _AutoCalibration())
            enabled = calibration.next_mode()
    deferral = Deferral(max_pending, stream, enabled)
    timing = None
    if calibration is not None and calibration.decision is None:
        timing = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        timing[0].record()
    _active.append(deferral)
    try:
        yield deferral
    finally:
        _active.remove(deferral)
        deferral._close()
    if timing is not None:
        timing[1].record()
        timing[1].synchronize()
        calibration.record(enabled, timing[0].elapsed_time(timing[1]))


def auto_decision(key: bool | str = True) -> bool | None:
    """What `deferred(auto=key)` decided on the current CUDA device: True/False, None while calibrating."""
    if not torch.cuda.is_available():
        return False
    calibration = _auto_decisions.get((str(torch.device("cuda", torch.cuda.current_device())), str(key)))
    return None if calibration is None else calibration.decision


# ---------------------------------------------------------------- DeferredLinear


class _DeferredLinearFunction(torch.autograd.Function):
    """y = x @ weightᵀ + bias; backward returns dx and, inside `deferred()`, defers dW = dyᵀx, db = Σdy."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        compute_dtype = weight.dtype
        if torch.is_autocast_enabled(x.device.type):
            # As F.linear under autocast: every operand in the autocast dtype.
            compute_dtype = torch.get_autocast_dtype(x.device.type)
        x_c, weight_c = x.to(compute_dtype), weight.to(compute_dtype)
        bias_c = bias.to(compute_dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x_c, weight_c, bias_c)
        ctx.save_for_backward(x_c, weight_c)
        ctx.params = (weight, bias)
        ctx.x_dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_c, weight_c = ctx.saved_tensors
        weight, bias = ctx.params
        needs_x, needs_weight, needs_bias = ctx.needs_input_grad
        grad_y = grad_y.to(weight_c.dtype)
        grad_x = (grad_y @ weight_c).to(ctx.x_dtype) if needs_x else None
        grad_y2d = grad_y.reshape(-1, grad_y.shape[-1])
        x2d = x_c.reshape(-1, x_c.shape[-1])

        def weight_grads(grad_y2d, x2d):
            grad_weight = grad_y2d.t() @ x2d if needs_weight else None
            grad_bias = grad_y2d.sum(0) if needs_bias else None
            return grad_weight, grad_bias

        params = (weight if needs_weight else None, bias if needs_bias else None)
        deferral = active()
        if deferral is not None and deferral.wants(*params):
            deferral.submit(params, (grad_y2d, x2d), weight_grads)
            return grad_x, None, None
        grad_weight, grad_bias = weight_grads(grad_y2d, x2d)
        return (
            grad_x,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            grad_bias.to(bias.dtype) if grad_bias is not None else None,
        )


class DeferredLinear(nn.Linear):
    """`nn.Linear` (same parameters and state_dict) whose weight gradients `deferred()` can defer.

    Without grad (or with frozen weight and bias) it is `F.linear`; otherwise its own Function computes
    the same products (in the autocast dtype under autocast, as `F.linear`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if not (torch.is_grad_enabled() and trains):
            return F.linear(x, self.weight, self.bias)
        return _DeferredLinearFunction.apply(x, self.weight, self.bias)


def defer_wgrad(model: nn.Module) -> list[str]:
    """Turns every plain `nn.Linear` of `model` (itself included) into a `DeferredLinear`, in place.

    The modules keep their identity, parameters, dtype, device, hooks and state_dict keys (only the class
    changes; `DeferredLinear` adds no state). Subclasses of `nn.Linear` are left alone. Returns the
    qualified names of the swapped modules ("" for the model itself).
    """
    swapped = []
    for name, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = DeferredLinear
            swapped.append(name)
    return swapped
