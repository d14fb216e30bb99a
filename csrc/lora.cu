// Fused LoRA BA-add forward (cdm_fast/ops/lora.py):
//
//   u = dropout(x) @ lora_Aᵀ                         x (M, K), lora_A (r, K)       u (M, r)
//   y = x @ weightᵀ + bias + scaling · u @ lora_Bᵀ    weight (N, K), lora_B (N, r)  y (M, N)
//
// One kernel: the mainloop accumulates the x·weightᵀ tile and, beside it, u = dropout(x)·lora_Aᵀ for the
// tile's rows from the same x tile in shared memory, so x is read once; the epilogue rounds u to the input
// dtype (the u saved for backward, written by the column-tile-0 blocks) and adds scaling · u·lora_Bᵀ with one
// more MMA against a lora_B tile, so neither u·lora_Bᵀ nor dropout(x) ever reaches global memory.
//
// Dropout is the counter-based mask of `dropout_keep` (ops/lora.py), bit for bit: element (i, j) of x is kept
// when hash32(hash32(i ^ seed) + j) >> 8 >= threshold. The mask zeroes x fragments fed to the u MMA only,
// and 1/(1 - p) multiplies the fp32 u accumulator, exactly.
//
// Instruction forms:
//   cp.async.cg.shared.global 16 B, zero-fill for tails        4-stage shared-memory pipeline
//   ldmatrix.sync.aligned.m8n8.x4.shared.b16                   operand fragments from swizzled tiles
//   mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32        (and .f16.f16) fp32 accumulation
#include "common.cuh"

#include <climits>
#include <string>

