// FP8 forward of the Fourier projection (cdm_fast/ops/projection.py, precision="fp8"):
//
//   quantize_rowwise / quantize_mx   t (outer, inner), any strides, bf16/fp16/fp32 -> e4m3 codes stored
//                                    (outer, inner) inner-contiguous + scales (cdm_fast/float8.py recipes)
//   projection_features_*            GEMM1  P = x @ freqs;  F = e4m3(256 · [sin 2πP, cos 2πP])  (N, 2m)
//   projection_output_*              GEMM2  y = F @ weight · 2^-8 / sqrt(m) + bias              (N, d_out)
//
// The GEMMs read both operands K-contiguous ("row.col"): A = codes (M, K), B = codes of the right
// operand transposed (N, K), which is how the quantise kernels store freqs and weight.
//
// Instruction forms:
//   cp.async.cg.shared.global 16 B, zero-fill for tails      4-stage shared-memory pipeline
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16                 operand fragments from swizzled tiles
//   mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32      "rowwise": fp32 scales in the epilogue
//   mma.sync.aligned.kind::mxf8f6f4.block_scale.scale_vec::1X.m16n8k32.row.col.f32.e4m3.e4m3.f32.ue8m0
//                                                            "mx" (sm_120a): ue8m0 scales per 32 of K
//
// Sin/cos use sincospif(2P): the argument 2P is exact and the reduction modulo 2 is exact for every
// magnitude, so the phase loses nothing to the rounding of 2π·P (sincosf would), and no Payne-Hanek slow
// path with its local-memory frame is compiled in.
#include "common.cuh"

#include <climits>
#include <cmath>
#include <string>

