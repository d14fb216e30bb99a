// Shared pieces of the cdm_fast CUDA kernels: error checking, the e4m3 / ue8m0 scaling recipes of
// cdm_fast/float8.py written once for device code, the L2-grouped tile order, and thin wrappers over
// the PTX forms the GEMMs use:
//   cp.async.cg.shared.global (16 B, zero-fill predication)    sm_80+
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16                    sm_75+
//   mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32         sm_89+
//   mma.sync.aligned.kind::mxf8f6f4.block_scale.scale_vec::1X.m16n8k32.row.col.f32.e4m3.e4m3.f32.ue8m0
//                                                               sm_120a family (arch-specific target)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// The plain e4m3 mma.sync exists from sm_89; the block-scaled form only on the arch-specific
// (`a`) or family (`f`) targets of compute capability 12.x. __CUDA_ARCH__ alone cannot tell sm_120
// from sm_120a, so the family macro decides.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define CDM_FAST_HAS_FP8_MMA 1
#endif
#if defined(__CUDA_ARCH_FAMILY_SPECIFIC__) && __CUDA_ARCH_FAMILY_SPECIFIC__ >= 1200 && \
    __CUDA_ARCH_FAMILY_SPECIFIC__ < 1300
#define CDM_FAST_HAS_MXF8F6F4_MMA 1
#endif

namespace cdm_fast {

// ------------------------------------------------------------------------------------------------ host

inline void check_cuda(cudaError_t status, const char* where) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string(where) + ": " + cudaGetErrorName(status) + " (" +
                             cudaGetErrorString(status) + ")");
  }
}

inline void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

// Compute capability of the current device as major * 10 + minor.
inline int current_capability(const char* where) {
  int device = 0, major = 0, minor = 0;
  check_cuda(cudaGetDevice(&device), where);
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), where);
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), where);
  return major * 10 + minor;
}

enum class ScalarType { kFloat32, kFloat16, kBFloat16 };

// The names are torch's dtype names without the "torch." prefix.
inline ScalarType parse_scalar_type(const std::string& name, const char* argument) {
  if (name == "float32") return ScalarType::kFloat32;
  if (name == "float16") return ScalarType::kFloat16;
  if (name == "bfloat16") return ScalarType::kBFloat16;
  throw std::invalid_argument(std::string(argument) + ": expected float32, float16 or bfloat16, got " + name);
}

// ------------------------------------------------------------------------------------------------ recipes

constexpr float kE4M3Max = 448.0f;
constexpr int kMxBlock = 32;
constexpr int kUe8m0Bias = 127;
// Sin/cos features are stored as e4m3(256 * f): a fixed power-of-two scale, also a valid ue8m0 byte.
constexpr int kFeatureScaleExponent = 8;
constexpr float kFeatureScale = 256.0f;
constexpr uint8_t kFeatureScaleUe8m0 = kUe8m0Bias - kFeatureScaleExponent;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, saturating to ±448 (the recipes clamp first, so saturation never triggers).
__device__ __forceinline__ uint8_t e4m3_from_float(float v) {
  return static_cast<uint8_t>(__nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3));
}

// Two codes packed little-endian: `lo` in the low byte, as they lie in memory.
__device__ __forceinline__ uint16_t e4m3x2_from_float(float lo, float hi) {
  return static_cast<uint16_t>(__nv_cvt_float2_to_fp8x2(make_float2(lo, hi), __NV_SATFINITE, __NV_E4M3));
}

// Row-wise recipe: scale = amax / 448 (1 where amax is 0); code = e4m3(clamp(t / scale, ±448)).
// IEEE division (nvcc's default -prec-div=true), as torch computes it.
__device__ __forceinline__ float rowwise_scale(float amax) { return amax > 0.0f ? amax / kE4M3Max : 1.0f; }

__device__ __forceinline__ uint8_t rowwise_code(float v, float scale) {
  return e4m3_from_float(fminf(fmaxf(v / scale, -kE4M3Max), kE4M3Max));
}

// MX recipe, bit for bit `mx_scale_exponent` of float8.py: ceil(log2(amax / 448)) from the fp32 bits,
// -127 for zero or subnormal ratios, clamped to [-127, 127].
__device__ __forceinline__ int mx_scale_exponent(float amax) {
  const uint32_t bits = __float_as_uint(amax / kE4M3Max);
  const int biased = static_cast<int>((bits >> 23) & 0xFFu);
  if (biased == 0) return -kUe8m0Bias;
  const int exponent = biased - kUe8m0Bias + ((bits & 0x7FFFFFu) != 0u ? 1 : 0);
  return min(exponent, kUe8m0Bias);
}

// 2^-exponent exactly, built from bits (2^-127 is the one subnormal case).
__device__ __forceinline__ float mx_inverse_scale(int exponent) {
  return exponent == kUe8m0Bias ? __uint_as_float(0x00400000u)
                                : __uint_as_float(static_cast<uint32_t>(kUe8m0Bias - exponent) << 23);
}

__device__ __forceinline__ uint8_t mx_code(float v, float inverse_scale) {
  return e4m3_from_float(fminf(fmaxf(v * inverse_scale, -kE4M3Max), kE4M3Max));
}

// ------------------------------------------------------------------------------------------------ tiles

// Launch order that keeps `group_m` consecutive row tiles of one column sweep resident together,
// so the column operand tiles they share stay in L2.
struct TileCoord {
  int m;
  int n;
};

__device__ __forceinline__ TileCoord grouped_tile(int linear, int tiles_m, int tiles_n, int group_m) {
  const int per_group = group_m * tiles_n;
  const int first_m = (linear / per_group) * group_m;
  const int rows = min(tiles_m - first_m, group_m);
  const int in_group = linear % per_group;
  return {first_m + in_group % rows, in_group / rows};
}

// ------------------------------------------------------------------------------------------------ PTX

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16-byte global -> shared copy; when `valid` is false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async_16(uint32_t shared, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(global),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t shared) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared));
}

// d += a * b on one m16n8k32 tile of e4m3 codes with fp32 accumulation.
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(CDM_FAST_HAS_FP8_MMA)
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// d += (a · 2^(scale_a - 127)) * (b · 2^(scale_b - 127)), one ue8m0 scale per row of a and column of b
// over the 32-long reduction. Selectors {byte 0, thread 0}: the scale of a's row (lane / 4) + 8 · (lane % 2)
// sits in byte 0 of `scale_a` (lanes 4g+2, 4g+3 repeat 4g, 4g+1), and the scale of b's column lane / 4 in
// byte 0 of `scale_b` (CUTLASS SM120 SFALayout / SFBLayout for the 16x8x32 block-scaled atom).
__device__ __forceinline__ void mma_mxf8(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                         uint32_t scale_a, uint32_t scale_b) {
#if defined(CDM_FAST_HAS_MXF8F6F4_MMA)
  const uint16_t selector = 0;
  asm volatile(
      "mma.sync.aligned.kind::mxf8f6f4.block_scale.scale_vec::1X.m16n8k32.row.col.f32.e4m3.e4m3.f32.ue8m0 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3}, {%10}, {%11, %12}, {%13}, {%14, %15};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(scale_a), "h"(selector),
        "h"(selector), "r"(scale_b), "h"(selector), "h"(selector));
#else
  __trap();
#endif
}

}  // namespace cdm_fast
