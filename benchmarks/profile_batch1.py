"""Where a batch-1 decode step goes: one 128-token prompt and N new tokens (default 1024) of the Qwen3-0.6B shape
under torch.profiler, each kernel's share of the critical path (its end minus the latest end before it, so a
kernel launched early by programmatic dependent launch counts only what it adds), averaged over the decode steps.
Then, around each step boundary, each kernel's gap to the one before, its duration and its share.

    python benchmarks/profile_batch1.py [N]
"""

import collections
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanovllm import LLM, SamplingParams
from nanovllm.bench import QWEN3_0_6B, model_dir, seed_prompts


def family(name: str, previous: str) -> str:
    """The kernel's part of the step; the GEMVs are told apart by the kernel before them."""
    lower = name.lower()
    if "paged_attention" in lower:
        return "attention"
    if "skinny" in lower:  # SkinnyPrologue::Kind 3 = RMSNorm, 2 = add + RMSNorm, 1 = SiLU-and-mul
        if "kind)2" in lower:
            return "gate_up (norm fused)" if previous == "o_proj" else "qkv (norm fused)"
        if "kind)1" in lower:
            return "down (silu fused)"
        if previous == "attention":
            return "o_proj"
        return "lm_head" if previous == "final rms_norm" else "layer-0 qkv"
    if "gather_embedding" in lower:
        return "gather_embedding"
    if "sample" in lower:
        return "sampler"
    if "copy_pinned" in lower:
        return "copy_pinned"
    if "rms" in lower:
        return "final rms_norm" if previous == "down (silu fused)" else "rms_norm"
    return name[:60]


def main(new_tokens: int) -> None:
    llm = LLM(model_dir(QWEN3_0_6B), max_model_len=2048, max_num_seqs=4)
    prompt = seed_prompts()[0][0][:128]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=new_tokens)
    llm.generate([prompt], params, use_tqdm=False)
    walls = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - start) / new_tokens * 1e6)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate([prompt], params, use_tqdm=False)
        torch.cuda.synchronize()
    llm.close()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)

    # Each kernel's share of the critical path, decode steps only: from the end of the first sampler (the
    # prefill's) on.
    names, shares = [], []
    latest_end = first_end = None
    for kernel in kernels:
        names.append(family(kernel.name, names[-1] if names else ""))
        if latest_end is None:
            shares.append(None)
            if names[-1] == "sampler":
                latest_end = first_end = kernel.time_range.end
            continue
        shares.append(max(0.0, kernel.time_range.end - latest_end))
        latest_end = max(latest_end, kernel.time_range.end)
    samplers = [i for i, name in enumerate(names) if name == "sampler"]
    steps, last_end = len(samplers) - 1, kernels[samplers[-1]].time_range.end
    share, count = collections.Counter(), collections.Counter()
    for name, us in zip(names[samplers[0] + 1:samplers[-1] + 1], shares[samplers[0] + 1:samplers[-1] + 1]):
        share[name] += us
        count[name] += 1
    print(f"wall per token: {' '.join(f'{w:.1f}' for w in walls)} us; profiled decode steps {steps}, GPU span per "
          f"step {(last_end - first_end) / steps:.1f} us, attributed {sum(share.values()) / steps:.1f} us")
    for name, us in share.most_common():
        print(f"  {name:40s} {us / steps:8.2f} us/step  ({count[name] / steps:.1f} kernels/step, "
              f"{us / max(count[name], 1):.2f} us each)")

    print("position  kernel                                              gap_before  duration  share (us, mean)")
    for offset in range(-3, 8):
        gaps, durations, step_shares = [], [], []
        for i in samplers[1:-1]:
            j = i + offset
            gaps.append(kernels[j].time_range.start - kernels[j - 1].time_range.end)
            durations.append(kernels[j].time_range.end - kernels[j].time_range.start)
            step_shares.append(shares[j])
        ordered = sorted(step_shares)
        print(f"{offset:+3d}  {names[samplers[1] + offset]:50s} {sum(gaps) / len(gaps):8.2f} "
              f"{sum(durations) / len(durations):8.2f} {sum(step_shares) / len(step_shares):8.2f} "
              f"(median {ordered[len(ordered) // 2]:.2f}, p90 {ordered[int(len(ordered) * 0.9)]:.2f})")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1024)