namespace cdm_fast {
namespace {

// 128x128 output tile, 32 elements (64 bytes) of K per stage, 8 warps as 2 (M) x 4 (N), each warp 64x32 of
// y = 4 x 4 mma tiles. The rank is padded to kRank (16, 32 or 64): every warp also accumulates u for 16 of
// its 64 rows (the four N-warps of an M-half split them) over all kRank columns.
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kBlockK = 32;
constexpr int kStages = 4;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpTileM = kBlockM / kWarpsM;
constexpr int kWarpTileN = kBlockN / kWarpsN;
constexpr int kMmaTilesM = kWarpTileM / 16;
constexpr int kMmaTilesN = kWarpTileN / 8;
constexpr int kMmaStepsK = kBlockK / 16;
constexpr int kElementBytes = 2;
constexpr int kRowBytes = kBlockK * kElementBytes;  // one swizzled tile row
constexpr int kChunksPerRow = kRowBytes / 16;
constexpr int kChunkElements = 16 / kElementBytes;
constexpr int kGroupM = 8;  // row tiles per L2 group (grouped_tile)
constexpr int kMaxRank = 64;
// u and lora_B tiles are stored (rows, kRank + kRankPad): 16 bytes of padding put the 8 rows of every
// ldmatrix matrix in distinct 16-byte bank groups.
constexpr int kRankPad = 8;
constexpr int kSharedLimit = 101376;  // sm_89 and sm_120: 99 KiB per block (opt-in)

constexpr int rank_row_bytes(int rank) { return (rank + kRankPad) * kElementBytes; }
constexpr int pipeline_bytes(int rank) { return kStages * (kBlockM + kBlockN + rank) * kRowBytes; }
constexpr int lora_shared_bytes_for(int rank) { return pipeline_bytes(rank) + kBlockN * rank_row_bytes(rank); }

static_assert(kRowBytes == 64, "the swizzle below is written for 4 16-byte chunks per row");
static_assert(kBlockK % 16 == 0, "a stage must hold whole k16 mma steps");
static_assert(kWarpsN * 16 == kWarpTileM, "the N-warps of an M-half split its rows into m16 tiles of u");
static_assert(kMmaTilesN % 2 == 0, "ldmatrix.x4 loads weight and lora_B fragments for pairs of n8 tiles");
static_assert((kBlockM * kChunksPerRow) % kThreads == 0 && (kBlockN * kChunksPerRow) % kThreads == 0,
              "every thread copies the same number of x and weight chunks");
static_assert(kMaxRank % 16 == 0, "the largest rank tile must be whole k16 steps");
static_assert(kBlockM * rank_row_bytes(kMaxRank) <= pipeline_bytes(16), "the u tile reuses the pipeline's memory");
static_assert(lora_shared_bytes_for(kMaxRank) <= kSharedLimit, "shared memory over sm_89/sm_120's 99 KiB");
static_assert(kStages >= 2, "the pipeline needs at least two stages");

// Byte offset of 16-byte chunk `chunk` of tile row `row`. XOR-ing the chunk with (row / 2) % 4 puts the
// 8 rows of every ldmatrix 8x16-byte matrix in 8 distinct 16-byte bank groups: conflict-free.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) << 4);
}

// lowbias32, `hash32` of ops/lora.py on uint32 arithmetic.
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Bit mask of a register holding x[i][col] (low half) and x[i][col + 1] (high half): ones where kept.
__device__ __forceinline__ uint32_t keep_mask(uint32_t row_key, uint32_t col, uint32_t threshold) {
  const uint32_t low = (hash32(row_key + col) >> 8) >= threshold ? 0x0000FFFFu : 0u;
  const uint32_t high = (hash32(row_key + col + 1u) >> 8) >= threshold ? 0xFFFF0000u : 0u;
  return low | high;
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high);
template <>
__device__ __forceinline__ uint32_t pack_pair<__nv_bfloat16>(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<__half>(float low, float high) {
  const __half2 pair = __floats2half2_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}

template <typename T>
struct LoraParams {
  const T* x;       // (m, k), row stride x_ld
  const T* weight;  // (n, k), row stride weight_ld
  const T* lora_a;  // (rank, k), row stride k
  const T* lora_b;  // (n, rank), row stride lora_b_ld; elements rank..lora_b_ld-1 finite (zero padding)
  const T* bias;    // (n,) or null
  T* y;             // (m, n), row stride n
  T* u;             // (m, rank), row stride rank
  int64_t x_ld, weight_ld, lora_b_ld;
  int m, n, k, rank;
  float scaling;
  float dropout_scale;  // 1 / (1 - p); 1 without dropout
  bool dropout;
  uint32_t dropout_threshold, dropout_seed;
};

// Rows [first_row, first_row + kRows) of a K-contiguous operand, K columns [k0, k0 + kBlockK), into a
// swizzled stage; rows past `rows` and columns past k are zero-filled.
template <int kRows, typename T>
__device__ __forceinline__ void load_tile(uint8_t* tile, const T* src, int64_t ld, int first_row, int rows, int k0,
                                          int k) {
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, chunk = c % kChunksPerRow;
    const int column = k0 + chunk * kChunkElements;
    const bool valid = first_row + row < rows && column < k;
    const T* from = valid ? src + static_cast<int64_t>(first_row + row) * ld + column : src;
    cp_async_16(shared_address(tile + swizzled_offset(row, chunk)), from, valid);
  }
}

// ldmatrix.x4 of an m16k16 A fragment: matrices = rows 0-7 / 8-15 at k 0-7, then the same rows at k 8-15.
__device__ __forceinline__ void load_a_fragment(uint32_t (&frag)[4], const uint8_t* tile, int row, int step,
                                                int lane) {
  ldmatrix_x4(frag, shared_address(tile + swizzled_offset(row + (lane & 15), step * 2 + (lane >> 4))));
}

// ldmatrix.x4 of two n8k16 B fragments (rows n, K contiguous): matrices = (n 0-7, k 0-7), (n 0-7, k 8-15),
// (n 8-15, k 0-7), (n 8-15, k 8-15); r[0], r[1] feed n-tile 0 and r[2], r[3] n-tile 1.
__device__ __forceinline__ void load_b_fragments(uint32_t (&r)[4], const uint8_t* tile, int row, int step,
                                                 int lane) {
  ldmatrix_x4(r, shared_address(tile + swizzled_offset(row + (lane & 7) + ((lane >> 4) << 3),
                                                       step * 2 + ((lane >> 3) & 1))));
}

template <typename T>
__device__ __forceinline__ void store_output(const LoraParams<T>& p, int row, int col, float v0, float v1) {
  if (row >= p.m) return;
  const bool has_second = col + 1 < p.n;
  if (p.bias != nullptr) {
    v0 += to_float(p.bias[col]);
    if (has_second) v1 += to_float(p.bias[col + 1]);
  }
  T* out = p.y + static_cast<int64_t>(row) * p.n + col;
  if (has_second && p.n % 2 == 0) {
    *reinterpret_cast<uint32_t*>(out) = pack_pair<T>(v0, v1);
  } else {
    out[0] = from_float<T>(v0);
    if (has_second) out[1] = from_float<T>(v1);
  }
}

template <typename T, int kRank>
__global__ void __launch_bounds__(kThreads, 1) lora_forward_kernel(const LoraParams<T> p) {
  static_assert(kRank % 16 == 0 && kRank <= kMaxRank, "the rank tile is whole k16 steps of the epilogue MMA");
  static_assert(rank_row_bytes(kRank) % 16 == 0 && (rank_row_bytes(kRank) / 16) % 2 == 1,
                "padded u / lora_B rows: an odd number of 16-byte chunks (conflict-free ldmatrix)");
  constexpr int kRankTilesN = kRank / 8;
  constexpr int kRankStepsK = kRank / 16;
  constexpr int kRankChunks = kRank / kChunkElements;
  constexpr int kRankRowBytes = rank_row_bytes(kRank);
  extern __shared__ __align__(128) uint8_t shared[];
  uint8_t* smem_x = shared;
  uint8_t* smem_w = smem_x + kStages * kBlockM * kRowBytes;
  uint8_t* smem_a = smem_w + kStages * kBlockN * kRowBytes;
  uint8_t* smem_b = smem_a + kStages * kRank * kRowBytes;  // (kBlockN, kRank + kRankPad), whole kernel
  uint8_t* smem_u = shared;                                 // (kBlockM, kRank + kRankPad), after the mainloop

  const int tiles_m = (p.m + kBlockM - 1) / kBlockM;
  const int tiles_n = (p.n + kBlockN - 1) / kBlockN;
  const TileCoord tile = grouped_tile(blockIdx.x, tiles_m, tiles_n, kGroupM);
  const int row0 = tile.m * kBlockM, col0 = tile.n * kBlockN;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_row = (warp / kWarpsN) * kWarpTileM, warp_col = (warp % kWarpsN) * kWarpTileN;
  // This warp's 16 rows of u within the block tile.
  const int u_row = warp_row + (warp % kWarpsN) * 16;
  const int k_tiles = (p.k + kBlockK - 1) / kBlockK;

  // lora_B's tile rides in the first commit group; it is read only in the epilogue.
  for (int c = threadIdx.x; c < kBlockN * kRankChunks; c += kThreads) {
    const int row = c / kRankChunks, chunk = c % kRankChunks;
    const bool valid = col0 + row < p.n && chunk * kChunkElements < p.rank;
    const T* from = valid ? p.lora_b + static_cast<int64_t>(col0 + row) * p.lora_b_ld + chunk * kChunkElements
                          : p.lora_b;
    cp_async_16(shared_address(smem_b + row * kRankRowBytes + chunk * 16), from, valid);
  }

  auto stage_load = [&](int stage, int k_tile) {
    const int k0 = k_tile * kBlockK;
    load_tile<kBlockM>(smem_x + stage * kBlockM * kRowBytes, p.x, p.x_ld, row0, p.m, k0, p.k);
    load_tile<kBlockN>(smem_w + stage * kBlockN * kRowBytes, p.weight, p.weight_ld, col0, p.n, k0, p.k);
    load_tile<kRank>(smem_a + stage * kRank * kRowBytes, p.lora_a, static_cast<int64_t>(p.k), 0, p.rank, k0, p.k);
  };

#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < k_tiles) stage_load(stage, stage);
    cp_async_commit();
  }

