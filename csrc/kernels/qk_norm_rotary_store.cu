// The attention block's elementwise prologue in one launch: per-head RMSNorm of q and k (Qwen3; skipped when no
// weights are given), NeoX rotary of q and k in place, and the store of k and v into the paged cache.
//
// Work is split into "head slots": each token has num_q_heads query slots, num_kv_heads key slots and
// num_kv_heads value slots, and a group of `group` threads (a power of two <= 32, so the norm's sum is a few
// warp shuffles) owns one slot. Lane l holds the rotary pairs j = l + i * group: WIDTH elements at j * WIDTH of
// the first half and their partners half + j * WIDTH, so the norm, the rotation and the stores all work on
// registers. Every load a slot needs (x, norm weight, cos/sin, cache slot) is issued before the sum of squares;
// the only dependent round trip is position -> cos/sin row. The arithmetic and the roundings are those of rms_norm
// followed by rotary_embedding (the normalised head is rounded to the storage dtype, then rotated), so the fused
// op matches the separate kernels up to the order of the sum of squares.
#include "elementwise_launchers.h"
#include "launch.cuh"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kBlockThreads = 256;

struct FusedArgs {
  const int64_t* positions;
  void* query;
  HeadLayout query_layout;
  void* key;
  HeadLayout key_layout;
  const void* value;
  HeadLayout value_layout;
  const void* q_norm_weight;  // both null: no norm
  const void* k_norm_weight;
  const float* cos_sin_cache;
  void* k_cache;
  void* v_cache;
  const int64_t* slot_mapping;
  int64_t num_tokens;
  int num_q_heads;
  int num_kv_heads;
  int head_dim;
  float eps;
};

template <typename T, int WIDTH, int PAIRS>
__global__ void __launch_bounds__(kBlockThreads) qk_norm_rotary_store_kernel(FusedArgs args, int group) {
  start_after_prior_grids();
  const int lane = threadIdx.x & (group - 1);
  const int slots_per_token = args.num_q_heads + 2 * args.num_kv_heads;
  const int64_t work = static_cast<int64_t>(blockIdx.x) * (kBlockThreads / group) + threadIdx.x / group;
  const bool live = work < args.num_tokens * slots_per_token;  // dead threads still join the shuffles
  const int64_t token = live ? work / slots_per_token : 0;
  const int head_slot = static_cast<int>(work - token * slots_per_token);
  const bool is_query = head_slot < args.num_q_heads;
  const bool is_value = head_slot >= args.num_q_heads + args.num_kv_heads;
  const int head = is_query ? head_slot : head_slot - args.num_q_heads - (is_value ? args.num_kv_heads : 0);
  const int half = args.head_dim / 2;

  const HeadLayout& layout = is_query ? args.query_layout : is_value ? args.value_layout : args.key_layout;
  const int64_t row = token * layout.token_stride + head * layout.head_stride;
  T* rotated = is_value ? nullptr : static_cast<T*>(is_query ? args.query : args.key) + row;  // written in place
  const T* x = is_value ? static_cast<const T*>(args.value) + row : rotated;
  const T* weight = static_cast<const T*>(is_query ? args.q_norm_weight : args.k_norm_weight);
  const bool norm = weight != nullptr && !is_value;

  const int64_t position = live && !is_value ? args.positions[token] : 0;
  const int64_t cache_slot = live && !is_query ? args.slot_mapping[token] : -1;
  const float* cos = args.cos_sin_cache + position * args.head_dim;
  const float* sin = cos + half;

  Pack<T, WIDTH> first[PAIRS], second[PAIRS], w_first[PAIRS], w_second[PAIRS];
  Pack<float, WIDTH> c[PAIRS], s[PAIRS];
  float sum_squares = 0.f;
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int offset = (lane + i * group) * WIDTH;
    if (!live || offset >= half) continue;
    first[i] = load_pack<T, WIDTH>(x + offset);
    second[i] = load_pack<T, WIDTH>(x + half + offset);
    if (norm) {
      w_first[i] = load_pack<T, WIDTH>(weight + offset);
      w_second[i] = load_pack<T, WIDTH>(weight + half + offset);
    }
    if (!is_value) {
      c[i] = load_pack<float, WIDTH>(cos + offset);
      s[i] = load_pack<float, WIDTH>(sin + offset);
    }
#pragma unroll
    for (int j = 0; j < WIDTH; ++j) {
      const float a = to_float(first[i].v[j]), b = to_float(second[i].v[j]);
      sum_squares += a * a + b * b;
    }
  }
  for (int offset = group / 2; offset > 0; offset /= 2)
    sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, offset);
  if (!live) return;
  const float inv_rms = rsqrtf(sum_squares / args.head_dim + args.eps);

  T* cache_row = nullptr;
  if (cache_slot >= 0)
    cache_row = static_cast<T*>(is_value ? args.v_cache : args.k_cache) +
                (cache_slot * args.num_kv_heads + head) * args.head_dim;
