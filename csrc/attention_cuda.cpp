// CUDA implementations of nanovllm_cpp::paged_attention_decode and qk_norm_rotary_paged_attention: validate the
// tensors on the host (no device synchronisation, no allocation, so the ops can be captured in a CUDA graph) and
// launch the kernel of csrc/kernels/paged_attention.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <utility>

#include "kernels/paged_attention.h"
#include "op_checks.h"

namespace {

nanovllm::AttentionDtype attention_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kBFloat16: return nanovllm::AttentionDtype::kBFloat16;
    case at::kHalf: return nanovllm::AttentionDtype::kFloat16;
    case at::kFloat: return nanovllm::AttentionDtype::kFloat32;
    default: TORCH_CHECK(false, op, "query dtype must be bfloat16, float16 or float32, got ", type);
  }
}

using nanovllm::aligned16;

// The checks and parameters the two ops share; op ("name: ") prefixes every message.
nanovllm::PagedAttentionParams attention_params(const char* op, const at::Tensor& out, const at::Tensor& query,
                                                const at::Tensor& k_cache, const at::Tensor& v_cache,
                                                const at::Tensor& block_tables, const at::Tensor& context_lens,
                                                double scale, int64_t max_context_len, const at::Tensor& workspace) {
  for (const at::Tensor* t : {&out, &k_cache, &v_cache, &block_tables, &context_lens, &workspace}) {
    TORCH_CHECK(t->device() == query.device(), op, "all tensors must be on ", query.device(), ", got one on ",
                t->device());
  }
  const auto dtype = attention_dtype(query.scalar_type(), op);
  TORCH_CHECK(query.dim() == 3, op, "query must be [num_seqs, num_q_heads, head_dim], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(), op,
              "out must match query (", query.sizes(), ", ", query.scalar_type(), "), got ", out.sizes(), ", ",
              out.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(), op,
              "k_cache/v_cache dtype must equal query dtype ", query.scalar_type(), ", got ", k_cache.scalar_type(),
              "/", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, "k_cache and v_cache must be contiguous");
  TORCH_CHECK(aligned16(k_cache.data_ptr()) && aligned16(v_cache.data_ptr()), op,
              "k_cache and v_cache must be 16-byte aligned");

  const int64_t num_seqs = query.size(0), num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, op, "head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(k_cache.size(3) == head_dim, op, "cache head_dim ", k_cache.size(3), " != query head_dim ",
              head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, op, "num_q_heads ", num_q_heads,
              " must be a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(num_q_heads / num_kv_heads <= 8, op, "at most 8 query heads per kv head, got ",
              num_q_heads / num_kv_heads);
  TORCH_CHECK(block_size >= 16 && (block_size & (block_size - 1)) == 0, op,
              "block_size must be a power of two >= 16, got ", block_size);

  const int64_t elems_per_16_bytes = 16 / query.element_size();
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, op, "query and out need a contiguous head_dim");
  TORCH_CHECK(aligned16(query.data_ptr()) && query.stride(0) % elems_per_16_bytes == 0 &&
                  query.stride(1) % elems_per_16_bytes == 0,
              op, "query rows must be 16-byte aligned (data pointer and strides ", query.strides(), ")");

  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_seqs && block_tables.stride(1) == 1,
              op, "block_tables must be int32 [num_seqs=", num_seqs, ", max_blocks] with a contiguous last dim, got ",
              block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.size(0) == num_seqs &&
                  context_lens.is_contiguous(),
              op, "context_lens must be contiguous int32 [num_seqs=", num_seqs, "], got ", context_lens.scalar_type(),
              " ", context_lens.sizes());
  TORCH_CHECK(max_context_len >= 0 && max_context_len <= std::numeric_limits<int32_t>::max(), op,
              "max_context_len must be in [0, 2^31), got ", max_context_len);
  TORCH_CHECK(num_seqs <= 65535, op, "at most 65535 sequences per call, got ", num_seqs);

  const int64_t needed = nanovllm::paged_attention_workspace_size(num_seqs, num_q_heads, head_dim, max_context_len);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous(), op,
              "workspace must be contiguous float32, got ", workspace.scalar_type());
  TORCH_CHECK(workspace.numel() >= needed, op, "workspace holds ", workspace.numel(), " floats, but ", num_seqs,
              " sequences x ", num_q_heads, " heads x head_dim ", head_dim, " at max_context_len ", max_context_len,
              " need ", needed, " (allocate it with nanovllm_cpp.paged_attention_workspace)");

  nanovllm::PagedAttentionParams params{};
  params.out = out.data_ptr();
  params.query = query.data_ptr();
  params.k_cache = k_cache.data_ptr();
  params.v_cache = v_cache.data_ptr();
  params.block_tables = block_tables.data_ptr<int32_t>();
  params.context_lens = context_lens.data_ptr<int32_t>();
  params.workspace = workspace.data_ptr<float>();
  params.workspace_size = workspace.numel();
  params.out_seq_stride = out.stride(0);
  params.out_head_stride = out.stride(1);
  params.query_seq_stride = query.stride(0);
  params.query_head_stride = query.stride(1);
  params.block_table_stride = block_tables.stride(0);
  params.num_seqs = int(num_seqs);
  params.num_q_heads = int(num_q_heads);
  params.num_kv_heads = int(num_kv_heads);
  params.head_dim = int(head_dim);
  params.block_size = int(block_size);
  // Tokens past the block table cannot exist; clamping here keeps the kernel's table reads in bounds.
  params.max_context_len = int(std::min(max_context_len, block_tables.size(1) * block_size));
  params.scale = float(scale);
  params.dtype = dtype;
  return params;
}

