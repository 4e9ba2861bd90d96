// Plain C++ entry point of the sampling kernel (csrc/kernels/sampling.cu); torch-facing checks live in
// csrc/sampling_cuda.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "elementwise_launchers.h"

namespace nanovllm::kernels {

// out[r] = argmax_v score(r, v) for each of `rows` rows of logits (row r at logits + r * row_stride elements,
// `vocab` contiguous elements). score = logit when temperatures[r] == 0 (greedy), else
// logit / temperature - log(-log(u(keys[r], v))), the Gumbel-max form of sampling from softmax(logit / T).
// Ties go to the lowest index. Enqueues one kernel on `stream` and returns cudaGetLastError().
cudaError_t launch_sample_tokens(int64_t* out, const void* logits, DType dtype, int64_t row_stride, int rows,
                                 int vocab, const float* temperatures, const int64_t* keys, cudaStream_t stream);

}  // namespace nanovllm::kernels
