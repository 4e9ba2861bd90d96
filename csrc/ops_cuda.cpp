// CUDA implementations of store_kvcache, rms_norm, fused_add_rms_norm, rotary_embedding, qk_norm_rotary_store,
// copy_pinned and gather_embedding (schemas in csrc/torch_bindings.cpp): check the tensors, describe their
// layouts as plain sizes and strides, and call the launchers of csrc/kernels/. This is the only file of these ops
// that includes torch headers.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "kernels/elementwise_launchers.h"
#include "op_checks.h"

namespace {

using nanovllm::check_launch;
using nanovllm::kernels::DType;
using nanovllm::kernels::HeadLayout;
using nanovllm::kernels::RowLayout;

DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  const at::ScalarType type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", name, " has dtype ", type,
              "; supported: float32, float16, bfloat16");
  return nanovllm::kernel_dtype_of(type);
}

void check_cuda(const at::Tensor& t, const at::Tensor& first, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == first.device(), op, ": ", name, " is on ", t.device(), " but the other tensors are on ",
              first.device());
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                      const char* like_name) {
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              like_name, " has ", like.scalar_type(), "; they must match");
}

int checked_int(int64_t value, const char* op, const char* what) {
  TORCH_CHECK(value >= 0 && value <= std::numeric_limits<int>::max(), op, ": ", what, " = ", value,
              " is out of range");
  return static_cast<int>(value);
}

// Describes the rows of t[..., hidden] (last dim contiguous) with at most two strides, merging leading dims that
// are contiguous with each other; views such as q out of a fused qkv projection need no copy.
RowLayout row_layout(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dim");
  TORCH_CHECK(t.size(-1) == 1 || t.stride(-1) == 1, op, ": ", name, " must have a contiguous last dim, got strides ",
              t.strides());
  std::vector<std::pair<int64_t, int64_t>> dims;  // (size, stride), outermost first
  for (int64_t d = 0; d + 1 < t.dim(); ++d) {
    if (t.size(d) == 1) continue;
    if (!dims.empty() && dims.back().second == t.stride(d) * t.size(d))
      dims.back() = {dims.back().first * t.size(d), t.stride(d)};
    else
      dims.emplace_back(t.size(d), t.stride(d));
  }
  TORCH_CHECK(dims.size() <= 2, op, ": ", name, " with sizes ", t.sizes(), " and strides ", t.strides(),
              " has rows that two strides cannot describe; pass a .contiguous() tensor");
  RowLayout layout;
  if (dims.size() == 1) layout.outer_stride = dims[0].second;
  if (dims.size() == 2) layout = RowLayout{dims[1].first, dims[0].second, dims[1].second};
  return layout;
}

void check_norm_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  check_cuda(weight, x, op, "weight");
  check_same_dtype(weight, x, op, "weight", "x");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1), op, ": weight must have shape [", x.size(-1),
              "] (the hidden size of x), got ", weight.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(x.size(-1) >= 1 && x.size(-1) <= nanovllm::kernels::kRmsNormMaxHidden, op, ": hidden size ",
              x.size(-1), " is outside the supported range 1..", nanovllm::kernels::kRmsNormMaxHidden);
}

int64_t num_rows(const at::Tensor& x) { return x.size(-1) == 0 ? 0 : x.numel() / x.size(-1); }

void store_kvcache(const at::Tensor& key, const at::Tensor& value, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  constexpr const char* op = "store_kvcache";
  check_cuda(key, key, op, "key");
  for (auto [t, name] : {std::pair{&value, "value"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&slot_mapping, "slot_mapping"}})
    check_cuda(*t, key, op, name);
  TORCH_CHECK(key.dim() == 3, op, ": key must be [num_tokens, num_kv_heads, head_dim], got ", key.sizes());
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value has shape ", value.sizes(), " but key has ", key.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == key.size(2), op, ": key rows [",
              key.size(1), ", ", key.size(2), "] do not match the cache's [num_kv_heads, head_dim] = [",
              k_cache.size(2), ", ", k_cache.size(3), "]");
  check_same_dtype(value, key, op, "value", "key");
  check_same_dtype(k_cache, key, op, "k_cache", "key");
  check_same_dtype(v_cache, key, op, "v_cache", "key");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}})
    TORCH_CHECK(t->size(2) == 1 || t->stride(2) == 1, op, ": ", name, " must have a contiguous last dim, got strides ",
                t->strides());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == key.size(0) && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous int64 [", key.size(0), "] tensor, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());

  const c10::cuda::CUDAGuard guard(key.device());
  const int64_t element_bytes = key.element_size();
  const auto byte_layout = [&](const at::Tensor& t) {
    return HeadLayout{t.stride(0) * element_bytes, t.stride(1) * element_bytes};
  };
  check_launch(nanovllm::kernels::launch_store_kvcache(
                   key.data_ptr(), byte_layout(key), value.data_ptr(), byte_layout(value), k_cache.data_ptr(),
                   v_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(), key.size(0),
                   checked_int(key.size(1), op, "num_kv_heads"),
                   checked_int(key.size(2) * element_bytes, op, "head bytes"), c10::cuda::getCurrentCUDAStream()),
               op);
}