  // A-fragment rows of this lane in the u MMA: lane / 4 and lane / 4 + 8 of the warp's 16 u rows.
  uint32_t row_key[2] = {0u, 0u};
  if (p.dropout) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
      row_key[h] = hash32(static_cast<uint32_t>(row0 + u_row + (lane >> 2) + 8 * h) ^ p.dropout_seed);
  }

  float acc[kMmaTilesM][kMmaTilesN][4] = {};
  float u_acc[kRankTilesN][4] = {};
  for (int k_tile = 0; k_tile < k_tiles; ++k_tile) {
    // Tile k_tile has landed; every warp is past the stage the next prefetch overwrites.
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = k_tile + kStages - 1;
    if (next < k_tiles) stage_load(next % kStages, next);
    cp_async_commit();

    const int stage = k_tile % kStages;
    const uint8_t* tile_x = smem_x + stage * kBlockM * kRowBytes;
    const uint8_t* tile_w = smem_w + stage * kBlockN * kRowBytes;
    const uint8_t* tile_a = smem_a + stage * kRank * kRowBytes;
#pragma unroll
    for (int step = 0; step < kMmaStepsK; ++step) {
      uint32_t frag_x[kMmaTilesM][4];
      uint32_t frag_w[kMmaTilesN][2];
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i) load_a_fragment(frag_x[i], tile_x, warp_row + i * 16, step, lane);
#pragma unroll
      for (int j = 0; j < kMmaTilesN; j += 2) {
        uint32_t r[4];
        load_b_fragments(r, tile_w, warp_col + j * 8, step, lane);
        frag_w[j][0] = r[0];
        frag_w[j][1] = r[1];
        frag_w[j + 1][0] = r[2];
        frag_w[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kMmaTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kMmaTilesN; ++j) mma_16816<T>(acc[i][j], frag_x[i], frag_w[j][0], frag_w[j][1]);

      // u from the same x tile: a0..a3 hold (row g, k 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..).
      uint32_t frag_u[4];
      load_a_fragment(frag_u, tile_x, u_row, step, lane);
      if (p.dropout) {
        const uint32_t col = static_cast<uint32_t>(k_tile * kBlockK + step * 16 + 2 * (lane & 3));
        frag_u[0] &= keep_mask(row_key[0], col, p.dropout_threshold);
        frag_u[1] &= keep_mask(row_key[1], col, p.dropout_threshold);
        frag_u[2] &= keep_mask(row_key[0], col + 8u, p.dropout_threshold);
        frag_u[3] &= keep_mask(row_key[1], col + 8u, p.dropout_threshold);
      }
#pragma unroll
      for (int j = 0; j < kRankTilesN; j += 2) {
        uint32_t r[4];
        load_b_fragments(r, tile_a, j * 8, step, lane);
        mma_16816<T>(u_acc[j], frag_u, r[0], r[1]);
        mma_16816<T>(u_acc[j + 1], frag_u, r[2], r[3]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  // u in the input dtype, through shared memory: it becomes the A operand of every warp of its M-half, and
  // the same rounded values are the u saved for backward.
  // Accumulator layout of m16n8: c0, c1 at (lane / 4, 2 · (lane % 4) + {0, 1}); c2, c3 eight rows below.
#pragma unroll
  for (int j = 0; j < kRankTilesN; ++j) {
    uint8_t* out = smem_u + (u_row + (lane >> 2)) * kRankRowBytes + (j * 8 + 2 * (lane & 3)) * kElementBytes;
    *reinterpret_cast<uint32_t*>(out) = pack_pair<T>(u_acc[j][0] * p.dropout_scale, u_acc[j][1] * p.dropout_scale);
    *reinterpret_cast<uint32_t*>(out + 8 * kRankRowBytes) =
        pack_pair<T>(u_acc[j][2] * p.dropout_scale, u_acc[j][3] * p.dropout_scale);
  }
  __syncthreads();

  if (tile.n == 0) {
    for (int e = threadIdx.x; e < kBlockM * kRank; e += kThreads) {
      const int row = e / kRank, col = e % kRank;
      if (row0 + row < p.m && col < p.rank)
        p.u[static_cast<int64_t>(row0 + row) * p.rank + col] =
            *reinterpret_cast<const T*>(smem_u + row * kRankRowBytes + col * kElementBytes);
    }
  }

  // y += scaling · u · lora_Bᵀ over the kRank-long reduction; one m16 tile of u at a time keeps 16 floats live.
  uint32_t frag_b[kMmaTilesN][kRankStepsK][2];
#pragma unroll
  for (int step = 0; step < kRankStepsK; ++step)
#pragma unroll
    for (int j = 0; j < kMmaTilesN; j += 2) {
      uint32_t r[4];
      const int row = warp_col + j * 8 + (lane & 7) + ((lane >> 4) << 3);
      ldmatrix_x4(r, shared_address(smem_b + row * kRankRowBytes + (step * 2 + ((lane >> 3) & 1)) * 16));
      frag_b[j][step][0] = r[0];
      frag_b[j][step][1] = r[1];
      frag_b[j + 1][step][0] = r[2];
      frag_b[j + 1][step][1] = r[3];
    }
#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i) {
    float lora[kMmaTilesN][4] = {};
#pragma unroll
    for (int step = 0; step < kRankStepsK; ++step) {
      uint32_t frag_u[4];
      const int row = warp_row + i * 16 + (lane & 15);
      ldmatrix_x4(frag_u, shared_address(smem_u + row * kRankRowBytes + (step * 2 + (lane >> 4)) * 16));
#pragma unroll
      for (int j = 0; j < kMmaTilesN; ++j) mma_16816<T>(lora[j], frag_u, frag_b[j][step][0], frag_b[j][step][1]);
    }
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] += p.scaling * lora[j][c];
  }

#pragma unroll
  for (int i = 0; i < kMmaTilesM; ++i) {
    const int row = row0 + warp_row + i * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < kMmaTilesN; ++j) {
      const int col = col0 + warp_col + j * 8 + 2 * (lane & 3);
      if (col >= p.n) continue;
      store_output(p, row, col, acc[i][j][0], acc[i][j][1]);
      store_output(p, row + 8, col, acc[i][j][2], acc[i][j][3]);
    }
  }
}

