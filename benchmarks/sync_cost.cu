// What one grid-wide synchronisation costs on this GPU, two ways, for a decode step built of small dependent
// kernels:
// - a kernel boundary: a CUDA graph of kPhases kernels, each reading a value its predecessor wrote (with and
//   without programmatic dependent launch);
// - a grid barrier: one persistent kernel that does the same kPhases times, with a barrier between phases
//   (each CTA adds to a counter with release semantics, then spins on it with acquire loads).
// Every phase, block b reads the value block b + 1 wrote in the phase before, so no phase can skip the sync.
// Then what handing a 1024-float vector on costs at such a boundary (the hidden state between two projections):
// written in slices, one per CTA as a GEMV writes its rows, or summed by float4 atomics from every CTA, as a
// down projection merged into the gate_up GEMV (each CTA's slice of the intermediate times its columns of the down
// weight) would have to. Every CTA reads the whole vector the phase before wrote.
// Last, the same vector handed on without any wait for a grid: each element travels with a tag (the phase that wrote
// it) in one 8-byte word, and readers poll their words until every tag is the one they expect, so the data and the
// news that it is ready come in one L2 round trip. Once in a chain of kernels that each let the next launch at
// once and never wait for a grid (the kernel in front is resident by then, so polling cannot deadlock), once
// inside one persistent kernel.
//
//   nvcc -gencode=arch=compute_90a,code=sm_90a -O3 -o /tmp/sync_cost benchmarks/sync_cost.cu && /tmp/sync_cost
#include <cuda_runtime.h>

#include <cstdio>
#include <utility>

#define CHECK(call)                                                                            \
  do {                                                                                         \
    const cudaError_t status = (call);                                                         \
    if (status != cudaSuccess) {                                                               \
      std::printf("%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(status));              \
      return 1;                                                                                \
    }                                                                                          \
  } while (0)

constexpr int kPhases = 140;  // about the kernels of a 28-layer decode step
constexpr int kReplays = 200;

__device__ __forceinline__ void pass_value_on(unsigned* values, int phase) {
  __shared__ unsigned seen;
  if (threadIdx.x == 0) seen = values[(blockIdx.x + 1) % gridDim.x];
  __syncthreads();
  if (threadIdx.x == 0) values[blockIdx.x] = seen + phase;
}

__global__ void phase_kernel(unsigned* values, int phase) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  pass_value_on(values, phase);
}

__device__ __forceinline__ void grid_barrier(unsigned* arrived, unsigned target) {
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("red.release.gpu.global.add.u32 [%0], 1;" ::"l"(arrived) : "memory");
    unsigned count;
    do {
      asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(count) : "l"(arrived) : "memory");
    } while (count < target);
  }
  __syncthreads();
}

// Every CTA must be resident at once: launch at most one CTA per SM per occupancy slot.
__global__ void persistent_kernel(unsigned* values, unsigned* arrived) {
  asm volatile("griddepcontrol.wait;" ::: "memory");  // the counter's reset
  for (int phase = 0; phase < kPhases; ++phase) {
    pass_value_on(values, phase);
    grid_barrier(arrived, (phase + 1) * gridDim.x);
  }
}

__global__ void reset_counter(unsigned* arrived) { *arrived = 0; }

constexpr int kVectorFloats = 1024;
constexpr int kVectorThreads = kVectorFloats / 4;  // one float4 a thread

__device__ __forceinline__ float4 read_vector(const float* vector) {
  return reinterpret_cast<const float4*>(vector)[threadIdx.x];
}

// Block b writes slice b of the next vector: thread t < slice, element b * slice + t, from the 4 elements thread t
// read. Returns that element's index, or -1 where this thread writes none; `value` is what it writes.
__device__ __forceinline__ int slice_element(float4 in, float* value) {
  __shared__ float sums[kVectorThreads];
  sums[threadIdx.x] = in.x + in.y + in.z + in.w;
  __syncthreads();  // every thread's input has arrived
  const int slice = (kVectorFloats + gridDim.x - 1) / gridDim.x;
  const int i = blockIdx.x * slice + threadIdx.x;
  *value = sums[threadIdx.x] * 0.5f + 1.f;
  return threadIdx.x < slice && i < kVectorFloats ? i : -1;
}

// Two buffers in turn: phase p reads buffer (p + 1) % 2, block b writes its slice of buffer p % 2.
__global__ void slice_handoff_kernel(float* buffers, int phase) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  float value;
  const int i = slice_element(read_vector(buffers + (phase + 1) % 2 * kVectorFloats), &value);
  if (i >= 0) buffers[phase % 2 * kVectorFloats + i] = value;
}