void rms_norm(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  constexpr const char* op = "rms_norm";
  check_cuda(x, x, op, "x");
  check_cuda(out, x, op, "out");
  const DType dtype = kernel_dtype(x, op, "x");
  check_same_dtype(out, x, op, "out", "x");
  TORCH_CHECK(out.sizes() == x.sizes(), op, ": out has shape ", out.sizes(), " but x has ", x.sizes());
  check_norm_weight(weight, x, op);
  const RowLayout x_layout = row_layout(x, op, "x");
  const RowLayout out_layout = row_layout(out, op, "out");

  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(nanovllm::kernels::launch_rms_norm(dtype, out.data_ptr(), out_layout, x.data_ptr(), x_layout,
                                                  weight.data_ptr(), num_rows(x), static_cast<int>(x.size(-1)),
                                                  static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               op);
}

void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps) {
  constexpr const char* op = "fused_add_rms_norm";
  check_cuda(x, x, op, "x");
  check_cuda(residual, x, op, "residual");
  const DType dtype = kernel_dtype(x, op, "x");
  check_same_dtype(residual, x, op, "residual", "x");
  TORCH_CHECK(residual.sizes() == x.sizes(), op, ": residual has shape ", residual.sizes(), " but x has ",
              x.sizes());
  check_norm_weight(weight, x, op);
  const RowLayout x_layout = row_layout(x, op, "x");
  const RowLayout residual_layout = row_layout(residual, op, "residual");

  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(nanovllm::kernels::launch_fused_add_rms_norm(
                   dtype, x.data_ptr(), x_layout, residual.data_ptr(), residual_layout, weight.data_ptr(),
                   num_rows(x), static_cast<int>(x.size(-1)), static_cast<float>(eps),
                   c10::cuda::getCurrentCUDAStream()),
               op);
}

// query [num_tokens, num_q_heads, head_dim] and key [num_tokens, num_kv_heads, head_dim] of one batch.
void check_query_key_shapes(const at::Tensor& query, const at::Tensor& key, const char* op) {
  TORCH_CHECK(query.dim() == 3, op, ": query must be [num_tokens, num_q_heads, head_dim], got ", query.sizes());
  TORCH_CHECK(key.dim() == 3, op, ": key must be [num_tokens, num_kv_heads, head_dim], got ", key.sizes());
  const int64_t num_tokens = query.size(0), head_dim = query.size(2);
  TORCH_CHECK(key.size(0) == num_tokens && key.size(2) == head_dim, op, ": key has shape ", key.sizes(),
              ", expected [", num_tokens, ", num_kv_heads, ", head_dim, "] to match query");
}

// The positions and the cos | sin table the rotary embedding reads for num_tokens tokens.
void check_rotary_tables(const at::Tensor& positions, const at::Tensor& cos_sin_cache, int64_t num_tokens,
                         int64_t head_dim, const char* op) {
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == num_tokens &&
                  positions.is_contiguous(),
              op, ": positions must be a contiguous int64 [", num_tokens, "] tensor, got ", positions.scalar_type(),
              " ", positions.sizes());
  TORCH_CHECK(cos_sin_cache.scalar_type() == at::kFloat && cos_sin_cache.dim() == 2 &&
                  cos_sin_cache.size(1) == head_dim && cos_sin_cache.is_contiguous(),
              op, ": cos_sin_cache must be a contiguous float32 [max_position, ", head_dim, "] tensor, got ",
              cos_sin_cache.scalar_type(), " ", cos_sin_cache.sizes());
}

