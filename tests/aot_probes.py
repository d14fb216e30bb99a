"""What the ahead-of-time check must reject, compiled for sm_90 and sm_120 by `python tests/aot_probes.py OUT`
(tests/test_aot.py runs it with TRITON_INTERPRET=0): a kernel whose dot is bf16 where e4m3 is required, the
same kernel held to its own bf16 form (the control), and `_matmul_kernel` with a config too large for either
arch's shared memory. Writes one JSON line per row of `bench.aot.measure` to OUT.
"""

from __future__ import annotations

import json
import sys

import triton
import triton.language as tl

from bench import aot
from cdm_fast.kernels import projection, registry


@triton.jit
def _bf16_dot_kernel(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    tile = offsets[:, None] * BLOCK + offsets[None, :]
    tl.store(c_ptr + tile, tl.dot(tl.load(a_ptr + tile), tl.load(b_ptr + tile)))


def _dot_probe(name: str, required: str) -> registry.Variant:
    signature = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "BLOCK": "constexpr"}
    patterns = {arch: (registry.MMA_FORMS[required][arch],) for arch in registry.ARCHS}
    return registry.Variant(name, signature, {}, patterns)


def rows() -> list[dict]:
    found = []
    small = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1)
    for name, required in (("bf16-dot-held-to-e4m3", "rowwise"), ("bf16-dot-held-to-bf16", "bf16")):
        for arch in registry.ARCHS:
            found.append(
                aot.measure(
                    "probe._bf16_dot_kernel", _bf16_dot_kernel, _dot_probe(name, required), small, arch, True
                )
            )
    matmul = next(entry for entry in registry.kernels() if entry.kernel is projection._matmul_kernel)
    bf16 = next(variant for variant in matmul.variants if variant.name == "bf16-a-row-major")
    # 4 (sm_90) or 3 (sm_120) stages of 128·(128 + 128)·2 B = 64 KiB: over both archs' limits.
    oversized = triton.Config(
        {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_stages=4, num_warps=8
    )
    for arch in registry.ARCHS:
        found.append(aot.measure("probe.oversized_matmul", matmul.fn, bf16, oversized, arch, True))
    return found


if __name__ == "__main__":
    with open(sys.argv[1], "w", encoding="utf-8") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows())
