// Paged-attention decode (one query token per sequence), flash-decoding style, in one kernel.
//
// One CTA per (partition, kv head, sequence). It serves all `group` query heads of its kv head, so every K/V row
// is read from memory once. Each warp walks its own tiles of the partition's tokens; a token's 16-byte chunks are
// spread over kLanesPerToken lanes (a warp reads whole 256-byte rows, several tokens per load instruction) and all
// K and V loads of a tile are issued before the first is used. Scores and the online softmax are fp32. The warps'
// (max, sum, output) states are merged through shared memory and written straight to `out` when the sequence fits
// in one partition; else to the float32 workspace, and the last partition of a (sequence, kv head) to finish
// combines them (a counter in the workspace), so a split costs no second kernel. CTAs of partitions past a
// sequence's length exit at once, so a launch shaped for max_context_len (CUDA graphs) costs what the actual
// lengths cost.
//
// With the fused prologue (DecodePrologue) the kernel also does the attention block's q/k norm, rotary and KV
// store, and it fetches the cached tokens of its first tile before waiting for the kernel in front (programmatic
// launch), which produces only q and the new token: at batch 1 that hides the cache's round trip and a launch.
// A split sequence's new token gets a CTA of its own, so that the CTA doing the prologue's extra work attends to
// nothing else.
#include "kernels/paged_attention.h"

#include "kernels/launch.cuh"
#include "kernels/vec_utils.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace nanovllm {
namespace {

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kTileAlign = 16;  // tiles never exceed (and partitions are multiples of) 16 tokens: one block
constexpr float kLog2e = 1.4426950408889634f;

// ---- 16-byte chunks of the storage type <-> float -------------------------------------------------------
template <typename T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);
};

__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[8], __nv_bfloat16) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // a bf16 is the top half of a float
    f[2 * i] = __uint_as_float(words[i] << 16);
    f[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[8], __half) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 pair = __half22float2(*reinterpret_cast<const __half2*>(&words[i]));
    f[2 * i] = pair.x;
    f[2 * i + 1] = pair.y;
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&f)[4], float) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}

template <typename T>
__device__ __forceinline__ float round_to(float x) { return kernels::to_float(kernels::from_float<T>(x)); }