// Three buffers in turn: phase p reads buffer (p + 2) % 3, every block adds into buffer p % 3, and block 0 zeroes
// buffer (p + 1) % 3, which phase p - 1 read and phase p + 1 adds into.
__global__ void atomic_handoff_kernel(float* buffers, int phase) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
  const float4 in = read_vector(buffers + (phase + 2) % 3 * kVectorFloats);
  const float4 mine = make_float4(in.x * 1e-3f + 1.f, in.y * 1e-3f, in.z * 1e-3f, in.w * 1e-3f);
  atomicAdd(reinterpret_cast<float4*>(buffers + phase % 3 * kVectorFloats) + threadIdx.x, mine);
  if (blockIdx.x == 0) reinterpret_cast<float4*>(buffers + (phase + 1) % 3 * kVectorFloats)[threadIdx.x] = float4{};
}

// Microseconds per replay of `graph`.
static float replay_us(cudaGraphExec_t graph, cudaStream_t stream) {
  for (int i = 0; i < 20; ++i) cudaGraphLaunch(graph, stream);
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  cudaEventRecord(start, stream);
  for (int i = 0; i < kReplays; ++i) cudaGraphLaunch(graph, stream);
  cudaEventRecord(stop, stream);
  cudaEventSynchronize(stop);
  float ms = 0.f;
  cudaEventElapsedTime(&ms, start, stop);
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms * 1e3f / kReplays;
}

// A launch shape of `ctas` x `threads` on `stream`, with programmatic dependent launch or without.
struct PhaseLaunch {
  cudaLaunchAttribute attribute = {};
  cudaLaunchConfig_t config = {};
  PhaseLaunch(int ctas, int threads, bool programmatic, cudaStream_t stream) {
    attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attribute.val.programmaticStreamSerializationAllowed = programmatic;
    config.gridDim = dim3(ctas);
    config.blockDim = dim3(threads);
    config.stream = stream;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  PhaseLaunch(const PhaseLaunch&) = delete;  // config points at attribute
};

// An instantiated graph of what enqueue() launches on `stream` (it returns the launches' status).
template <typename Enqueue>
static cudaError_t capture(cudaStream_t stream, Enqueue&& enqueue, cudaGraphExec_t* exec) {
  cudaGraph_t graph;
  cudaError_t status = cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal);
  if (status != cudaSuccess) return status;
  status = enqueue();
  const cudaError_t captured = cudaStreamEndCapture(stream, &graph);
  if (status != cudaSuccess) return status;
  return captured != cudaSuccess ? captured : cudaGraphInstantiate(exec, graph, 0);
}

// kernel(data, phase) for phase = 0 .. kPhases - 1, one after the other.
template <typename T>
static cudaError_t launch_phases(const PhaseLaunch& launch, void (*kernel)(T*, int), T* data) {
  cudaError_t status = cudaSuccess;
  for (int phase = 0; phase < kPhases && status == cudaSuccess; ++phase)
    status = cudaLaunchKernelEx(&launch.config, kernel, data, phase);
  return status;
}

// Tagged words: element i of buffer b is words[b][i] = {value, tag}, 8 bytes stored and loaded whole. Phase p reads
// buffer p % 2, expecting tag p, and writes buffer (p + 1) % 2 with tag p + 1; every phase rewrites every word of its
// buffer, so a word left from an earlier phase or replay never carries the tag a reader waits for.
__device__ __forceinline__ uint4 load_tagged_pair(const uint2* words) {
  uint4 pair;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(pair.x), "=r"(pair.y), "=r"(pair.z), "=r"(pair.w)
               : "l"(words)
               : "memory");
  return pair;
}

__device__ __forceinline__ void store_tagged(uint2* word, float value, unsigned tag) {
  asm volatile("st.volatile.global.v2.u32 [%0], {%1, %2};" ::"l"(word), "r"(__float_as_uint(value)), "r"(tag)
               : "memory");
}

// This thread's 4 elements of the vector, once all four carry `tag`.
__device__ __forceinline__ float4 read_tagged_vector(const uint2* words, unsigned tag) {
  const uint2* mine = words + 4 * threadIdx.x;
  uint4 low, high;
  do {
    low = load_tagged_pair(mine);
    high = load_tagged_pair(mine + 2);
  } while (low.y != tag || low.w != tag || high.y != tag || high.w != tag);
  return make_float4(__uint_as_float(low.x), __uint_as_float(low.z), __uint_as_float(high.x), __uint_as_float(high.z));
}

__device__ __forceinline__ void pass_tagged_vector_on(uint2* words, int phase) {
  float value;
  const int i = slice_element(read_tagged_vector(words + phase % 2 * kVectorFloats, phase), &value);
  if (i >= 0) store_tagged(words + (phase + 1) % 2 * kVectorFloats + i, value, phase + 1);
}

__global__ void seed_tagged_vector(uint2* words) {
  for (int i = threadIdx.x; i < kVectorFloats; i += blockDim.x) store_tagged(words + i, 1.f, 0);
}

