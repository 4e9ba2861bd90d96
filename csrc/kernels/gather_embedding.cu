// A decode step's first kernel after its staged inputs: out[r] = weight[ids[rows[r]]], the input-id gather
// (sampled and staged ids share one table) and the embedding lookup in one launch, where two torch index_selects
// took two launches that programmatic launch could not overlap with the first layer's GEMV.
//
// One thread per 16-byte pack of a row: a byte copy, bit-exact for any dtype.
#include <algorithm>

#include "elementwise_launchers.h"
#include "launch.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kThreads = 128;
constexpr int kMaxBlocksPerRow = 64;

__global__ void __launch_bounds__(kThreads)
    gather_embedding_kernel(uint4* out, const uint4* weight, int64_t vocab, int64_t packs_per_row,
                            const int64_t* ids, int64_t num_ids, const int64_t* rows) {
  // rows and ids are written by the kernels in front (the staged inputs' copy, the last step's sampler). The
  // kernels after this one launch only once that copy is complete: the fused decode attention reads the staged
  // inputs before its own wait (launch.cuh).
  wait_for_prior_grids();
  allow_dependent_launch();
  const int64_t r = blockIdx.y;
  const int64_t row = rows[r];
  const int64_t id = row >= 0 && row < num_ids ? ids[row] : -1;
  const bool valid = id >= 0 && id < vocab;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < packs_per_row; i += int64_t(gridDim.x) * kThreads)
    out[r * packs_per_row + i] = valid ? __ldg(weight + id * packs_per_row + i) : make_uint4(0, 0, 0, 0);
}

}  // namespace

cudaError_t launch_gather_embedding(void* out, const void* weight, int64_t vocab, int64_t row_bytes,
                                    const int64_t* ids, int64_t num_ids, const int64_t* rows, int64_t num_rows,
                                    cudaStream_t stream) {
  if (num_rows == 0 || row_bytes == 0) return cudaSuccess;
  const int64_t packs_per_row = row_bytes / 16;
  const int64_t blocks_per_row = std::min<int64_t>((packs_per_row + kThreads - 1) / kThreads, kMaxBlocksPerRow);
  const LaunchShape shape{dim3(static_cast<unsigned>(blocks_per_row), static_cast<unsigned>(num_rows)),
                          dim3(kThreads)};
  return launch_kernel(gather_embedding_kernel, shape, stream, static_cast<uint4*>(out),
                       static_cast<const uint4*>(weight), vocab, packs_per_row, ids, num_ids, rows);
}

}  // namespace nanovllm::kernels