// ================================================================================================ host

int rank_tile(int64_t rank) { return rank <= 16 ? 16 : rank <= 32 ? 32 : 64; }

void require_aligned(uintptr_t address, uintptr_t alignment, const char* argument) {
  require(address != 0, std::string(argument) + ": expected a device pointer, got null");
  require(address % alignment == 0,
          std::string(argument) + ": expected a " + std::to_string(alignment) + "-byte aligned pointer");
}

int checked_size(int64_t value, int64_t minimum, const char* argument) {
  require(value >= minimum && value <= INT_MAX, std::string(argument) + ": expected " + std::to_string(minimum) +
                                                    " <= value <= 2^31 - 1, got " + std::to_string(value));
  return static_cast<int>(value);
}

void require_row_stride(int64_t stride, int64_t minimum, const char* argument) {
  require(stride >= minimum && stride % kChunkElements == 0,
          std::string(argument) + ": expected a multiple of " + std::to_string(kChunkElements) + " >= " +
              std::to_string(minimum) + " (16-byte cp.async rows), got " + std::to_string(stride));
}

template <typename T, int kRank>
void launch_rank(const LoraParams<T>& p, uintptr_t stream, const char* where) {
  constexpr int shared_bytes = lora_shared_bytes_for(kRank);
  const auto kernel = lora_forward_kernel<T, kRank>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes), where);
  const int64_t tiles = static_cast<int64_t>((p.m + kBlockM - 1) / kBlockM) * ((p.n + kBlockN - 1) / kBlockN);
  require(tiles <= INT_MAX, std::string(where) + ": too many tiles for one launch");
  kernel<<<static_cast<unsigned>(tiles), kThreads, shared_bytes, reinterpret_cast<cudaStream_t>(stream)>>>(p);
  check_cuda(cudaGetLastError(), where);
}

