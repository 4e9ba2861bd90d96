// RMSNorm and fused residual-add + RMSNorm.
//
// A group of `group` threads (a power of two, 1..512) owns one row: each thread loads up to PACKS packs of
// WIDTH elements into registers, the group sums squares (warp shuffles, then shared memory when the group spans
// several warps), and the same registers are scaled and stored, so x is read from global memory once. Short rows
// (per-head q/k norm, head_dim 64/128) get small groups, several rows per warp; long rows get a block each.
//
// Where the weight is loaded depends on the grid. A small grid (decode: at most one block per SM) is pure
// latency, so the weight is loaded together with x and the row costs one memory round trip, not two (2.6 -> 1.9 us
// for one row of 1024 on an H100). A large grid keeps the weight load after the reduction: the preloaded weight
// costs ~35 registers a thread, and with them half the resident blocks that hide memory latency (16K rows of
// 1024 ran at 64% of copy bandwidth instead of 79%).
#include "elementwise_launchers.h"
#include "launch.cuh"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kBlockThreads = 256;  // threads per block when a row needs fewer
constexpr int kMaxGroup = 512;  // launch bound: leaves 128 registers a thread, no spills

__device__ __forceinline__ int64_t row_offset(const RowLayout& layout, int64_t row) {
  return row / layout.inner_rows * layout.outer_stride + row % layout.inner_rows * layout.inner_stride;
}

// Sum over the `group` threads that share a row. Every thread of the block must call it (it may synchronize).
__device__ __forceinline__ float group_sum(float value, int group) {
  for (int offset = min(group, 32) / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  if (group > 32) {
    __shared__ float warp_sums[kMaxGroup / 32];
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
    __syncthreads();
    const int warps = group / 32;
    const int first = threadIdx.x / group * warps;
    value = 0.f;
    for (int w = 0; w < warps; ++w) value += warp_sums[first + w];
  }
  return value;
}

// FUSED = false: out = norm(x) * w, residual unused.
// FUSED = true:  residual += x; out = norm(residual) * w, called with out == x (each element is read before the
//                same thread overwrites it).
// PRELOAD_WEIGHT: load the weight with x, before the reduction (see the top of the file).
template <typename T, int WIDTH, int PACKS, bool FUSED, bool PRELOAD_WEIGHT>
__global__ void __launch_bounds__(kMaxGroup, 1) rms_norm_kernel(T* out, RowLayout out_layout, const T* x,
                                                             RowLayout x_layout, T* residual,
                                                             RowLayout residual_layout, const T* weight,
                                                             int64_t num_rows, int hidden, int group, float eps) {
  start_after_prior_grids();
  const int lane = threadIdx.x & (group - 1);
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / group) + threadIdx.x / group;
  const bool live = row < num_rows;  // dead threads still join group_sum
  const int packs = hidden / WIDTH;

  Pack<T, WIDTH> values[PACKS], weights[PACKS];
  float sum_squares = 0.f;
  if (live) {
    // x and residual are loaded before the first store: the compiler cannot hoist a load above a store that may
    // alias it, and the loads in flight together are what hides memory latency.
    const T* x_row = x + row_offset(x_layout, row);
#pragma unroll
    for (int i = 0; i < PACKS; ++i) {
      const int p = lane + i * group;
      if (p < packs) {
        values[i] = load_pack<T, WIDTH>(x_row + p * WIDTH);
        if constexpr (PRELOAD_WEIGHT) weights[i] = load_pack<T, WIDTH>(weight + p * WIDTH);
      }
    }
    if constexpr (FUSED) {
      T* residual_row = residual + row_offset(residual_layout, row);
      Pack<T, WIDTH> sums[PACKS];
#pragma unroll
      for (int i = 0; i < PACKS; ++i) {
        const int p = lane + i * group;
        if (p < packs) sums[i] = load_pack<T, WIDTH>(residual_row + p * WIDTH);
      }
#pragma unroll
      for (int i = 0; i < PACKS; ++i) {
        const int p = lane + i * group;
        if (p < packs) {
#pragma unroll
          for (int j = 0; j < WIDTH; ++j)
            sums[i].v[j] = from_float<T>(to_float(sums[i].v[j]) + to_float(values[i].v[j]));
          store_pack(residual_row + p * WIDTH, sums[i]);
          values[i] = sums[i];  // normalise the rounded sum, as the reference does
        }
      }
    }
#pragma unroll
    for (int i = 0; i < PACKS; ++i) {
      const int p = lane + i * group;
      if (p < packs) {
#pragma unroll
        for (int j = 0; j < WIDTH; ++j) {
          const float v = to_float(values[i].v[j]);
          sum_squares += v * v;
        }
      }
    }
  }
  const float inv_rms = rsqrtf(group_sum(sum_squares, group) / hidden + eps);
  if (!live) return;
  T* out_row = out + row_offset(out_layout, row);
#pragma unroll
  for (int i = 0; i < PACKS; ++i) {
    const int p = lane + i * group;
    if (p < packs) {
      if constexpr (!PRELOAD_WEIGHT) weights[i] = load_pack<T, WIDTH>(weight + p * WIDTH);  // L1/L2: shared by rows
      Pack<T, WIDTH> result;
#pragma unroll
      for (int j = 0; j < WIDTH; ++j)
        result.v[j] = from_float<T>(to_float(values[i].v[j]) * inv_rms * to_float(weights[i].v[j]));
      store_pack(out_row + p * WIDTH, result);
    }
  }
}

