// Skinny GEMM for decode: out[M, N] = a[M, K] @ weight[N, K]^T with M <= 8.
//
// At M <= 8 the weight is read once per call and dominates the bytes moved, so the kernel is a weight stream:
// - a warp owns kRowsPerWarp weight rows; each step its lanes copy one 16-byte piece of each row (32 lanes:
//   512 contiguous bytes per row) with cp.async into a per-thread ring of kPipelineSteps steps in shared
//   memory. The ring, not registers, holds the bytes in flight (16 loads a thread, 128 KiB an SM), every thread
//   reads back only what it copied itself (no barrier), and the copies run ahead across row tiles, so
//   arithmetic, reductions and tile changes overlap the stream;
// - small N splits K over `split` warps of the block (their partial sums meet in shared memory), so even
//   N = 1024 fills every SM;
// - the activations (or silu(gate) * up, for the MLP down projection) are staged once per block in shared
//   memory as fp32, after the first copies are issued, so their latency hides behind the stream;
// - blocks loop over row tiles (a persistent grid for the LM head), so the activations are staged once per
//   block, not once per tile;
// - each warp reduces its M x kRowsPerWarp sums with a transposing butterfly (31 shuffles at M = 8, not 160).
#include <algorithm>
#include <atomic>
#include <type_traits>

#include "skinny_linear.h"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;    // more rows per warp share each staged-activation read
constexpr int kPipelineSteps = 4;  // with 4 rows: 16 copies of 16 bytes in flight per thread
constexpr int kMaxSplit = 8;
constexpr int kRingBytes = kPipelineSteps * kRowsPerWarp * 16 * kThreads;  // 128 KiB
// Shared memory for the staged fp32 activations: 96 KiB holds K = 3072 at M = 8 and fits beside the ring; a
// longer K is staged in slices of this size.
constexpr int kMaxStageBytes = 96 * 1024;
constexpr int kStageColsMultiple = 256;

struct Problem {
  void* out;
  int64_t out_row_stride;
  const void* x;
  int64_t x_row_stride;
  const void* weight;
  int n;
  int k;
  int split;       // warps sharing one group of rows, each taking every split-th run of 32 loads along K
  int stage_cols;  // K columns staged at a time (all of K unless it does not fit)
  int num_tiles;   // row tiles of (kWarps / split) * kRowsPerWarp rows
};

// 16 bytes global -> shared, bypassing L1 (every weight byte is used once).
__device__ __forceinline__ void copy_async(void* shared_dst, const void* global_src) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(shared_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(global_src) : "memory");
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }

// Waits until at most kPending of this thread's committed copy groups are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}

// Position in a block's sequence of steps: row tile, first column of the staged K slice, step in the slice.
struct Cursor {
  int tile;
  int k0;
  int step;

  __device__ __forceinline__ void advance(int steps, int stage_cols, int k) {
    if (++step < steps) return;
    step = 0;
    k0 += stage_cols;
    if (k0 < k) return;
    k0 = 0;
    tile += gridDim.x;
  }
};

template <typename T>
inline constexpr int kLoadElems = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[kLoadElems<T>]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      out[i] = __uint_as_float(words[i]);
    } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    } else {
      const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
      out[2 * i] = pair.x;
      out[2 * i + 1] = pair.y;
    }
  }
}

__device__ __forceinline__ float silu(float v) { return v / (1.f + expf(-v)); }

// Where a[m][k0 + col] (col a multiple of 4) starts its run of 4 staged floats. A weight load of V elements
// meets V staged floats; for bf16/fp16 (V = 8) its two float4 halves lie in separate halves of the row, so the
// lanes of a warp read consecutive 16-byte words (a contiguous 32 bytes per lane would conflict two ways).
template <typename T>
__device__ __forceinline__ int staged_offset(int m, int col, int cols) {
  constexpr int V = kLoadElems<T>;
  return m * cols + (col % V) / 4 * (cols / (V / 4)) + col / V * 4;
}