// The inverse of unpack, for values already rounded to the storage type.
__device__ __forceinline__ uint4 pack(const float (&f)[8], __nv_bfloat16) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) words[i] = (__float_as_uint(f[2 * i]) >> 16) | (__float_as_uint(f[2 * i + 1]) & 0xffff0000u);
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ uint4 pack(const float (&f)[8], __half) {
  uint32_t words[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const __half2 pair = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    words[i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ uint4 pack(const float (&f)[4], float) {
  return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}

template <typename T>
__device__ __forceinline__ void store(T* dst, float x) { *dst = kernels::from_float<T>(x); }

__device__ __forceinline__ uint4 load_chunk(const void* ptr) { return __ldg(static_cast<const uint4*>(ptr)); }

__device__ __forceinline__ int sequence_length(const PagedAttentionParams& p, int seq) {
  return min(max(p.context_lens[seq], 0), p.max_context_len);
}

// exp2(x - m) where a max of -inf (nothing seen yet) must give 0 for x = -inf, not NaN.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// The workspace of a split launch: per (sequence, query head, CTA along x) a normalised partial output row, then
// all partial maxima, then all partial sums; and, counted back from the workspace's end (where no launch shape
// puts its rows), one counter of finished partitions per (sequence, kv head).
struct Workspace {
  float* out;
  float* max;
  float* sum;
  unsigned* counters_end;
  int num_kv_heads;
  __device__ Workspace(const PagedAttentionParams& p, int rows_per_head) : num_kv_heads(p.num_kv_heads) {
    const int64_t rows = int64_t(p.num_seqs) * p.num_q_heads * rows_per_head;
    out = p.workspace;
    max = out + rows * p.head_dim;
    sum = max + rows;
    counters_end = reinterpret_cast<unsigned*>(p.workspace + p.workspace_size);
  }
  __device__ unsigned* partitions_done(int seq, int kv_head) const {
    return counters_end - 1 - (int64_t(seq) * num_kv_heads + kv_head);
  }
};

template <typename T, int HEAD_DIM, int GROUP>
struct Layout {
  static constexpr int kElems = Chunk<T>::kElems;
  static constexpr int kLanesPerToken = HEAD_DIM / kElems;
  static constexpr int kTokensPerLoad = 32 / kLanesPerToken;
  // Loads in flight per lane; fewer for 8 heads, whose scores and accumulators need the registers.
  static constexpr int kUnroll = std::min(kTileAlign / kTokensPerLoad, GROUP >= 8 ? 4 : 8);
  static constexpr int kTile = kTokensPerLoad * kUnroll;
  static_assert(kLanesPerToken <= 32 && 32 % kLanesPerToken == 0, "a warp must cover whole rows");
  static_assert(kTileAlign % kTile == 0, "a tile must stay inside one 16-token-aligned span");
};

// One lane's E elements at d0 of a head spread over LANES lanes (the rotary partner of element d0 + i sits
// LANES / 2 lanes away): rms_norm when a weight is given, then the NeoX rotation, each rounded to T as
// qk_norm_rotary_store rounds them. Every lane of the warp calls it.
template <typename T, int LANES, int E>
__device__ __forceinline__ void norm_rotate(float (&x)[E], const float (&weight)[E], bool norm, const float (&cos_row)[E],
                                            const float (&sin_row)[E], bool first_half, int head_dim, float eps) {
  if (norm) {
    float sum_squares = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) sum_squares += x[i] * x[i];
#pragma unroll
    for (int o = LANES / 2; o > 0; o /= 2) sum_squares += __shfl_xor_sync(0xffffffffu, sum_squares, o);
    const float inv_rms = rsqrtf(sum_squares / head_dim + eps);
#pragma unroll
    for (int i = 0; i < E; ++i) x[i] = round_to<T>(x[i] * inv_rms * weight[i]);
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const float partner = __shfl_xor_sync(0xffffffffu, x[i], LANES / 2);
    x[i] = round_to<T>(first_half ? x[i] * cos_row[i] - partner * sin_row[i] : x[i] * cos_row[i] + partner * sin_row[i]);
  }
}

// Folds U loads of K/V (kTokensPerLoad tokens each, this lane's chunk of them) into the lane's online-softmax
// state of every query head.
template <typename T, int HEAD_DIM, int GROUP, int U>
__device__ __forceinline__ void attend(const uint4 (&k_raw)[U], const uint4 (&v_raw)[U], const bool (&live)[U],
                                       const float (&q)[GROUP][Chunk<T>::kElems], float (&m)[GROUP],
                                       float (&l)[GROUP], float (&acc)[GROUP][Chunk<T>::kElems]) {
  using L = Layout<T, HEAD_DIM, GROUP>;
  constexpr int E = L::kElems;
  float s[U][GROUP];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float k[E];
    unpack(k_raw[u], k, T{});
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      float dot = 0.f;
#pragma unroll
      for (int i = 0; i < E; ++i) dot = fmaf(q[h][i], k[i], dot);
      s[u][h] = dot;
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
      for (int o = L::kLanesPerToken / 2; o > 0; o /= 2) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], o);
      if (!live[u]) s[u][h] = -INFINITY;
    }
  }
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    float tile_max = s[0][h];
#pragma unroll
    for (int u = 1; u < U; ++u) tile_max = fmaxf(tile_max, s[u][h]);
    const float m_new = fmaxf(m[h], tile_max);
    const float m_ref = safe_max(m_new);
    const float correction = exp2f(m[h] - m_ref);
    m[h] = m_new;
    l[h] *= correction;
#pragma unroll
    for (int i = 0; i < E; ++i) acc[h][i] *= correction;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      s[u][h] = exp2f(s[u][h] - m_ref);
      l[h] += s[u][h];
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    float v[E];
    unpack(v_raw[u], v, T{});
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
      for (int i = 0; i < E; ++i) acc[h][i] = fmaf(s[u][h], v[i], acc[h][i]);
    }
  }
}