namespace cdm_fast {
namespace {

// ================================================================================================ quantise

// A block owns kQuantTile slices (rows of the logical (outer, inner) view) and walks the reduction dim in
// kQuantTile-long chunks through a shared tile, so that global reads coalesce along whichever dim is
// contiguous and code writes coalesce along inner. One chunk is exactly one MX block.
constexpr int kQuantTile = 32;
constexpr int kQuantRows = 8;
static_assert(kQuantTile == kMxBlock, "one quantise chunk must be one MX block");
static_assert(kQuantTile % kQuantRows == 0, "the block's rows must tile the chunk");
constexpr int kQuantSlicesPerRow = kQuantTile / kQuantRows;

struct QuantizeInput {
  const void* data;
  int64_t outer, inner, stride_outer, stride_inner;
};

template <typename T>
__device__ __forceinline__ void load_chunk(float (&tile)[kQuantTile][kQuantTile + 1], const QuantizeInput& in,
                                           int64_t outer0, int64_t inner0) {
  const T* data = static_cast<const T*>(in.data);
  const bool inner_contiguous = in.stride_inner <= in.stride_outer;
#pragma unroll
  for (int r = 0; r < kQuantSlicesPerRow; ++r) {
    const int across = threadIdx.y + r * kQuantRows;
    const int slice = inner_contiguous ? across : threadIdx.x;
    const int k = inner_contiguous ? threadIdx.x : across;
    const int64_t o = outer0 + slice, i = inner0 + k;
    tile[slice][k] =
        (o < in.outer && i < in.inner) ? to_float(data[o * in.stride_outer + i * in.stride_inner]) : 0.0f;
  }
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// One fp32 scale per slice (amax over the whole of inner): a pass for amax, a pass for the codes.
template <typename T>
__global__ void __launch_bounds__(kQuantTile * kQuantRows)
    quantize_rowwise_kernel(const QuantizeInput in, uint8_t* __restrict__ codes, float* __restrict__ scales) {
  __shared__ float tile[kQuantTile][kQuantTile + 1];
  __shared__ float slice_scale[kQuantTile];
  const int64_t outer0 = static_cast<int64_t>(blockIdx.x) * kQuantTile;

  float amax[kQuantSlicesPerRow] = {};
  for (int64_t inner0 = 0; inner0 < in.inner; inner0 += kQuantTile) {
    load_chunk<T>(tile, in, outer0, inner0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kQuantSlicesPerRow; ++r)
      amax[r] = fmaxf(amax[r], fabsf(tile[threadIdx.y + r * kQuantRows][threadIdx.x]));
    __syncthreads();
  }
#pragma unroll
  for (int r = 0; r < kQuantSlicesPerRow; ++r) {
    const float slice_amax = warp_max(amax[r]);
    if (threadIdx.x == 0) slice_scale[threadIdx.y + r * kQuantRows] = rowwise_scale(slice_amax);
  }
  __syncthreads();
  if (threadIdx.y == 0 && outer0 + threadIdx.x < in.outer) scales[outer0 + threadIdx.x] = slice_scale[threadIdx.x];

  for (int64_t inner0 = 0; inner0 < in.inner; inner0 += kQuantTile) {
    load_chunk<T>(tile, in, outer0, inner0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kQuantSlicesPerRow; ++r) {
      const int slice = threadIdx.y + r * kQuantRows;
      const int64_t o = outer0 + slice, i = inner0 + threadIdx.x;
      if (o < in.outer && i < in.inner)
        codes[o * in.inner + i] = rowwise_code(tile[slice][threadIdx.x], slice_scale[slice]);
    }
    __syncthreads();
  }
}

// One ue8m0 scale per 32 consecutive elements of inner, stored block-major: scales[block * scales_ld + o].
// Blocks are independent, so blockIdx.y strides over them.
template <typename T>
__global__ void __launch_bounds__(kQuantTile * kQuantRows)
    quantize_mx_kernel(const QuantizeInput in, uint8_t* __restrict__ codes, uint8_t* __restrict__ scales,
                       int64_t scales_ld) {
  __shared__ float tile[kQuantTile][kQuantTile + 1];
  const int64_t outer0 = static_cast<int64_t>(blockIdx.x) * kQuantTile;
  for (int64_t inner0 = static_cast<int64_t>(blockIdx.y) * kQuantTile; inner0 < in.inner;
       inner0 += static_cast<int64_t>(gridDim.y) * kQuantTile) {
    load_chunk<T>(tile, in, outer0, inner0);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < kQuantSlicesPerRow; ++r) {
      const int slice = threadIdx.y + r * kQuantRows;
      const float v = tile[slice][threadIdx.x];
      const int exponent = mx_scale_exponent(warp_max(fabsf(v)));
      const int64_t o = outer0 + slice, i = inner0 + threadIdx.x;
      if (o < in.outer && i < in.inner) codes[o * in.inner + i] = mx_code(v, mx_inverse_scale(exponent));
      if (threadIdx.x == 0 && o < in.outer)
        scales[(inner0 / kMxBlock) * scales_ld + o] = static_cast<uint8_t>(exponent + kUe8m0Bias);
    }
    __syncthreads();
  }
}

// ================================================================================================ GEMM

// 128x128 block tile, 64 bytes (= 64 e4m3) of K per stage, 4 stages, 8 warps as 2 (M) x 4 (N), each warp
// 64x32 = 4 x 4 mma tiles. 64 KiB of operand tiles (+2 KiB of MX scales) fits the 99 KiB opt-in limit
// of sm_89 and sm_120 with room to spare.
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 64;
constexpr int kStages = 4;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kGemmThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpTileM = kBlockM / kWarpsM;
constexpr int kWarpTileN = kBlockN / kWarpsN;
constexpr int kMmaTilesM = kWarpTileM / 16;
constexpr int kMmaTilesN = kWarpTileN / 8;
constexpr int kMmaStepsK = kBlockK / 32;  // also the MX blocks per stage
constexpr int kChunksPerRow = kBlockK / 16;
constexpr int kStageBytesA = kBlockM * kBlockK;
constexpr int kStageBytesB = kBlockN * kBlockK;
constexpr int kStageScaleBytesA = kMmaStepsK * kBlockM;
constexpr int kStageScaleBytesB = kMmaStepsK * kBlockN;
constexpr int kGroupM = 8;  // row tiles per L2 group (grouped_tile)
// K (d_in, 2m) and the column counts (m, d_out) must be multiples of this: 16-byte cp.async rows and
// whole element pairs in the epilogues.
constexpr int kSizeMultiple = 16;

constexpr int gemm_shared_bytes(bool block_scaled) {
  return kStages * (kStageBytesA + kStageBytesB) +
         (block_scaled ? kStages * (kStageScaleBytesA + kStageScaleBytesB) : 0);
}

static_assert(kBlockK == 64, "the shared-memory swizzle below is written for 4 16-byte chunks per row");
static_assert(kBlockM % (kWarpsM * 16) == 0 && kBlockN % (kWarpsN * 16) == 0,
              "warp tiles must be whole m16 tiles and whole pairs of n8 tiles (ldmatrix.x4 on B)");
static_assert(kBlockK % kMxBlock == 0, "a stage must hold whole MX blocks");
static_assert((kBlockM * kChunksPerRow) % kGemmThreads == 0 && (kBlockN * kChunksPerRow) % kGemmThreads == 0,
              "every thread copies the same number of 16-byte chunks");
static_assert(kStageScaleBytesA / 16 + kStageScaleBytesB / 16 <= kGemmThreads,
              "one 16-byte scale chunk per thread at most");
static_assert(kBlockM % 16 == 0 && kBlockN % 16 == 0, "scale rows are copied in 16-byte chunks");
static_assert(gemm_shared_bytes(true) <= 99 * 1024, "sm_89 and sm_120 allow 99 KiB of shared memory per block");
static_assert(kStages >= 2, "the pipeline needs at least two stages");

// Byte offset of 16-byte chunk `chunk` of tile row `row`. XOR-ing the chunk with (row / 2) % 4 puts the
// 8 rows of every ldmatrix 8x16-byte matrix in 8 distinct 16-byte bank groups: conflict-free.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kBlockK + ((chunk ^ ((row >> 1) & 3)) << 4);
}

struct GemmOperands {
  const uint8_t* a;        // (m, k) e4m3, row stride k
  const uint8_t* b;        // (n, k) e4m3, row stride k
  const uint8_t* scale_a;  // MX only: ue8m0 (k / 32, scale_a_ld); null for the feature operand
  const uint8_t* scale_b;  // MX only: ue8m0 (k / 32, scale_b_ld)
  int64_t scale_a_ld;
  int64_t scale_b_ld;
  int m, n, k;
};

// Sin/cos epilogue of GEMM1: writes e4m3(256 sin 2πP) at column c and e4m3(256 cos 2πP) at m + c.
template <bool kMx>
struct FeaturesEpilogue {
  static constexpr bool kBlockScaled = kMx;
  static constexpr bool kFeatureOperandA = false;
  uint8_t* features;        // (rows, 2 * num_frequencies)
  const float* row_scale;   // rowwise: x scales (rows,)
  const float* col_scale;   // rowwise: freqs scales (num_frequencies,)
  int num_frequencies;

