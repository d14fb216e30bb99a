"""`FourierProjector`: a teacher latent (d_in) mapped to the student width (d_out) by Fourier features."""

from __future__ import annotations

import torch
from torch import nn

from cdm_fast.float8 import Float8Scaling
from cdm_fast.ops.projection import PRECISIONS, fourier_projection


class FourierProjector(nn.Module):
    """y = concat(sin(2π·x@freqs), cos(2π·x@freqs)) / sqrt(m) @ weight + bias.

    freqs (d_in, m) ~ N(0, sigma²) from a generator seeded with `seed` (a buffer, or a parameter with
    `learn_frequencies=True`); weight (2m, d_out) ~ N(0, 1) so that, the features having unit norm, each
    output starts with unit variance; bias zeros. Choose sigma so that the phases x@freqs are O(1) turns
    (about 1/||x|| for latents of norm ||x||): larger sigma wraps the phases randomly.

    Input (..., d_in) of any float dtype; output (..., d_out) in the input's dtype.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        num_frequencies: int,
        sigma: float = 1.0,
        learn_frequencies: bool = False,
        precision: str = "bf16",
        seed: int = 0,
        bias: bool = True,
        fp8_scaling: Float8Scaling | None = None,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("d_in", d_in), ("d_out", d_out), ("num_frequencies", num_frequencies)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not sigma > 0:
            raise ValueError(f"sigma: expected a positive float, got {sigma!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        self.d_in, self.d_out, self.num_frequencies = d_in, d_out, num_frequencies
        self.sigma, self.precision, self.seed = sigma, precision, seed
        self.fp8_scaling, self.backend = fp8_scaling, backend
        generator = torch.Generator().manual_seed(seed)
        freqs = torch.randn(d_in, num_frequencies, generator=generator) * sigma
        if learn_frequencies:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)
        self.weight = nn.Parameter(torch.randn(2 * num_frequencies, d_out, generator=generator))
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fourier_projection(
            x,
            self.freqs,
            self.weight,
            self.bias,
            precision=self.precision,
            fp8_scaling=self.fp8_scaling,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"d_in={self.d_in}, d_out={self.d_out}, num_frequencies={self.num_frequencies}, "
            f"sigma={self.sigma}, learn_frequencies={isinstance(self.freqs, nn.Parameter)}, "
            f"precision={self.precision!r}"
        )
