// CUDA implementations of skinny_linear, silu_mul_skinny_linear, add_rms_norm_skinny_linear and
// rms_norm_skinny_linear (schemas in csrc/torch_bindings.cpp): check the tensors, then call the launcher of
// csrc/kernels/skinny_linear.cu.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "kernels/skinny_linear.h"
#include "op_checks.h"

namespace {

using nanovllm::aligned16;
using nanovllm::kernels::kSkinnyLinearKMultiple;
using nanovllm::kernels::kSkinnyLinearMaxRows;
using nanovllm::kernels::SkinnyPrologue;

// out = a @ weight^T where a is x as the prologue makes it (csrc/kernels/skinny_linear.h); the prologue's own
// tensors are checked by its op.
void run(const char* op, const at::Tensor& out, const at::Tensor& x, const char* x_name, const at::Tensor& weight,
         const SkinnyPrologue& prologue) {
  const bool silu_mul = prologue.kind == SkinnyPrologue::Kind::kSiluMul;
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&x, x_name}, {&weight, "weight"}}) {
    TORCH_CHECK(t->is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t->device());
    TORCH_CHECK(t->device() == x.device(), op, ": ", name, " is on ", t->device(), " but ", x_name, " is on ",
                x.device());
  }
  const at::ScalarType type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, op, ": ", x_name, " has dtype ",
              type, "; supported: float32, float16, bfloat16");
  for (const auto& [t, name] : {std::pair{&out, "out"}, {&weight, "weight"}})
    TORCH_CHECK(t->scalar_type() == type, op, ": ", name, " has dtype ", t->scalar_type(), " but ", x_name,
                " has ", type, "; they must match");
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && out.dim() == 2, op, ": ", x_name,
              ", weight and out must be 2-D, got ", x.sizes(), ", ", weight.sizes(), " and ", out.sizes());
  const int64_t rows = x.size(0), n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(rows >= 1 && rows <= kSkinnyLinearMaxRows, op, ": ", x_name, " has ", rows,
              " rows; this kernel takes 1 to ", kSkinnyLinearMaxRows, " (use a GEMM for more)");
  TORCH_CHECK(k > 0 && k % kSkinnyLinearKMultiple == 0, op, ": K = ", k,
              " (weight.size(1)) must be a positive multiple of ", kSkinnyLinearKMultiple);
  TORCH_CHECK(n <= std::numeric_limits<int>::max() && k <= std::numeric_limits<int>::max(), op, ": weight shape ",
              weight.sizes(), " is out of range");
  const int64_t x_cols = silu_mul ? 2 * k : k;
  TORCH_CHECK(x.size(1) == x_cols, op, ": ", x_name, " must be [", rows, ", ", x_cols, "]",
              silu_mul ? " (gate | up, each K wide)" : "", " for weight ", weight.sizes(), ", got ", x.sizes());
  TORCH_CHECK(out.size(0) == rows && out.size(1) == n, op, ": out must be [", rows, ", ", n, "], got ", out.sizes());
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous");
  TORCH_CHECK(x.stride(1) == 1, op, ": ", x_name, " must have a contiguous last dim, got strides ", x.strides());
  TORCH_CHECK(out.stride(1) == 1 || n == 1, op, ": out must have a contiguous last dim, got strides ", out.strides());
  const int64_t element_bytes = x.element_size();
  TORCH_CHECK(aligned16(x) && (rows == 1 || x.stride(0) * element_bytes % 16 == 0), op, ": ", x_name,
              " rows must start at 16-byte aligned addresses (row stride ", x.stride(0), " elements)");
  TORCH_CHECK(aligned16(weight), op, ": weight must start at a 16-byte aligned address");

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t status = nanovllm::kernels::launch_skinny_linear(
      nanovllm::kernel_dtype_of(type), out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0), prologue,
      weight.data_ptr(), static_cast<int>(rows), static_cast<int>(n), static_cast<int>(k),
      c10::cuda::getCurrentCUDAStream());
  nanovllm::check_launch(status, op);
}

void skinny_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight) {
  run("skinny_linear", out, x, "x", weight, {});
}

void silu_mul_skinny_linear(const at::Tensor& out, const at::Tensor& gate_up, const at::Tensor& weight) {
  run("silu_mul_skinny_linear", out, gate_up, "gate_up", weight, {SkinnyPrologue::Kind::kSiluMul});
}

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const auto* a0 = static_cast<const char*>(a.data_ptr());
  const auto* b0 = static_cast<const char*>(b.data_ptr());
  return a0 < b0 + b.numel() * b.element_size() && b0 < a0 + a.numel() * a.element_size();
}

void check_norm_weight(const char* op, const at::Tensor& norm_weight, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(norm_weight.is_cuda() && norm_weight.device() == x.device() &&
                  norm_weight.scalar_type() == x.scalar_type() && norm_weight.dim() == 1 &&
                  norm_weight.size(0) == weight.size(1) && norm_weight.is_contiguous() && aligned16(norm_weight),
              op, ": norm_weight must be a contiguous, 16-byte aligned ", x.scalar_type(), " [", weight.size(1),
              "] tensor on ", x.device(), ", got ", norm_weight.scalar_type(), " ", norm_weight.sizes());
}

void rms_norm_skinny_linear(const at::Tensor& out, const at::Tensor& x, const at::Tensor& norm_weight, double eps,
                            const at::Tensor& weight) {
  constexpr const char* op = "rms_norm_skinny_linear";
  check_norm_weight(op, norm_weight, x, weight);
  run(op, out, x, "x", weight,
      {SkinnyPrologue::Kind::kRmsNorm, nullptr, nullptr, norm_weight.data_ptr(), static_cast<float>(eps)});
}

void add_rms_norm_skinny_linear(const at::Tensor& out, const at::Tensor& residual_out, const at::Tensor& x,
                                const at::Tensor& residual, const at::Tensor& norm_weight, double eps,
                                const at::Tensor& weight) {
  constexpr const char* op = "add_rms_norm_skinny_linear";
  for (const auto& [t, name] : {std::pair{&residual_out, "residual_out"}, {&residual, "residual"}}) {
    TORCH_CHECK(t->is_cuda() && t->device() == x.device(), op, ": ", name, " must be on ", x.device());
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->sizes() == x.sizes() && t->is_contiguous(), op, ": ",
                name, " must be a contiguous ", x.scalar_type(), " tensor of x's shape ", x.sizes(), ", got ",
                t->scalar_type(), " ", t->sizes(), " with strides ", t->strides());
    TORCH_CHECK(aligned16(*t), op, ": ", name, " must start at a 16-byte aligned address");
  }
  check_norm_weight(op, norm_weight, x, weight);
  // Every block reads x and residual while the first one writes residual_out.
  TORCH_CHECK(!overlaps(residual_out, x) && !overlaps(residual_out, residual), op,
              ": residual_out must not overlap x or residual");
  run(op, out, x, "x", weight,
      {SkinnyPrologue::Kind::kAddRmsNorm, residual.data_ptr(), residual_out.data_ptr(), norm_weight.data_ptr(),
       static_cast<float>(eps)});
}

}  // namespace

TORCH_LIBRARY_IMPL(nanovllm_cpp, CUDA, m) {
  m.impl("skinny_linear", &skinny_linear);
  m.impl("silu_mul_skinny_linear", &silu_mul_skinny_linear);
  m.impl("add_rms_norm_skinny_linear", &add_rms_norm_skinny_linear);
  m.impl("rms_norm_skinny_linear", &rms_norm_skinny_linear);
}
