"""nn.Module front ends of the ops."""

from cdm_fast.nn.lora import FusedLoraLinear
from cdm_fast.nn.projector import FourierProjector

__all__ = ["FourierProjector", "FusedLoraLinear"]