void rotary_embedding(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& cos_sin_cache) {
  constexpr const char* op = "rotary_embedding";
  check_cuda(query, query, op, "query");
  check_cuda(key, query, op, "key");
  check_cuda(positions, query, op, "positions");
  check_cuda(cos_sin_cache, query, op, "cos_sin_cache");
  const DType dtype = kernel_dtype(query, op, "query");
  check_same_dtype(key, query, op, "key", "query");
  check_query_key_shapes(query, key, op);
  const int64_t num_tokens = query.size(0);
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0, op, ": head_dim must be even and >= 2, got ", head_dim);
  for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}})
    TORCH_CHECK(t->stride(2) == 1, op, ": ", name, " must have a contiguous last dim, got strides ", t->strides());
  check_rotary_tables(positions, cos_sin_cache, num_tokens, head_dim, op);

  const c10::cuda::CUDAGuard guard(query.device());
  check_launch(nanovllm::kernels::launch_rotary_embedding(
                   dtype, positions.data_ptr<int64_t>(), query.data_ptr(), HeadLayout{query.stride(0), query.stride(1)},
                   checked_int(query.size(1), op, "num_q_heads"), key.data_ptr(),
                   HeadLayout{key.stride(0), key.stride(1)}, checked_int(key.size(1), op, "num_kv_heads"),
                   cos_sin_cache.data_ptr<float>(), num_tokens, checked_int(head_dim, op, "head_dim"),
                   c10::cuda::getCurrentCUDAStream()),
               op);
}

void qk_norm_rotary_store(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                          const at::Tensor& value, const std::optional<at::Tensor>& q_norm_weight,
                          const std::optional<at::Tensor>& k_norm_weight, const at::Tensor& cos_sin_cache,
                          const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                          double eps) {
  constexpr const char* op = "qk_norm_rotary_store";
  check_cuda(query, query, op, "query");
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}, {&positions, "positions"},
                         {&cos_sin_cache, "cos_sin_cache"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"},
                         {&slot_mapping, "slot_mapping"}})
    check_cuda(*t, query, op, name);
  const DType dtype = kernel_dtype(query, op, "query");
  for (auto [t, name] : {std::pair{&key, "key"}, {&value, "value"}, {&k_cache, "k_cache"}, {&v_cache, "v_cache"}})
    check_same_dtype(*t, query, op, name, "query");

  check_query_key_shapes(query, key, op);
  const int64_t num_tokens = query.size(0);
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(value.sizes() == key.sizes(), op, ": value has shape ", value.sizes(), " but key has ", key.sizes());
  TORCH_CHECK(head_dim >= 2 && head_dim % 2 == 0 && head_dim <= nanovllm::kernels::kQkNormRotaryMaxHeadDim, op,
              ": head_dim must be even and in 2..", nanovllm::kernels::kQkNormRotaryMaxHeadDim, ", got ", head_dim);
  for (auto [t, name] : {std::pair{&query, "query"}, {&key, "key"}, {&value, "value"}})
    TORCH_CHECK(t->stride(2) == 1, op, ": ", name, " must have a contiguous last dim, got strides ", t->strides());

  TORCH_CHECK(q_norm_weight.has_value() == k_norm_weight.has_value(), op,
              ": pass both q_norm_weight and k_norm_weight (Qwen3) or neither (no q/k norm), got only ",
              q_norm_weight.has_value() ? "q_norm_weight" : "k_norm_weight");
  for (auto [weight, name] : {std::pair{&q_norm_weight, "q_norm_weight"}, {&k_norm_weight, "k_norm_weight"}}) {
    if (!weight->has_value()) continue;
    const at::Tensor& w = weight->value();
    check_cuda(w, query, op, name);
    check_same_dtype(w, query, op, name, "query");
    TORCH_CHECK(w.dim() == 1 && w.size(0) == head_dim && w.is_contiguous(), op, ": ", name,
                " must be a contiguous [", head_dim, "] tensor (head_dim), got ", w.sizes());
  }

  check_rotary_tables(positions, cos_sin_cache, num_tokens, head_dim, op);
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache has shape ", v_cache.sizes(), " but k_cache has ",
              k_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == key.size(1) && k_cache.size(3) == head_dim, op, ": key rows [", key.size(1), ", ",
              head_dim, "] do not match the cache's [num_kv_heads, head_dim] = [", k_cache.size(2), ", ",
              k_cache.size(3), "]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), op, ": k_cache and v_cache must be contiguous");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == num_tokens && slot_mapping.is_contiguous(),
              op, ": slot_mapping must be a contiguous int64 [", num_tokens, "] tensor, got ",
              slot_mapping.scalar_type(), " ", slot_mapping.sizes());

  const c10::cuda::CUDAGuard guard(query.device());
  const auto head_layout = [](const at::Tensor& t) { return HeadLayout{t.stride(0), t.stride(1)}; };
  check_launch(nanovllm::kernels::launch_qk_norm_rotary_store(
                   dtype, positions.data_ptr<int64_t>(), query.data_ptr(), head_layout(query),
                   checked_int(query.size(1), op, "num_q_heads"), key.data_ptr(), head_layout(key), value.data_ptr(),
                   head_layout(value), checked_int(key.size(1), op, "num_kv_heads"),
                   q_norm_weight ? q_norm_weight->data_ptr() : nullptr,
                   k_norm_weight ? k_norm_weight->data_ptr() : nullptr, cos_sin_cache.data_ptr<float>(),
                   k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(), num_tokens,
                   static_cast<int>(head_dim), static_cast<float>(eps), c10::cuda::getCurrentCUDAStream()),
               op);
}