// kFused: the prologue of DecodePrologue. Its loads (the first tile's K/V, the position's cos/sin row, the norm
// weights) go out before the wait for the kernel in front, so their registers stay live through the prologue,
// which costs occupancy (~165 registers a thread, not ~126): the engine takes it at decode batches where latency,
// not bandwidth, sets the step time.
template <typename T, int HEAD_DIM, int GROUP, bool kFused>
__global__ void __launch_bounds__(kThreads)
paged_attention_kernel(const PagedAttentionParams p, int partition_size, int num_partitions) {
  using L = Layout<T, HEAD_DIM, GROUP>;
  constexpr int E = L::kElems;
  constexpr int U = L::kUnroll;
  constexpr int kLanes = L::kLanesPerToken;
  const DecodePrologue& pro = p.prologue;
  kernels::allow_dependent_launch();
  // Unfused, the kernel in front may have stored any of the cached tokens; fused, it stores none of them (and the
  // lengths, tables and positions come from the host).
  if (!kFused) kernels::wait_for_prior_grids();

  // The grid runs kv head fastest, then sequence, then CTA along the context (see launch).
  const int kv_head = blockIdx.x, seq = blockIdx.y;
  const int len = sequence_length(p, seq);
  const bool whole_sequence = len <= partition_size;  // one partition: no combine, write out directly
  // Fused, a sequence longer than one partition has its newest token in a CTA of its own, the first along the
  // context (launched only then): its norm, rotary, store and attention run beside the partitions', not on top
  // of the last partition's.
  const bool new_token_apart = kFused && !whole_sequence;
  const bool has_new_token_ctas = int(gridDim.z) > num_partitions;
  const bool new_token_cta = has_new_token_ctas && blockIdx.z == 0;
  const int partition = int(blockIdx.z) - (has_new_token_ctas ? 1 : 0);
  const int tokens = new_token_apart ? len - 1 : len;  // the tokens the partitions cut
  const int start = new_token_cta ? len - 1 : partition * partition_size;
  if (new_token_cta ? !new_token_apart : start >= tokens) return;  // padding row, or past this sequence's end
  const int end = new_token_cta ? len : min(start + partition_size, tokens);
  const bool new_token_here = kFused && end == len;  // this CTA stores and attends to token len - 1 itself
  const int cached_end = new_token_here ? len - 1 : end;
  // Partial rows, in token order: the partitions', then the new token's.
  const int parts = (tokens + partition_size - 1) / partition_size + (new_token_apart ? 1 : 0);
  const int part = new_token_cta ? parts - 1 : partition;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / kLanes;          // which token of a load this lane reads
  const int d0 = (lane % kLanes) * E;      // first of this lane's E elements of a row
  const int group = p.num_q_heads / p.num_kv_heads;  // <= GROUP; heads past it are computed, not written
  const float scale_log2 = p.scale * kLog2e;         // softmax in base 2

  const int64_t token_stride = int64_t(p.num_kv_heads) * HEAD_DIM;
  const int64_t block_stride = token_stride * p.block_size;
  const int64_t lane_offset = kv_head * HEAD_DIM + d0 + slot * token_stride;
  const T* k_lane = static_cast<const T*>(p.k_cache) + lane_offset;
  const T* v_lane = static_cast<const T*>(p.v_cache) + lane_offset;
  const int* table = p.block_tables + seq * p.block_table_stride;
  const int block_shift = __ffs(p.block_size) - 1;
  constexpr int kStep = kNumWarps * L::kTile;

  uint4 k_raw[U], v_raw[U];
  bool live[U];
  const auto load_tile = [&](int tile, int block) {
    const int64_t base = block * block_stride + (tile & (p.block_size - 1)) * token_stride;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      live[u] = tile + u * L::kTokensPerLoad + slot < cached_end;
      const int64_t offset = base + u * L::kTokensPerLoad * token_stride;
      k_raw[u] = live[u] ? load_chunk(k_lane + offset) : make_uint4(0, 0, 0, 0);
      v_raw[u] = live[u] ? load_chunk(v_lane + offset) : make_uint4(0, 0, 0, 0);
    }
  };
  int tile = start + warp * L::kTile;
  if (kFused && tile < cached_end) load_tile(tile, table[tile >> block_shift]);

  const bool first_half = d0 < HEAD_DIM / 2;
  const bool norm = kFused && pro.q_norm_weight != nullptr;
  float q_weight[E] = {}, k_weight[E] = {}, cos_row[E] = {}, sin_row[E] = {};
  if constexpr (kFused) {
    const float* row = pro.cos_sin_cache + pro.positions[seq] * HEAD_DIM + d0 % (HEAD_DIM / 2);
#pragma unroll
    for (int i = 0; i < E; i += 4) {
      const float4 c = *reinterpret_cast<const float4*>(row + i);
      const float4 s = *reinterpret_cast<const float4*>(row + HEAD_DIM / 2 + i);
      cos_row[i] = c.x, cos_row[i + 1] = c.y, cos_row[i + 2] = c.z, cos_row[i + 3] = c.w;
      sin_row[i] = s.x, sin_row[i + 1] = s.y, sin_row[i + 2] = s.z, sin_row[i + 3] = s.w;
    }
    if (norm) {
      unpack(load_chunk(static_cast<const T*>(pro.q_norm_weight) + d0), q_weight, T{});
      unpack(load_chunk(static_cast<const T*>(pro.k_norm_weight) + d0), k_weight, T{});
    }
    kernels::wait_for_prior_grids();
  }

  float q[GROUP][E];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    if (h < group) {
      const T* row = static_cast<const T*>(p.query) + seq * p.query_seq_stride +
                     (kv_head * group + h) * p.query_head_stride + d0;
      unpack(load_chunk(row), q[h], T{});
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) q[h][i] = 0.f;
    }
  }
  // The new token's key and value, loaded with q: warp 0 of its CTA attends to it, lanes of token slot 0 store it.
  const bool attends_new_token = new_token_here && warp == 0;
  uint4 new_k[1] = {}, new_v[1] = {};
  if (attends_new_token) {
    new_k[0] = load_chunk(static_cast<const T*>(pro.key) + seq * pro.key_seq_stride + kv_head * pro.key_head_stride + d0);
    new_v[0] = load_chunk(static_cast<const T*>(pro.value) + seq * pro.value_seq_stride +
                          kv_head * pro.value_head_stride + d0);
  }
  if constexpr (kFused) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h)
      norm_rotate<T, kLanes>(q[h], q_weight, norm, cos_row, sin_row, first_half, HEAD_DIM, pro.eps);
  }
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
#pragma unroll
    for (int i = 0; i < E; ++i) q[h][i] *= scale_log2;
  }

  float m[GROUP], l[GROUP], acc[GROUP][E];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) acc[h][i] = 0.f;
  }

  if (attends_new_token) {  // first, so that its registers are free again for the loop
    float k[E];
    unpack(new_k[0], k, T{});
    norm_rotate<T, kLanes>(k, k_weight, norm, cos_row, sin_row, first_half, HEAD_DIM, pro.eps);
    new_k[0] = pack(k, T{});
    const int64_t cache_slot = pro.slot_mapping[seq];
    if (slot == 0 && cache_slot >= 0) {
      const int64_t row = (cache_slot * p.num_kv_heads + kv_head) * HEAD_DIM + d0;
      *reinterpret_cast<uint4*>(static_cast<T*>(p.k_cache) + row) = new_k[0];
      *reinterpret_cast<uint4*>(static_cast<T*>(p.v_cache) + row) = new_v[0];
    }
    const bool only_slot_zero[1] = {slot == 0};
    attend<T, HEAD_DIM, GROUP, 1>(new_k, new_v, only_slot_zero, q, m, l, acc);
  }

  bool loaded = kFused;  // the first tile's loads went out before the wait
  int block = tile < cached_end ? table[tile >> block_shift] : 0;
  for (; tile < cached_end; tile += kStep) {
    const int next = tile + kStep;
    const int next_block = next < cached_end ? table[next >> block_shift] : 0;  // in flight during this tile
    if (!loaded) load_tile(tile, block);
    loaded = false;
    attend<T, HEAD_DIM, GROUP, U>(k_raw, v_raw, live, q, m, l, acc);
    block = next_block;
  }

  // Merge the token slots of the warp (lanes kLanesPerToken apart hold the same elements of other tokens).
