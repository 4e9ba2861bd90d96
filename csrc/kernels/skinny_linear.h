// Plain C++ entry point of the skinny GEMM (csrc/kernels/skinny_linear.cu) for decode-sized batches; the
// torch-facing checks live in csrc/skinny_linear_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "elementwise_launchers.h"

namespace nanovllm::kernels {

// Most activation rows one launch takes: the kernel keeps rows x 4 fp32 accumulators per thread in registers.
inline constexpr int kSkinnyLinearMaxRows = 8;

// K must be a multiple of this (one 16-byte weight load holds 8 bf16/fp16 elements).
inline constexpr int kSkinnyLinearKMultiple = 8;

// What the kernel makes of x (row m at x + m * x_row_stride) before the product: the activation rows a.
struct SkinnyPrologue {
  enum class Kind {
    kNone,        // a = x, k elements a row
    kSiluMul,     // x rows are [gate (k) | up (k)]; a = silu(gate) * up, in fp32
    kAddRmsNorm,  // r = x + residual rounded to the dtype, written to residual_out; a = rms_norm(r) * norm_weight
                  // rounded to the dtype (fused_add_rms_norm's two outputs, out of place); residual, residual_out
                  // contiguous [rows, k], norm_weight [k]
    kRmsNorm,     // a = rms_norm(x) * norm_weight rounded to the dtype (rms_norm's output); norm_weight [k]
  };
  Kind kind = Kind::kNone;
  const void* residual = nullptr;
  void* residual_out = nullptr;
  const void* norm_weight = nullptr;
  float eps = 0.f;
};

// out[m, n] = sum_k a[m, k] * weight[n, k] for m < rows, n < n_out, in fp32, rounded once to the dtype.
// weight: contiguous [n_out, k]; out: row m at out + m * out_row_stride (elements).
// x, weight, out and the prologue's tensors are 16-byte aligned with 16-byte aligned row strides;
// 1 <= rows <= kSkinnyLinearMaxRows, k a positive multiple of kSkinnyLinearKMultiple. Enqueues one kernel on
// `stream` (none when n_out == 0) and returns its launch status.
cudaError_t launch_skinny_linear(DType dtype, void* out, int64_t out_row_stride, const void* x,
                                 int64_t x_row_stride, const SkinnyPrologue& prologue, const void* weight, int rows,
                                 int n_out, int k, cudaStream_t stream);

}  // namespace nanovllm::kernels
