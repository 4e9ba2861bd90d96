// Skinny GEMM for decode: out[M, N] = a[M, K] @ weight[N, K]^T with M <= 8.
//
// At M <= 8 the weight is read once per call and dominates the bytes moved, so the kernel is a weight stream:
// - a warp owns kRowsPerWarp weight rows; its lanes walk K in 16-byte loads (ld.global.nc, no L1 allocation:
//   every weight byte is used once), kStepsPerBatch steps of all its rows issued before the first use, so a
//   lane keeps 8 loads in flight;
// - small N splits K over `split` warps of the block (their partial sums meet in shared memory), so even
//   N = 1024 fills every SM;
// - the activations (or silu(gate) * up, for the MLP down projection; or rms_norm(x + residual) * w, for the
//   projection after a residual add and norm; or rms_norm(x) * w, for the first layer's) are staged once per
//   block in shared memory as fp32; the first weight loads are issued before the staging, so its latency hides
//   behind them;
// - blocks loop over row tiles (a persistent grid for the LM head), so the activations are staged once per
//   block, not once per tile;
// - under programmatic dependent launch the first weight loads are issued before the wait for the kernel in
//   front (which produces the activations), so the weight stream overlaps that kernel's tail;
// - each warp reduces its M x kRowsPerWarp sums with a transposing butterfly (31 shuffles at M = 8, not 160).
#include <algorithm>
#include <atomic>
#include <type_traits>

#include "launch.cuh"
#include "skinny_linear.h"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
constexpr int kRowsPerWarp = 4;    // more rows per warp share each staged-activation read
constexpr int kStepsPerBatch = 2;  // with 4 rows: 8 weight loads in flight per lane
constexpr int kMaxSplit = 8;
// Shared memory for the staged fp32 activations: 96 KiB holds K = 3072 at M = 8 and leaves room for two blocks
// per SM; a longer K is staged in slices of this size.
constexpr int kMaxStageBytes = 96 * 1024;
constexpr int kStageColsMultiple = 256;

struct Problem {
  void* out;
  int64_t out_row_stride;
  const void* x;
  int64_t x_row_stride;
  SkinnyPrologue prologue;
  const void* weight;
  int n;
  int k;
  int split;       // warps sharing one group of rows, each taking every split-th run of 32 loads along K
  int stage_cols;  // K columns staged at a time (all of K unless it does not fit)
  int num_tiles;   // row tiles of (kWarps / split) * kRowsPerWarp rows
};

__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  // volatile keeps the loads ahead of the activation staging that follows them in program order.
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

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

// Stores 8 staged floats of row m from column col (a multiple of 8): two float4 runs at their staged offsets.
template <typename T>
__device__ __forceinline__ void store_staged8(float* staged, int m, int col, int cols, const float (&values)[8]) {
#pragma unroll
  for (int h = 0; h < 2; ++h)
    *reinterpret_cast<float4*>(staged + staged_offset<T>(m, col + 4 * h, cols)) =
        make_float4(values[4 * h], values[4 * h + 1], values[4 * h + 2], values[4 * h + 3]);
}

// One element of rms_norm(x + residual) * w, rounded to T as rms_norm's output is, so the product is that of the
// two unfused ops.
template <typename T>
__device__ __forceinline__ float normed(float sum, float inv_rms, T weight) {
  return to_float(from_float<T>(sum * inv_rms * to_float(weight)));
}

template <SkinnyPrologue::Kind P>
inline constexpr bool kNormalizes = P == SkinnyPrologue::Kind::kAddRmsNorm || P == SkinnyPrologue::Kind::kRmsNorm;

// The row the norm prologues normalise: x + residual rounded to T, as fused_add_rms_norm stores it; or x.
template <typename T, SkinnyPrologue::Kind P>
__device__ __forceinline__ Pack<T, 8> prenorm_row(const Problem& p, int m, int col) {
  const Pack<T, 8> x = load_pack<T, 8>(static_cast<const T*>(p.x) + m * p.x_row_stride + col);
  if constexpr (P == SkinnyPrologue::Kind::kRmsNorm) {
    return x;
  } else {
    const Pack<T, 8> r = load_pack<T, 8>(static_cast<const T*>(p.prologue.residual) + m * p.k + col);
    Pack<T, 8> sum;
#pragma unroll
    for (int j = 0; j < 8; ++j) sum.v[j] = from_float<T>(to_float(r.v[j]) + to_float(x.v[j]));
    return sum;
  }
}