  __device__ __forceinline__ void store(int row, int col, float p0, float p1) const {
    if constexpr (!kMx) {
      const float rs = row_scale[row];
      p0 = p0 * rs * col_scale[col];
      p1 = p1 * rs * col_scale[col + 1];
    }
    float sin0, cos0, sin1, cos1;
    sincospif(2.0f * p0, &sin0, &cos0);
    sincospif(2.0f * p1, &sin1, &cos1);
    uint8_t* out = features + static_cast<int64_t>(row) * (2 * num_frequencies) + col;
    *reinterpret_cast<uint16_t*>(out) = e4m3x2_from_float(kFeatureScale * sin0, kFeatureScale * sin1);
    *reinterpret_cast<uint16_t*>(out + num_frequencies) =
        e4m3x2_from_float(kFeatureScale * cos0, kFeatureScale * cos1);
  }
};

template <typename T>
__device__ __forceinline__ void store_pair(T* out, float v0, float v1);
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* out, float v0, float v1) {
  *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(v0, v1);
}
template <>
__device__ __forceinline__ void store_pair<__half>(__half* out, float v0, float v1) {
  *reinterpret_cast<__half2*>(out) = __floats2half2_rn(v0, v1);
}

// Output epilogue of GEMM2: y = acc · alpha (· weight column scale) + bias, in the input dtype.
// alpha = 2^-8 / sqrt(m) for rowwise (the feature scale is applied here) and 1 / sqrt(m) for MX (the mma
// applied it through the constant ue8m0 byte).
template <bool kMx, typename OutT>
struct OutputEpilogue {
  static constexpr bool kBlockScaled = kMx;
  static constexpr bool kFeatureOperandA = true;
  OutT* y;
  int64_t y_row_stride;
  const float* col_scale;  // rowwise: weight scales (d_out,)
  const float* bias;       // (d_out,) float32, or null
  float alpha;