__global__ void tagged_handoff_kernel(uint2* words, int phase) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  pass_tagged_vector_on(words, phase);
}

__global__ void tagged_persistent_kernel(uint2* words) {
  for (int phase = 0; phase < kPhases; ++phase) pass_tagged_vector_on(words, phase);
}

// Microseconds per phase of the tagged hand-offs, `ctas` CTAs a phase: a graph of the seed, then the phases as a
// chain of kernels (persistent false) or as one kernel.
static cudaError_t tagged_phase_us(int ctas, bool persistent, cudaStream_t stream, float* us) {
  uint2* words;
  cudaError_t status = cudaMalloc(&words, 2 * kVectorFloats * sizeof(uint2));
  if (status != cudaSuccess) return status;
  status = cudaMemset(words, 0xff, 2 * kVectorFloats * sizeof(uint2));
  if (status != cudaSuccess) return status;
  const PhaseLaunch launch(ctas, kVectorThreads, true, stream);
  cudaGraphExec_t exec;
  status = capture(stream, [&] {
    seed_tagged_vector<<<1, kVectorFloats, 0, stream>>>(words);
    if (!persistent) return launch_phases(launch, tagged_handoff_kernel, words);
    tagged_persistent_kernel<<<ctas, kVectorThreads, 0, stream>>>(words);
    return cudaGetLastError();
  }, &exec);
  if (status != cudaSuccess) return status;
  *us = replay_us(exec, stream) / kPhases;
  status = cudaStreamSynchronize(stream);
  cudaGraphExecDestroy(exec);
  cudaFree(words);
  return status;
}

int main() {
  unsigned *values, *arrived;
  CHECK(cudaMalloc(&values, 4096 * sizeof(unsigned)));
  CHECK(cudaMalloc(&arrived, sizeof(unsigned)));
  cudaStream_t stream;
  CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp props;
  CHECK(cudaGetDeviceProperties(&props, 0));
  std::printf("%s, %d SMs, %d phases\n", props.name, sms, kPhases);
  for (int threads : {128, 512}) {
    for (int ctas_per_sm : {1, 2}) {
      for (int programmatic : {0, 1}) {
        const PhaseLaunch launch(sms * ctas_per_sm, threads, programmatic, stream);
        cudaGraphExec_t chain, persistent;
        CHECK(capture(stream, [&] { return launch_phases(launch, phase_kernel, values); }, &chain));
        CHECK(capture(stream, [&] {
          reset_counter<<<1, 1, 0, stream>>>(arrived);
          return cudaLaunchKernelEx(&launch.config, persistent_kernel, values, arrived);
        }, &persistent));

        const float chain_us = replay_us(chain, stream), persistent_us = replay_us(persistent, stream);
        CHECK(cudaStreamSynchronize(stream));
        std::printf("%3d threads x %3d CTAs, programmatic launch %s: %.3f us a kernel boundary, "
                    "%.3f us a grid barrier\n",
                    threads, sms * ctas_per_sm, programmatic ? "on " : "off", chain_us / kPhases,
                    persistent_us / kPhases);
        CHECK(cudaGraphExecDestroy(chain));
        CHECK(cudaGraphExecDestroy(persistent));
      }
    }
  }

  float* vectors;
  CHECK(cudaMalloc(&vectors, 3 * kVectorFloats * sizeof(float)));
  CHECK(cudaMemset(vectors, 0, 3 * kVectorFloats * sizeof(float)));
  for (int ctas_per_sm : {1, 2}) {
    for (const auto& [kernel, how] : {std::pair{slice_handoff_kernel, "written in slices"},
                                      {atomic_handoff_kernel, "summed by float4 atomics from every CTA"}}) {
      const PhaseLaunch launch(sms * ctas_per_sm, kVectorThreads, true, stream);
      cudaGraphExec_t chain;
      CHECK(capture(stream, [&, kernel = kernel] { return launch_phases(launch, kernel, vectors); }, &chain));
      const float chain_us = replay_us(chain, stream);
      CHECK(cudaStreamSynchronize(stream));
      std::printf("%d threads x %3d CTAs, programmatic launch on, a %d-float vector %s: %.3f us a kernel boundary\n",
                  kVectorThreads, sms * ctas_per_sm, kVectorFloats, how, chain_us / kPhases);
      CHECK(cudaGraphExecDestroy(chain));
    }
  }
  for (int ctas_per_sm : {1, 2}) {
    for (bool persistent : {false, true}) {
      float us = 0.f;
      CHECK(tagged_phase_us(sms * ctas_per_sm, persistent, stream, &us));
      std::printf("%d threads x %3d CTAs, a %d-float vector in tagged words, %s: %.3f us a hand-off\n", kVectorThreads,
                  sms * ctas_per_sm, kVectorFloats, persistent ? "one persistent kernel" : "a chain of kernels", us);
    }
  }
  return 0;
}
