"""Where a workload's GPU time goes: W0 (or W1) through the engine under torch.profiler, kernel time summed by
kernel family (CUDA-graph replays included), against the wall time of the generate call.

    python benchmarks/profile_workload.py [W0|W1]

Kernels launched early by programmatic dependent launch count from their start, so a kernel that waits for the
one in front also counts that wait: the families are a split of kernel time, not of the critical path.
"""

import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.bench import QWEN3_0_6B, model_dir, seed_prompts, workloads

# The first key found in a kernel's name (case-insensitive) names its family.
FAMILIES = [("paged_attention", "decode attention"), ("flash", "prefill attention"), ("fmha", "prefill attention"),
            ("attention", "other attention"), ("skinny", "skinny gemv"), ("gemm", "cublas gemm"),
            ("nvjet", "cublas gemm"), ("xmma", "cublas gemm"), ("cutlass", "cublas gemm"), ("sample", "sampling"),
            ("rms", "norms"), ("qk_norm", "qk norm/rotary/store"), ("rotary", "qk norm/rotary/store"),
            ("store_kv", "qk norm/rotary/store"), ("silu", "silu_and_mul"), ("copy_pinned", "copies"),
            ("Memcpy", "copies"), ("Memset", "memset"), ("embedding", "embedding"), ("index", "embedding")]


def main(name: str) -> None:
    llm = LLM(model_dir(QWEN3_0_6B), max_model_len=2048, max_num_seqs=512, max_num_batched_tokens=16384,
              gpu_memory_utilization=0.9)
    warm = seed_prompts()[0][:8]
    llm.generate(warm, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=8)] * 8, use_tqdm=False)
    load = workloads()[name]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        llm.generate(load.prompts, load.params, use_tqdm=False)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    by_family, by_name, count = collections.Counter(), collections.Counter(), 0
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total
        by_family[next((f for key, f in FAMILIES if key.lower() in event.name.lower()), "other")] += us
        by_name[event.name[:90]] += us
        count += 1
    total = sum(by_family.values())
    print(f"{name}: wall {wall:.3f} s, GPU kernel time {total / 1e6:.3f} s ({total / 1e6 / wall:.1%} of wall), "
          f"{count} kernels")
    for family, us in by_family.most_common():
        print(f"  {family:28s} {us / 1e6:7.3f} s  {us / total:6.1%}")
    print("top kernels:")
    for kernel, us in by_name.most_common(25):
        print(f"  {us / 1e6:7.3f} s  {kernel}")
    llm.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "W0")
