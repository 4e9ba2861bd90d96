// CUDA implementation of nanovllm_cpp::paged_attention_decode: validates the tensors on the host (no device
// synchronisation, no allocation, so the op can be captured in a CUDA graph) and launches the kernels of
// csrc/kernels/paged_attention.cu on the current stream.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kernels/paged_attention.h"

namespace {

constexpr const char* kOp = "paged_attention_decode: ";

nanovllm::AttentionDtype attention_dtype(at::ScalarType type) {
  switch (type) {
    case at::kBFloat16: return nanovllm::AttentionDtype::kBFloat16;
    case at::kHalf: return nanovllm::AttentionDtype::kFloat16;
    case at::kFloat: return nanovllm::AttentionDtype::kFloat32;
    default: TORCH_CHECK(false, kOp, "query dtype must be bfloat16, float16 or float32, got ", type);
  }
}

bool is_aligned_16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void paged_attention_decode_cuda(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& block_tables,
                                 const at::Tensor& context_lens, double scale, int64_t max_context_len,
                                 const at::Tensor& workspace) {
  for (const at::Tensor* t : {&out, &k_cache, &v_cache, &block_tables, &context_lens, &workspace}) {
    TORCH_CHECK(t->device() == query.device(), kOp, "all tensors must be on ", query.device(), ", got one on ",
                t->device());
  }
  const auto dtype = attention_dtype(query.scalar_type());
  TORCH_CHECK(query.dim() == 3, kOp, "query must be [num_seqs, num_q_heads, head_dim], got ", query.sizes());
  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type(), kOp,
              "out must match query (", query.sizes(), ", ", query.scalar_type(), "), got ", out.sizes(), ", ",
              out.scalar_type());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), kOp,
              "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.scalar_type() == query.scalar_type() && v_cache.scalar_type() == query.scalar_type(), kOp,
              "k_cache/v_cache dtype must equal query dtype ", query.scalar_type(), ", got ", k_cache.scalar_type(),
              "/", v_cache.scalar_type());
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), kOp, "k_cache and v_cache must be contiguous");
  TORCH_CHECK(is_aligned_16(k_cache.data_ptr()) && is_aligned_16(v_cache.data_ptr()), kOp,
              "k_cache and v_cache must be 16-byte aligned");

  const int64_t num_seqs = query.size(0), num_q_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(head_dim == 64 || head_dim == 128, kOp, "head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK(k_cache.size(3) == head_dim, kOp, "cache head_dim ", k_cache.size(3), " != query head_dim ",
              head_dim);
  TORCH_CHECK(num_kv_heads > 0 && num_q_heads % num_kv_heads == 0, kOp, "num_q_heads ", num_q_heads,
              " must be a multiple of num_kv_heads ", num_kv_heads);
  TORCH_CHECK(num_q_heads / num_kv_heads <= 8, kOp, "at most 8 query heads per kv head, got ",
              num_q_heads / num_kv_heads);
  TORCH_CHECK(block_size >= 16 && (block_size & (block_size - 1)) == 0, kOp,
              "block_size must be a power of two >= 16, got ", block_size);

  const int64_t elems_per_16_bytes = 16 / query.element_size();
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1, kOp, "query and out need a contiguous head_dim");
  TORCH_CHECK(is_aligned_16(query.data_ptr()) && query.stride(0) % elems_per_16_bytes == 0 &&
                  query.stride(1) % elems_per_16_bytes == 0,
              kOp, "query rows must be 16-byte aligned (data pointer and strides ", query.strides(), ")");

  TORCH_CHECK(block_tables.scalar_type() == at::kInt && block_tables.dim() == 2 &&
                  block_tables.size(0) == num_seqs && block_tables.stride(1) == 1,
              kOp, "block_tables must be int32 [num_seqs=", num_seqs, ", max_blocks] with a contiguous last dim, got ",
              block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(context_lens.scalar_type() == at::kInt && context_lens.dim() == 1 && context_lens.size(0) == num_seqs &&
                  context_lens.is_contiguous(),
              kOp, "context_lens must be contiguous int32 [num_seqs=", num_seqs, "], got ", context_lens.scalar_type(),
              " ", context_lens.sizes());
  TORCH_CHECK(max_context_len >= 0 && max_context_len <= std::numeric_limits<int32_t>::max(), kOp,
              "max_context_len must be in [0, 2^31), got ", max_context_len);
  TORCH_CHECK(num_seqs <= 65535, kOp, "at most 65535 sequences per call, got ", num_seqs);

  const int64_t needed = nanovllm::paged_attention_workspace_size(num_seqs, num_q_heads, head_dim, max_context_len);
  TORCH_CHECK(workspace.scalar_type() == at::kFloat && workspace.is_contiguous(), kOp,
              "workspace must be contiguous float32, got ", workspace.scalar_type());
  TORCH_CHECK(workspace.numel() >= needed, kOp, "workspace holds ", workspace.numel(), " floats, but ", num_seqs,
              " sequences x ", num_q_heads, " heads x head_dim ", head_dim, " at max_context_len ", max_context_len,
              " need ", needed, " (allocate it with nanovllm_cpp.paged_attention_workspace)");
  if (num_seqs == 0) return;

  nanovllm::PagedAttentionParams params{};
  params.out = out.data_ptr();
  params.query = query.data_ptr();
  params.k_cache = k_cache.data_ptr();
  params.v_cache = v_cache.data_ptr();
  params.block_tables = block_tables.data_ptr<int32_t>();
  params.context_lens = context_lens.data_ptr<int32_t>();
  params.workspace = workspace.data_ptr<float>();
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

  const c10::cuda::CUDAGuard guard(query.device());
  const cudaError_t err = nanovllm::paged_attention_decode(params, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) { m.impl("paged_attention_decode", &paged_attention_decode_cuda); }
