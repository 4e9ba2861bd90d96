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

// out[m, n] = sum_k a[m, k] * weight[n, k] for m < rows, n < n_out, in fp32, rounded once to the dtype.
// weight: contiguous [n_out, k]; out: row m at out + m * out_row_stride (elements).
// a = x (row m at x + m * x_row_stride, k contiguous elements) when silu_mul is false; with silu_mul, x holds
// gate_up rows [gate (k) | up (k)] and a = silu(gate) * up, computed in fp32.
// x, weight and out are 16-byte aligned with 16-byte aligned row strides; 1 <= rows <= kSkinnyLinearMaxRows,
// k a positive multiple of kSkinnyLinearKMultiple. Enqueues one kernel on `stream` (none when n_out == 0) and
// returns cudaGetLastError().
cudaError_t launch_skinny_linear(DType dtype, void* out, int64_t out_row_stride, const void* x,
                                 int64_t x_row_stride, const void* weight, int rows, int n_out, int k, bool silu_mul,
                                 cudaStream_t stream);

}  // namespace nanovllm::kernels
