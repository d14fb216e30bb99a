"""Every Triton kernel of the package, as the ahead-of-time check (`python -m bench.aot`, tests/test_aot.py)
compiles it: its argument types per variant, the constexpr variants it is launched with, and the instructions
it must compile to on each architecture.

The configs are never listed here: they are the kernel's own autotune list (`kernel.configs`), and the shared
memory pruning is the kernel's own `early_config_prune`. The signatures describe the launch the launchers
make in the common case (16-byte aligned pointers, unit innermost strides, other sizes and strides multiples
of 16): the case Triton pipelines deepest, so the one with the largest shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import attention, lora, projection

# Architectures checked, as (major, minor) compute capability.
SM_90 = (9, 0)
SM_120 = (12, 0)
ARCHS = (SM_90, SM_120)

# @triton.jit functions that are called from kernels, never launched.
HELPERS = frozenset(
    {
        "grouped_tile",
        "_round_to_e4m3_grid",
        "to_e4m3",
        "cast",
        "dot_in_dtype",
        "load_tile",
        "store_tile",
        "hash32",
        "dropout_keep",
        "load_4bit_tile",
        "load_base_weight_tile",
        "_mx_scale_exponent",
        "_sin_cos_of_turns",
        "_dot",
        "_visible",
    }
)

# PTX every variant of a kind must contain, per architecture (regular expressions).
_E4M3_CAST = r"cvt\.rn\.satfinite\.e4m3x2\.f32"
# libdevice.fast_sinf: the hardware sine on a reduced argument, not libdevice's full range reduction.
_FAST_SINE = r"sin\.approx(\.ftz)?\.f32"
MMA_FORMS = {
    "bf16": {SM_90: r"wgmma\.mma_async\S*\.bf16\.bf16", SM_120: r"mma\.sync\S*\.bf16\.bf16"},
    "fp16": {SM_90: r"wgmma\.mma_async\S*\.f16\.f16", SM_120: r"mma\.sync\S*\.f16\.f16"},
    # fp32 operands go through FMAs (input_precision="ieee"), never tf32 MMAs.
    "fp32": {SM_90: r"fma\.rn\.f32", SM_120: r"fma\.rn\.f32"},
    "rowwise": {SM_90: r"wgmma\.mma_async\S*\.e4m3\.e4m3", SM_120: r"mma\.sync\S*\.e4m3\.e4m3"},
    # sm_90 has no block-scaled MMA: Triton upcasts MX operands to bf16 for wgmma (rowwise is its recipe).
    "mx": {
        SM_90: r"wgmma\.mma_async\S*\.bf16\.bf16",
        SM_120: r"mma\.sync\S*kind::mxf8f6f4\.block_scale\S*\.e4m3\.e4m3",
    },
}
_FORBIDDEN = {"fp32": r"\.tf32"}

_TRITON_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Variant:
    """One specialisation of a kernel: Triton type per argument ("*bf16", "i32", "fp32", "constexpr"), the
    values of its non-config constexprs, and the PTX it must and must not contain per architecture."""

    name: str
    signature: dict[str, str]
    constexprs: dict[str, Any]
    required: dict[tuple[int, int], tuple[str, ...]]
    forbidden: tuple[str, ...] = ()
    # False: CI compiles, per arch, only the first config the pruner keeps there (`bench.aot --all`: all).
    every_config: bool = True

    @property
    def divisible_by_16(self) -> tuple[str, ...]:
        """Arguments the launch specialises as multiples of 16: pointers and integer sizes and strides."""
        return tuple(name for name, kind in self.signature.items() if kind.startswith("*") or kind == "i32")


@dataclass(frozen=True)
class KernelEntry:
    """A launched Triton kernel: the autotuner object (its `.fn`, `.configs`, `.early_config_prune`)."""

    name: str
    kernel: Any
    variants: tuple[Variant, ...] = field(default_factory=tuple)

    @property
    def fn(self):
        return self.kernel.fn

    @property
    def configs(self):
        return self.kernel.configs


def _variant(
    kernel,
    name: str,
    pointers: dict[str, str | None],
    constexprs: dict[str, Any],
    required: dict[tuple[int, int], tuple[str, ...]],
    *,
    unit_strides: tuple[str, ...] = (),
    floats: tuple[str, ...] = (),
    forbidden: tuple[str, ...] = (),
    every_config: bool = True,
) -> Variant:
    """The signature in the kernel's argument order: pointers as given (None: a constexpr None, an absent
    operand), unit strides and constexprs as constexpr, `floats` as fp32, every other argument i32."""
    config_keys = set(kernel.configs[0].kwargs)
    values = dict(constexprs)
    signature = {}
    for arg in kernel.fn.arg_names:
        if arg in pointers:
            signature[arg] = pointers[arg] or "constexpr"
            if pointers[arg] is None:
                values[arg] = None
        elif arg in unit_strides:
            signature[arg] = "constexpr"
            values[arg] = 1
        elif arg in constexprs or arg in config_keys:
            signature[arg] = "constexpr"
        elif arg in floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
    missing = set(values) - set(signature)
    assert not missing, f"{name}: {sorted(missing)} are not arguments of {kernel.fn.__name__}"
    return Variant(name, signature, values, required, forbidden, every_config)


def _input_precision(dtype: str) -> str:
    return "ieee" if dtype == "fp32" else "tf32"


def _mma(kind: str) -> dict[tuple[int, int], tuple[str, ...]]:
    return {arch: (pattern,) for arch, pattern in MMA_FORMS[kind].items()}


def _with(required: dict[tuple[int, int], tuple[str, ...]], *patterns: str):
    return {arch: (*found, *patterns) for arch, found in required.items()}


def _quantize_variants(kernel, scales: str) -> tuple[Variant, ...]:
    required = {arch: (_E4M3_CAST, r"div\.rn\.f32") for arch in ARCHS}
    return tuple(
        _variant(
            kernel,
            dtype,
            {"t_ptr": _TRITON_DTYPES[dtype], "codes_ptr": "*fp8e4nv", "scales_ptr": scales},
            {"INTERPRET": False},
            required,
            unit_strides=("stride_t_k", "stride_codes_k", "stride_scales_block"),
        )
        for dtype in ("bf16", "fp16", "fp32")
    )


def _features_variants() -> tuple[Variant, ...]:
    kernel = projection._features_kernel
    variants = []
    # precision "bf16" (F in x.dtype) and "fp8-features" (F as e4m3 codes), both with a plain GEMM.
    for dtype in ("bf16", "fp16", "fp32"):
        for features_fp8 in (False, True):
            operand = _TRITON_DTYPES[dtype]
            required = _with(_mma(dtype), _FAST_SINE)
            variants.append(
                _variant(
                    kernel,
                    f"plain-{dtype}" + ("-fp8-features" if features_fp8 else ""),
                    {
                        "x_ptr": operand,
                        "x_scale_ptr": None,
                        "freqs_ptr": operand,
                        "freqs_scale_ptr": None,
                        "features_ptr": "*fp8e4nv" if features_fp8 else operand,
                    },
                    {
                        "MODE": "plain",
                        "FEATURES_FP8": features_fp8,
                        "INPUT_PRECISION": _input_precision(dtype),
                        "INTERPRET": False,
                    },
                    _with(required, _E4M3_CAST) if features_fp8 else required,
                    unit_strides=("stride_x_k", "stride_freqs_n", "stride_features_n"),
                    forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                    every_config=dtype == "bf16",
                )
            )
    # precision "fp8": K-major e4m3 codes of both operands (the quantise kernels store them so).
    for mode, scales in (("rowwise", "*fp32"), ("mx", "*u8")):
        variants.append(
            _variant(
                kernel,
                mode,
                {
                    "x_ptr": "*fp8e4nv",
                    "x_scale_ptr": scales,
                    "freqs_ptr": "*fp8e4nv",
                    "freqs_scale_ptr": scales,
                    "features_ptr": "*fp8e4nv",
                },
                {"MODE": mode, "FEATURES_FP8": True, "INPUT_PRECISION": "tf32", "INTERPRET": False},
                _with(_mma(mode), _E4M3_CAST, _FAST_SINE),
                unit_strides=(
                    ("stride_x_k", "stride_freqs_k", "stride_features_n")
                    + (("stride_x_scale_k", "stride_freqs_scale_k") if mode == "mx" else ())
                ),
            )
        )
    return tuple(variants)


def _output_variants() -> tuple[Variant, ...]:
    kernel = projection._output_kernel
    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        operand = _TRITON_DTYPES[dtype]
        variants.append(
            _variant(
                kernel,
                f"plain-{dtype}",
                {
                    "features_ptr": operand,
                    "weight_ptr": operand,
                    "weight_scale_ptr": None,
                    "bias_ptr": operand,
                    "y_ptr": operand,
                },
                {"MODE": "plain", "INPUT_PRECISION": _input_precision(dtype), "INTERPRET": False},
                _mma(dtype),
                unit_strides=("stride_features_k", "stride_weight_n", "stride_bias", "stride_y_n"),
                floats=("inverse_sqrt_m",),
                forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                every_config=dtype == "bf16",
            )
        )
    for mode, scales in (("rowwise", "*fp32"), ("mx", "*u8")):
        for dtype in ("bf16", "fp16"):
            variants.append(
                _variant(
                    kernel,
                    f"{mode}-{dtype}",
                    {
                        "features_ptr": "*fp8e4nv",
                        "weight_ptr": "*fp8e4nv",
                        "weight_scale_ptr": scales,
                        "bias_ptr": _TRITON_DTYPES[dtype],
                        "y_ptr": _TRITON_DTYPES[dtype],
                    },
                    {"MODE": mode, "INPUT_PRECISION": "tf32", "INTERPRET": False},
                    _mma(mode),
                    unit_strides=("stride_features_k", "stride_weight_k", "stride_bias", "stride_y_n")
                    + (("stride_weight_scale_k",) if mode == "mx" else ()),
                    floats=("inverse_sqrt_m",),
                    every_config=dtype == "bf16",
                )
            )
    return tuple(variants)


def _phase_grad_variants() -> tuple[Variant, ...]:
    kernel = projection._phase_grad_kernel
    return tuple(
        _variant(
            kernel,
            dtype,
            {
                name: _TRITON_DTYPES[dtype]
                for name in (
                    "x_ptr",
                    "freqs_ptr",
                    "grad_y_ptr",
                    "weight_ptr",
                    "grad_phase_ptr",
                    "features_ptr",
                )
            },
            {"INPUT_PRECISION": _input_precision(dtype), "INTERPRET": False},
            _with(_mma(dtype), _FAST_SINE),
            unit_strides=(
                "stride_x_k",
                "stride_freqs_n",
                "stride_grad_y_k",
                "stride_weight_k",
                "stride_grad_phase_n",
                "stride_features_n",
            ),
            floats=("inverse_sqrt_m",),
            forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
            every_config=dtype == "bf16",
        )
        for dtype in ("bf16", "fp16", "fp32")
    )


def _matmul_variants() -> tuple[Variant, ...]:
    # backward's three products: grad_weight = Fᵀ grad_y reads A transposed (M-major), the others row-major.
    kernel = projection._matmul_kernel
    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        for layout, unit in (("a-row-major", "stride_a_k"), ("a-transposed", "stride_a_m")):
            variants.append(
                _variant(
                    kernel,
                    f"{dtype}-{layout}",
                    {name: _TRITON_DTYPES[dtype] for name in ("a_ptr", "b_ptr", "c_ptr")},
                    {"INPUT_PRECISION": _input_precision(dtype), "INTERPRET": False},
                    _mma(dtype),
                    unit_strides=(unit, "stride_b_n", "stride_c_n"),
                    forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                    every_config=dtype == "bf16",
                )
            )
    return tuple(variants)


def _any_mma(dtype: str) -> dict[tuple[int, int], tuple[str, ...]]:
    """Either MMA form: a skinny tile (16 rows, or r = 16 columns) may not fill a wgmma warpgroup on sm_90."""
    if dtype == "fp32":
        return _mma(dtype)
    name = "bf16" if dtype == "bf16" else "f16"
    return {arch: (rf"(wgmma\.mma_async|mma\.sync)\S*\.{name}\.{name}",) for arch in ARCHS}


# The rank most adapters use (r = 32) pads to this tile.
_LORA_RANK_BLOCK = 32


def _lora_matmul_variants(kernel, decode: bool = False) -> tuple[Variant, ...]:
    variants = []
    # forward: w = weight (out, in) row-major; dgrad: w = weightᵀ, read N-major. "4bit": a double-quantised
    # bitsandbytes base (codes, uint8 absmax with its nested tables), read through its own strides.
    roles = (
        ("forward-mainloop-dropout", "stride_w_k", {"COMPUTE_T": True, "INPUT_DROPOUT": True}),
        ("forward-separate", "stride_w_k", {"COMPUTE_T": False, "INPUT_DROPOUT": False}),
        ("dgrad-mainloop-dropout", "stride_w_n", {"COMPUTE_T": True, "EPILOGUE_DROPOUT": True}),
        ("forward-4bit", "stride_w_k", {"COMPUTE_T": True, "WEIGHT_4BIT": True, "DOUBLE_QUANT": True}),
        ("dgrad-4bit", "stride_w_n", {"COMPUTE_T": True, "EPILOGUE_DROPOUT": True, "WEIGHT_4BIT": True}),
    )
    for dtype in ("bf16", "fp16", "fp32"):
        operand = _TRITON_DTYPES[dtype]
        for role, unit, flags in roles:
            if decode and not flags["COMPUTE_T"]:
                continue  # the decode path always computes t in the mainloop
            if "4bit" in role and dtype != "bf16":
                continue  # the 4-bit decode is dtype-independent up to the final cast
            constexprs = {
                "RANK_BLOCK": _LORA_RANK_BLOCK,
                "COMPUTE_T": False,
                "INPUT_DROPOUT": False,
                "EPILOGUE_DROPOUT": False,
                "WEIGHT_4BIT": False,
                "DOUBLE_QUANT": False,
                **flags,
                "INPUT_PRECISION": _input_precision(dtype),
                "INTERPRET": False,
            }
            pointers = {
                name: operand for name in ("a_ptr", "w_ptr", "down_ptr", "up_ptr", "t_ptr", "out_ptr")
            }
            pointers["bias_ptr"] = operand if role.startswith("forward") else None
            if constexprs["WEIGHT_4BIT"]:
                double = constexprs["DOUBLE_QUANT"]
                pointers.update(
                    w_ptr="*u8",
                    w_absmax_ptr="*u8" if double else "*fp32",
                    w_code_ptr="*fp32",
                    w_nested_absmax_ptr="*fp32" if double else None,
                    w_nested_code_ptr="*fp32" if double else None,
                )
            else:
                pointers.update(
                    w_absmax_ptr=None, w_code_ptr=None, w_nested_absmax_ptr=None, w_nested_code_ptr=None
                )
            variants.append(
                _variant(
                    kernel,
                    f"{dtype}-{role}",
                    pointers,
                    constexprs,
                    _any_mma(dtype) if decode else _mma(dtype),
                    unit_strides=("stride_a_k", "stride_out_n", "stride_t_r")
                    + (() if constexprs["WEIGHT_4BIT"] else (unit,))
                    + (("stride_bias",) if role.startswith("forward") else ()),
                    floats=("epilogue_scale", "dropout_rescale", "w_offset"),
                    forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                    every_config=dtype == "bf16" and role in ("forward-separate", "forward-mainloop-dropout"),
                )
            )
    return tuple(variants)


def _lora_splitk_variants() -> tuple[Variant, ...]:
    # Dense bases with and without input dropout, and a double-quantised 4-bit base; out and u are fp32
    # accumulators (atomics), whatever the operands' dtype.
    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        operand = _TRITON_DTYPES[dtype]
        for role, flags in (
            ("plain", {}),
            ("dropout", {"INPUT_DROPOUT": True}),
            ("4bit", {"WEIGHT_4BIT": True, "DOUBLE_QUANT": True}),
        ):
            if role == "4bit" and dtype != "bf16":
                continue  # the 4-bit decode is dtype-independent up to the final cast
            constexprs = {
                "RANK_BLOCK": _LORA_RANK_BLOCK,
                "INPUT_DROPOUT": False,
                "WEIGHT_4BIT": False,
                "DOUBLE_QUANT": False,
                **flags,
                "INPUT_PRECISION": _input_precision(dtype),
                "INTERPRET": False,
            }
            pointers = {name: operand for name in ("x_ptr", "w_ptr", "lora_A_ptr", "lora_B_ptr", "bias_ptr")}
            pointers.update(u_ptr="*fp32", out_ptr="*fp32")
            if constexprs["WEIGHT_4BIT"]:
                pointers.update(
                    w_ptr="*u8",
                    w_absmax_ptr="*u8",
                    w_code_ptr="*fp32",
                    w_nested_absmax_ptr="*fp32",
                    w_nested_code_ptr="*fp32",
                )
            else:
                pointers.update(
                    w_absmax_ptr=None, w_code_ptr=None, w_nested_absmax_ptr=None, w_nested_code_ptr=None
                )
            variants.append(
                _variant(
                    lora._lora_splitk_kernel,
                    f"{dtype}-{role}",
                    pointers,
                    constexprs,
                    _any_mma(dtype),
                    unit_strides=("stride_x_k", "stride_out_n", "stride_u_r", "stride_bias")
                    + (() if constexprs["WEIGHT_4BIT"] else ("stride_w_k",)),
                    floats=("scaling", "dropout_rescale", "w_offset"),
                    forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                    every_config=dtype == "bf16" and role == "plain",
                )
            )
    return tuple(variants)


def _lora_down_variants() -> tuple[Variant, ...]:
    kernel = lora._lora_down_kernel
    return tuple(
        _variant(
            kernel,
            f"{dtype}-{'dropout' if dropout else 'plain'}",
            {name: _TRITON_DTYPES[dtype] for name in ("a_ptr", "down_ptr", "t_ptr")},
            {
                "RANK_BLOCK": _LORA_RANK_BLOCK,
                "INPUT_DROPOUT": dropout,
                "INPUT_PRECISION": _input_precision(dtype),
                "INTERPRET": False,
            },
            _any_mma(dtype),
            unit_strides=("stride_a_k", "stride_down_k", "stride_t_r"),
            floats=("dropout_rescale",),
            forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
            every_config=dtype == "bf16",
        )
        for dtype in ("bf16", "fp16", "fp32")
        for dropout in (False, True)
    )


def _lora_weight_grad_variants() -> tuple[Variant, ...]:
    kernel = lora._lora_weight_grad_kernel
    variants = []
    # d lora_A = vᵀ (keep ⊙ x): P = r, Q = in; d lora_B = dyᵀ u: P = out, Q = r. Both read M-major tiles.
    for dtype in ("bf16", "fp16", "fp32"):
        for name, block_p, block_q, dropout in (
            ("grad-A-dropout", _LORA_RANK_BLOCK, 64, True),
            ("grad-B", 64, _LORA_RANK_BLOCK, False),
        ):
            variants.append(
                _variant(
                    kernel,
                    f"{dtype}-{name}",
                    {
                        "left_ptr": _TRITON_DTYPES[dtype],
                        "right_ptr": _TRITON_DTYPES[dtype],
                        "partial_ptr": "*fp32",
                    },
                    {
                        "RIGHT_DROPOUT": dropout,
                        "INPUT_PRECISION": _input_precision(dtype),
                        "INTERPRET": False,
                        "BLOCK_P": block_p,
                        "BLOCK_Q": block_q,
                    },
                    _any_mma(dtype),
                    unit_strides=("stride_left_p", "stride_right_q", "stride_partial_q"),
                    forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                    every_config=dtype == "bf16",
                )
            )
    return tuple(variants)


# Attention: the head dims models use (each a constexpr, the tile width BLOCK_D) and the default block size.
_ATTENTION_HEAD_DIMS = (64, 128, 256)
_ATTENTION_BLOCK_SIZE = 128
_ATTENTION_STRIDES = {
    "forward": (
        "stride_q_d",
        "stride_k_d",
        "stride_v_d",
        "stride_kpm_s",
        "stride_out_d",
        "stride_lse_s",
        "stride_entropy_s",
        "stride_blocks_j",
    ),
    "dkdv": (
        "stride_q_d",
        "stride_k_d",
        "stride_v_d",
        "stride_grad_d",
        "stride_kpm_s",
        "stride_dk_d",
        "stride_dv_d",
        "stride_blocks_j",
    ),
    "dq": (
        "stride_q_d",
        "stride_k_d",
        "stride_v_d",
        "stride_grad_d",
        "stride_kpm_s",
        "stride_dq_d",
        "stride_blocks_j",
    ),
}


def _attention_variants(kernel, role: str) -> tuple[Variant, ...]:
    """dtype × head dim (× entropy for forward), causal with a key-padding mask (the most masking); CI
    compiles every config of bf16 D = 128 only (the others: the first config the pruner keeps)."""
    variants = []
    for dtype in ("bf16", "fp16", "fp32"):
        operand = _TRITON_DTYPES[dtype]
        for head_dim in _ATTENTION_HEAD_DIMS:
            for entropy in (True, False) if role == "forward" else (None,):
                pointers = {
                    name: operand
                    for name in (
                        "q_ptr",
                        "k_ptr",
                        "v_ptr",
                        "grad_out_ptr",
                        "out_ptr",
                        "dq_ptr",
                        "dk_ptr",
                        "dv_ptr",
                    )
                }
                pointers.update(
                    kpm_ptr="*u8",
                    lse_ptr="*fp32",
                    delta_ptr="*fp32",
                    kv_blocks_ptr="*i32",
                    kv_counts_ptr="*i32",
                    q_blocks_ptr="*i32",
                    q_counts_ptr="*i32",
                )
                if role == "forward":
                    pointers["entropy_ptr"] = "*fp32" if entropy else None
                pointers = {name: kind for name, kind in pointers.items() if name in kernel.fn.arg_names}
                suffix = "" if entropy is None else ("-entropy" if entropy else "-no-entropy")
                variants.append(
                    _variant(
                        kernel,
                        f"{dtype}-d{head_dim}{suffix}",
                        pointers,
                        {
                            "CAUSAL": True,
                            "BLOCK_SIZE": _ATTENTION_BLOCK_SIZE,
                            "BLOCK_D": head_dim,
                            "INPUT_PRECISION": _input_precision(dtype),
                            "INTERPRET": False,
                        },
                        # the 16- and 32-row tiles (D = 256 on sm_120) do not fill a wgmma warpgroup
                        _any_mma(dtype),
                        unit_strides=_ATTENTION_STRIDES[role],
                        floats=("scale",),
                        forbidden=(_FORBIDDEN["fp32"],) if dtype == "fp32" else (),
                        every_config=dtype == "bf16" and head_dim == 128 and entropy is not False,
                    )
                )
    return tuple(variants)


def _attention_delta_variants() -> tuple[Variant, ...]:
    kernel = attention._attention_delta_kernel
    return tuple(
        _variant(
            kernel,
            f"{dtype}-d{head_dim}",
            {"grad_out_ptr": _TRITON_DTYPES[dtype], "out_ptr": _TRITON_DTYPES[dtype], "delta_ptr": "*fp32"},
            {"BLOCK_D": head_dim},
            {arch: () for arch in ARCHS},  # a row sum: no MMA
            unit_strides=("stride_grad_d", "stride_out_d"),
            every_config=False,
        )
        for dtype in ("bf16", "fp16", "fp32")
        for head_dim in _ATTENTION_HEAD_DIMS
    )


def kernels() -> tuple[KernelEntry, ...]:
    """The registry. Built on call: under TRITON_INTERPRET=1 the kernels hold the interpreter's one config."""
    return (
        KernelEntry(
            "projection._quantize_rowwise_kernel",
            projection._quantize_rowwise_kernel,
            _quantize_variants(projection._quantize_rowwise_kernel, "*fp32"),
        ),
        KernelEntry(
            "projection._quantize_mx_kernel",
            projection._quantize_mx_kernel,
            _quantize_variants(projection._quantize_mx_kernel, "*u8"),
        ),
        KernelEntry("projection._features_kernel", projection._features_kernel, _features_variants()),
        KernelEntry("projection._output_kernel", projection._output_kernel, _output_variants()),
        KernelEntry("projection._phase_grad_kernel", projection._phase_grad_kernel, _phase_grad_variants()),
        KernelEntry("projection._matmul_kernel", projection._matmul_kernel, _matmul_variants()),
        KernelEntry(
            "lora._lora_matmul_kernel",
            lora._lora_matmul_kernel,
            _lora_matmul_variants(lora._lora_matmul_kernel),
        ),
        KernelEntry(
            "lora._lora_decode_kernel",
            lora._lora_decode_kernel,
            _lora_matmul_variants(lora._lora_decode_kernel, decode=True),
        ),
        KernelEntry("lora._lora_splitk_kernel", lora._lora_splitk_kernel, _lora_splitk_variants()),
        KernelEntry("lora._lora_down_kernel", lora._lora_down_kernel, _lora_down_variants()),
        KernelEntry(
            "lora._lora_weight_grad_kernel", lora._lora_weight_grad_kernel, _lora_weight_grad_variants()
        ),
        KernelEntry(
            "attention._attention_forward_kernel",
            attention._attention_forward_kernel,
            _attention_variants(attention._attention_forward_kernel, "forward"),
        ),
        KernelEntry(
            "attention._attention_delta_kernel",
            attention._attention_delta_kernel,
            _attention_delta_variants(),
        ),
        KernelEntry(
            "attention._attention_dkdv_kernel",
            attention._attention_dkdv_kernel,
            _attention_variants(attention._attention_dkdv_kernel, "dkdv"),
        ),
        KernelEntry(
            "attention._attention_dq_kernel",
            attention._attention_dq_kernel,
            _attention_variants(attention._attention_dq_kernel, "dq"),
        ),
    )


# The CUDA extension (csrc/): SASS opcodes each kernel must contain per arch, as cuobjdump prints them, by
# (kernel family, scaling); the GEMM's first template argument (kMx) selects the scaling.
EXTENSION_SASS: dict[tuple[str, str], dict[str, dict[str, Any]]] = {
    ("fp8_gemm_kernel", "rowwise"): {
        "sm_89": {"required": ("QMMA",)},
        "sm_120a": {"required": ("QMMA",)},
        # sm_90 has no fp8 mma.sync: ptxas emulates it with HMMA (recorded, not a violation).
        "sm_90a": {"required": (), "note": "fp8 mma.sync is emulated with HMMA on sm_90"},
    },
    ("fp8_gemm_kernel", "mx"): {
        "sm_89": {"required": (), "note": "no block-scaled MMA before sm_120: a stub, never launched"},
        "sm_90a": {"required": (), "note": "no block-scaled MMA before sm_120: a stub, never launched"},
        "sm_120a": {"required": ("QMMA.SF",)},
    },
}