#pragma unroll
  for (int o = kLanes; o < 32; o *= 2) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
      const float m_other = __shfl_xor_sync(0xffffffffu, m[h], o);
      const float l_other = __shfl_xor_sync(0xffffffffu, l[h], o);
      const float m_new = fmaxf(m[h], m_other);
      const float c_self = exp2f(m[h] - safe_max(m_new)), c_other = exp2f(m_other - safe_max(m_new));
      m[h] = m_new;
      l[h] = l[h] * c_self + l_other * c_other;
#pragma unroll
      for (int i = 0; i < E; ++i) acc[h][i] = acc[h][i] * c_self + __shfl_xor_sync(0xffffffffu, acc[h][i], o) * c_other;
    }
  }

  // Merge the warps.
  __shared__ float warp_max[kNumWarps][GROUP], warp_sum[kNumWarps][GROUP];
  __shared__ __align__(16) float warp_out[kNumWarps][GROUP][HEAD_DIM];
  if (lane < kLanes) {
#pragma unroll
    for (int h = 0; h < GROUP; ++h) {
#pragma unroll
      for (int i = 0; i < E; ++i) warp_out[warp][h][d0 + i] = acc[h][i];
      if (lane == 0) {
        warp_max[warp][h] = m[h];
        warp_sum[warp][h] = l[h];
      }
    }
  }
  __syncthreads();

  const Workspace ws(p, gridDim.z);
  for (int idx = threadIdx.x; idx < group * HEAD_DIM; idx += kThreads) {
    const int h = idx / HEAD_DIM, d = idx % HEAD_DIM;
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) m_all = fmaxf(m_all, warp_max[w][h]);  // finite: start < len
    float sum = 0.f, out = 0.f;
