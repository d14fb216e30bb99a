"""Drop the fused ops into models built by other libraries: peft's LoRA layers (`patch_peft`, in
`cdm_fast.patch.peft_lora`) and transformers' attention (`register_hf_attention`, in
`cdm_fast.patch.hf_attention`). `defer_wgrad` (from `cdm_fast.wgrad`) is here too: the third drop-in.
"""

from cdm_fast.patch.hf_attention import (
    ATTENTION_NAME,
    AttentionEntropy,
    attention_entropy_recorder,
    register_hf_attention,
)
from cdm_fast.patch.peft_lora import (
    EIGHT_BIT_REASON,
    QUANTIZED_REASON,
    PatchReport,
    is_patched,
    patch_peft,
    unpatch,
)
from cdm_fast.wgrad import defer_wgrad

__all__ = [
    "ATTENTION_NAME",
    "EIGHT_BIT_REASON",
    "QUANTIZED_REASON",
    "AttentionEntropy",
    "PatchReport",
    "attention_entropy_recorder",
    "defer_wgrad",
    "is_patched",
    "patch_peft",
    "register_hf_attention",
    "unpatch",
]
