// Small device helpers shared by the elementwise kernels: packed 16-byte loads/stores, fp32 conversions and
// the storage-dtype dispatch. Plain CUDA, no torch headers (those cost a minute per file to compile).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "elementwise_launchers.h"

namespace nanovllm::kernels {

// N consecutive elements moved as one access. A 16-byte pack compiles to a single LDG.128/STG.128; wider packs
// (8 floats) keep 16-byte alignment and become several 16-byte accesses.
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& pack) {
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

// Elements of T in one 16-byte access.
template <typename T>
inline constexpr int kElemsPer16B = 16 / sizeof(T);

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, as torch's .to(dtype) does, so results match the references bit for bit where the
// fp32 math is the same.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) with the CUDA type of the storage dtype.
template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(TypeTag<float>{}); break;
    case DType::Float16: f(TypeTag<__half>{}); break;
    case DType::BFloat16: f(TypeTag<__nv_bfloat16>{}); break;
  }
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

}  // namespace nanovllm::kernels
