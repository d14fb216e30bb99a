"""peft's LoRA layers on the fused op.

`patch_peft(model)` makes every supported peft `lora.Linear`, and every peft `lora.bnb.Linear4bit` (QLoRA:
the adapter over a bitsandbytes 4-bit base), run `cdm_fast.lora_linear` (one op for the base product and the
adapter) by overriding the module's `forward` on the instance: the module objects, their parameters,
state_dict keys and `save_pretrained` output stay exactly peft's, so adapters saved after patching are
ordinary peft adapters. The fused forward re-checks the layer's state on every call (adapters disabled,
merged, another active adapter, extra arguments) and hands anything it does not cover to peft's own forward,
so a patched model never computes something peft would not.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cdm_fast import quant
from cdm_fast.ops.lora import lora_linear

QUANTIZED_REASON = "quantized base other than bitsandbytes 4-bit"
EIGHT_BIT_REASON = "8-bit base is not supported (4-bit only)"
# peft modules that wrap a quantized base layer (bitsandbytes, GPTQ, AWQ, HQQ, ...) live in these files.
_QUANTIZED_PEFT_MODULES = ("bnb", "gptq", "awq", "aqlm", "eetq", "hqq", "torchao", "inc")
_QUANTIZED_BASE_PACKAGES = (
    "bitsandbytes",
    "auto_gptq",
    "gptqmodel",
    "awq",
    "hqq",
    "optimum",
    "torchao",
    "eetq",
)


@dataclass
class PatchReport:
    """What `patch_peft` did: the patched LoRA modules and, for every other LoRA module, why not.

    Names are `model.named_modules()` names. `undo()` restores the patched modules' own forwards.
    """

    patched: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def undo(self) -> list[str]:
        """Unpatch the modules this report patched; returns their names."""
        if self.model is None:
            return []
        restored = []
        for name in self.patched:
            if _unpatch_module(self.model.get_submodule(name)):
                restored.append(name)
        return restored

    def __str__(self) -> str:
        rows = [(name, "patched") for name in self.patched]
        rows += [(name, f"skipped: {reason}") for name, reason in self.skipped.items()]
        header = f"cdm_fast.patch_peft: {len(self.patched)} patched, {len(self.skipped)} skipped"
        if not rows:
            return header + " (no LoRA modules found)"
        width = max(len("module"), *(len(name) for name, _ in rows))
        lines = [header, f"{'module':<{width}}  status", f"{'-' * width}  {'-' * 6}"]
        lines += [f"{name:<{width}}  {status}" for name, status in rows]
        return "\n".join(lines)


def patch_peft(model: nn.Module, *, backend: str | None = None) -> PatchReport:
    """Make every supported peft LoRA Linear in `model` run the fused `lora_linear` op.

    Works on a `PeftModel` and on any module tree with adapters injected by `peft.inject_adapter_in_model`.
    Supported: a peft `lora.Linear` over an unquantised `nn.Linear` (not fan_in_fan_out), or a peft
    `lora.bnb.Linear4bit` over a `bitsandbytes.nn.Linear4bit` whose quantised weight
    `cdm_fast.quant.from_bitsandbytes` reads (NF4/FP4, double quantisation or not, in the standard layout or
    the one bitsandbytes repacks to on AVX512-BF16 CPUs); not merged, with exactly one active adapter that is
    vanilla LoRA (no DoRA or other variant, no lora_bias) and whose dropout is `nn.Identity` or `nn.Dropout`.
    Every other LoRA module is left untouched and listed in `report.skipped` with its reason. Patching twice
    does not wrap twice (the backend is updated).

    Args:
        model: the model to patch in place.
        backend: passed to `lora_linear` (None/"auto", "torch", "triton", "cuda").

    Returns:
        A `PatchReport`; `report.undo()` or `unpatch(model)` restores peft's forwards.
    """
    from peft.tuners.lora import LoraLayer

    report = PatchReport(model=model)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        reason = _unsupported_reason(module)
        forward = module.__dict__.get("forward")
        if reason is None and forward is not None and not _is_fused_forward(forward):
            reason = "forward already overridden on the instance (e.g. an accelerate hook)"
        if reason is not None:
            report.skipped[name] = reason
            continue
        # A partial of a module-level function (not a bound method) keeps the module picklable.
        module.forward = functools.partial(_fused_forward, module, backend)
        report.patched.append(name)
    return report


def unpatch(model: nn.Module) -> list[str]:
    """Restore peft's own forward on every module `patch_peft` patched; returns their names."""
    return [name for name, module in model.named_modules() if _unpatch_module(module)]