  __device__ __forceinline__ void store(int row, int col, float v0, float v1) const {
    float scale0 = alpha, scale1 = alpha;
    if constexpr (!kMx) {
      scale0 *= col_scale[col];
      scale1 *= col_scale[col + 1];
    }
    v0 *= scale0;
    v1 *= scale1;
    if (bias != nullptr) {
      v0 += bias[col];
      v1 += bias[col + 1];
    }
    store_pair(y + static_cast<int64_t>(row) * y_row_stride + col, v0, v1);
  }
};

template <bool kBlockScaled, bool kFeatureOperandA>
__device__ __forceinline__ void load_stage(uint8_t* smem_a, uint8_t* smem_b, uint8_t* smem_scale_a,
                                           uint8_t* smem_scale_b, const GemmOperands& ops, int row0,
                                           int col0, int k_tile) {
  const int k0 = k_tile * kBlockK;
#pragma unroll
  for (int c = threadIdx.x; c < kBlockM * kChunksPerRow; c += kGemmThreads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int k = k0 + chunk * 16;
    const bool valid = row0 + row < ops.m && k < ops.k;
    const uint8_t* src = valid ? ops.a + static_cast<int64_t>(row0 + row) * ops.k + k : ops.a;
    cp_async_16(shared_address(smem_a + swizzled_offset(row, chunk)), src, valid);
  }
#pragma unroll
  for (int c = threadIdx.x; c < kBlockN * kChunksPerRow; c += kGemmThreads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int k = k0 + chunk * 16;
    const bool valid = col0 + row < ops.n && k < ops.k;
    const uint8_t* src = valid ? ops.b + static_cast<int64_t>(col0 + row) * ops.k + k : ops.b;
    cp_async_16(shared_address(smem_b + swizzled_offset(row, chunk)), src, valid);
  }
  if constexpr (kBlockScaled) {
    // Scales are block-major, so a stage's are kMmaStepsK runs of kBlockM (kBlockN) contiguous bytes.
    // Their leading dims are padded to 16, so a chunk that starts in range is wholly allocated.
    constexpr int kChunksA = kFeatureOperandA ? 0 : kStageScaleBytesA / 16;
    constexpr int kChunksB = kStageScaleBytesB / 16;
    const int num_blocks = (ops.k + kMxBlock - 1) / kMxBlock;
    const int c = threadIdx.x;
    if (c < kChunksA) {
      const int step = c / (kBlockM / 16), offset = (c % (kBlockM / 16)) * 16;
      const int block = k_tile * kMmaStepsK + step;
      const bool valid = block < num_blocks && row0 + offset < ops.m;
      const uint8_t* src = valid ? ops.scale_a + block * ops.scale_a_ld + row0 + offset : ops.scale_a;
      cp_async_16(shared_address(smem_scale_a + step * kBlockM + offset), src, valid);
    } else if (c < kChunksA + kChunksB) {
      const int cb = c - kChunksA;
      const int step = cb / (kBlockN / 16), offset = (cb % (kBlockN / 16)) * 16;
      const int block = k_tile * kMmaStepsK + step;
      const bool valid = block < num_blocks && col0 + offset < ops.n;
      const uint8_t* src = valid ? ops.scale_b + block * ops.scale_b_ld + col0 + offset : ops.scale_b;
      cp_async_16(shared_address(smem_scale_b + step * kBlockN + offset), src, valid);
    }
  }
}

// C (m, n) = A (m, k) · B (n, k)^T on e4m3 codes with fp32 accumulation, handed to Epilogue::store in
// element pairs (row, col), (row, col + 1). Rows and columns past m and n are zero-filled on load and
// never stored; K tails are zero-filled.
template <class Epilogue>
__global__ void __launch_bounds__(kGemmThreads) fp8_gemm_kernel(const GemmOperands ops, const Epilogue epilogue) {
  constexpr bool kBlockScaled = Epilogue::kBlockScaled;
  constexpr bool kFeatureOperandA = Epilogue::kFeatureOperandA;
  extern __shared__ __align__(128) uint8_t shared[];
  uint8_t* smem_a = shared;
  uint8_t* smem_b = smem_a + kStages * kStageBytesA;
  uint8_t* smem_scale_a = smem_b + kStages * kStageBytesB;
  uint8_t* smem_scale_b = smem_scale_a + kStages * kStageScaleBytesA;

  const int tiles_m = (ops.m + kBlockM - 1) / kBlockM;
  const int tiles_n = (ops.n + kBlockN - 1) / kBlockN;
  const TileCoord tile = grouped_tile(blockIdx.x, tiles_m, tiles_n, kGroupM);
  const int row0 = tile.m * kBlockM, col0 = tile.n * kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / kWarpsN) * kWarpTileM, warp_col = (warp % kWarpsN) * kWarpTileN;
  const int k_tiles = (ops.k + kBlockK - 1) / kBlockK;

  auto stage_load = [&](int stage, int k_tile) {
    load_stage<kBlockScaled, kFeatureOperandA>(
        smem_a + stage * kStageBytesA, smem_b + stage * kStageBytesB, smem_scale_a + stage * kStageScaleBytesA,
        smem_scale_b + stage * kStageScaleBytesB, ops, row0, col0, k_tile);
  };

