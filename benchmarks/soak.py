"""Soak: thousands of random requests through one LLM, in waves; nothing may accumulate.

    python benchmarks/soak.py [--requests 5000] [--waves 10] [--layers 4] [--kv-blocks 4096]
    pytest benchmarks/soak.py            # the same check with 300 requests (needs a CUDA GPU)

A Qwen3-0.6B-shaped model with fewer layers and random bf16 weights; prompts of 1..1024 tokens (a third start
with one of four shared "system prompts", so prefix-cache blocks are reused and evicted), max_tokens 1..256,
ignore_eos, half greedy and half sampled. After a warm-up wave the free block count, torch.cuda.memory_allocated
and the host RSS are recorded; after the last wave the first two must be identical and the RSS within
RSS_GROWTH_LIMIT of the warm value.

Why RSS_GROWTH_LIMIT = 48 MiB: a request that leaked its Sequence would keep ~650 token ids (a list of pointers
plus one int object each, ~23 KB), i.e. ~100 MB over 4,500 requests, and a leaked RequestOutput keeps as much
again; the limit catches either while leaving room for allocator noise (glibc and pymalloc arenas are not
returned to the OS at once, and CUDA loads kernels lazily the first time a new GEMM shape appears).
"""

import argparse
import os
import random
import sys
import time

import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.bench import QWEN3_0_6B, write_random_model

RSS_GROWTH_LIMIT = 48 << 20
MAX_PROMPT = 1024
MAX_OUTPUT = 256
# 64k tokens of KV: room for ~100 of the 256 sequences a step may hold, so preemption and prefix-cache eviction
# happen all the time (the GPU's full memory would hold every request at once and exercise neither).
KV_BLOCKS = 4096


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def model_folder(layers: int) -> str:
    root = os.environ.get("NANOVLLM_BENCH_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))
    target = os.path.join(root, f"qwen3-0.6b-{layers}layers-random")
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        write_random_model(dict(QWEN3_0_6B, num_hidden_layers=layers, max_position_embeddings=4096), target)
    return target


def random_requests(rng: random.Random, n: int, systems: list[list[int]]):
    prompts, params = [], []
    for _ in range(n):
        length = rng.randrange(1, MAX_PROMPT + 1)
        shared = rng.choice(systems)[:length - 1] if rng.random() < 1 / 3 else []
        prompts.append(shared + [rng.randrange(3, 151000) for _ in range(length - len(shared))])
        sampled = rng.random() < 0.5
        params.append(SamplingParams(temperature=0.8 if sampled else 0.0, top_p=0.95 if sampled else 1.0,
                                     max_tokens=rng.randrange(1, MAX_OUTPUT + 1), ignore_eos=True))
    return prompts, params


def snapshot(llm: LLM) -> dict:
    torch.cuda.synchronize()
    alloc = llm.scheduler.allocator
    return dict(free_blocks=alloc.num_free_blocks, sequences=alloc.num_sequences,
                gpu_allocated=torch.cuda.memory_allocated(), rss=rss_bytes())


def soak(num_requests: int, waves: int, layers: int = 4, kv_blocks: int = KV_BLOCKS, seed: int = 0) -> dict:
    """Runs a warm-up wave, then num_requests in `waves` generate() calls; returns the measurements."""
    rng = random.Random(seed)
    systems = [[rng.randrange(3, 151000) for _ in range(rng.randrange(64, 400))] for _ in range(4)]
    with LLM(model_folder(layers), max_model_len=MAX_PROMPT + MAX_OUTPUT, max_num_seqs=256,
             num_kvcache_blocks=kv_blocks) as llm:
        num_blocks = llm.scheduler.allocator.num_blocks
        llm.generate(*random_requests(rng, 256, systems), use_tqdm=False)  # every path and shape once
        warm = snapshot(llm)
        per_wave = -(-num_requests // waves)
        done = tokens = 0
        rss_trace = []
        start = time.perf_counter()
        while done < num_requests:
            prompts, params = random_requests(rng, min(per_wave, num_requests - done), systems)
            outputs = llm.generate(prompts, params, use_tqdm=False)
            assert [len(o.token_ids) for o in outputs] == [p.max_tokens for p in params]
            tokens += sum(len(p) for p in prompts) + sum(p.max_tokens for p in params)
            done += len(prompts)
            del outputs, prompts, params
            rss_trace.append(rss_bytes())
        seconds = time.perf_counter() - start
        end = snapshot(llm)
        stats = llm.scheduler.allocator.stats
        return dict(requests=done, tokens=tokens, seconds=seconds, num_blocks=num_blocks, warm=warm, end=end,
                    rss_trace=rss_trace, preemptions=llm.num_preemptions, evictions=stats.evictions,
                    hit_rate=stats.hit_tokens / max(stats.query_tokens, 1))


def report(result: dict) -> None:
    mib = 1 << 20
    warm, end = result["warm"], result["end"]
    print(f"soak: {result['requests']} requests, {result['tokens']} tokens in {result['seconds']:.1f} s; "
          f"{result['preemptions']} preemptions, {result['evictions']} prefix-cache evictions, "
          f"hit rate {result['hit_rate']:.2f}")
    print(f"  free blocks {warm['free_blocks']} -> {end['free_blocks']} (of {result['num_blocks']}), "
          f"sequences {end['sequences']}")
    print(f"  torch.cuda.memory_allocated {warm['gpu_allocated']} -> {end['gpu_allocated']} bytes")
    print(f"  RSS {warm['rss'] / mib:.1f} -> {end['rss'] / mib:.1f} MiB "
          f"(growth {(end['rss'] - warm['rss']) / mib:+.1f} MiB, limit {RSS_GROWTH_LIMIT / mib:.0f}); per wave: "
          + " ".join(f"{r / mib:.0f}" for r in result["rss_trace"]))


def check(result: dict) -> None:
    warm, end = result["warm"], result["end"]
    assert end["free_blocks"] == warm["free_blocks"] == result["num_blocks"]
    assert end["sequences"] == 0
    assert end["gpu_allocated"] == warm["gpu_allocated"]
    assert end["rss"] - warm["rss"] < RSS_GROWTH_LIMIT


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_soak_short(capsys):
    result = soak(num_requests=300, waves=3)
    with capsys.disabled():
        print()
        report(result)
    check(result)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--waves", type=int, default=10)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--kv-blocks", type=int, default=KV_BLOCKS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("soak.py needs a CUDA GPU")
    result = soak(args.requests, args.waves, args.layers, args.kv_blocks, args.seed)
    report(result)
    check(result)
    print("soak: OK")


if __name__ == "__main__":
    main(sys.argv[1:])
