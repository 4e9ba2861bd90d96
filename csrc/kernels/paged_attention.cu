// Paged-attention decode (one query token per sequence), flash-decoding style.
//
// Main kernel: one CTA per (partition, kv head, sequence). It serves all `group` query heads of its kv head, so
// every K/V row is read from memory once. Each warp walks its own tiles of the partition's tokens; a token's
// 16-byte chunks are spread over kLanesPerToken lanes (a warp reads whole 256-byte rows, several tokens per
// load instruction) and all K and V loads of a tile are issued before the first is used. Scores and the
// online softmax are fp32. The warps' (max, sum, output) states are merged through shared memory and written
// straight to `out` when the sequence fits in one partition, else to the float32 workspace, which the reduce
// kernel combines. CTAs of partitions past a sequence's length exit at once, so a launch shaped for
// max_context_len (CUDA graphs) costs what the actual lengths cost.
#include "kernels/paged_attention.h"

#include "kernels/launch.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace nanovllm {
namespace {

constexpr int kNumWarps = 4;
constexpr int kThreads = kNumWarps * 32;
constexpr int kReduceWarps = 8;
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

__device__ __forceinline__ void store(__nv_bfloat16* dst, float x) { *dst = __float2bfloat16(x); }
__device__ __forceinline__ void store(__half* dst, float x) { *dst = __float2half(x); }
__device__ __forceinline__ void store(float* dst, float x) { *dst = x; }

__device__ __forceinline__ uint4 load_chunk(const void* ptr) { return __ldg(static_cast<const uint4*>(ptr)); }

__device__ __forceinline__ int sequence_length(const PagedAttentionParams& p, int seq) {
  return min(max(p.context_lens[seq], 0), p.max_context_len);
}

// exp2(x - m) where a max of -inf (nothing seen yet) must give 0 for x = -inf, not NaN.
__device__ __forceinline__ float safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// The workspace of a split launch: per (sequence, query head, partition) a normalised partial output row,
// then all partial maxima, then all partial sums.
struct Workspace {
  float* out;
  float* max;
  float* sum;
  __device__ Workspace(const PagedAttentionParams& p, int num_partitions) {
    const int64_t rows = int64_t(p.num_seqs) * p.num_q_heads * num_partitions;
    out = p.workspace;
    max = out + rows * p.head_dim;
    sum = max + rows;
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

template <typename T, int HEAD_DIM, int GROUP>
__global__ void __launch_bounds__(kThreads)
paged_attention_partition_kernel(const PagedAttentionParams p, int partition_size, int num_partitions) {
  kernels::start_after_prior_grids();
  using L = Layout<T, HEAD_DIM, GROUP>;
  constexpr int E = L::kElems;
  constexpr int U = L::kUnroll;
  const int partition = blockIdx.x, kv_head = blockIdx.y, seq = blockIdx.z;
  const int len = sequence_length(p, seq);
  const int start = partition * partition_size;
  if (start >= len) return;  // padding row, or a partition past this sequence's end
  const int end = min(start + partition_size, len);
  const bool whole_sequence = len <= partition_size;  // one partition: no reduce, write out directly

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slot = lane / L::kLanesPerToken;                // which token of a load this lane reads
  const int d0 = (lane % L::kLanesPerToken) * E;            // first of this lane's E elements of a row
  const int group = p.num_q_heads / p.num_kv_heads;         // <= GROUP; heads past it are computed, not written
  const float scale_log2 = p.scale * kLog2e;                // softmax in base 2

  float q[GROUP][E];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    if (h < group) {
      const T* row = static_cast<const T*>(p.query) + seq * p.query_seq_stride +
                     (kv_head * group + h) * p.query_head_stride + d0;
      unpack(load_chunk(row), q[h], T{});
#pragma unroll
      for (int i = 0; i < E; ++i) q[h][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < E; ++i) q[h][i] = 0.f;
    }
  }

  float m[GROUP], l[GROUP], acc[GROUP][E];
#pragma unroll
  for (int h = 0; h < GROUP; ++h) {
    m[h] = -INFINITY;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < E; ++i) acc[h][i] = 0.f;
  }