#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) stage_load(stage, stage);
    cp_async_commit();
  }

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    // Tile k_tile has landed; every warp is past the stage the next prefetch overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = k_tile + kStages - 1;
    if (next < k_tiles) stage_load(next % kStages, next);
    cp_async_commit();

    const int stage = k_tile % kStages;
    const uint8_t* tile_a = smem_a + stage * kStageBytesA;
    const uint8_t* tile_b = smem_b + stage * kStageBytesB;
#pragma unroll
    for (int step = 0; step < kMmaStepsK; ++step) {
      uint32_t frag_a[kMmaTilesM][4];
      uint32_t frag_b[kMmaTilesN][2];
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i) {
        // Matrices 0..3 = rows 0-7 / 8-15 at k bytes 0-15, then the same rows at 16-31: a0..a3.
        const int row = warp_row + i * 16 + (lane & 15);
        ldmatrix_x4(frag_a[i], shared_address(tile_a + swizzled_offset(row, step * 2 + (lane >> 4))));
      }
#pragma unroll
      for (int j = 0; j < kMmaTilesN; j += 2) {
        // Matrices 0..3 = (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15), (n 8-15, k 16-31).
        const int row = warp_col + j * 8 + (lane & 7) + ((lane >> 4) << 3);
        uint32_t r[4];
        ldmatrix_x4(r, shared_address(tile_b + swizzled_offset(row, step * 2 + ((lane >> 3) & 1))));
        frag_b[j][0] = r[0];
        frag_b[j][1] = r[1];
        frag_b[j + 1][0] = r[2];
        frag_b[j + 1][1] = r[3];
      }
      if constexpr (kBlockScaled) {
        const uint8_t* scales_a = smem_scale_a + stage * kStageScaleBytesA + step * kBlockM;
        const uint8_t* scales_b = smem_scale_b + stage * kStageScaleBytesB + step * kBlockN;
        uint32_t scale_a[kMmaTilesM], scale_b[kMmaTilesN];
#pragma unroll
        for (int i = 0; i < kMmaTilesM; ++i)
          scale_a[i] = kFeatureOperandA ? kFeatureScaleUe8m0
                                        : scales_a[warp_row + i * 16 + (lane >> 2) + 8 * (lane & 1)];
#pragma unroll
        for (int j = 0; j < kMmaTilesN; ++j) scale_b[j] = scales_b[warp_col + j * 8 + (lane >> 2)];
#pragma unroll
        for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kMmaTilesN; ++j) mma_mxf8(acc[i][j], frag_a[i], frag_b[j], scale_a[i], scale_b[j]);
      } else {
#pragma unroll
        for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
          for (int j = 0; j < kMmaTilesN; ++j) mma_e4m3(acc[i][j], frag_a[i], frag_b[j]);
      }
    }
  }
  cp_async_wait<0>();

  // Accumulator layout of m16n8: c0, c1 at (lane / 4, 2 · (lane % 4) + {0, 1}); c2, c3 eight rows below.
#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i) {
    const int row = row0 + warp_row + i * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j) {
      const int col = col0 + warp_col + j * 8 + 2 * (lane & 3);
      if (col >= ops.n) continue;
      if (row < ops.m) epilogue.store(row, col, acc[i][j][0], acc[i][j][1]);
      if (row + 8 < ops.m) epilogue.store(row + 8, col, acc[i][j][2], acc[i][j][3]);
    }
  }
}

// ================================================================================================ host