bool layout_is_aligned(const void* base, const RowLayout& layout, int width) {
  return is_aligned16(base) && layout.outer_stride % width == 0 && layout.inner_stride % width == 0;
}

int next_pow2(int value) {
  int p = 1;
  while (p < value) p *= 2;
  return p;
}

// A cheap query (the runtime caches device attributes); false on error, which only costs the latency trick.
bool at_most_one_block_per_sm(int64_t blocks) {
  int device = 0, sms = 0;
  return cudaGetDevice(&device) == cudaSuccess &&
         cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && blocks <= sms;
}

template <typename T, int WIDTH, int PACKS, bool FUSED>
cudaError_t launch(T* out, RowLayout out_layout, const T* x, RowLayout x_layout, T* residual,
                   RowLayout residual_layout, const T* weight, int64_t num_rows, int hidden, float eps,
                   cudaStream_t stream) {
  const int packs = hidden / WIDTH;
  const int group = next_pow2((packs + PACKS - 1) / PACKS);
  if (group > kMaxGroup) return cudaErrorInvalidValue;  // unreachable for hidden <= kRmsNormMaxHidden
  const int threads = group > kBlockThreads ? group : kBlockThreads;
  const int rows_per_block = threads / group;
  const int64_t blocks = (num_rows + rows_per_block - 1) / rows_per_block;
  const auto kernel = at_most_one_block_per_sm(blocks) ? rms_norm_kernel<T, WIDTH, PACKS, FUSED, true>
                                                       : rms_norm_kernel<T, WIDTH, PACKS, FUSED, false>;
  return launch_kernel(kernel, {dim3(static_cast<unsigned>(blocks)), dim3(threads)}, stream, out, out_layout, x,
                       x_layout, residual, residual_layout, weight, num_rows, hidden, group, eps);
}

// 16-byte packs when every row start is 16-byte aligned and hidden is a whole number of packs; one element per
// access otherwise (odd hidden sizes such as 769, or views at odd offsets).
template <bool FUSED>
cudaError_t launch_any(DType dtype, void* out, RowLayout out_layout, const void* x, RowLayout x_layout,
                       void* residual, RowLayout residual_layout, const void* weight, int64_t num_rows, int hidden,
                       float eps, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWidth = kElemsPer16B<T>;
    const bool vectorized = hidden % kWidth == 0 && layout_is_aligned(out, out_layout, kWidth) &&
                            layout_is_aligned(x, x_layout, kWidth) && is_aligned16(weight) &&
                            (!FUSED || layout_is_aligned(residual, residual_layout, kWidth));
    auto* out_t = static_cast<T*>(out);
    auto* x_t = static_cast<const T*>(x);
    auto* residual_t = static_cast<T*>(residual);
    auto* weight_t = static_cast<const T*>(weight);
    // Both instantiations cover kRmsNormMaxHidden: 512 threads x 4 packs x (>= 4) elements, 512 x 16 x 1.
    status = vectorized ? launch<T, kWidth, 4, FUSED>(out_t, out_layout, x_t, x_layout, residual_t, residual_layout,
                                                      weight_t, num_rows, hidden, eps, stream)
                        : launch<T, 1, 16, FUSED>(out_t, out_layout, x_t, x_layout, residual_t, residual_layout,
                                                  weight_t, num_rows, hidden, eps, stream);
  });
  return status;
}

}  // namespace

cudaError_t launch_rms_norm(DType dtype, void* out, RowLayout out_layout, const void* x, RowLayout x_layout,
                            const void* weight, int64_t num_rows, int hidden, float eps, cudaStream_t stream) {
  return launch_any<false>(dtype, out, out_layout, x, x_layout, nullptr, RowLayout{}, weight, num_rows, hidden, eps,
                           stream);
}

cudaError_t launch_fused_add_rms_norm(DType dtype, void* x, RowLayout x_layout, void* residual,
                                      RowLayout residual_layout, const void* weight, int64_t num_rows, int hidden,
                                      float eps, cudaStream_t stream) {
  return launch_any<true>(dtype, x, x_layout, x, x_layout, residual, residual_layout, weight, num_rows, hidden, eps,
                          stream);
}

}  // namespace nanovllm::kernels
