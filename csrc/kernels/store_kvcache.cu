// Scatter each token's new keys and values into its paged-cache slot.
//
// A pure byte copy (exact for any dtype) in the widest unit, up to 16 bytes, that divides the head's bytes and
// every stride and base address. Each token's kv_heads * head_dim row is contiguous in the cache; the source rows
// may be strided views of a fused qkv projection. blockDim.x threads walk one token's units (keys, then values),
// blockDim.y tokens share a block so short rows still fill it.
#include "elementwise_launchers.h"
#include "launch.cuh"
#include "vec_utils.cuh"

namespace nanovllm::kernels {
namespace {

constexpr int kBlockThreads = 256;

template <typename Unit>
__global__ void store_kvcache_kernel(const char* key, HeadLayout key_layout, const char* value,
                                     HeadLayout value_layout, char* k_cache, char* v_cache,
                                     const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads,
                                     int head_bytes) {
  start_after_prior_grids();
  const int64_t token = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (token >= num_tokens) return;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;  // padding token

  const int units_per_head = head_bytes / static_cast<int>(sizeof(Unit));
  const int units = num_kv_heads * units_per_head;
  const int64_t cache_row = slot * num_kv_heads * head_bytes;
  for (int i = threadIdx.x; i < 2 * units; i += blockDim.x) {
    const bool is_value = i >= units;
    const int unit = is_value ? i - units : i;
    const int head = unit / units_per_head;
    const int byte = (unit - head * units_per_head) * static_cast<int>(sizeof(Unit));
    const HeadLayout& layout = is_value ? value_layout : key_layout;
    const char* src = (is_value ? value : key) + token * layout.token_stride + head * layout.head_stride + byte;
    char* dst = (is_value ? v_cache : k_cache) + cache_row + head * head_bytes + byte;
    *reinterpret_cast<Unit*>(dst) = *reinterpret_cast<const Unit*>(src);
  }
}

template <typename Unit>
cudaError_t launch(const void* key, HeadLayout key_layout, const void* value, HeadLayout value_layout, void* k_cache,
                   void* v_cache, const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, int head_bytes,
                   cudaStream_t stream) {
  const int units = 2 * num_kv_heads * (head_bytes / static_cast<int>(sizeof(Unit)));
  const int threads_x = units < kBlockThreads ? round_up(units, 32) : kBlockThreads;
  const dim3 block(threads_x, kBlockThreads / threads_x);
  const int64_t blocks = (num_tokens + block.y - 1) / block.y;
  return launch_kernel(store_kvcache_kernel<Unit>, {dim3(static_cast<unsigned>(blocks)), block}, stream,
                       static_cast<const char*>(key), key_layout, static_cast<const char*>(value), value_layout,
                       static_cast<char*>(k_cache), static_cast<char*>(v_cache), slot_mapping, num_tokens,
                       num_kv_heads, head_bytes);
}

}  // namespace

cudaError_t launch_store_kvcache(const void* key, HeadLayout key_layout, const void* value, HeadLayout value_layout,
                                 void* k_cache, void* v_cache, const int64_t* slot_mapping, int64_t num_tokens,
                                 int num_kv_heads, int head_bytes, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  // Every address the kernel touches is a sum of these, so their common alignment is the widest safe unit.
  uint64_t bits = static_cast<uint64_t>(head_bytes) | reinterpret_cast<uintptr_t>(key) |
                  reinterpret_cast<uintptr_t>(value) | reinterpret_cast<uintptr_t>(k_cache) |
                  reinterpret_cast<uintptr_t>(v_cache) | static_cast<uint64_t>(key_layout.token_stride) |
                  static_cast<uint64_t>(key_layout.head_stride) | static_cast<uint64_t>(value_layout.token_stride) |
                  static_cast<uint64_t>(value_layout.head_stride);
  const auto run = [&](auto unit) {
    return launch<decltype(unit)>(key, key_layout, value, value_layout, k_cache, v_cache, slot_mapping, num_tokens,
                                  num_kv_heads, head_bytes, stream);
  };
  if (bits % 16 == 0) return run(uint4{});
  if (bits % 8 == 0) return run(uint2{});
  if (bits % 4 == 0) return run(uint32_t{});
  if (bits % 2 == 0) return run(uint16_t{});
  return run(uint8_t{});
}

}  // namespace nanovllm::kernels
