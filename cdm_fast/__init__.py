"""cdm-fast: Triton and CUDA kernels for distillation on one consumer Blackwell GPU.

Each op has a plain-torch reference (`cdm_fast.ops.<name>.reference`) that defines what it computes,
and dispatches to the CUDA extension, Triton or torch (see `cdm_fast.dispatch`).
"""

from cdm_fast import wgrad
from cdm_fast.dispatch import BackendUnavailable
from cdm_fast.ops.attention import block_sparse_attention
from cdm_fast.ops.lora import lora_linear
from cdm_fast.ops.projection import fourier_projection

__version__ = "0.1.0"
__all__ = [
    "BackendUnavailable",
    "block_sparse_attention",
    "fourier_projection",
    "lora_linear",
    "wgrad",
    "__version__",
]
