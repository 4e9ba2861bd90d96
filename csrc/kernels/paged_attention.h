// Paged-attention decode: the torch-free interface between csrc/attention_cuda.cpp (checks, tensors) and
// csrc/kernels/paged_attention.cu (kernels, split choice). Semantics: nanovllm_cpp/reference.py.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace nanovllm {

enum class AttentionDtype { kFloat16, kBFloat16, kFloat32 };

// The attention block's prologue, fused into decode (qk_norm_rotary_paged_attention): `query` holds the raw q
// projection; each CTA normalises (given the weights) and rotates the q heads it serves, and the CTA whose
// partition holds a sequence's newest token (index context_len - 1, at cache slot slot_mapping[seq]) does the same
// to that token's key, stores key and value in the cache and attends to them from registers. Roundings are those
// of qk_norm_rotary_store. The other cached tokens are read before the kernel in front has finished (programmatic
// launch): no kernel of the same step may write them.
struct DecodePrologue {
  const void* key = nullptr;  // [num_seqs, num_kv_heads, head_dim] each, last dim contiguous, 16-byte aligned rows
  const void* value = nullptr;
  int64_t key_seq_stride = 0, key_head_stride = 0;
  int64_t value_seq_stride = 0, value_head_stride = 0;
  const int64_t* positions = nullptr;     // [num_seqs]: the rotary position of each new token
  const int64_t* slot_mapping = nullptr;  // [num_seqs]: its cache slot (-1: not stored)
  const void* q_norm_weight = nullptr;    // [head_dim] each; both null: no norm
  const void* k_norm_weight = nullptr;
  const float* cos_sin_cache = nullptr;   // [max_position, head_dim]: cos | sin halves
  float eps = 0.f;
};

struct PagedAttentionParams {
  void* out;                // [num_seqs, num_q_heads, head_dim], last dim contiguous
  const void* query;        // [num_seqs, num_q_heads, head_dim], last dim contiguous, 16-byte aligned rows
  void* k_cache;            // [num_blocks, block_size, num_kv_heads, head_dim], contiguous; written only by the
  void* v_cache;            // fused prologue (the new token)
  const int* block_tables;  // [num_seqs, max_blocks_per_seq], last dim contiguous
  const int* context_lens;  // [num_seqs]
  float* workspace;         // paged_attention_workspace_size(num_seqs, ...) floats or more, zeroed once
  int64_t workspace_size;   // its floats: split launches keep their counters at its end
  int64_t out_seq_stride, out_head_stride;
  int64_t query_seq_stride, query_head_stride;
  int64_t block_table_stride;
  int num_seqs, num_q_heads, num_kv_heads, head_dim;
  int block_size;       // a power of two >= 16
  int max_context_len;  // host bound, already clamped to max_blocks_per_seq * block_size
  float scale;
  AttentionDtype dtype;
  DecodePrologue prologue;  // key == nullptr: query and cache are final (paged_attention_decode)
};

// Split-K: a sequence's context is cut into partitions of at least kMinPartitionTokens tokens (with the fused
// prologue, its new token takes one more), and a launch never holds more than kMaxSplitRows (sequence, partition)
// pairs, so the float32 workspace needs
//   min(num_seqs * (ceil(max_context_len / kMinPartitionTokens) + 1), kMaxSplitRows) * num_q_heads * (head_dim + 3)
// elements: per query head a partial output row plus its max and sum, and at the end of the workspace one
// counter per (sequence, kv head) of the partitions done (the last one to finish combines them and sets the
// counter back to zero, so a workspace zeroed once serves every launch). Mirrors
// nanovllm_cpp.ops.paged_attention_workspace_size; monotone in num_seqs, so one workspace sized for the largest
// batch serves every smaller one.
inline constexpr int64_t kMinPartitionTokens = 64;  // 4 warps x one 16-token tile
inline constexpr int64_t kMaxSplitRows = 4096;

inline int64_t paged_attention_workspace_size(int64_t num_seqs, int64_t num_q_heads, int64_t head_dim,
                                              int64_t max_context_len) {
  const int64_t partitions = (max_context_len + kMinPartitionTokens - 1) / kMinPartitionTokens + 1;
  int64_t rows = num_seqs * partitions;
  if (rows > kMaxSplitRows) rows = kMaxSplitRows;
  return rows * num_q_heads * (head_dim + 3);
}

// Enqueues the kernels on `stream` (no allocation, no synchronisation: CUDA-graph capturable) and returns the
// launch error, if any.
cudaError_t paged_attention_decode(const PagedAttentionParams& params, cudaStream_t stream);

}  // namespace nanovllm