template <typename T>
const T* as_pointer(uintptr_t address) {
  return reinterpret_cast<const T*>(address);
}
template <typename T>
T* as_mutable_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void require_device_pointer(uintptr_t address, uintptr_t alignment, const char* argument) {
  require(address != 0, std::string(argument) + ": expected a device pointer, got null");
  require(address % alignment == 0,
          std::string(argument) + ": expected a " + std::to_string(alignment) + "-byte aligned pointer");
}

void require_size_multiple(int64_t value, const char* argument) {
  require(value > 0 && value % kSizeMultiple == 0, std::string(argument) + ": expected a positive multiple of " +
                                                       std::to_string(kSizeMultiple) + ", got " +
                                                       std::to_string(value));
}

void require_fp8_device(bool mx, const char* where) {
  const int capability = current_capability(where);
  if (mx) {
    if (capability / 10 != 12)
      throw std::runtime_error(std::string(where) +
                               ": block-scaled (mx) fp8 mma.sync needs compute capability 12.x, device has " +
                               std::to_string(capability / 10) + "." + std::to_string(capability % 10));
  } else if (capability < 89) {
    throw std::runtime_error(std::string(where) + ": fp8 mma.sync needs compute capability >= 8.9, device has " +
                             std::to_string(capability / 10) + "." + std::to_string(capability % 10));
  }
}

template <class Epilogue>
void launch_gemm(const GemmOperands& ops, const Epilogue& epilogue, uintptr_t stream, const char* where) {
  if (ops.m == 0) return;
  const int64_t tiles = static_cast<int64_t>((ops.m + kBlockM - 1) / kBlockM) * ((ops.n + kBlockN - 1) / kBlockN);
  require(tiles <= INT_MAX, std::string(where) + ": too many tiles for one launch");
  constexpr int shared_bytes = gemm_shared_bytes(Epilogue::kBlockScaled);
  const auto kernel = fp8_gemm_kernel<Epilogue>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes), where);
  kernel<<<static_cast<unsigned>(tiles), kGemmThreads, shared_bytes, reinterpret_cast<cudaStream_t>(stream)>>>(
      ops, epilogue);
  check_cuda(cudaGetLastError(), where);
}

int checked_int(int64_t value, const char* argument) {
  require(value >= 0 && value <= INT_MAX, std::string(argument) + ": expected 0 <= value <= 2^31 - 1, got " +
                                              std::to_string(value));
  return static_cast<int>(value);
}

QuantizeInput quantize_input(uintptr_t src, int64_t outer, int64_t inner, int64_t stride_outer,
                             int64_t stride_inner) {
  require(src != 0 || outer * inner == 0, "src: expected a device pointer, got null");
  require(outer >= 0 && inner >= 0, "outer, inner: expected non-negative sizes");
  require(stride_outer >= 0 && stride_inner >= 0, "stride_outer, stride_inner: expected non-negative strides");
  return {reinterpret_cast<const void*>(src), outer, inner, stride_outer, stride_inner};
}

unsigned quantize_grid_x(int64_t outer, const char* where) {
  const int64_t blocks = (outer + kQuantTile - 1) / kQuantTile;
  require(blocks <= INT_MAX, std::string(where) + ": outer is too large for one launch");
  return static_cast<unsigned>(blocks);
}

template <typename Launch>
void dispatch_input_type(ScalarType type, Launch&& launch) {
  switch (type) {
    case ScalarType::kFloat32:
      launch(float{});
      break;
    case ScalarType::kFloat16:
      launch(__half{});
      break;
    case ScalarType::kBFloat16:
      launch(__nv_bfloat16{});
      break;
  }
}

