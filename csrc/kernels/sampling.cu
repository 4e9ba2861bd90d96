// Token sampling: greedy argmax and Gumbel-max sampling in one pass over the logits.
//
// Sampling from softmax(logit / T) is argmax_v(logit_v / T - log(E_v)) with E_v ~ Exp(1) independent; E_v =
// -log(u_v), where u_v is a counter-based hash of (the row's key, v). So a row needs no softmax, no random-number
// state and no [rows, vocab] noise tensor: one block per row reads its logits once (16-byte loads), each thread
// keeps its best (score, index), and a block reduce picks the winner (ties to the lowest index, like torch.argmax).
// A few rows alone would leave most SMs idle while one block walks 150K logits: on Hopper each row then gets a
// cluster of blocks, each taking an interleaved slice of the row, and block 0 of the cluster reduces the others'
// winners through distributed shared memory (no scratch buffer, one launch).
// The same function is nanovllm_cpp.reference.sample_tokens, bit for bit up to the last ulp of logf.
#include <cooperative_groups.h>

#include <cfloat>
#include <climits>

#include "launch.cuh"
#include "sampling.h"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kThreads = 1024;
constexpr int kMaxSlices = 8;  // blocks per row: the portable cluster size limit

// The 32-bit xor-shift-multiply hash of the reference (nanovllm.layers.sampler.mix32).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

struct Best {
  float score;
  int index;
};

__device__ __forceinline__ Best better(Best a, Best b) {
  return (b.score > a.score || (b.score == a.score && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Best warp_best(Best b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    Best other{__shfl_xor_sync(0xffffffffu, b.score, offset), __shfl_xor_sync(0xffffffffu, b.index, offset)};
    b = better(b, other);
  }
  return b;
}

// Block b serves row b / slices and its slice b % slices; slices > 1 only in clusters of `slices` blocks.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kThreads) sample_tokens_kernel(int64_t* __restrict__ out,
                                                                 const T* __restrict__ logits, int64_t row_stride,
                                                                 int vocab, const float* __restrict__ temperatures,
                                                                 const int64_t* __restrict__ keys, int slices) {
  start_after_prior_grids();
  const int row = blockIdx.x / slices, slice = blockIdx.x % slices;
  const T* row_logits = logits + row * row_stride;
  const float temperature = temperatures[row];
  const bool greedy = temperature == 0.f;
  const uint32_t row_hash = mix32(static_cast<uint32_t>(keys[row]));
  Best best{-INFINITY, INT_MAX};

  auto consider = [&](float logit, int v) {
    float score = logit;
    if (!greedy) {
      const uint32_t bits = mix32(row_hash ^ (static_cast<uint32_t>(v) * 0x9E3779B1u));
      // 23 bits + 0.5 is exact in fp32 and keeps u strictly inside (0, 1).
      const float u = (static_cast<float>(bits >> 9) + 0.5f) * (1.f / 8388608.f);
      score = logit / temperature - logf(-logf(u));
    }
    if (score > best.score) best = {score, v};  // v only grows per thread: '>' keeps the lowest index of a tie
  };

  constexpr int kWidth = VECTOR ? kElemsPer16B<T> : 1;
  const int packs = vocab / kWidth, first = slice * kThreads + threadIdx.x, stride = slices * kThreads;
  for (int p = first; p < packs; p += stride) {
    const Pack<T, kWidth> pack = load_pack<T, kWidth>(row_logits + p * kWidth);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) consider(to_float(pack.v[i]), p * kWidth + i);
  }
  for (int v = packs * kWidth + first; v < vocab; v += stride) consider(to_float(row_logits[v]), v);

  __shared__ float warp_scores[kThreads / 32];
  __shared__ int warp_indices[kThreads / 32];
  __shared__ Best block_best;
  best = warp_best(best);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    warp_scores[warp] = best.score;
    warp_indices[warp] = best.index;
  }
  __syncthreads();
  if (warp == 0) {
    best = {warp_scores[lane], warp_indices[lane]};
    best = warp_best(best);
    if (lane == 0) block_best = best;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (slices > 1) {
    namespace cg = cooperative_groups;
    const cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every block's winner is in its shared memory
    if (slice == 0 && threadIdx.x == 0)
      for (int other = 1; other < slices; ++other)
        block_best = better(block_best, *cluster.map_shared_rank(&block_best, other));
    cluster.sync();  // the others' shared memory stays alive until block 0 has read it
  }
#endif
  // A row of NaNs only: no score compares greater, fall back to token 0 rather than an out-of-range id.
  if (slice == 0 && threadIdx.x == 0) out[row] = block_best.index == INT_MAX ? 0 : block_best.index;
}

// Blocks per row: 1, or (Hopper and later) the power of two that brings the grid closest to one block per SM.
int slices_per_row(int rows) {
  const DeviceTraits device = current_device_traits();
  if (device.compute_major < 9) return 1;
  int slices = 1;
  while (slices < kMaxSlices && rows * slices * 2 <= device.multiprocessors) slices *= 2;
  return slices;
}

template <typename T, bool VECTOR>
cudaError_t launch(int64_t* out, const T* logits, int64_t row_stride, int rows, int vocab, const float* temperatures,
                   const int64_t* keys, cudaStream_t stream) {
  const int slices = slices_per_row(rows);
  return launch_kernel(sample_tokens_kernel<T, VECTOR>,
                       {dim3(rows * slices), dim3(kThreads), 0, static_cast<unsigned>(slices)}, stream, out, logits,
                       row_stride, vocab, temperatures, keys, slices);
}

}  // namespace

cudaError_t launch_sample_tokens(int64_t* out, const void* logits, DType dtype, int64_t row_stride, int rows,
                                 int vocab, const float* temperatures, const int64_t* keys, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* typed = static_cast<const T*>(logits);
    const bool aligned = is_aligned16(typed) && row_stride % kElemsPer16B<T> == 0;
    status = aligned ? launch<T, true>(out, typed, row_stride, rows, vocab, temperatures, keys, stream)
                     : launch<T, false>(out, typed, row_stride, rows, vocab, temperatures, keys, stream);
  });
  return status;
}

}  // namespace nanovllm::kernels
