// Token sampling: greedy argmax and Gumbel-max sampling in one pass over the logits.
//
// Sampling from softmax(logit / T) is argmax_v(logit_v * (1 / T) - log(E_v)) with E_v ~ Exp(1) independent;
// E_v = -log(u_v), where u_v is a counter-based hash of (the row's key, v). So a row needs no softmax, no
// random-number state and no [rows, vocab] noise tensor: one block per row reads its logits once (16-byte loads),
// each thread keeps its best (score, index), and a block reduce picks the winner (ties to the lowest index, like
// torch.argmax). The two logs of each logit bound the kernel by instructions, not bytes, so they take the special
// function unit's log2 (one instruction each) wherever its error stays at a few ulp of the result, and a short
// series where it would not (E near 0, the largest noise: see log2_uniform).
// A few rows alone would leave most SMs idle while one block walks 150K logits: on Hopper each row then gets a
// cluster of blocks, each taking an interleaved slice of the row, and block 0 of the cluster reduces the others'
// winners through distributed shared memory (no scratch buffer, one launch).
// The same function is nanovllm_cpp.reference.sample_tokens, bit for bit up to a few ulp of the logs.
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

// The 32-bit xor-shift-multiply hash of the reference (nanovllm_cpp.reference._mix32).
__device__ __forceinline__ uint32_t mix32(uint32_t x) {
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  x = (x ^ (x >> 16)) * 0x45D9F3Bu;
  return x ^ (x >> 16);
}

constexpr float kLn2 = 0.693147180559945f;

// The special function unit's log2 and reciprocal, one instruction each (the operands here are normal floats).
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float fast_reciprocal(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// The uniform (m + 0.5) / 2^23 of the top 23 bits m of a hash, strictly inside (0, 1), built from its bits without an
// int-to-float conversion: 1 + m / 2^23 minus (1 - 2^-24) is exact (Sterbenz), the same value the reference computes.
__device__ __forceinline__ float uniform_of(uint32_t bits) {
  return __uint_as_float(0x3F800000u | (bits >> 9)) - 0.99999994f;
}

// log2(u) (negative), so that -ln(u) = -ln 2 * this, with a relative error of a few ulp. Below 0.5, lg2.approx is
// within 2 ulp. Above, its absolute error of 2^-22 would swamp log2(u), which nears 0 (down to -8.6e-8) as u nears
// 1: the largest noise, the likeliest winner. There ln(u) = -2 atanh(s) with s = (1 - u) / (1 + u) in [0, 1/3]
// (1 - u is exact), a series in s^2 that ends past 1e-8 of its first term.
__device__ __forceinline__ float log2_uniform(float u) {
  const float s = (1.f - u) * fast_reciprocal(1.f + u), z = s * s;
  constexpr float c = -2.f / kLn2;
  float series = c / 13.f;
  series = fmaf(series, z, c / 11.f);
  series = fmaf(series, z, c / 9.f);
  series = fmaf(series, z, c / 7.f);
  series = fmaf(series, z, c / 5.f);
  series = fmaf(series, z, c / 3.f);
  series = fmaf(series, z, c);
  // Both ways are computed and one selected: as a branch (what the compiler makes of `?:` here) each element
  // would be a divergent region, and the elements of a pack could no longer overlap.
  float log2_u;
  asm("{\n\t.reg .pred below;\n\tsetp.lt.f32 below, %1, 0f3F000000;\n\tselp.f32 %0, %2, %3, below;\n\t}"
      : "=f"(log2_u)
      : "f"(u), "f"(fast_log2(u)), "f"(s * series));
  return log2_u;
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

// This thread's best over its packs of the row (pack p at p * kWidth; packs first, first + stride, ...) and its
// share of the tail past the last whole pack. kSample: Gumbel-max scores, else the logits themselves.
template <bool kSample, typename T, int kWidth>
__device__ __forceinline__ Best scan_row(const T* row_logits, int vocab, int first, int stride, uint32_t row_hash,
                                         float inv_temperature) {
  Best best{-INFINITY, INT_MAX};
  auto consider = [&](float logit, int v) {
    float score = logit;
    if constexpr (kSample) {
      const float u = uniform_of(mix32(row_hash ^ (static_cast<uint32_t>(v) * 0x9E3779B1u)));
      // -ln(-ln u) = -ln 2 * log2(-log2 u) - ln(ln 2): the constant moves every score alike, so it is left out.
      score = fmaf(-kLn2, fast_log2(-log2_uniform(u)), logit * inv_temperature);
    }
    if (score > best.score) best = {score, v};  // v only grows per thread: '>' keeps the lowest index of a tie
  };
  const int packs = vocab / kWidth;
  for (int p = first; p < packs; p += stride) {
    const Pack<T, kWidth> pack = load_pack<T, kWidth>(row_logits + p * kWidth);
#pragma unroll
    for (int i = 0; i < kWidth; ++i) consider(to_float(pack.v[i]), p * kWidth + i);
  }
  for (int v = packs * kWidth + first; v < vocab; v += stride) consider(to_float(row_logits[v]), v);
  return best;
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
  constexpr int kWidth = VECTOR ? kElemsPer16B<T> : 1;
  const int first = slice * kThreads + threadIdx.x, stride = slices * kThreads;
  Best best = temperature == 0.f
                  ? scan_row<false, T, kWidth>(row_logits, vocab, first, stride, 0, 0.f)
                  : scan_row<true, T, kWidth>(row_logits, vocab, first, stride,
                                              mix32(static_cast<uint32_t>(keys[row])), 1.f / temperature);

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