  const int64_t token_stride = int64_t(p.num_kv_heads) * HEAD_DIM;
  const int64_t block_stride = token_stride * p.block_size;
  const int64_t lane_offset = kv_head * HEAD_DIM + d0 + slot * token_stride;
  const T* k_lane = static_cast<const T*>(p.k_cache) + lane_offset;
  const T* v_lane = static_cast<const T*>(p.v_cache) + lane_offset;
  const int* table = p.block_tables + seq * p.block_table_stride;
  const int block_shift = __ffs(p.block_size) - 1;
  constexpr int kStep = kNumWarps * L::kTile;

  int tile = start + warp * L::kTile;
  int block = tile < end ? table[tile >> block_shift] : 0;
  for (; tile < end; tile += kStep) {
    const int next = tile + kStep;
    const int next_block = next < end ? table[next >> block_shift] : 0;  // in flight during this tile
    const int64_t base = block * block_stride + (tile & (p.block_size - 1)) * token_stride;

    uint4 k_raw[U], v_raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool live = tile + u * L::kTokensPerLoad + slot < end;
      const int64_t offset = base + u * L::kTokensPerLoad * token_stride;
      k_raw[u] = live ? load_chunk(k_lane + offset) : make_uint4(0, 0, 0, 0);
      v_raw[u] = live ? load_chunk(v_lane + offset) : make_uint4(0, 0, 0, 0);
    }

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
      const bool live = tile + u * L::kTokensPerLoad + slot < end;
#pragma unroll
      for (int h = 0; h < GROUP; ++h) {
#pragma unroll
        for (int o = L::kLanesPerToken / 2; o > 0; o /= 2) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], o);
        if (!live) s[u][h] = -INFINITY;
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
    block = next_block;
  }

  // Merge the token slots of the warp (lanes kLanesPerToken apart hold the same elements of other tokens).
#pragma unroll
  for (int o = L::kLanesPerToken; o < 32; o *= 2) {
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
  if (lane < L::kLanesPerToken) {
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
      const Workspace ws(p, num_partitions);
      const int64_t row = (int64_t(seq) * p.num_q_heads + head) * num_partitions + partition;
      ws.out[row * HEAD_DIM + d] = out / sum;
      if (d == 0) {
        ws.max[row] = m_all;
        ws.sum[row] = sum;
      }
    }
  }
}

// Combines the partitions of one (query head, sequence). Each warp folds every kReduceWarps-th partition with an
// online softmax of its own (no common max first), so the loads of all its partitions go out together and the
// reduce costs one memory round trip and one barrier; the warps' states then merge through shared memory.
template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(kReduceWarps * 32)
paged_attention_reduce_kernel(const PagedAttentionParams p, int partition_size, int num_partitions) {
  kernels::start_after_prior_grids();
  constexpr int kPerLane = HEAD_DIM / 32;
  const int head = blockIdx.x, seq = blockIdx.y;
  const int len = sequence_length(p, seq);
  if (len == 0) return;
  const int parts = (len + partition_size - 1) / partition_size;
  if (parts == 1) return;  // the partition kernel wrote this sequence's output itself
  const Workspace ws(p, num_partitions);
  const int64_t row0 = (int64_t(seq) * p.num_q_heads + head) * num_partitions;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  float m = -INFINITY, sum = 0.f, out[kPerLane] = {};
#pragma unroll 4
  for (int i = warp; i < parts; i += kReduceWarps) {
    const float m_part = ws.max[row0 + i];  // finite: every partition below `parts` holds tokens
    const float m_new = fmaxf(m, m_part);
    const float c_self = exp2f(m - m_new), weight = ws.sum[row0 + i] * exp2f(m_part - m_new);
    m = m_new;
    sum = sum * c_self + weight;
    const float* row = ws.out + (row0 + i) * HEAD_DIM + lane * kPerLane;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out[j] = fmaf(weight, row[j], out[j] * c_self);
  }

  __shared__ float warp_max[kReduceWarps], warp_sum[kReduceWarps];
  __shared__ float warp_out[kReduceWarps][HEAD_DIM];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) warp_out[warp][lane * kPerLane + j] = out[j];
  if (lane == 0) {
    warp_max[warp] = m;  // -inf for a warp that had no partition; its sum and output are 0
    warp_sum[warp] = sum;
  }
  __syncthreads();
  if (threadIdx.x < HEAD_DIM) {
    float m_all = -INFINITY;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) m_all = fmaxf(m_all, warp_max[w]);  // finite: parts >= 2
    float total = 0.f, value = 0.f;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) {
      const float c = exp2f(warp_max[w] - m_all);
      total += warp_sum[w] * c;
      value += warp_out[w][threadIdx.x] * c;
    }
    store(static_cast<T*>(p.out) + seq * p.out_seq_stride + head * p.out_head_stride + threadIdx.x, value / total);
  }
}