#pragma unroll
    for (int w = 0; w < kNumWarps; ++w) {
      const float c = exp2f(warp_max[w][h] - m_all);
      sum += warp_sum[w][h] * c;
      out += warp_out[w][h][d] * c;
    }
    const int head = kv_head * group + h;
    if (whole_sequence) {
      store(static_cast<T*>(p.out) + seq * p.out_seq_stride + head * p.out_head_stride + d, out / sum);
    } else {
      const int64_t row = (int64_t(seq) * p.num_q_heads + head) * gridDim.z + part;
      ws.out[row * HEAD_DIM + d] = out / sum;
      if (d == 0) {
        ws.max[row] = m_all;
        ws.sum[row] = sum;
      }
    }
  }
  if (whole_sequence) return;

  // The last partition of this (sequence, kv head) to finish combines them all.
  __shared__ bool combines;
  __syncthreads();  // every partial row of this CTA is written
  if (threadIdx.x == 0) {
    unsigned* done = ws.partitions_done(seq, kv_head);
    // One thread counts the CTA done with release and acquire at device scope: the release publishes the rows the
    // barrier above ordered before it, the acquire (with the barrier below) makes the other partitions' rows
    // visible to the whole CTA. A fence in every thread, as before, cost each partition a wait of its own.
    unsigned finished_before;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(finished_before) : "l"(done) : "memory");
    combines = finished_before == unsigned(parts - 1);
    if (combines) *done = 0;  // the next launch counts from zero (it runs after this kernel has ended)
  }
  __syncthreads();
  if (!combines) return;
  // Warp w combines heads w, w + kNumWarps, ...; a lane owns HEAD_DIM / 32 elements of every row, and lane b
  // holds the max and sum of partition b of a batch. All loads of a batch go out together, so up to kCombineBatch
  // partitions cost one L2 round trip (a fold partition by partition waits for one each).
  constexpr int kPerLane = HEAD_DIM / 32;
  constexpr int kCombineBatch = 16;
  for (int h = warp; h < group; h += kNumWarps) {
    const int head = kv_head * group + h;
    const int64_t row0 = (int64_t(seq) * p.num_q_heads + head) * gridDim.z;
    float m_run = -INFINITY, total = 0.f, value[kPerLane] = {};
    for (int first = 0; first < parts; first += kCombineBatch) {
      const int count = min(kCombineBatch, parts - first);
      const bool holds = lane < count;
      const float m_part = holds ? __ldcg(ws.max + row0 + first + lane) : -INFINITY;
      const float sum_part = holds ? __ldcg(ws.sum + row0 + first + lane) : 0.f;
      float rows[kCombineBatch][kPerLane];
#pragma unroll
      for (int b = 0; b < kCombineBatch; ++b) {
        const float* row = ws.out + (row0 + first + b) * HEAD_DIM + lane * kPerLane;
#pragma unroll
        for (int j = 0; j < kPerLane; j += 2) {
          const float2 pair = b < count ? __ldcg(reinterpret_cast<const float2*>(row + j)) : make_float2(0.f, 0.f);
          rows[b][j] = pair.x;
          rows[b][j + 1] = pair.y;
        }
      }
      float m_new = fmaxf(m_run, m_part);  // finite: partition `first` holds tokens
#pragma unroll
      for (int o = 16; o > 0; o /= 2) m_new = fmaxf(m_new, __shfl_xor_sync(0xffffffffu, m_new, o));
      const float weight = holds ? sum_part * exp2f(m_part - m_new) : 0.f;
      float batch_total = weight;
#pragma unroll
      for (int o = 16; o > 0; o /= 2) batch_total += __shfl_xor_sync(0xffffffffu, batch_total, o);
      const float c_self = exp2f(m_run - m_new);
      total = total * c_self + batch_total;
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) value[j] *= c_self;
#pragma unroll
      for (int b = 0; b < kCombineBatch; ++b) {
        const float weight_b = __shfl_sync(0xffffffffu, weight, b);
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) value[j] = fmaf(weight_b, rows[b][j], value[j]);
      }
      m_run = m_new;
    }
    T* out = static_cast<T*>(p.out) + seq * p.out_seq_stride + head * p.out_head_stride + lane * kPerLane;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) store(out + j, value[j] / total);
  }
}