def is_patched(module: nn.Module) -> bool:
    """Whether `module`'s forward is the fused one installed by `patch_peft`."""
    forward = module.__dict__.get("forward")
    return forward is not None and _is_fused_forward(forward)


def _unpatch_module(module: nn.Module) -> bool:
    if not is_patched(module):
        return False
    del module.__dict__["forward"]
    return True


def _is_fused_forward(forward: Any) -> bool:
    return isinstance(forward, functools.partial) and forward.func is _fused_forward


def _bnb_class(name: str) -> type | None:
    """`bitsandbytes.nn.<name>`, or None when bitsandbytes was never imported (then no such layer exists)."""
    return getattr(sys.modules.get("bitsandbytes.nn"), name, None)


def _is_bnb_4bit(module: nn.Module) -> bool:
    """Whether `module` is peft's `lora.bnb.Linear4bit`: LoRA over a bitsandbytes 4-bit Linear."""
    linear4bit = _bnb_class("Linear4bit")
    return (
        linear4bit is not None
        and type(module).__module__ == "peft.tuners.lora.bnb"
        and type(module).__name__ == "Linear4bit"
        and isinstance(module.get_base_layer(), linear4bit)
    )


def _is_bnb_8bit(module: nn.Module) -> bool:
    linear8bit = _bnb_class("Linear8bitLt")
    return type(module).__name__ == "Linear8bitLt" or (
        linear8bit is not None and isinstance(module.get_base_layer(), linear8bit)
    )


def _quantized(module: nn.Module) -> bool:
    peft_file = type(module).__module__.rsplit(".", 1)[-1]
    if type(module).__module__.startswith("peft.") and peft_file in _QUANTIZED_PEFT_MODULES:
        return True
    base = module.get_base_layer()
    weight = getattr(base, "weight", None)
    classes = (type(base), type(weight))
    return any(cls.__module__.split(".")[0] in _QUANTIZED_BASE_PACKAGES for cls in classes)


def _base_4bit_reason(base: nn.Module) -> str | None:
    """Why the fused op cannot read `base` (a bitsandbytes Linear4bit) as it is now, or None when it can."""
    linear4bit = _bnb_class("Linear4bit")
    if type(base).forward is not linear4bit.forward:
        return f"base layer {type(base).__name__} overrides bitsandbytes' Linear4bit.forward"
    try:
        quant.from_bitsandbytes(base.weight)
    except ValueError as error:
        return f"4-bit weight not readable: {error}"
    return None


def _unsupported_reason(module: nn.Module) -> str | None:
    """Why the fused op cannot compute `module`'s forward in its current state, or None when it can."""
    from peft.tuners.lora import Linear as LoraLinear

    if _is_bnb_4bit(module):
        reason = _base_4bit_reason(module.get_base_layer())
        if reason is not None:
            return reason
    elif _is_bnb_8bit(module):
        return EIGHT_BIT_REASON
    elif _quantized(module):
        return QUANTIZED_REASON
    elif not isinstance(module, LoraLinear):
        return f"not a LoRA Linear layer ({type(module).__module__}.{type(module).__name__})"
    elif type(module.base_layer) is not nn.Linear:
        return f"base layer is {type(module.base_layer).__name__}, not nn.Linear"
    elif module.fan_in_fan_out:
        return "fan_in_fan_out (transposed base weight)"
    if module.merged:
        return f"merged adapter weights ({', '.join(module.merged_adapters)})"
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters ({', '.join(active)}); the fused op runs exactly one"
    return _adapter_reason(module, active[0])