template <typename T>
void launch(const LoraParams<T>& p, uintptr_t stream, const char* where) {
  switch (rank_tile(p.rank)) {
    case 16:
      launch_rank<T, 16>(p, stream, where);
      break;
    case 32:
      launch_rank<T, 32>(p, stream, where);
      break;
    default:
      launch_rank<T, 64>(p, stream, where);
      break;
  }
}

template <typename T>
LoraParams<T> make_params(uintptr_t x, int64_t x_ld, uintptr_t weight, int64_t weight_ld, uintptr_t lora_a,
                          uintptr_t lora_b, int64_t lora_b_ld, uintptr_t bias, uintptr_t y, uintptr_t u, int m,
                          int n, int k, int rank, double scaling, double dropout_p, int64_t dropout_threshold,
                          int64_t dropout_seed) {
  LoraParams<T> p{};
  p.x = reinterpret_cast<const T*>(x);
  p.weight = reinterpret_cast<const T*>(weight);
  p.lora_a = reinterpret_cast<const T*>(lora_a);
  p.lora_b = reinterpret_cast<const T*>(lora_b);
  p.bias = reinterpret_cast<const T*>(bias);
  p.y = reinterpret_cast<T*>(y);
  p.u = reinterpret_cast<T*>(u);
  p.x_ld = x_ld;
  p.weight_ld = weight_ld;
  p.lora_b_ld = lora_b_ld;
  p.m = m;
  p.n = n;
  p.k = k;
  p.rank = rank;
  p.scaling = static_cast<float>(scaling);
  p.dropout = dropout_p > 0.0;
  p.dropout_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  p.dropout_threshold = static_cast<uint32_t>(dropout_threshold);
  p.dropout_seed = static_cast<uint32_t>(dropout_seed);
  return p;
}

}  // namespace

