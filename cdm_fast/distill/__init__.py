"""Distillation loops: `lora` (LoRA on high-CDM completions of the frozen model)."""

from cdm_fast.distill.lora import LoraDistillConfig, run

__all__ = ["LoraDistillConfig", "run"]
