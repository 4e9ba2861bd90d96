// Kernel launches with programmatic dependent launch (PDL, Hopper and later).
//
// A decode step is a chain of ~250 small dependent kernels, and at small batches each one's launch, ramp-up and
// first memory round trip cost more than its work. With PDL a kernel's CTAs are scheduled while the kernel before
// it still runs: they fetch what no kernel of the step writes (the weights) and then wait for the earlier grids,
// so a weight stream overlaps the latency-bound kernels in front of it. CUDA graphs keep these programmatic edges.
//
// The contract of every kernel launched through launch_kernel: before wait_for_prior_grids() it reads only memory
// that no kernel writes (weights, caches of constants) and writes nothing; after it, all work ordered before the
// launch on the stream is complete and visible. allow_dependent_launch() may come anywhere (the next kernel still
// waits for this one to complete before it reads anything). One documented exception: the fused decode attention
// (paged_attention.h, DecodePrologue) also reads, before its wait, the host-staged step inputs and the KV cache of
// earlier steps; every engine step starts with copy_pinned of its staged inputs, which stores them only after
// all kernels of the steps before are complete, and then gathers its input ids with gather_embedding, which lets
// the kernels after it launch only once its own wait has returned, so once that copy is complete.
//
// NANOVLLM_PDL=0 in the environment turns the attribute off (ordinary stream order), to measure what it buys.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <utility>

namespace nanovllm::kernels {

__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The prologue of a kernel with nothing to fetch before its inputs are ready: let the next kernel launch, then
// wait for the earlier ones.
__device__ __forceinline__ void start_after_prior_grids() {
  allow_dependent_launch();
  wait_for_prior_grids();
}

// The current device's multiprocessor count and compute capability major, asked once per device (0 on error).
struct DeviceTraits {
  int multiprocessors = 0;
  int compute_major = 0;
};

inline DeviceTraits current_device_traits() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> sms[kMaxDevices] = {}, majors[kMaxDevices] = {};
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device < 0 || device >= kMaxDevices) return {};
  int count = sms[device].load(std::memory_order_relaxed), major = majors[device].load(std::memory_order_relaxed);
  if (count == 0) {
    if (cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
      return {};
    majors[device].store(major, std::memory_order_relaxed);
    sms[device].store(count, std::memory_order_relaxed);
  }
  return {count, major};
}

inline bool programmatic_launch_enabled() {
  static const bool allowed = [] {
    const char* setting = std::getenv("NANOVLLM_PDL");
    return setting == nullptr || std::strcmp(setting, "0") != 0;
  }();
  return allowed && current_device_traits().compute_major >= 9;
}

struct LaunchShape {
  dim3 grid;
  dim3 block;
  size_t shared_bytes = 0;
  unsigned cluster = 1;  // blocks per thread-block cluster along x (Hopper); 1 = no cluster
};

// kernel<<<shape>>>(args...) on `stream`, with the programmatic-serialization attribute where the device has it.
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), const LaunchShape& shape, cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (programmatic_launch_enabled()) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (shape.cluster > 1) {
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count++].val.clusterDim = {shape.cluster, 1, 1};
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = shape.grid;
  config.blockDim = shape.block;
  config.dynamicSmemBytes = shape.shared_bytes;
  config.stream = stream;
  config.attrs = attributes;
  config.numAttrs = count;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace nanovllm::kernels