struct Split {
  int partition_size;  // tokens, a multiple of kTileAlign
  int num_partitions;
};

// While (sequence, kv head) pairs alone cannot fill the GPU, partitions are as short as possible (down to
// kMinPartitionTokens), so that a short context still spreads over many CTAs: the launch is shaped for
// max_context_len (CUDA graphs), the partitions past a sequence's real end exit at once, and the live ones are as
// many as the real length allows. Two bounds keep them from getting shorter still: the workspace
// (kMaxSplitRows), and kMaxCtasPerSm, which keeps a launch for a huge max_context_len from being mostly CTAs that
// only exit. Once the pairs fill the GPU, partitions are kLongPartitionTokens long: short sequences take one
// partition and write their output directly, and only long ones are split (and reduced), so one long sequence
// cannot hold up a large batch.
Split choose_split(const PagedAttentionParams& p) {
  constexpr int64_t kEnoughCtasPerSm = 2, kMaxCtasPerSm = 8, kLongPartitionTokens = 4096;
  const int64_t work_items = int64_t(p.num_seqs) * p.num_kv_heads;
  const int64_t max_len = p.max_context_len;
  const int64_t max_partitions = kMaxSplitRows / p.num_seqs;  // what the workspace holds
  if (max_partitions < 2 || max_len <= kMinPartitionTokens) {
    return {int((max_len + kTileAlign - 1) / kTileAlign * kTileAlign), 1};
  }
  const int64_t sms = std::max(kernels::current_device_traits().multiprocessors, 1);
  int64_t size = (max_len + max_partitions - 1) / max_partitions;
  if (work_items >= kEnoughCtasPerSm * sms) {
    size = std::max(size, kLongPartitionTokens);
  } else {
    const int64_t max_ctas = kMaxCtasPerSm * sms;
    size = std::max({size, kMinPartitionTokens, (max_len * work_items + max_ctas - 1) / max_ctas});
  }
  size = (size + kTileAlign - 1) / kTileAlign * kTileAlign;
  return {int(size), int((max_len + size - 1) / size)};
}

template <typename T, int HEAD_DIM, int GROUP>
cudaError_t launch(const PagedAttentionParams& p, const Split& split, cudaStream_t stream) {
  const dim3 grid(split.num_partitions, p.num_kv_heads, p.num_seqs);
  cudaError_t status = kernels::launch_kernel(paged_attention_partition_kernel<T, HEAD_DIM, GROUP>,
                                              {grid, dim3(kThreads)}, stream, p, split.partition_size,
                                              split.num_partitions);
  if (status != cudaSuccess || split.num_partitions == 1) return status;
  return kernels::launch_kernel(paged_attention_reduce_kernel<T, HEAD_DIM>,
                                {dim3(p.num_q_heads, p.num_seqs), dim3(kReduceWarps * 32)}, stream, p,
                                split.partition_size, split.num_partitions);
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