def _adapter_reason(module: nn.Module, adapter: str) -> str | None:
    if module.use_dora.get(adapter, False) or adapter in module.lora_magnitude_vector:
        return f"DoRA (use_dora) on adapter {adapter!r}"
    variant = module.lora_variant.get(adapter)
    if variant is not None:
        return f"LoRA variant {type(variant).__name__} on adapter {adapter!r}"
    if module.lora_bias.get(adapter, False) or module.lora_B[adapter].bias is not None:
        return f"lora_bias on adapter {adapter!r}"
    if type(module.lora_A[adapter]) is not nn.Linear or type(module.lora_B[adapter]) is not nn.Linear:
        return f"adapter {adapter!r} weights are not plain nn.Linear"
    dropout = module.lora_dropout[adapter]
    if type(dropout) not in (nn.Identity, nn.Dropout):
        return f"lora_dropout is {type(dropout).__name__}, not nn.Identity or nn.Dropout"
    if not isinstance(module.scaling[adapter], (int, float)):
        return f"scaling of adapter {adapter!r} is {type(module.scaling[adapter]).__name__}, not a float"
    return None


def _fused_forward(module: nn.Module, backend: str | None, x: torch.Tensor, *args: Any, **kwargs: Any):
    # Decided per call, not at patch time: disable_adapter(), set_adapter(), merge() and peft's extra
    # arguments (adapter_names for mixed batches, variant kwargs) all change what the layer must compute.
    base = module.base_layer
    if (
        args
        or kwargs
        or module.disable_adapters
        or base._forward_hooks
        or base._forward_pre_hooks
        or _unsupported_reason(module) is not None
    ):
        return type(module).forward(module, x, *args, **kwargs)
    adapter = next(name for name in module.active_adapters if name in module.lora_A)
    dropout = module.lora_dropout[adapter]
    if _is_bnb_4bit(module):
        if torch.is_autocast_enabled(x.device.type):
            # bitsandbytes' 4-bit matmul and peft's adapter-dtype handling under autocast are not mirrored.
            return type(module).forward(module, x, *args, **kwargs)
        return _fused_4bit_forward(module, adapter, backend, x)
    if torch.is_autocast_enabled(x.device.type):
        # peft's base_layer(x) runs F.linear in the autocast dtype, and its result dtype is the layer's.
        x = x.to(torch.get_autocast_dtype(x.device.type))
    return lora_linear(
        x,
        base.weight,
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        float(module.scaling[adapter]),
        base.bias,
        dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        # peft applies dropout when the dropout module is in training mode; that flag is the one to follow.
        training=dropout.training,
        backend=backend,
    )


def _fused_4bit_forward(
    module: nn.Module, adapter: str, backend: str | None, x: torch.Tensor
) -> torch.Tensor:
    # As bitsandbytes' Linear4bit.forward: the first input's dtype may fix compute_dtype, x and bias run in
    # compute_dtype (bias.data is cast in place), the result comes back in x's dtype. peft adds the adapter,
    # computed in its own dtype, cast to that same result dtype; the fused op computes it in compute_dtype.
    base = module.base_layer
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    input_dtype = x.dtype
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    bias = base.bias
    if bias is not None:
        if bias.dtype != x.dtype:
            bias.data = bias.data.to(x.dtype)
        bias = bias.to(x.dtype)
    dropout = module.lora_dropout[adapter]
    y = lora_linear(
        x,
        base.weight,
        module.lora_A[adapter].weight,
        module.lora_B[adapter].weight,
        float(module.scaling[adapter]),
        bias,
        dropout_p=dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
        training=dropout.training,
        backend=backend,
    )
    return y.to(input_dtype)
