"""`FusedLoraLinear`: a frozen `nn.Linear` plus a LoRA adapter, run as one `lora_linear` call."""

from __future__ import annotations

import math

import torch
from torch import nn

from cdm_fast.ops.lora import lora_linear

# peft's default (autocast_adapter_dtype=True) keeps adapters of half-precision bases in float32.
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class FusedLoraLinear(nn.Module):
    """y = x @ weightᵀ + bias + scaling · (dropout(x) @ lora_Aᵀ) @ lora_Bᵀ, scaling = lora_alpha / r.

    weight (out, in) and bias (out,) are `base`'s own Parameters, frozen (requires_grad is set to False on
    them); lora_A (r, in) is initialised like peft (kaiming-uniform, a=√5) and lora_B (out, r) to zeros, so
    the layer starts equal to `base`. The adapter lives on base's device, in base's dtype, or in float32 when
    base is float16/bfloat16 (peft's default). Dropout (p = lora_dropout) applies to the adapter's input in
    training mode only, with the op's counter-based mask.

    Input (..., in) float; output (..., out) in the input's dtype.
    """

    def __init__(
        self,
        base: nn.Linear,
        r: int,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected a positive int, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected 0 ≤ p < 1, got {lora_dropout!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r = r
        # alpha = r (scaling 1) unless given: the adapter's update then has the size its init gives it.
        self.lora_alpha = float(r if lora_alpha is None else lora_alpha)
        self.scaling = self.lora_alpha / r
        self.lora_dropout = float(lora_dropout)
        self.backend = backend
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.bias = base.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        adapter_dtype = torch.float32 if base.weight.dtype in _HALF_DTYPES else base.weight.dtype
        factory = {"device": base.weight.device, "dtype": adapter_dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        base: nn.Linear,
        r: int,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        *,
        backend: str | None = None,
    ) -> FusedLoraLinear:
        """The constructor under the name other front ends use: wraps `base` (sharing its Parameters)."""
        return cls(base, r, lora_alpha, lora_dropout, backend=backend)

    def reset_lora_parameters(self) -> None:
        """peft's init: lora_A as nn.Linear's default (kaiming-uniform, a=√5), lora_B zeros (y = base(x))."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lora_linear(
            x,
            self.weight,
            self.lora_A,
            self.lora_B,
            self.scaling,
            self.bias,
            dropout_p=self.lora_dropout,
            training=self.training,
            backend=self.backend,
        )

    @torch.no_grad()
    def merged_linear(self) -> nn.Linear:
        """A new nn.Linear: weight (out, in) + scaling · lora_B @ lora_A in weight's dtype, bias copied."""
        merged = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        # Sum in at least float32 so that a half-precision weight is rounded once, at the end.
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.scaling * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))
        merged.weight.copy_((self.weight.to(dtype) + delta).to(self.weight.dtype))
        if self.bias is not None:
            merged.bias.copy_(self.bias)
        return merged

    def extra_repr(self) -> str:
        fields = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"bias={self.bias is not None}",
            f"r={self.r}",
            f"lora_alpha={self.lora_alpha:g}",
            f"lora_dropout={self.lora_dropout:g}",
        ]
        if self.backend is not None:
            fields.append(f"backend={self.backend!r}")
        return ", ".join(fields)