// kAddRmsNorm: block 0 writes the sums x + residual (the next residual) as it stages them.
template <typename T, SkinnyPrologue::Kind P>
__device__ __forceinline__ void store_residual_out(const Problem& p, int m, int col, const Pack<T, 8>& sum) {
  if constexpr (P == SkinnyPrologue::Kind::kAddRmsNorm) {
    if (blockIdx.x == 0) store_pack(static_cast<T*>(p.prologue.residual_out) + m * p.k + col, sum);
  }
}

// The norm prologues, once per block before the first staging: inv_rms[m] of row m (warp m). Loads only, so the
// unrolled loads of a lane go out together.
template <typename T, int M, SkinnyPrologue::Kind P>
__device__ void compute_row_scales(const Problem& p, float* inv_rms) {
  static_assert(M <= kWarps, "one warp per row");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= M) return;
  float sum_squares = 0.f;
#pragma unroll 4
  for (int col = lane * 8; col < p.k; col += 32 * 8) {
    const Pack<T, 8> sum = prenorm_row<T, P>(p, warp, col);
#pragma unroll
    for (int j = 0; j < 8; ++j) sum_squares += to_float(sum.v[j]) * to_float(sum.v[j]);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  if (lane == 0) inv_rms[warp] = rsqrtf(sum_squares / p.k + p.prologue.eps);
}

// Stages a[m][k0 + col] in fp32 for col < cols (layout: staged_offset); every thread of the block calls it.
template <typename T, int M, SkinnyPrologue::Kind P>
__device__ void stage_activations(float* staged, const Problem& p, int k0, int cols, const float* inv_rms) {
  const T* x = static_cast<const T*>(p.x);
  const int packs_per_row = cols / 8;
  for (int i = threadIdx.x; i < M * packs_per_row; i += kThreads) {
    const int m = i / packs_per_row;
    const int col = (i % packs_per_row) * 8;
    const T* row = x + m * p.x_row_stride + k0 + col;
    float values[8];
    if constexpr (P == SkinnyPrologue::Kind::kSiluMul) {
      const Pack<T, 8> first = load_pack<T, 8>(row);
      const Pack<T, 8> up = load_pack<T, 8>(row + p.k);
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = silu(to_float(first.v[j])) * to_float(up.v[j]);
    } else if constexpr (kNormalizes<P>) {
      const Pack<T, 8> sum = prenorm_row<T, P>(p, m, k0 + col);
      const Pack<T, 8> w = load_pack<T, 8>(static_cast<const T*>(p.prologue.norm_weight) + k0 + col);
      store_residual_out<T, P>(p, m, k0 + col, sum);
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = normed(to_float(sum.v[j]), inv_rms[m], w.v[j]);
    } else {
      const Pack<T, 8> first = load_pack<T, 8>(row);
#pragma unroll
      for (int j = 0; j < 8; ++j) values[j] = to_float(first.v[j]);
    }
    store_staged8<T>(staged, m, col, cols, values);
  }
}

// The norm prologues in one pass over their inputs, when all of K is staged at once and a thread owns at most one
// 8-column pack of each row (kNormPassCols): the rows (x + residual, or x) go to the stage as they are loaded,
// their squares meet in shared memory, and the stage is scaled in place. compute_row_scales then
// stage_activations load the inputs twice, one more L2 round trip after the wait.
constexpr int kNormPassCols = kThreads * 8;

template <typename T, int M, SkinnyPrologue::Kind P>
__device__ void stage_normed_activations(float* staged, const Problem& p, float (&row_squares)[kWarps][M]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int col = threadIdx.x * 8;
  const bool owns = col < p.k;
  Pack<T, 8> norm_weight = {};
  float squares[M] = {};
  if (owns) {
    norm_weight = load_pack<T, 8>(static_cast<const T*>(p.prologue.norm_weight) + col);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      const Pack<T, 8> sum = prenorm_row<T, P>(p, m, col);
      store_residual_out<T, P>(p, m, col, sum);
      float values[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        values[j] = to_float(sum.v[j]);
        squares[m] += values[j] * values[j];
      }
      store_staged8<T>(staged, m, col, p.k, values);
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m) {
    for (int offset = 16; offset > 0; offset /= 2) squares[m] += __shfl_xor_sync(0xffffffffu, squares[m], offset);
    if (lane == 0) row_squares[warp][m] = squares[m];
  }
  __syncthreads();
  if (!owns) return;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float total = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += row_squares[w][m];
    const float inv_rms = rsqrtf(total / p.k + p.prologue.eps);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float4* slot = reinterpret_cast<float4*>(staged + staged_offset<T>(m, col + 4 * h, p.k));
      const float4 sum = *slot;
      const T* w = norm_weight.v + 4 * h;
      *slot = make_float4(normed(sum.x, inv_rms, w[0]), normed(sum.y, inv_rms, w[1]), normed(sum.z, inv_rms, w[2]),
                          normed(sum.w, inv_rms, w[3]));
    }
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

