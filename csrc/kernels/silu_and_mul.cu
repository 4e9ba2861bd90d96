// SiLU-and-multiply, the gated MLP's activation: out = silu(x[:, :d]) * x[:, d:], fp32 math, one rounding.
//
// One thread per 16-byte pack of out: it loads the matching packs of the gate and up halves, so every byte moves
// once in 16-byte accesses. Blocks are as wide as a row needs (up to kMaxThreads), one row per grid x index, so
// a decode step (one token) is a single block and a long prefill is one block per row.
#include "elementwise_launchers.h"
#include "launch.cuh"
#include "vec_utils.cuh"

#include <algorithm>

namespace nanovllm::kernels {
namespace {

constexpr int kMaxThreads = 512;

template <typename T, int WIDTH>
__global__ void __launch_bounds__(kMaxThreads)
silu_and_mul_kernel(T* out, int64_t out_row_stride, const T* x, int64_t x_row_stride, int d) {
  start_after_prior_grids();
  const int i = (blockIdx.y * blockDim.x + threadIdx.x) * WIDTH;
  if (i >= d) return;
  const T* row = x + blockIdx.x * x_row_stride;
  const Pack<T, WIDTH> gate = load_pack<T, WIDTH>(row + i);
  const Pack<T, WIDTH> up = load_pack<T, WIDTH>(row + d + i);
  Pack<T, WIDTH> result;
#pragma unroll
  for (int k = 0; k < WIDTH; ++k) {
    const float g = to_float(gate.v[k]);
    result.v[k] = from_float<T>(g / (1.f + expf(-g)) * to_float(up.v[k]));
  }
  store_pack(out + blockIdx.x * out_row_stride + i, result);
}

template <typename T, int WIDTH>
cudaError_t launch(void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride, int64_t num_tokens, int d,
                   cudaStream_t stream) {
  const int packs = d / WIDTH;
  const int threads = std::min(round_up(packs, 32), kMaxThreads);
  const dim3 grid(static_cast<unsigned>(num_tokens), (packs + threads - 1) / threads);
  return launch_kernel(silu_and_mul_kernel<T, WIDTH>, {grid, dim3(threads)}, stream, static_cast<T*>(out),
                       out_row_stride, static_cast<const T*>(x), x_row_stride, d);
}

}  // namespace

cudaError_t launch_silu_and_mul(DType dtype, void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride,
                                int64_t num_tokens, int d, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWidth = kElemsPer16B<T>;
    // 16-byte packs need every row start (of out, of x and of its up half) on a 16-byte boundary.
    const bool packed = d % kWidth == 0 && out_row_stride % kWidth == 0 && x_row_stride % kWidth == 0 &&
                        is_aligned16(out) && is_aligned16(x);
    status = packed ? launch<T, kWidth>(out, out_row_stride, x, x_row_stride, num_tokens, d, stream)
                    : launch<T, 1>(out, out_row_stride, x, x_row_stride, num_tokens, d, stream);
  });
  return status;
}

}  // namespace nanovllm::kernels