template <bool kMx>
void launch_output(uintptr_t features, uintptr_t weight_codes, uintptr_t weight_scales, int64_t weight_scales_ld,
                   uintptr_t bias, uintptr_t y, const std::string& y_dtype, int64_t n, int64_t m, int64_t d_out,
                   int64_t y_row_stride, uintptr_t stream, const char* where) {
  require_size_multiple(m, "m");
  require_size_multiple(d_out, "d_out");
  require(y_row_stride >= d_out && y_row_stride % 2 == 0,
          "y_row_stride: expected an even stride >= d_out, got " + std::to_string(y_row_stride));
  require_device_pointer(features, 16, "features");
  require_device_pointer(weight_codes, 16, "weight_codes");
  require_device_pointer(weight_scales, kMx ? 16 : 4, "weight_scales");
  require_device_pointer(y, 4, "y");
  require(!kMx || weight_scales_ld >= d_out, "weight_scales_ld: expected >= d_out");
  require_fp8_device(kMx, where);
  const GemmOperands ops{as_pointer<uint8_t>(features),
                         as_pointer<uint8_t>(weight_codes),
                         nullptr,
                         kMx ? as_pointer<uint8_t>(weight_scales) : nullptr,
                         0,
                         weight_scales_ld,
                         checked_int(n, "n"),
                         checked_int(d_out, "d_out"),
                         checked_int(2 * m, "2m")};
  const double alpha = (kMx ? 1.0 : 1.0 / kFeatureScale) / std::sqrt(static_cast<double>(m));
  const float* col_scale = kMx ? nullptr : as_pointer<float>(weight_scales);
  const float* bias_pointer = as_pointer<float>(bias);
  const ScalarType out_type = parse_scalar_type(y_dtype, "y_dtype");
  require(out_type != ScalarType::kFloat32, "y_dtype: expected float16 or bfloat16, got float32");
  if (out_type == ScalarType::kBFloat16) {
    const OutputEpilogue<kMx, __nv_bfloat16> epilogue{as_mutable_pointer<__nv_bfloat16>(y), y_row_stride, col_scale,
                                                      bias_pointer, static_cast<float>(alpha)};
    launch_gemm(ops, epilogue, stream, where);
  } else {
    const OutputEpilogue<kMx, __half> epilogue{as_mutable_pointer<__half>(y), y_row_stride, col_scale, bias_pointer,
                                               static_cast<float>(alpha)};
    launch_gemm(ops, epilogue, stream, where);
  }
}

}  // namespace

// ================================================================================================ API
// Declared in bindings.cpp; every function checks its arguments, launches on `stream` and throws
// std::invalid_argument (bad arguments) or std::runtime_error (CUDA errors) instead of returning.

void quantize_rowwise(uintptr_t src, const std::string& dtype, int64_t outer, int64_t inner, int64_t stride_outer,
                      int64_t stride_inner, uintptr_t codes, uintptr_t scales, uintptr_t stream) {
  constexpr const char* where = "cdm_fast._C.quantize_rowwise";
  const QuantizeInput in = quantize_input(src, outer, inner, stride_outer, stride_inner);
  if (outer == 0) return;
  require_device_pointer(scales, 4, "scales");
  require(codes != 0 || inner == 0, "codes: expected a device pointer, got null");
  const dim3 grid(quantize_grid_x(outer, where));
  const dim3 block(kQuantTile, kQuantRows);
  dispatch_input_type(parse_scalar_type(dtype, "dtype"), [&](auto tag) {
    quantize_rowwise_kernel<decltype(tag)><<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        in, as_mutable_pointer<uint8_t>(codes), as_mutable_pointer<float>(scales));
  });
  check_cuda(cudaGetLastError(), where);
}

void quantize_mx(uintptr_t src, const std::string& dtype, int64_t outer, int64_t inner, int64_t stride_outer,
                 int64_t stride_inner, uintptr_t codes, uintptr_t scales, int64_t scales_ld, uintptr_t stream) {
  constexpr const char* where = "cdm_fast._C.quantize_mx";
  const QuantizeInput in = quantize_input(src, outer, inner, stride_outer, stride_inner);
  if (outer == 0 || inner == 0) return;
  require(scales_ld >= outer, "scales_ld: expected >= outer, got " + std::to_string(scales_ld));
  require_device_pointer(codes, 1, "codes");
  require_device_pointer(scales, 1, "scales");
  const int64_t blocks = (inner + kMxBlock - 1) / kMxBlock;
  // Enough blocks along inner to fill the device when outer is small (freqs: outer = m).
  const dim3 grid(quantize_grid_x(outer, where), static_cast<unsigned>(blocks < 64 ? blocks : 64));
  const dim3 block(kQuantTile, kQuantRows);
  dispatch_input_type(parse_scalar_type(dtype, "dtype"), [&](auto tag) {
    quantize_mx_kernel<decltype(tag)><<<grid, block, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        in, as_mutable_pointer<uint8_t>(codes), as_mutable_pointer<uint8_t>(scales), scales_ld);
  });
  check_cuda(cudaGetLastError(), where);
}

