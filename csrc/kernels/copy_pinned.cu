// Copies between pinned host memory and the device done by a kernel that reads or writes the host buffer over
// the bus (UVA mapping), instead of a copy-engine transfer. A decode step starts with the copy of its staged
// inputs and ends with the copy of its sampled tokens; as copy-engine transfers each costs a hand-off between
// the copy engine and the SMs of 5-10 µs (H200 profile: a memcpy node ends ~10 µs before the next kernel node
// starts), as kernels none.
//
// One thread per 16-byte pack. From the host, the loads go out before the wait for earlier grids (the host buffer
// is written by the host alone, before the launch), so the bus round trip overlaps the kernel in front; to the
// host, they wait (the kernels before write the source) and the stores write through to system memory.
#include "elementwise_launchers.h"
#include "launch.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kThreads = 256;

template <bool kFromHost>
__global__ void __launch_bounds__(kThreads) copy_pinned_kernel(uint4* dst, const uint4* src, int64_t packs) {
  allow_dependent_launch();
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  uint4 pack = {};
  if (kFromHost && i < packs) pack = __ldcv(src + i);  // not cached: the host rewrites the buffer between launches
  wait_for_prior_grids();
  if (i >= packs) return;
  if constexpr (kFromHost) {
    dst[i] = pack;
  } else {
    __stwt(dst + i, src[i]);
  }
}

}  // namespace

cudaError_t launch_copy_pinned(void* dst, const void* src, int64_t nbytes, bool from_host, cudaStream_t stream) {
  if (nbytes == 0) return cudaSuccess;
  const int64_t packs = nbytes / 16;
  const LaunchShape shape{dim3(static_cast<unsigned>((packs + kThreads - 1) / kThreads)), dim3(kThreads)};
  auto* const to = static_cast<uint4*>(dst);
  const auto* const from = static_cast<const uint4*>(src);
  return from_host ? launch_kernel(copy_pinned_kernel<true>, shape, stream, to, from, packs)
                   : launch_kernel(copy_pinned_kernel<false>, shape, stream, to, from, packs);
}

}  // namespace nanovllm::kernels