// Two blocks per SM at M <= 2 (64 registers, a few spilled): a block of the next kernel then fits beside one of
// this, so its weight loads start under programmatic launch (batch-1 decode step 0.89 -> 0.81 ms on an H200).
template <typename T, int M, SkinnyPrologue::Kind P>
__global__ void __launch_bounds__(kThreads, M <= 2 ? 2 : 1) skinny_linear_kernel(Problem p) {
  constexpr int V = kLoadElems<T>;
  constexpr int R = kRowsPerWarp;
  constexpr int U = kStepsPerBatch;
  constexpr int kSums = M * R;
  constexpr int kLog2Slots = log2_ceil(kSums);  // the butterfly works on a power-of-two number of sums
  static_assert(kLog2Slots <= 5, "one warp reduces at most 32 sums");

  extern __shared__ float4 stage_storage[];
  float* staged = reinterpret_cast<float*>(stage_storage);
  __shared__ float partials[kWarps][32];
  __shared__ float inv_rms[M];
  __shared__ float row_squares[kWarps][M];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int split = p.split;
  const int group = warp / split;
  const int part = warp % split;
  const int rows_per_tile = kWarps / split * R;
  const T* weight = static_cast<const T*>(p.weight);
  T* out = static_cast<T*>(p.out);
  const bool single_stage = p.stage_cols >= p.k;
  const bool one_pass_norm = single_stage && p.k <= kNormPassCols;
  bool staged_once = false;
  allow_dependent_launch();

  for (int tile = blockIdx.x; tile < p.num_tiles; tile += gridDim.x) {
    const int row0 = tile * rows_per_tile + group * R;
    float acc[M][R] = {};
    for (int k0 = 0; k0 < p.k; k0 += p.stage_cols) {
      const int cols = min(p.stage_cols, p.k - k0);
      const int loads_per_row = cols / V;
      const int stride = 32 * split;
      const int steps = (loads_per_row + stride - 1) / stride;  // the same for every warp: barriers stay uniform
      for (int s0 = 0; s0 < steps; s0 += U) {
        uint4 w[U][R];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int c = lane + 32 * part + stride * (s0 + u);
#pragma unroll
          for (int r = 0; r < R; ++r) {
            w[u][r] = make_uint4(0, 0, 0, 0);
            if (c < loads_per_row && row0 + r < p.n)
              w[u][r] = load_streaming(weight + static_cast<int64_t>(row0 + r) * p.k + k0 + c * V);
          }
        }
        if (s0 == 0 && (!staged_once || !single_stage)) {
          if (staged_once) {
            __syncthreads();  // every warp is done reading the previous slice
          } else {
            wait_for_prior_grids();  // the activations are the previous kernel's output
          }
          if constexpr (kNormalizes<P>) {
            if (one_pass_norm) {
              stage_normed_activations<T, M, P>(staged, p, row_squares);
            } else {
              if (!staged_once) {
                compute_row_scales<T, M, P>(p, inv_rms);
                __syncthreads();
              }
              stage_activations<T, M, P>(staged, p, k0, cols, inv_rms);
            }
          } else {
            stage_activations<T, M, P>(staged, p, k0, cols, inv_rms);
          }
          __syncthreads();
          staged_once = true;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          const int c = lane + 32 * part + stride * (s0 + u);
          if (c >= loads_per_row) continue;
          float wf[R][V];
#pragma unroll
          for (int r = 0; r < R; ++r) unpack<T>(w[u][r], wf[r]);
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
      }
    }

    float sums[1 << kLog2Slots];
#pragma unroll
    for (int i = 0; i < (1 << kLog2Slots); ++i) sums[i] = i < kSums ? acc[i / R][i % R] : 0.f;
    warp_transpose_sum<0>(sums, lane);
    const int slot = lane >> (5 - kLog2Slots);
    const bool writer = (lane & ((1 << (5 - kLog2Slots)) - 1)) == 0 && slot < kSums;
    if (split == 1) {
      const int row = row0 + slot % R;
      if (writer && row < p.n) out[(slot / R) * p.out_row_stride + row] = from_float<T>(sums[0]);
    } else {
      if (writer) partials[warp][slot] = sums[0];
      __syncthreads();
      const int groups = kWarps / split;
      if (threadIdx.x < groups * kSums) {
        const int g = threadIdx.x / kSums;
        const int s = threadIdx.x % kSums;
        float total = 0.f;
        for (int q = 0; q < split; ++q) total += partials[g * split + q][s];
        const int row = tile * rows_per_tile + g * R + s % R;
        if (row < p.n) out[(s / R) * p.out_row_stride + row] = from_float<T>(total);
      }
      __syncthreads();  // partials are reused by the next tile
    }
  }
}