void projection_features_fp8(uintptr_t x_codes, uintptr_t x_scales, uintptr_t freq_codes, uintptr_t freq_scales,
                             uintptr_t features, int64_t n, int64_t d_in, int64_t m, uintptr_t stream) {
  constexpr const char* where = "cdm_fast._C.projection_features_fp8";
  require_size_multiple(d_in, "d_in");
  require_size_multiple(m, "m");
  require_device_pointer(x_codes, 16, "x_codes");
  require_device_pointer(freq_codes, 16, "freq_codes");
  require_device_pointer(x_scales, 4, "x_scales");
  require_device_pointer(freq_scales, 4, "freq_scales");
  require_device_pointer(features, 2, "features");
  require_fp8_device(false, where);
  const GemmOperands ops{as_pointer<uint8_t>(x_codes),
                         as_pointer<uint8_t>(freq_codes),
                         nullptr,
                         nullptr,
                         0,
                         0,
                         checked_int(n, "n"),
                         checked_int(m, "m"),
                         checked_int(d_in, "d_in")};
  const FeaturesEpilogue<false> epilogue{as_mutable_pointer<uint8_t>(features), as_pointer<float>(x_scales),
                                         as_pointer<float>(freq_scales), static_cast<int>(m)};
  launch_gemm(ops, epilogue, stream, where);
}

void projection_features_mxfp8(uintptr_t x_codes, uintptr_t x_scales, int64_t x_scales_ld, uintptr_t freq_codes,
                               uintptr_t freq_scales, int64_t freq_scales_ld, uintptr_t features, int64_t n,
                               int64_t d_in, int64_t m, uintptr_t stream) {
  constexpr const char* where = "cdm_fast._C.projection_features_mxfp8";
  require_size_multiple(d_in, "d_in");
  require_size_multiple(m, "m");
  require_device_pointer(x_codes, 16, "x_codes");
  require_device_pointer(freq_codes, 16, "freq_codes");
  require_device_pointer(x_scales, 16, "x_scales");
  require_device_pointer(freq_scales, 16, "freq_scales");
  require_device_pointer(features, 2, "features");
  require(x_scales_ld >= n && x_scales_ld % 16 == 0, "x_scales_ld: expected a multiple of 16 >= n");
  require(freq_scales_ld >= m && freq_scales_ld % 16 == 0, "freq_scales_ld: expected a multiple of 16 >= m");
  require_fp8_device(true, where);
  const GemmOperands ops{as_pointer<uint8_t>(x_codes),
                         as_pointer<uint8_t>(freq_codes),
                         as_pointer<uint8_t>(x_scales),
                         as_pointer<uint8_t>(freq_scales),
                         x_scales_ld,
                         freq_scales_ld,
                         checked_int(n, "n"),
                         checked_int(m, "m"),
                         checked_int(d_in, "d_in")};
  const FeaturesEpilogue<true> epilogue{as_mutable_pointer<uint8_t>(features), nullptr, nullptr, static_cast<int>(m)};
  launch_gemm(ops, epilogue, stream, where);
}

void projection_output_fp8(uintptr_t features, uintptr_t weight_codes, uintptr_t weight_scales, uintptr_t bias,
                           uintptr_t y, const std::string& y_dtype, int64_t n, int64_t m, int64_t d_out,
                           int64_t y_row_stride, uintptr_t stream) {
  launch_output<false>(features, weight_codes, weight_scales, 0, bias, y, y_dtype, n, m, d_out, y_row_stride, stream,
                       "cdm_fast._C.projection_output_fp8");
}

void projection_output_mxfp8(uintptr_t features, uintptr_t weight_codes, uintptr_t weight_scales,
                             int64_t weight_scales_ld, uintptr_t bias, uintptr_t y, const std::string& y_dtype,
                             int64_t n, int64_t m, int64_t d_out, int64_t y_row_stride, uintptr_t stream) {
  require(weight_scales_ld % 16 == 0, "weight_scales_ld: expected a multiple of 16");
  launch_output<true>(features, weight_codes, weight_scales, weight_scales_ld, bias, y, y_dtype, n, m, d_out,
                      y_row_stride, stream, "cdm_fast._C.projection_output_mxfp8");
}

}  // namespace cdm_fast