// ================================================================================================ API
// Declared in bindings.cpp; checks its arguments, launches on `stream` and throws std::invalid_argument (bad
// arguments) or std::runtime_error (CUDA errors) instead of returning.

int64_t lora_max_rank() { return kMaxRank; }

int64_t lora_shared_bytes(int64_t rank) {
  require(rank >= 1 && rank <= kMaxRank,
          "rank: expected 1 <= rank <= " + std::to_string(kMaxRank) + ", got " + std::to_string(rank));
  switch (rank_tile(rank)) {
    case 16:
      return lora_shared_bytes_for(16);
    case 32:
      return lora_shared_bytes_for(32);
    default:
      return lora_shared_bytes_for(64);
  }
}

void lora_forward(uintptr_t x, int64_t x_row_stride, uintptr_t weight, int64_t weight_row_stride, uintptr_t lora_a,
                  uintptr_t lora_b, int64_t lora_b_row_stride, uintptr_t bias, uintptr_t y, uintptr_t u,
                  const std::string& dtype, int64_t m, int64_t n, int64_t k, int64_t rank, double scaling,
                  double dropout_p, int64_t dropout_threshold, int64_t dropout_seed, uintptr_t stream) {
  constexpr const char* where = "cdm_fast._C.lora_forward";
  const int m_int = checked_size(m, 0, "m");
  const int n_int = checked_size(n, 1, "n");
  const int k_int = checked_size(k, 1, "k");
  require(k % kChunkElements == 0, "k: in_features must be a multiple of " + std::to_string(kChunkElements) +
                                       " for 16-byte cp.async, got " + std::to_string(k));
  require(rank >= 1 && rank <= kMaxRank,
          "rank: expected 1 <= rank <= " + std::to_string(kMaxRank) + ", got " + std::to_string(rank));
  require_row_stride(x_row_stride, k, "x_row_stride");
  require_row_stride(weight_row_stride, k, "weight_row_stride");
  require_row_stride(lora_b_row_stride, rank, "lora_b_row_stride");
  require(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p: expected 0 <= p < 1, got " + std::to_string(dropout_p));
  require(dropout_threshold >= 0 && dropout_threshold <= (int64_t{1} << 24),
          "dropout_threshold: expected 0 <= threshold <= 2^24, got " + std::to_string(dropout_threshold));
  require(dropout_seed >= 0 && dropout_seed <= int64_t{0xFFFFFFFF},
          "dropout_seed: expected 0 <= seed < 2^32, got " + std::to_string(dropout_seed));
  const ScalarType type = parse_scalar_type(dtype, "dtype");
  require(type != ScalarType::kFloat32, "dtype: expected float16 or bfloat16, got float32");
  require_aligned(x, 16, "x");
  require_aligned(weight, 16, "weight");
  require_aligned(lora_a, 16, "lora_a");
  require_aligned(lora_b, 16, "lora_b");
  require(bias == 0 || bias % 2 == 0, "bias: expected a 2-byte aligned pointer");
  require_aligned(y, 4, "y");
  require_aligned(u, 2, "u");
  if (m_int == 0) return;
  // bf16/fp16 mma.sync exists from sm_80; the extension is built for 8.9 and later.
  const int capability = current_capability(where);
  if (capability < 80)
    throw std::runtime_error(std::string(where) + ": bf16/fp16 mma.sync needs compute capability >= 8.0, device has " +
                             std::to_string(capability / 10) + "." + std::to_string(capability % 10));
  const int rank_int = static_cast<int>(rank);
  if (type == ScalarType::kBFloat16) {
    launch(make_params<__nv_bfloat16>(x, x_row_stride, weight, weight_row_stride, lora_a, lora_b, lora_b_row_stride,
                                      bias, y, u, m_int, n_int, k_int, rank_int, scaling, dropout_p,
                                      dropout_threshold, dropout_seed),
           stream, where);
  } else {
    launch(make_params<__half>(x, x_row_stride, weight, weight_row_stride, lora_a, lora_b, lora_b_row_stride, bias, y,
                               u, m_int, n_int, k_int, rank_int, scaling, dropout_p, dropout_threshold,
                               dropout_seed),
           stream, where);
  }
}

}  // namespace cdm_fast
