// CUDA implementation of sample_tokens (schema in csrc/torch_bindings.cpp): checks, then the launcher of
// csrc/kernels/sampling.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "kernels/sampling.h"
#include "op_checks.h"

namespace {

void sample_tokens(const at::Tensor& out, const at::Tensor& logits, const at::Tensor& temperatures,
                   const at::Tensor& keys) {
  constexpr const char* op = "sample_tokens";
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&logits, "logits"}, {&temperatures, "temperatures"},
                                {&keys, "keys"}}) {
    TORCH_CHECK(t->is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t->device());
    TORCH_CHECK(t->device() == logits.device(), op, ": ", name, " is on ", t->device(), " but logits is on ",
                logits.device());
  }
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [rows, vocab], got shape ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(logits.stride(1) == 1 || vocab == 1, op, ": logits must have a contiguous last dim, got strides ",
              logits.strides());
  TORCH_CHECK(vocab >= 1 && vocab <= std::numeric_limits<int>::max() && rows <= std::numeric_limits<int>::max(), op,
              ": logits shape ", logits.sizes(), " is out of range (1 <= vocab < 2**31)");
  const at::ScalarType type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": logits has dtype ", type,
              "; supported: float32, float16, bfloat16");
  TORCH_CHECK(out.scalar_type() == at::kLong && out.dim() == 1 && out.size(0) == rows && out.is_contiguous(), op,
              ": out must be a contiguous int64 [", rows, "], got ", out.scalar_type(), " ", out.sizes());
  TORCH_CHECK(temperatures.scalar_type() == at::kFloat && temperatures.dim() == 1 && temperatures.size(0) == rows &&
                  temperatures.is_contiguous(),
              op, ": temperatures must be a contiguous float32 [", rows, "], got ", temperatures.scalar_type(), " ",
              temperatures.sizes());
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.size(0) == rows && keys.is_contiguous(), op,
              ": keys must be a contiguous int64 [", rows, "], got ", keys.scalar_type(), " ", keys.sizes());
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t status = nanovllm::kernels::launch_sample_tokens(
      out.data_ptr<int64_t>(), logits.data_ptr(), nanovllm::kernel_dtype_of(type), logits.stride(0),
      static_cast<int>(rows), static_cast<int>(vocab), temperatures.data_ptr<float>(), keys.data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream());
  nanovllm::check_launch(status, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) { m.impl("sample_tokens", &sample_tokens); }