// Stages a[m][k0 + col] in fp32 for col < cols (layout: staged_offset); every thread of the block calls it.
template <typename T, int M, bool SILU>
__device__ void stage_activations(float* staged, const Problem& p, int k0, int cols) {
  const T* x = static_cast<const T*>(p.x);
  const int packs_per_row = cols / 8;
  for (int i = threadIdx.x; i < M * packs_per_row; i += kThreads) {
    const int m = i / packs_per_row;
    const int col = (i % packs_per_row) * 8;
    const T* row = x + m * p.x_row_stride + k0 + col;
    const Pack<T, 8> first = load_pack<T, 8>(row);
    float values[8];
    if constexpr (SILU) {
      const Pack<T, 8> up = load_pack<T, 8>(row + p.k);
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = silu(to_float(first.v[j])) * to_float(up.v[j]);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = to_float(first.v[j]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h)
      *reinterpret_cast<float4*>(staged + staged_offset<T>(m, col + 4 * h, cols)) =
          make_float4(values[4 * h], values[4 * h + 1], values[4 * h + 2], values[4 * h + 3]);
  }
}

constexpr int log2_ceil(int v) { return v <= 1 ? 0 : 1 + log2_ceil((v + 1) / 2); }

// Sums each of kSize values over the warp with kSize - 1 + (5 - log2(kSize)) shuffles, not 5 per value: at each
// level a lane keeps the half of its values that its lane bit selects and adds the partner's copy of that half.
// Lane l ends with the warp's total of value (l >> (5 - log2(kSize))) in sums[0].
template <int kLevel, int kSize>
__device__ __forceinline__ void warp_transpose_sum(float (&sums)[kSize], int lane) {
  if constexpr (kLevel < 5) {
    constexpr int offset = 16 >> kLevel;
    constexpr int held = kSize >> kLevel;
    if constexpr (held > 1) {
      const bool upper = lane & offset;
#pragma unroll
      for (int i = 0; i < held / 2; ++i) {
        const float send = upper ? sums[i] : sums[i + held / 2];
        const float keep = upper ? sums[i + held / 2] : sums[i];
        sums[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
      }
    } else {
      sums[0] += __shfl_xor_sync(0xffffffffu, sums[0], offset);
    }
    warp_transpose_sum<kLevel + 1>(sums, lane);
  }
}

template <typename T, int M, bool SILU>
__global__ void __launch_bounds__(kThreads, 1) skinny_linear_kernel(Problem p) {
  constexpr int V = kLoadElems<T>;
  constexpr int R = kRowsPerWarp;
  constexpr int kSums = M * R;
  constexpr int kLog2Slots = log2_ceil(kSums);  // the butterfly works on a power-of-two number of sums
  static_assert(kLog2Slots <= 5, "one warp reduces at most 32 sums");

  extern __shared__ uint4 shared_storage[];
  uint4* ring = shared_storage;  // [kPipelineSteps][R][kThreads]: each thread owns one column
  float* staged = reinterpret_cast<float*>(shared_storage + kRingBytes / 16);
  __shared__ float partials[kWarps][32];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int split = p.split;
  const int group = warp / split;
  const int part = warp % split;
  const int rows_per_tile = kWarps / split * R;
  const int stride = 32 * split;  // 16-byte pieces of a row slice between one step and the next
  const int steps = (p.stage_cols / V + stride - 1) / stride;  // per slice; the same for every warp and slice
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const bool single_stage = p.stage_cols >= p.k;

  // Copies step `at` of this thread's rows into ring slot `slot`; commits a group even when it copies nothing,
  // so that group counts stay in step with the ring.
  const auto issue = [&](const Cursor& at, int slot) {
    const int c = lane + 32 * part + stride * at.step;
    const int slice_loads = min(p.stage_cols, p.k - at.k0) / V;
    const int row0 = at.tile * rows_per_tile + group * R;
    if (at.tile < p.num_tiles && c < slice_loads) {
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (row0 + r < p.n)
          copy_async(ring + (slot * R + r) * kThreads + threadIdx.x,
                     weight + static_cast<int64_t>(row0 + r) * p.k + at.k0 + c * V);
    }
    commit_copies();
  };

  Cursor producer{static_cast<int>(blockIdx.x), 0, 0};
#pragma unroll
  for (int slot = 0; slot < kPipelineSteps; ++slot) {
    issue(producer, slot);
    producer.advance(steps, p.stage_cols, p.k);
  }

  float acc[M][R] = {};
  bool staged_once = false;
  int slot = 0;
  for (Cursor at{static_cast<int>(blockIdx.x), 0, 0}; at.tile < p.num_tiles; at.advance(steps, p.stage_cols, p.k)) {
    const int cols = min(p.stage_cols, p.k - at.k0);
    if (at.step == 0 && (!staged_once || !single_stage)) {
      if (staged_once) __syncthreads();  // every warp is done reading the previous slice
      stage_activations<T, M, SILU>(staged, p, at.k0, cols);
      __syncthreads();
      staged_once = true;
    }
    wait_copies<kPipelineSteps - 1>();  // this step's group has landed
    const int c = lane + 32 * part + stride * at.step;
    if (c < cols / V) {
      float wf[R][V];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack<T>(ring[(slot * R + r) * kThreads + threadIdx.x], wf[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xv[V];
#pragma unroll
        for (int q = 0; q < V / 4; ++q) {
          const float4 f = *reinterpret_cast<const float4*>(staged + staged_offset<T>(m, c * V + 4 * q, cols));
          xv[4 * q] = f.x;
          xv[4 * q + 1] = f.y;
          xv[4 * q + 2] = f.z;
          xv[4 * q + 3] = f.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int j = 0; j < V; ++j) acc[m][r] = fmaf(wf[r][j], xv[j], acc[m][r]);
      }
    }
    // The slot was read into registers above (same thread, program order), so it can be refilled.
    issue(producer, slot);
    producer.advance(steps, p.stage_cols, p.k);
    slot = slot + 1 == kPipelineSteps ? 0 : slot + 1;
    if (at.step + 1 < steps || at.k0 + p.stage_cols < p.k) continue;

    // Last step of the tile: reduce over the warp (and over the split warps), write, start the next tile.
    float sums[1 << kLog2Slots];
#pragma unroll
    for (int i = 0; i < (1 << kLog2Slots); ++i) sums[i] = i < kSums ? acc[i / R][i % R] : 0.f;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
    warp_transpose_sum<0>(sums, lane);
    const int sum_slot = lane >> (5 - kLog2Slots);
    const bool writer = (lane & ((1 << (5 - kLog2Slots)) - 1)) == 0 && sum_slot < kSums;
    const int tile_row0 = at.tile * rows_per_tile;
    if (split == 1) {
      const int row = tile_row0 + group * R + sum_slot % R;
      if (writer && row < p.n) out[(sum_slot / R) * p.out_row_stride + row] = from_float<T>(sums[0]);
    } else {
      if (writer) partials[warp][sum_slot] = sums[0];
      __syncthreads();
      const int groups = kWarps / split;
      if (threadIdx.x < groups * kSums) {
        const int g = threadIdx.x / kSums;
        const int s = threadIdx.x % kSums;
        float total = 0.f;
        for (int q = 0; q < split; ++q) total += partials[g * split + q][s];
        const int row = tile_row0 + g * R + s % R;
        if (row < p.n) out[(s / R) * p.out_row_stride + row] = from_float<T>(total);
      }
      __syncthreads();  // partials are reused by the next tile
    }
  }
  wait_copies<0>();  // no copy may outlive the block (the tail groups are empty, but say so)
}

template <typename T, int M, bool SILU>
cudaError_t launch_typed(const Problem& base, cudaStream_t stream) {
  constexpr int V = kLoadElems<T>;
  Problem p = base;
  int device = 0, sms = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;

  const int max_stage_cols = kMaxStageBytes / (4 * M) / kStageColsMultiple * kStageColsMultiple;
  p.stage_cols = std::min(p.k, max_stage_cols);
  const int loads_per_row = p.stage_cols / V;
  const auto tiles_for = [&](int split) {
    const int rows_per_tile = kWarps / split * kRowsPerWarp;
    return (p.n + rows_per_tile - 1) / rows_per_tile;
  };
  // Split K while the tiles would leave SMs idle and every lane still gets a piece of each row slice.
  p.split = 1;
  while (p.split < kMaxSplit && tiles_for(p.split) < sms && 32 * p.split < loads_per_row) p.split *= 2;
  p.num_tiles = tiles_for(p.split);

  const auto kernel = skinny_linear_kernel<T, M, SILU>;
  const int shared_bytes = kRingBytes + M * p.stage_cols * static_cast<int>(sizeof(float));
  // The opt-in above 48 KiB of dynamic shared memory is per device; set it once for each.
  static std::atomic<uint64_t> large_shared_allowed{0};
  const uint64_t device_bit = uint64_t{1} << (device % 64);
  if (!(large_shared_allowed.load() & device_bit)) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kRingBytes + kMaxStageBytes);
    if (status != cudaSuccess) return status;
    large_shared_allowed.fetch_or(device_bit);
  }
  int blocks_per_sm = 0;
  status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, shared_bytes);
  if (status != cudaSuccess) return status;
  const int grid = std::min(p.num_tiles, std::max(blocks_per_sm, 1) * sms);
  kernel<<<grid, kThreads, shared_bytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool SILU>
cudaError_t launch_rows(int rows, const Problem& p, cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_typed<T, 1, SILU>(p, stream);
    case 2: return launch_typed<T, 2, SILU>(p, stream);
    case 3: return launch_typed<T, 3, SILU>(p, stream);
    case 4: return launch_typed<T, 4, SILU>(p, stream);
    case 5: return launch_typed<T, 5, SILU>(p, stream);
    case 6: return launch_typed<T, 6, SILU>(p, stream);
    case 7: return launch_typed<T, 7, SILU>(p, stream);
    case 8: return launch_typed<T, 8, SILU>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kSkinnyLinearMaxRows == 8, "launch_rows instantiates one kernel per row count");

}  // namespace

cudaError_t launch_skinny_linear(DType dtype, void* out, int64_t out_row_stride, const void* x,
                                 int64_t x_row_stride, const void* weight, int rows, int n_out, int k, bool silu_mul,
                                 cudaStream_t stream) {
  if (rows < 1 || rows > kSkinnyLinearMaxRows || n_out < 0 || k <= 0 || k % kSkinnyLinearKMultiple != 0)
    return cudaErrorInvalidValue;
  if (n_out == 0) return cudaSuccess;
  const Problem p{out, out_row_stride, x, x_row_stride, weight, n_out, k, 1, k, 0};
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    status = silu_mul ? launch_rows<T, true>(rows, p, stream) : launch_rows<T, false>(rows, p, stream);
  });
  return status;
}

}  // namespace nanovllm::kernels