struct Split {
  int partition_size;  // tokens, a multiple of kTileAlign
  int num_partitions;
  int new_token_ctas;  // 1 when fused and split: a CTA before the partitions holds the new token (workspace row)
  int ctas_along_context() const { return num_partitions + new_token_ctas; }
};

// While (sequence, kv head) pairs alone cannot fill the GPU, partitions are as short as possible (down to
// kMinPartitionTokens), so that a short context still spreads over many CTAs: the launch is shaped for
// max_context_len (CUDA graphs), the partitions past a sequence's real end exit at once, and the live ones are as
// many as the real length allows. Two bounds keep them from getting shorter still: the workspace
// (kMaxSplitRows), and kMaxCtasPerSm, which keeps a launch for a huge max_context_len from being mostly CTAs that
// only exit. Once the pairs fill the GPU, short sequences take one partition and write their output directly, and
// only long ones are split (and combined), so one long sequence cannot hold up a large batch. How long is long
// depends on how many pairs each SM gets. With few (fewer than kBalancedCtasPerSm), a batch of mixed lengths (W0's
// middle and tail) would end with the CTAs of its longest sequences running alone, so partitions are
// kBalancingPartitionTokens long (H200, 80 sequences of 317 to 2047 tokens: 110.2 us, against 123.6 us with one
// partition per sequence; 256 tokens is slower again from 160 sequences up, where the combines cost more than the
// balance brings). With many, an SM's CTAs average the lengths out and a split only adds combines (224 sequences:
// the same time either way; W1, 256 sequences: 1% faster unsplit), so partitions are kLongPartitionTokens long.
Split choose_split(const PagedAttentionParams& p) {
  constexpr int64_t kEnoughCtasPerSm = 2, kBalancedCtasPerSm = 12, kMaxCtasPerSm = 8;
  constexpr int64_t kBalancingPartitionTokens = 512, kLongPartitionTokens = 4096;
  const int64_t work_items = int64_t(p.num_seqs) * p.num_kv_heads;
  const int64_t max_len = p.max_context_len;
  const bool fused = p.prologue.key != nullptr;
  // What the workspace holds; fused, a split sequence has one more partial row (its new token's CTA).
  const int64_t max_partitions = kMaxSplitRows / p.num_seqs - (fused ? 1 : 0);
  if (max_partitions < 2 || max_len <= kMinPartitionTokens) {
    return {int((max_len + kTileAlign - 1) / kTileAlign * kTileAlign), 1, 0};
  }
  const int64_t sms = std::max(kernels::current_device_traits().multiprocessors, 1);
  int64_t size = (max_len + max_partitions - 1) / max_partitions;
  if (work_items >= kEnoughCtasPerSm * sms) {
    size = std::max(size, work_items < kBalancedCtasPerSm * sms ? kBalancingPartitionTokens : kLongPartitionTokens);
  } else {
    const int64_t max_ctas = kMaxCtasPerSm * sms;
    size = std::max({size, kMinPartitionTokens, (max_len * work_items + max_ctas - 1) / max_ctas});
  }
  size = (size + kTileAlign - 1) / kTileAlign * kTileAlign;
  const int num_partitions = int((max_len + size - 1) / size);
  return {int(size), num_partitions, fused && num_partitions > 1 ? 1 : 0};
}