// The address a kernel reaches pinned host memory at (under unified addressing, the host address itself).
void* mapped_host_address(const at::Tensor& t, const char* op, const char* name) {
  cudaPointerAttributes attributes{};
  const cudaError_t status = cudaPointerGetAttributes(&attributes, t.data_ptr());
  TORCH_CHECK(status == cudaSuccess && attributes.devicePointer != nullptr, op, ": ", name,
              " is not mapped into the device's address space (", cudaGetErrorString(status), ")");
  return attributes.devicePointer;
}

void copy_pinned(const at::Tensor& dst, const at::Tensor& src, int64_t nbytes) {
  constexpr const char* op = "copy_pinned";
  const auto pinned = [](const at::Tensor& t) { return t.device().is_cpu() && t.is_pinned(); };
  const bool from_host = dst.is_cuda() && pinned(src);
  TORCH_CHECK(from_host || (src.is_cuda() && pinned(dst)), op,
              ": needs one CUDA tensor and one pinned CPU tensor, got dst on ", dst.device(),
              pinned(dst) ? " (pinned)" : "", " and src on ", src.device(), pinned(src) ? " (pinned)" : "");
  for (const auto& [t, name] : {std::pair{&dst, "dst"}, std::pair{&src, "src"}}) {
    TORCH_CHECK(t->scalar_type() == at::kByte && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
                " must be a contiguous uint8 vector, got ", t->scalar_type(), " ", t->sizes());
    TORCH_CHECK(nanovllm::aligned16(*t), op, ": ", name, " must start on a 16-byte boundary");
  }
  TORCH_CHECK(nbytes >= 0 && nbytes % 16 == 0 && nbytes <= dst.numel() && nbytes <= src.numel(), op,
              ": nbytes = ", nbytes, " must be a multiple of 16 within both buffers (dst ", dst.numel(), ", src ",
              src.numel(), " bytes)");
  if (nbytes == 0) return;
  const c10::cuda::CUDAGuard guard(from_host ? dst.device() : src.device());
  void* const to = from_host ? dst.data_ptr() : mapped_host_address(dst, op, "dst");
  const void* const from = from_host ? mapped_host_address(src, op, "src") : src.data_ptr();
  check_launch(nanovllm::kernels::launch_copy_pinned(to, from, nbytes, from_host, c10::cuda::getCurrentCUDAStream()),
               op);
}

void gather_embedding(const at::Tensor& out, const at::Tensor& weight, const at::Tensor& ids, const at::Tensor& rows) {
  constexpr const char* op = "gather_embedding";
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&weight, "weight"}, {&ids, "ids"}, {&rows, "rows"}})
    check_cuda(*t, out, op, name);
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous() && nanovllm::aligned16(weight), op,
              ": weight must be a contiguous, 16-byte aligned [vocab, hidden] tensor, got ", weight.sizes(),
              " with strides ", weight.strides());
  const int64_t row_bytes = weight.size(1) * weight.element_size();
  TORCH_CHECK(row_bytes % 16 == 0, op, ": a weight row must be a multiple of 16 bytes, got ", row_bytes);
  for (const auto& [t, name] : {std::pair{&ids, "ids"}, {&rows, "rows"}})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->is_contiguous(), op, ": ", name,
                " must be a contiguous int64 vector, got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(rows.size(0) <= 65535, op, ": at most 65535 rows, got ", rows.size(0));
  TORCH_CHECK(out.scalar_type() == weight.scalar_type() && out.dim() == 2 && out.size(0) == rows.size(0) &&
                  out.size(1) == weight.size(1) && out.is_contiguous() && nanovllm::aligned16(out),
              op, ": out must be a contiguous, 16-byte aligned ", weight.scalar_type(), " [", rows.size(0), ", ",
              weight.size(1), "] tensor, got ", out.scalar_type(), " ", out.sizes());
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(nanovllm::kernels::launch_gather_embedding(
                   out.data_ptr(), weight.data_ptr(), weight.size(0), row_bytes, ids.data_ptr<int64_t>(), ids.size(0),
                   rows.data_ptr<int64_t>(), rows.size(0), c10::cuda::getCurrentCUDAStream()),
               op);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) {
  m.impl("store_kvcache", &store_kvcache);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("qk_norm_rotary_store", &qk_norm_rotary_store);
  m.impl("copy_pinned", &copy_pinned);
  m.impl("gather_embedding", &gather_embedding);
}
