// NeoX (rotate-half) rotary embedding, in place on query and key in one launch.
//
// Element i of a head pairs with i + head_dim/2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with cos/sin
// read from the token's row of the fp32 cache. A thread rotates WIDTH consecutive pairs (16-byte packs of each
// half when aligned, single elements otherwise); blockDim.x threads walk one token's query heads then key heads,
// so the threads of a token share its cos/sin row through L1. blockDim.y tokens share a block.
#include "elementwise_launchers.h"
#include "launch.cuh"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kBlockThreads = 256;

template <typename T, int WIDTH>
__global__ void rotary_embedding_kernel(const int64_t* positions, T* query, HeadLayout query_layout, int num_q_heads,
                                        T* key, HeadLayout key_layout, int num_kv_heads, const float* cos_sin_cache,
                                        int64_t num_tokens, int head_dim) {
  start_after_prior_grids();
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) return;
  const int half = head_dim / 2;
  const int chunks_per_head = half / WIDTH;
  const int chunks = (num_q_heads + num_kv_heads) * chunks_per_head;
  const float* cos = cos_sin_cache + positions[token] * head_dim;
  const float* sin = cos + half;

  for (int chunk = threadIdx.x; chunk < chunks; chunk += blockDim.x) {
    const int head = chunk / chunks_per_head;
    const int offset = (chunk - head * chunks_per_head) * WIDTH;
    T* x = head < num_q_heads
               ? query + token * query_layout.token_stride + head * query_layout.head_stride + offset
               : key + token * key_layout.token_stride + (head - num_q_heads) * key_layout.head_stride + offset;
    Pack<T, WIDTH> first = load_pack<T, WIDTH>(x);
    Pack<T, WIDTH> second = load_pack<T, WIDTH>(x + half);
    const Pack<float, WIDTH> c = load_pack<float, WIDTH>(cos + offset);
    const Pack<float, WIDTH> s = load_pack<float, WIDTH>(sin + offset);
#pragma unroll
    for (int j = 0; j < WIDTH; ++j) {
      const float x1 = to_float(first.v[j]);
      const float x2 = to_float(second.v[j]);
      first.v[j] = from_float<T>(x1 * c.v[j] - x2 * s.v[j]);
      second.v[j] = from_float<T>(x2 * c.v[j] + x1 * s.v[j]);
    }
    store_pack(x, first);
    store_pack(x + half, second);
  }
}

template <typename T, int WIDTH>
cudaError_t launch(const int64_t* positions, T* query, HeadLayout query_layout, int num_q_heads, T* key,
                   HeadLayout key_layout, int num_kv_heads, const float* cos_sin_cache, int64_t num_tokens,
                   int head_dim, cudaStream_t stream) {
  const int chunks = (num_q_heads + num_kv_heads) * (head_dim / 2 / WIDTH);
  const int threads_x = chunks < kBlockThreads ? round_up(chunks, 32) : kBlockThreads;
  const dim3 block(threads_x, kBlockThreads / threads_x);
  const int64_t blocks = (num_tokens + block.y - 1) / block.y;
  return launch_kernel(rotary_embedding_kernel<T, WIDTH>, {dim3(static_cast<unsigned>(blocks)), block}, stream,
                       positions, query, query_layout, num_q_heads, key, key_layout, num_kv_heads, cos_sin_cache,
                       num_tokens, head_dim);
}

bool layout_is_aligned(const void* base, const HeadLayout& layout, int width) {
  return is_aligned16(base) && layout.token_stride % width == 0 && layout.head_stride % width == 0;
}

}  // namespace

cudaError_t launch_rotary_embedding(DType dtype, const int64_t* positions, void* query, HeadLayout query_layout,
                                    int num_q_heads, void* key, HeadLayout key_layout, int num_kv_heads,
                                    const float* cos_sin_cache, int64_t num_tokens, int head_dim,
                                    cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWidth = kElemsPer16B<T>;
    // Packs of both halves need head_dim/2 to be whole packs; the cos/sin packs (kWidth floats, >= 16 bytes) then
    // start at 16-byte multiples of an aligned cache.
    const bool vectorized = head_dim / 2 % kWidth == 0 && layout_is_aligned(query, query_layout, kWidth) &&
                            layout_is_aligned(key, key_layout, kWidth) && is_aligned16(cos_sin_cache);
    auto* q = static_cast<T*>(query);
    auto* k = static_cast<T*>(key);
    status = vectorized ? launch<T, kWidth>(positions, q, query_layout, num_q_heads, k, key_layout, num_kv_heads,
                                            cos_sin_cache, num_tokens, head_dim, stream)
                        : launch<T, 1>(positions, q, query_layout, num_q_heads, k, key_layout, num_kv_heads,
                                       cos_sin_cache, num_tokens, head_dim, stream);
  });
  return status;
}

}  // namespace nanovllm::kernels