template <typename T, int HEAD_DIM, int GROUP>
cudaError_t launch(const PagedAttentionParams& p, const Split& split, cudaStream_t stream) {
  const bool fused = p.prologue.key != nullptr;
  // Under programmatic launch only the CTAs that fit beside the kernel in front start early (fetching their first
  // tile before it ends), about one an SM beside the qkv GEMV, and CTAs are dispatched roughly in grid order. The
  // context runs slowest, so the first ones dispatched are every sequence's new token and first partitions, the ones
  // that hold tokens; the partitions past the real lengths (a launch is shaped for max_context_len) come last and
  // exit at once. With the context fastest, a kv head's 34 CTAs at batch 1 (max_context_len 2048), mostly empty,
  // came before the next head's: attention 7.29 -> 7.03 us a layer in the batch-1 decode graph (H200).
  const dim3 grid(p.num_kv_heads, p.num_seqs, split.ctas_along_context());
  const auto kernel = fused ? paged_attention_kernel<T, HEAD_DIM, GROUP, true>
                            : paged_attention_kernel<T, HEAD_DIM, GROUP, false>;
  return kernels::launch_kernel(kernel, {grid, dim3(kThreads)}, stream, p, split.partition_size,
                                split.num_partitions);
}

// Groups that are not a power of two run in the next larger instantiation; the extra heads are never written.
template <typename T, int HEAD_DIM>
cudaError_t dispatch_group(const PagedAttentionParams& p, const Split& split, cudaStream_t stream) {
  const int group = p.num_q_heads / p.num_kv_heads;
  if (group <= 1) return launch<T, HEAD_DIM, 1>(p, split, stream);
  if (group <= 2) return launch<T, HEAD_DIM, 2>(p, split, stream);
  if (group <= 4) return launch<T, HEAD_DIM, 4>(p, split, stream);
  return launch<T, HEAD_DIM, 8>(p, split, stream);
}

template <typename T>
cudaError_t dispatch_head_dim(const PagedAttentionParams& p, const Split& split, cudaStream_t stream) {
  if (p.head_dim == 64) return dispatch_group<T, 64>(p, split, stream);
  return dispatch_group<T, 128>(p, split, stream);
}

}  // namespace

cudaError_t paged_attention_decode(const PagedAttentionParams& params, cudaStream_t stream) {
  if (params.num_seqs == 0 || params.max_context_len == 0) return cudaSuccess;
  const Split split = choose_split(params);
  switch (params.dtype) {
    case AttentionDtype::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(params, split, stream);
    case AttentionDtype::kFloat16: return dispatch_head_dim<__half>(params, split, stream);
    case AttentionDtype::kFloat32: return dispatch_head_dim<float>(params, split, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace nanovllm