void launch(const char* op, const at::Tensor& query, const nanovllm::PagedAttentionParams& params) {
  if (params.num_seqs == 0) return;
  const c10::cuda::CUDAGuard guard(query.device());
  const cudaError_t err = nanovllm::paged_attention_decode(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, "kernel launch failed: ", cudaGetErrorString(err));
}

void paged_attention_decode_cuda(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale, int64_t max_context_len,
                                 const at::Tensor& workspace) {
  constexpr const char* op = "paged_attention_decode: ";
  launch(op, query, attention_params(op, out, query, k_cache, v_cache, block_tables, context_lens, scale,
                                      max_context_len, workspace));
}

void check_per_seq_int64(const char* op, const at::Tensor& t, const at::Tensor& query, const char* name) {
  TORCH_CHECK(t.device() == query.device(), op, name, " must be on ", query.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == query.size(0) && t.is_contiguous(), op,
              name, " must be contiguous int64 [num_seqs=", query.size(0), "], got ", t.scalar_type(), " ", t.sizes());
}

void qk_norm_rotary_paged_attention_cuda(const at::Tensor& out, const at::Tensor& query, const at::Tensor& key,
                                         const at::Tensor& value, const at::Tensor& positions,
                                         const std::optional<at::Tensor>& q_norm_weight,
                                         const std::optional<at::Tensor>& k_norm_weight,
                                         const at::Tensor& cos_sin_cache, const at::Tensor& k_cache,
                                         const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                         const at::Tensor& block_tables, const at::Tensor& context_lens,
                                         double scale, int64_t max_context_len, const at::Tensor& workspace,
                                         double eps) {
  constexpr const char* op = "qk_norm_rotary_paged_attention: ";
  nanovllm::PagedAttentionParams params = attention_params(op, out, query, k_cache, v_cache, block_tables,
                                                           context_lens, scale, max_context_len, workspace);
  const int64_t num_seqs = query.size(0), head_dim = query.size(2), num_kv_heads = k_cache.size(2);
  const int64_t elems_per_16_bytes = 16 / query.element_size();
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}}) {
    TORCH_CHECK(t->device() == query.device(), op, name, " must be on ", query.device(), ", got ", t->device());
    TORCH_CHECK(t->scalar_type() == query.scalar_type(), op, name, " dtype must equal query dtype ",
                query.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 3 && t->size(0) == num_seqs && t->size(1) == num_kv_heads && t->size(2) == head_dim,
                op, name, " must be [num_seqs, num_kv_heads, head_dim] = [", num_seqs, ", ", num_kv_heads, ", ",
                head_dim, "], got ", t->sizes());
    TORCH_CHECK(t->stride(2) == 1 && aligned16(t->data_ptr()) && t->stride(0) % elems_per_16_bytes == 0 &&
                    t->stride(1) % elems_per_16_bytes == 0,
                op, name, " rows must be contiguous and 16-byte aligned (data pointer and strides ", t->strides(),
                ")");
  }
  check_per_seq_int64(op, positions, query, "positions");
  check_per_seq_int64(op, slot_mapping, query, "slot_mapping");
  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(), op,
              "pass both q_norm_weight and k_norm_weight (Qwen3) or neither (no q/k norm), got only ",
              q_norm_weight.has_value() ? "q_norm_weight" : "k_norm_weight");
  for (const std::optional<at::Tensor>* weight : {&q_norm_weight, &k_norm_weight}) {
    if (!weight->has_value()) continue;
    const at::Tensor& w = weight->value();
    TORCH_CHECK(w.device() == query.device() && w.scalar_type() == query.scalar_type() && w.dim() == 1 &&
                    w.size(0) == head_dim && w.is_contiguous() && aligned16(w.data_ptr()),
                op, "q/k norm weights must be contiguous, 16-byte aligned [head_dim=", head_dim, "] tensors of ",
                query.scalar_type(), " on ", query.device(), ", got ", w.scalar_type(), " ", w.sizes(), " on ",
                w.device());
  }
  TORCH_CHECK(cos_sin_cache.device() == query.device() && cos_sin_cache.scalar_type() == at::kFloat &&
                  cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim && cos_sin_cache.is_contiguous() &&
                  aligned16(cos_sin_cache.data_ptr()),
              op, "cos_sin_cache must be a contiguous, 16-byte aligned float32 [max_position, ", head_dim,
              "] tensor on ", query.device(), ", got ", cos_sin_cache.scalar_type(), " ", cos_sin_cache.sizes());

  nanovllm::DecodePrologue& prologue = params.prologue;
  prologue.key = key.data_ptr();
  prologue.value = value.data_ptr();
  prologue.key_seq_stride = key.stride(0);
  prologue.key_head_stride = key.stride(1);
  prologue.value_seq_stride = value.stride(0);
  prologue.value_head_stride = value.stride(1);
  prologue.positions = positions.data_ptr<int64_t>();
  prologue.slot_mapping = slot_mapping.data_ptr<int64_t>();
  prologue.q_norm_weight = q_norm_weight ? q_norm_weight->data_ptr() : nullptr;
  prologue.k_norm_weight = k_norm_weight ? k_norm_weight->data_ptr() : nullptr;
  prologue.cos_sin_cache = cos_sin_cache.data_ptr<float>();
  prologue.eps = float(eps);
  launch(op, query, params);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) {
  m.impl("paged_attention_decode", &paged_attention_decode_cuda);
  m.impl("qk_norm_rotary_paged_attention", &qk_norm_rotary_paged_attention_cuda);
}
