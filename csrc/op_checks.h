// Host-side helpers the csrc/*_cuda.cpp glue files share: small predicates for their checks, and the check of a
// launcher's status.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/elementwise_launchers.h"

namespace nanovllm {

inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
inline bool aligned16(const at::Tensor& t) { return aligned16(t.data_ptr()); }

// The kernels' dtype for a scalar type the op has already checked to be float32, float16 or bfloat16.
inline kernels::DType kernel_dtype_of(at::ScalarType type) {
  return type == at::kFloat ? kernels::DType::Float32
         : type == at::kHalf ? kernels::DType::Float16
                             : kernels::DType::BFloat16;
}

inline void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(status));
}

}  // namespace nanovllm