#pragma unroll
  for (int i = 0; i < PAIRS; ++i) {
    const int offset = (lane + i * group) * WIDTH;
    if (offset >= half) continue;
    if (!is_value) {
#pragma unroll
      for (int j = 0; j < WIDTH; ++j) {
        if (norm) {
          first[i].v[j] = from_float<T>(to_float(first[i].v[j]) * inv_rms * to_float(w_first[i].v[j]));
          second[i].v[j] = from_float<T>(to_float(second[i].v[j]) * inv_rms * to_float(w_second[i].v[j]));
        }
        const float x1 = to_float(first[i].v[j]), x2 = to_float(second[i].v[j]);
        first[i].v[j] = from_float<T>(x1 * c[i].v[j] - x2 * s[i].v[j]);
        second[i].v[j] = from_float<T>(x2 * c[i].v[j] + x1 * s[i].v[j]);
      }
      store_pack(rotated + offset, first[i]);
      store_pack(rotated + half + offset, second[i]);
    }
    if (cache_row != nullptr) {
      store_pack(cache_row + offset, first[i]);
      store_pack(cache_row + half + offset, second[i]);
    }
  }
}

int next_pow2(int value) {
  int p = 1;
  while (p < value) p *= 2;
  return p;
}

template <typename T, int WIDTH, int PAIRS>
cudaError_t launch(const FusedArgs& args, cudaStream_t stream) {
  const int group = next_pow2((args.head_dim / 2 / WIDTH + PAIRS - 1) / PAIRS);
  const int64_t work = args.num_tokens * (args.num_q_heads + 2 * args.num_kv_heads);
  const int64_t slots_per_block = kBlockThreads / group;
  const int64_t blocks = (work + slots_per_block - 1) / slots_per_block;
  return launch_kernel(qk_norm_rotary_store_kernel<T, WIDTH, PAIRS>,
                       {dim3(static_cast<unsigned>(blocks)), dim3(kBlockThreads)}, stream, args, group);
}

// As few pairs per lane as a warp allows: each one costs ~40 live registers at 16-byte packs, and the register
// count bounds how many blocks an SM holds at large token counts. 16-byte packs need at most 2 pairs per lane
// (fp32, head_dim 512), single elements up to 8.
template <typename T, int WIDTH, int MAX_PAIRS>
cudaError_t launch_pairs(const FusedArgs& args, cudaStream_t stream) {
  const int pairs_per_lane = (args.head_dim / 2 / WIDTH + 31) / 32;
  if (pairs_per_lane <= 1) return launch<T, WIDTH, 1>(args, stream);
  if (pairs_per_lane <= 2) return launch<T, WIDTH, 2>(args, stream);
  if constexpr (MAX_PAIRS > 2) {
    if (pairs_per_lane <= 4) return launch<T, WIDTH, 4>(args, stream);
    if (pairs_per_lane <= 8) return launch<T, WIDTH, 8>(args, stream);
  }
  return cudaErrorInvalidValue;  // unreachable for head_dim <= kQkNormRotaryMaxHeadDim
}

bool layout_is_aligned(const void* base, const HeadLayout& layout, int width) {
  return is_aligned16(base) && layout.token_stride % width == 0 && layout.head_stride % width == 0;
}

}  // namespace

cudaError_t launch_qk_norm_rotary_store(DType dtype, const int64_t* positions, void* query, HeadLayout query_layout,
                                        int num_q_heads, void* key, HeadLayout key_layout, const void* value,
                                        HeadLayout value_layout, int num_kv_heads, const void* q_norm_weight,
                                        const void* k_norm_weight, const float* cos_sin_cache, void* k_cache,
                                        void* v_cache, const int64_t* slot_mapping, int64_t num_tokens,
                                        int head_dim, float eps, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const FusedArgs args{positions,     query,         query_layout,  key,          key_layout,
                       value,         value_layout,  q_norm_weight, k_norm_weight, cos_sin_cache,
                       k_cache,       v_cache,       slot_mapping,  num_tokens,   num_q_heads,
                       num_kv_heads,  head_dim,      eps};
  cudaError_t status = cudaSuccess;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kWidth = kElemsPer16B<T>;
    // Packs of both halves need head_dim/2 to be whole packs; every base and stride must keep them 16-byte
    // aligned (the cos/sin packs of kWidth floats then are too).
    const bool vectorized = head_dim / 2 % kWidth == 0 && layout_is_aligned(query, query_layout, kWidth) &&
                            layout_is_aligned(key, key_layout, kWidth) &&
                            layout_is_aligned(value, value_layout, kWidth) && is_aligned16(cos_sin_cache) &&
                            is_aligned16(k_cache) && is_aligned16(v_cache) &&
                            (q_norm_weight == nullptr || (is_aligned16(q_norm_weight) && is_aligned16(k_norm_weight)));
    status = vectorized ? launch_pairs<T, kWidth, 2>(args, stream) : launch_pairs<T, 1, 8>(args, stream);
  });
  return status;
}

}  // namespace nanovllm::kernels