template <typename T, int M, SkinnyPrologue::Kind P>
cudaError_t launch_typed(const Problem& base, cudaStream_t stream) {
  constexpr int V = kLoadElems<T>;
  Problem p = base;
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return status;
  const int sms = std::max(current_device_traits().multiprocessors, 1);

  const int max_stage_cols = kMaxStageBytes / (4 * M) / kStageColsMultiple * kStageColsMultiple;
  p.stage_cols = std::min(p.k, max_stage_cols);
  const int loads_per_row = p.stage_cols / V;
  const auto tiles_for = [&](int split) {
    const int rows_per_tile = kWarps / split * kRowsPerWarp;
    return (p.n + rows_per_tile - 1) / rows_per_tile;
  };
  // Split K until one batch of loads covers a row slice, then further while the tiles leave SMs idle and
  // every lane still gets a load.
  p.split = 1;
  while (p.split < kMaxSplit && 32 * p.split * kStepsPerBatch < loads_per_row) p.split *= 2;
  while (p.split < kMaxSplit && tiles_for(p.split) < sms && 32 * p.split < loads_per_row) p.split *= 2;
  p.num_tiles = tiles_for(p.split);

  const auto kernel = skinny_linear_kernel<T, M, P>;
  const int stage_bytes = M * p.stage_cols * static_cast<int>(sizeof(float));
  // The opt-in above 48 KiB of dynamic shared memory is per device; set it once for each.
  static std::atomic<uint64_t> large_stage_allowed{0};
  const uint64_t device_bit = uint64_t{1} << (device % 64);
  if (!(large_stage_allowed.load() & device_bit)) {
    status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kMaxStageBytes);
    if (status != cudaSuccess) return status;
    large_stage_allowed.fetch_or(device_bit);
  }
  int blocks_per_sm = 0;
  status = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, stage_bytes);
  if (status != cudaSuccess) return status;
  const int grid = std::min(p.num_tiles, std::max(blocks_per_sm, 1) * sms);
  return launch_kernel(kernel, {dim3(grid), dim3(kThreads), static_cast<size_t>(stage_bytes)}, stream, p);
}

template <typename T, SkinnyPrologue::Kind P>
cudaError_t launch_rows(int rows, const Problem& p, cudaStream_t stream) {
  switch (rows) {
    case 1: return launch_typed<T, 1, P>(p, stream);
    case 2: return launch_typed<T, 2, P>(p, stream);
    case 3: return launch_typed<T, 3, P>(p, stream);
    case 4: return launch_typed<T, 4, P>(p, stream);
    case 5: return launch_typed<T, 5, P>(p, stream);
    case 6: return launch_typed<T, 6, P>(p, stream);
    case 7: return launch_typed<T, 7, P>(p, stream);
    case 8: return launch_typed<T, 8, P>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}
static_assert(kSkinnyLinearMaxRows == 8, "launch_rows instantiates one kernel per row count");

}  // namespace

cudaError_t launch_skinny_linear(DType dtype, void* out, int64_t out_row_stride, const void* x,
                                 int64_t x_row_stride, const SkinnyPrologue& prologue, const void* weight, int rows,
                                 int n_out, int k, cudaStream_t stream) {
  if (rows < 1 || rows > kSkinnyLinearMaxRows || n_out < 0 || k <= 0 || k % kSkinnyLinearKMultiple != 0)
    return cudaErrorInvalidValue;
  if (n_out == 0) return cudaSuccess;
  const Problem p{out, out_row_stride, x, x_row_stride, prologue, weight, n_out, k, 1, k, 0};
  using Kind = SkinnyPrologue::Kind;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    switch (prologue.kind) {
      case Kind::kNone: status = launch_rows<T, Kind::kNone>(rows, p, stream); break;
      case Kind::kSiluMul: status = launch_rows<T, Kind::kSiluMul>(rows, p, stream); break;
      case Kind::kAddRmsNorm: status = launch_rows<T, Kind::kAddRmsNorm>(rows, p, stream); break;
      case Kind::kRmsNorm: status = launch_rows<T, Kind::kRmsNorm>(rows, p, stream); break;
    }
  });
  return status;
}

}  // namespace nanovllm::kernels
