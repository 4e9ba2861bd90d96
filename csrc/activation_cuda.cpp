// CUDA implementation of silu_and_mul (schema in csrc/torch_bindings.cpp): checks the tensors and calls the
// launcher of csrc/kernels/silu_and_mul.cu, which needs no torch headers.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "kernels/elementwise_launchers.h"
#include "op_checks.h"

namespace {

void silu_and_mul(const at::Tensor& out, const at::Tensor& x) {
  constexpr const char* op = "silu_and_mul";
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(out.device() == x.device(), op, ": out is on ", out.device(), " but x is on ", x.device());
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": x has dtype ", type,
              "; supported: float32, float16, bfloat16");
  TORCH_CHECK(out.scalar_type() == type, op, ": out has dtype ", out.scalar_type(), " but x has ", type,
              "; they must match");
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, op, ": x must be [tokens, 2 * d] and out [tokens, d], got x ",
              x.sizes(), " and out ", out.sizes());
  TORCH_CHECK(x.size(1) % 2 == 0, op, ": the last dim of x (", x.size(1), ") must be even: gate and up halves");
  const int64_t tokens = x.size(0), d = x.size(1) / 2;
  TORCH_CHECK(out.size(0) == tokens && out.size(1) == d, op, ": out must have shape [", tokens, ", ", d,
              "] for x of shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(x.size(1) <= 1 || x.stride(1) == 1, op, ": x must have a contiguous last dim, got strides ",
              x.strides());
  TORCH_CHECK(out.size(1) <= 1 || out.stride(1) == 1, op, ": out must have a contiguous last dim, got strides ",
              out.strides());
  TORCH_CHECK(tokens <= std::numeric_limits<int>::max(), op, ": ", tokens, " tokens is more than ",
              std::numeric_limits<int>::max());
  // The grid's y dim (at most 65535 blocks of 512 threads) covers a row; 2**24 is well inside it for any width.
  TORCH_CHECK(d <= (int64_t{1} << 24), op, ": d = ", d, " is more than the supported ", int64_t{1} << 24);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t status = nanovllm::kernels::launch_silu_and_mul(
      nanovllm::kernel_dtype_of(type), out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0), tokens,
      static_cast<int>(d), c10::cuda::getCurrentCUDAStream());
  nanovllm::check_launch(status, op);
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) { m.impl("silu_and_mul", &silu_and_mul); }
