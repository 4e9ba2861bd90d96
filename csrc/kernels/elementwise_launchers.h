// Plain C++ entry points of the elementwise CUDA kernels (store_kvcache, rms_norm, fused_add_rms_norm,
// rotary_embedding, qk_norm_rotary_store, silu_and_mul, copy_pinned, gather_embedding). They take raw pointers,
// sizes and strides, so the .cu files need no torch headers; the torch-facing checks live in csrc/ops_cuda.cpp
// (silu_and_mul's in csrc/activation_cuda.cpp). Strides are in elements (bytes for store_kvcache), the last dim is
// always contiguous.
// Each launcher enqueues one kernel on `stream` and returns cudaGetLastError().
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace nanovllm::kernels {

enum class DType { Float32, Float16, BFloat16 };

// Row r of a [..., hidden] tensor starts at (r / inner_rows) * outer_stride + (r % inner_rows) * inner_stride,
// which covers [tokens, hidden] and [tokens, heads, head_dim] views (e.g. q out of a fused qkv projection).
struct RowLayout {
  int64_t inner_rows = 1;
  int64_t outer_stride = 0;
  int64_t inner_stride = 0;
};

// A [tokens, heads, head_dim] view: element (t, h, i) at t * token_stride + h * head_stride + i.
struct HeadLayout {
  int64_t token_stride = 0;
  int64_t head_stride = 0;
};

// Largest hidden size the RMSNorm kernels keep in registers (one row per thread group of at most 512 threads).
inline constexpr int64_t kRmsNormMaxHidden = 8192;

// k_cache/v_cache row slot_mapping[t] (kv_heads * head_dim contiguous elements) = key/value[t]; slot -1 skips.
// A byte copy, so bit-exact for any dtype; key/value layouts in bytes.
cudaError_t launch_store_kvcache(const void* key, HeadLayout key_layout, const void* value, HeadLayout value_layout,
                                 void* k_cache, void* v_cache, const int64_t* slot_mapping, int64_t num_tokens,
                                 int num_kv_heads, int head_bytes, cudaStream_t stream);

// out = x * rsqrt(mean(x^2) + eps) * weight per row of `hidden` elements; out may alias x.
cudaError_t launch_rms_norm(DType dtype, void* out, RowLayout out_layout, const void* x, RowLayout x_layout,
                            const void* weight, int64_t num_rows, int hidden, float eps, cudaStream_t stream);

// residual += x (rounded to the storage dtype), then x = rms_norm(residual) * weight.
cudaError_t launch_fused_add_rms_norm(DType dtype, void* x, RowLayout x_layout, void* residual,
                                      RowLayout residual_layout, const void* weight, int64_t num_rows, int hidden,
                                      float eps, cudaStream_t stream);

// NeoX rotate-half rotary embedding of query and key in place, in one launch. cos_sin_cache: fp32
// [max_position, head_dim], cos | sin halves; positions: int64 [num_tokens].
cudaError_t launch_rotary_embedding(DType dtype, const int64_t* positions, void* query, HeadLayout query_layout,
                                    int num_q_heads, void* key, HeadLayout key_layout, int num_kv_heads,
                                    const float* cos_sin_cache, int64_t num_tokens, int head_dim,
                                    cudaStream_t stream);

// Largest head_dim of qk_norm_rotary_store (a head's rotary pairs fit one warp's registers).
inline constexpr int kQkNormRotaryMaxHeadDim = 512;

// The attention prologue in one launch, per token t: if q_norm_weight/k_norm_weight are given (both or neither),
// each query/key head = rms_norm(head) * weight (rounded to the dtype); then the rotary embedding of query and key
// at positions[t], in place (as launch_rotary_embedding); then k_cache/v_cache row slot_mapping[t] = key/value[t]
// (as launch_store_kvcache; slot -1 skips). Caches: contiguous [slots, num_kv_heads, head_dim]; layouts in
// elements; value has num_kv_heads heads like key.
cudaError_t launch_qk_norm_rotary_store(DType dtype, const int64_t* positions, void* query, HeadLayout query_layout,
                                        int num_q_heads, void* key, HeadLayout key_layout, const void* value,
                                        HeadLayout value_layout, int num_kv_heads, const void* q_norm_weight,
                                        const void* k_norm_weight, const float* cos_sin_cache, void* k_cache,
                                        void* v_cache, const int64_t* slot_mapping, int64_t num_tokens,
                                        int head_dim, float eps, cudaStream_t stream);

// out[t, i] = silu(x[t, i]) * x[t, d + i] for i < d, in fp32, rounded once to the dtype. x: [num_tokens, 2 * d],
// out: [num_tokens, d], rows at the given strides (elements), last dims contiguous.
cudaError_t launch_silu_and_mul(DType dtype, void* out, int64_t out_row_stride, const void* x, int64_t x_row_stride,
                                int64_t num_tokens, int d, cudaStream_t stream);

// dst[0, nbytes) = src[0, nbytes) between device memory and pinned host memory, the host side given by its
// device-accessible address (cudaPointerAttributes::devicePointer): src if from_host, else dst. nbytes a multiple
// of 16, both 16-byte aligned.
cudaError_t launch_copy_pinned(void* dst, const void* src, int64_t nbytes, bool from_host, cudaStream_t stream);

// out row r (row_bytes contiguous bytes) = weight row ids[rows[r]] for r < num_rows (num_rows <= 65535); a zero
// row where rows[r] is outside [0, num_ids) or the id outside [0, vocab). row_bytes a multiple of 16, out and
// weight contiguous and 16-byte aligned.
cudaError_t launch_gather_embedding(void* out, const void* weight, int64_t vocab, int64_t row_bytes,
                                    const int64_t* ids, int64_t num_ids, const int64_t* rows, int64_t num_rows,
                                    cudaStream_t stream);

}  // namespace nanovllm::kernels
