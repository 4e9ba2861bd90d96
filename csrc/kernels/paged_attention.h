// Paged-attention decode: the torch-free interface between csrc/attention_cuda.cpp (checks, tensors) and
// csrc/kernels/paged_attention.cu (kernels, split choice). Semantics: nanovllm_cpp/reference.py.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nanovllm {

enum class AttentionDtype { kFloat16, kBFloat16, kFloat32 };

struct PagedAttentionParams {
  void* out;                // [num_seqs, num_q_heads, head_dim], last dim contiguous
  const void* query;        // [num_seqs, num_q_heads, head_dim], last dim contiguous, 16-byte aligned rows
  const void* k_cache;      // [num_blocks, block_size, num_kv_heads, head_dim], contiguous
  const void* v_cache;
  const int* block_tables;  // [num_seqs, max_blocks_per_seq], last dim contiguous
  const int* context_lens;  // [num_seqs]
  float* workspace;         // paged_attention_workspace_size(num_seqs, ...) floats
  int64_t out_seq_stride, out_head_stride;
  int64_t query_seq_stride, query_head_stride;
  int64_t block_table_stride;
  int num_seqs, num_q_heads, num_kv_heads, head_dim;
  int block_size;       // a power of two >= 16
  int max_context_len;  // host bound, already clamped to max_blocks_per_seq * block_size
  float scale;
  AttentionDtype dtype;
};

// Split-K: a sequence's context is cut into partitions of at least kMinPartitionTokens tokens, and a launch
// never holds more than kMaxSplitRows (sequence, partition) pairs, so the float32 workspace needs
//   min(num_seqs * ceil(max_context_len / kMinPartitionTokens), kMaxSplitRows) * num_q_heads * (head_dim + 2)
// elements (a partial output row plus its max and sum per query head). Mirrors
// nanovllm_cpp.ops.paged_attention_workspace_size; monotone in num_seqs, so one workspace sized for the largest
// batch serves every smaller one.
inline constexpr int64_t kMinPartitionTokens = 64;  // 4 warps x one 16-token tile
inline constexpr int64_t kMaxSplitRows = 4096;

inline int64_t paged_attention_workspace_size(int64_t num_seqs, int64_t num_q_heads, int64_t head_dim,
                                              int64_t max_context_len) {
  const int64_t partitions = (max_context_len + kMinPartitionTokens - 1) / kMinPartitionTokens;
  int64_t rows = num_seqs * partitions;
  if (rows > kMaxSplitRows) rows = kMaxSplitRows;
  return rows * num_q_heads * (head_dim + 2);
}

// Enqueues the kernels on `stream` (no allocation, no synchronisation: CUDA-graph capturable) and returns the
// launch error, if any.
cudaError_t paged_attention_decode(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace nanovllm
