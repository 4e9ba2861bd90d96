"""Offline throughput benchmark: `python -m nanovllm.bench` (options: --help).

Model: Qwen3-0.6B's shape with random bf16 weights, written once by transformers to a cache folder (no
download). Prompts are token ids and every request uses ignore_eos, so the work is fixed by the workload.

Workloads
  W0  nano-vLLM's bench.py: random.seed(0); 256 prompts of randint(100, 1024) tokens drawn from [0, 10000];
      then, per prompt, SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, 1024)).
      133,966 output tokens.
  W1  the same prompts, greedy, max_tokens=512 each (131,072 output tokens).
  batch-1 decode: one 128-token prompt, 1024 new tokens.   TTFT: one 1024-token prompt, 1 new token.

Floor: the least time the workload can take on this GPU, simulated step by step from the workload and the
engine's schedule (chunked prefill of up to max_num_batched_tokens tokens per step, prefill first, then a
decode step over every running sequence; the KV cache holds every request at once, so nothing is preempted).
Each step costs max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run:
  bytes  every weight read once (the tied embedding once, as the LM head)
         + KV read: K and V of every context token that this step did not produce
           (decode: the whole context of every running sequence; prefill: the earlier chunks of a prompt)
         + KV write: K and V of every token the step computes
         (KV per token = layers x 2 x kv_heads x head_dim x dtype bytes; activations and logits are left out)
  FLOPs  2 x (non-embedding weights) per token + 2 x (LM head) per sampled token
         + causal attention, 4 x q_heads x head_dim x context per token per layer
Copy bandwidth: a 1 GiB device-to-device copy, bytes read + written. Matmul rate: a square matmul in the
model's dtype. Reported as fraction = floor time / measured time (1.0 = at the floor).

--peer runs transformers' continuous batching (generate_batch; it pages the --peer-attn attention, default sdpa)
on W1 in a child process, so its memory never meets ours. Its time runs from its first request's creation to
its last one's end: each generate_batch call sizes its cache and captures graphs first, which ours does in LLM().
"""

import argparse
import json
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import transformers

from nanovllm import LLM, SamplingParams
from nanovllm.config import Config

QWEN3_0_6B = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6)
# A model small enough for a CPU smoke test; its vocabulary still covers W0's token ids.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            intermediate_size=128, vocab_size=10240, tie_word_embeddings=True, max_position_embeddings=4096,
            rope_theta=1e6, rms_norm_eps=1e-6)
W0_OUTPUT_TOKENS = 133_966


# ---------------------------------------------------------------- model folder


def model_dir(shape: dict, root: str | None = None) -> str:
    """A Qwen3 folder of this shape with random weights, written on first use."""
    name = "qwen3-0.6b-random" if shape == QWEN3_0_6B else "qwen3-tiny-random"
    root = root or os.environ.get("NANOVLLM_BENCH_DIR", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))
    target = os.path.join(root, name)
    if not os.path.isfile(os.path.join(target, "model.safetensors")):
        write_random_model(shape, target)
    return target


def write_random_model(shape: dict, target: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**shape, architectures=["Qwen3ForCausalLM"], dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    # Prompts are token ids: the engine only needs a tokenizer to detokenize outputs, so one word per id does.
    vocab = {f"<{i}>": i for i in range(shape["vocab_size"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<0>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)))
    model.save_pretrained(staging)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the engine sizes its KV cache from the memory left free
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(staging)
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the cache is shared like any model folder
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # atomic: a half-written folder is never taken for a finished one


# ---------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]
    params: list[SamplingParams]

    @property
    def output_tokens(self) -> int:
        return sum(p.max_tokens for p in self.params)


def seed_prompts() -> tuple[list[list[int]], list[int]]:
    """nano-vLLM bench.py's draw, in its order: all prompts first, then every request's max_tokens."""
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    max_tokens = [random.randint(100, 1024) for _ in range(256)]
    return prompts, max_tokens


def workloads(num_prompts: int = 256, output_cap: int | None = None) -> dict[str, Workload]:
    """W0 and W1, cut to the first num_prompts requests; output_cap shortens every request (smoke tests)."""
    prompts, max_tokens = seed_prompts()
    prompts = prompts[:num_prompts]

    def cap(n):
        return n if output_cap is None else min(n, output_cap)

    return {
        "W0": Workload("W0", prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=cap(m))
                                       for m in max_tokens[:num_prompts]]),
        "W1": Workload("W1", prompts, [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=cap(512))
                                       for _ in prompts]),
    }


# ---------------------------------------------------------------- floor


@dataclass
class ModelCost:
    """What one token costs in bytes and FLOPs, from a Hugging Face config."""
    weight_bytes: int        # every parameter, read once per step
    layer_params: int        # non-embedding parameters of all layers (FLOPs per token / 2)
    head_params: int         # LM head (FLOPs per sampled token / 2)
    kv_bytes_per_token: int
    attn_flops_per_ctx: int  # FLOPs per query token per context token, all layers

    @classmethod
    def of(cls, hf, dtype_bytes: int) -> "ModelCost":
        h, i = hf.hidden_size, hf.intermediate_size
        d = getattr(hf, "head_dim", None) or h // hf.num_attention_heads
        nq, nkv, layers = hf.num_attention_heads, hf.num_key_value_heads, hf.num_hidden_layers
        per_layer = h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * i + 2 * h + 2 * d
        embed = hf.vocab_size * h
        params = layers * per_layer + embed + h + (0 if hf.tie_word_embeddings else embed)
        return cls(params * dtype_bytes, layers * per_layer, embed, layers * 2 * nkv * d * dtype_bytes,
                   layers * 4 * nq * d)


def simulate_floor(cost: ModelCost, prompt_lens: list[int], max_tokens: list[int], copy_bytes_per_s: float,
                   matmul_flops_per_s: float, max_num_batched_tokens: int, max_num_seqs: int) -> dict:
    """Floor seconds of a workload under the engine's schedule (see the module docstring)."""
    waiting = list(range(len(prompt_lens)))
    done = [0] * len(prompt_lens)        # prompt tokens computed
    generated = [0] * len(prompt_lens)
    running: list[int] = []
    prefill_s = decode_s = 0.0
    steps = {"prefill": 0, "decode": 0}

    def step_time(nbytes, flops):
        return max(nbytes / copy_bytes_per_s, flops / matmul_flops_per_s)

    while waiting or running:
        if waiting and len(running) < max_num_seqs:
            budget, new_tokens, kv_read, attn_ctx, chunks = max_num_batched_tokens, 0, 0, 0, 0
            finished_prompts = []
            for s in list(waiting):
                start = done[s]
                if budget == 0 or (start == 0 and len(running) + chunks >= max_num_seqs):
                    break
                end = min(prompt_lens[s], start + budget)
                chunks += 1
                new_tokens += end - start
                kv_read += start
                attn_ctx += end * (end + 1) // 2 - start * (start + 1) // 2  # causal: token p sees p + 1
                budget -= end - start
                done[s] = end
                if end == prompt_lens[s]:
                    finished_prompts.append(s)
            for s in finished_prompts:  # they join the running set after the step, as in the scheduler
                waiting.remove(s)
                generated[s] = 1
                if max_tokens[s] > 1:
                    running.append(s)
            sampled = len(finished_prompts)
            nbytes = cost.weight_bytes + (kv_read + new_tokens) * cost.kv_bytes_per_token
            flops = (2 * cost.layer_params * new_tokens + 2 * cost.head_params * sampled
                     + cost.attn_flops_per_ctx * attn_ctx)
            prefill_s += step_time(nbytes, flops)
            steps["prefill"] += 1
        else:
            context = sum(prompt_lens[s] + generated[s] for s in running)
            batch = len(running)
            # Each sequence reads the K/V of its context but the newest token, and writes that one.
            nbytes = cost.weight_bytes + context * cost.kv_bytes_per_token
            flops = 2 * (cost.layer_params + cost.head_params) * batch + cost.attn_flops_per_ctx * context
            decode_s += step_time(nbytes, flops)
            steps["decode"] += 1
            for s in running:
                generated[s] += 1
            running = [s for s in running if generated[s] < max_tokens[s]]
    return {"seconds": prefill_s + decode_s, "prefill_seconds": prefill_s, "decode_seconds": decode_s,
            "prefill_steps": steps["prefill"], "decode_steps": steps["decode"]}


# ---------------------------------------------------------------- device rates


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[iters // 2]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read + written."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = median_seconds(lambda: dst.copy_(src), device, iters=20)
    return 2 * n / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOPs per second of a large square matmul in the model's dtype."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: torch.mm(a, b), device, iters=20)
    return 2 * n ** 3 / seconds


# ---------------------------------------------------------------- runs


def timed_generate(llm: LLM, prompts, params, device: torch.device) -> tuple[int, float]:
    synchronize(device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    synchronize(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    expected = sum(p.max_tokens for p in params)
    if tokens != expected:
        raise RuntimeError(f"generated {tokens} tokens, the workload asks for {expected} (ignore_eos is set)")
    return tokens, seconds


def host_overhead(llm: LLM, batch_size: int, steps: int = 20) -> dict:
    """Milliseconds per decode step at batch_size: host time (scheduling, input preparation, launches,
    postprocessing) measured with perf_counter around each phase of real steps run one at a time, against GPU
    time: the same step's device work (input copy, captured graph with LM head and sampler, token copy) replayed
    back to back and timed with CUDA events. Then the engine's own loop, which plans each decode step while the
    one before runs: its wall time per step over the GPU time is the host time left exposed."""
    runner, scheduler = llm.model_runner, llm.scheduler
    prompts = [[(7 * i + j) % 10000 for j in range(128)] for i in range(batch_size)]
    params = SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=2 * steps + 16)
    for seq in llm._prepare(prompts, params):
        scheduler.add(seq)
    while True:  # prefill every prompt
        batch = scheduler.schedule()
        if not batch.is_prefill:
            break
        scheduler.postprocess(batch, runner.run(batch))
    scheduler.postprocess(batch, runner.run(batch))
    sched = prep = launch = post = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        batch = scheduler.schedule()
        scheduled = time.perf_counter()
        inputs = runner.prepare(batch)
        prepared = time.perf_counter()
        runner.launch(inputs)
        launched = time.perf_counter()
        token_ids = runner.collect(inputs)
        collected = time.perf_counter()
        scheduler.postprocess(batch, token_ids)
        done = time.perf_counter()
        sched += scheduled - start
        prep += prepared - scheduled
        launch += launched - prepared
        post += done - collected
    assert not batch.is_prefill and len(batch.seqs) == batch_size, "the measured steps must be full decode steps"

    gpu_ms = 0.0
    if torch.cuda.is_available():  # the last step's device part again: same staged inputs, same KV slots
        events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        runner.launch(inputs)
        events[0].record()
        for _ in range(steps):
            runner.launch(inputs)
        events[1].record()
        events[1].synchronize()
        gpu_ms = events[0].elapsed_time(events[1]) / steps
        runner.collect(inputs)
    llm.step()  # from here on a step is always in flight, and each call returns once one more has run
    start = time.perf_counter()
    for _ in range(steps):
        llm.step()
    loop_ms = 1e3 * (time.perf_counter() - start) / steps
    assert llm.scheduler.running and len(llm.scheduler.running) == batch_size, "the loop must stay at batch_size"
    llm.abort()
    host_ms = {"schedule_ms": 1e3 * sched / steps, "prepare_ms": 1e3 * prep / steps,
               "launch_ms": 1e3 * launch / steps, "postprocess_ms": 1e3 * post / steps}
    host = sum(host_ms.values())
    return {"batch_size": batch_size, **host_ms, "host_ms": host, "gpu_ms": gpu_ms,
            "host_over_gpu": host / gpu_ms if gpu_ms else None, "loop_ms": loop_ms,
            "exposed_over_gpu": max(loop_ms - gpu_ms, 0.0) / gpu_ms if gpu_ms else None}


def peer_generate(path: str, prompts: list[list[int]], max_new_tokens: int, warmup_prompts: int,
                  attn: str = "sdpa", device: str = "cuda") -> dict:
    """transformers' continuous batching, greedy with EOS disabled; runs in a child process."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation=attn).to(device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:warmup_prompts], GenerationConfig(max_new_tokens=8, do_sample=False,
                                                                    eos_token_id=-1, pad_token_id=0))
    synchronize(torch.device(device))
    start = time.perf_counter()
    outputs = list(model.generate_batch(prompts, config).values())
    synchronize(torch.device(device))
    call_seconds = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outputs)
    # Each call sizes its cache and captures its CUDA graphs before taking requests (ours does that in LLM()):
    # time the requests, first created to last finished, when the outputs carry those stamps.
    created = [getattr(o, "created_time", -1) for o in outputs]
    finished = [getattr(o, "lifespan", (-1, -1))[1] for o in outputs]
    serving = max(finished) - min(created) if min(created) >= start and min(finished) > 0 else call_seconds
    return {"engine": f"transformers {transformers.__version__} generate_batch (continuous batching, {attn})",
            "requests": len(outputs), "output_tokens": tokens, "seconds": serving, "call_seconds": call_seconds,
            "tok_per_s": tokens / serving}


def run_peer(path: str, workload: Workload, attn: str = "sdpa", device: str = "cuda") -> dict:
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peer_generate, (path, workload.prompts, workload.params[0].max_tokens, 8, attn, device))


@dataclass
class Row:
    name: str
    output_tokens: int
    seconds: float
    floor_seconds: float
    tok_per_s: float = 0.0
    floor_tok_per_s: float = 0.0
    fraction_of_floor: float = 0.0

    def __post_init__(self):
        self.tok_per_s = self.output_tokens / self.seconds
        self.floor_tok_per_s = self.output_tokens / self.floor_seconds
        self.fraction_of_floor = self.floor_seconds / self.seconds


def print_table(rows: list[Row], peer: dict | None, rates: dict) -> None:
    print(f"device: {rates['device']}   copy {rates['copy_GBps']:.0f} GB/s   "
          f"matmul {rates['matmul_TFLOPs']:.1f} TFLOP/s ({rates['dtype']})")
    print(f"{'run':<16} {'tokens':>8} {'seconds':>9} {'tok/s':>10} {'floor tok/s':>12} {'of floor':>9}")
    for r in rows:
        print(f"{r.name:<16} {r.output_tokens:>8} {r.seconds:>9.3f} {r.tok_per_s:>10.1f} {r.floor_tok_per_s:>12.1f} "
              f"{r.fraction_of_floor:>8.1%}")
    if peer is not None:
        if "error" in peer:
            print(f"peer: failed: {peer['error']}")
        else:
            ratio = f"ours/peer {peer['ours_over_peer']:.2f}x" if "ours_over_peer" in peer else ""
            print(f"{'peer W1':<16} {peer['output_tokens']:>8} {peer['seconds']:>9.3f} {peer['tok_per_s']:>10.1f}   "
                  f"{ratio}   ({peer['engine']})")


def save_chart(rows: list[Row], peer: dict | None, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = [r.name for r in rows if r.name in ("W0", "W1")]
    ours = [r.tok_per_s for r in rows if r.name in names]
    floor = [r.floor_tok_per_s for r in rows if r.name in names]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label="nanovllm-cpp")
    ax.bar([i + 0.2 for i in x], floor, 0.4, label="floor (bytes / copy bandwidth)", alpha=0.5)
    if peer and "tok_per_s" in peer and "W1" in names:
        ax.scatter([names.index("W1")], [peer["tok_per_s"]], color="k", zorder=3, label="transformers CB")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("output tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run(args) -> dict:
    shape = TINY if args.tiny else QWEN3_0_6B
    path = args.model or model_dir(shape)
    runs = args.runs.split(",")
    unknown = set(runs) - {"W0", "W1", "batch1", "ttft"}
    if unknown:
        raise SystemExit(f"--runs: unknown {sorted(unknown)} (choose from W0, W1, batch1, ttft)")
    loads = workloads(args.num_prompts, args.output_cap)
    peer = None
    if args.peer:  # first, in a child process, before our engine takes the GPU memory
        if not torch.cuda.is_available():
            raise SystemExit("--peer needs a CUDA GPU")
        try:
            peer = run_peer(path, loads["W1"], args.peer_attn)
        except Exception as e:  # a peer that fails to run is reported, not fatal to our numbers
            peer = {"error": f"{type(e).__name__}: {e}"}

    # The engine's own device and dtype choice; the rates are measured before its KV cache takes the memory.
    config = Config(path)
    device, dtype = torch.device(config.device), config.dtype
    cost = ModelCost.of(config.hf_config, dtype.itemsize)
    rates = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "dtype": str(dtype).removeprefix("torch."),
             "copy_GBps": copy_bandwidth(device) / 1e9, "matmul_TFLOPs": matmul_rate(device, dtype) / 1e12}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    llm = LLM(path, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9,
              kvcache_block_size=16, enforce_eager=args.enforce_eager, enable_prefix_caching=True)

    def floor(prompts, params):
        return simulate_floor(cost, [len(p) for p in prompts], [p.max_tokens for p in params],
                              rates["copy_GBps"] * 1e9, rates["matmul_TFLOPs"] * 1e12,
                              args.max_num_batched_tokens, args.max_num_seqs)

    warm_prompts = seed_prompts()[0][:8]  # a first batch through every code path before anything is timed
    timed_generate(llm, warm_prompts, [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=8)] * 8, device)
    rows, floors = [], {}
    for name in runs:
        if name in loads:
            prompts, params = loads[name].prompts, loads[name].params
        elif name == "batch1":
            new = 1024 if args.output_cap is None else min(1024, args.output_cap)
            prompts, params = [seed_prompts()[0][0][:128]], [SamplingParams(temperature=0.0, ignore_eos=True,
                                                                             max_tokens=new)]
        else:  # ttft: prefill of one 1024-token prompt, which also samples the first token
            prompts = [[random.Random(1).randint(0, 10000) for _ in range(1024)]]
            params = [SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=1)]
        preempted = llm.num_preemptions
        tokens, seconds = timed_generate(llm, prompts, params, device)
        floors[name] = floor(prompts, params)
        floors[name]["preemptions"] = llm.num_preemptions - preempted
        rows.append(Row(name, tokens, seconds, floors[name]["seconds"]))
    overhead = [host_overhead(llm, bs) for bs in (1, min(256, args.max_num_seqs))] if args.host_overhead else None
    llm.close()

    if peer is not None and "tok_per_s" in peer:
        ours = next((r for r in rows if r.name == "W1"), None)
        if ours is not None:
            peer["ours_over_peer"] = ours.tok_per_s / peer["tok_per_s"]
    print_table(rows, peer, rates)
    for o in overhead or []:
        print(f"host overhead at batch {o['batch_size']}: schedule {o['schedule_ms']:.3f} + prepare "
              f"{o['prepare_ms']:.3f} + launch {o['launch_ms']:.3f} + postprocess {o['postprocess_ms']:.3f} = "
              f"{o['host_ms']:.3f} ms host vs {o['gpu_ms']:.3f} ms GPU per decode step "
              f"({o['host_over_gpu'] or 0:.1%}); planned ahead, the engine loop takes {o['loop_ms']:.3f} ms per "
              f"step: {o['exposed_over_gpu'] or 0:.1%} over the GPU time")
    hf = config.hf_config
    model = {k: getattr(hf, k, None) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim", "intermediate_size", "vocab_size",
                                               "tie_word_embeddings")}
    result = {"model": {"path": path, **model, "params": cost.weight_bytes // dtype.itemsize},
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
              "rates": rates,
              "engine": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                         "max_model_len": args.max_model_len, "enforce_eager": args.enforce_eager,
                         "num_prompts": args.num_prompts, "output_cap": args.output_cap},
              "runs": {r.name: {**asdict(r), "floor": floors[r.name]} for r in rows}, "peer": peer,
              "host_overhead": overhead}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.chart:
        save_chart(rows, peer, args.chart)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanovllm.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder (default: Qwen3-0.6B shape, random weights, written once)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Qwen3 (CPU smoke test)")
    p.add_argument("--runs", default="W0,W1,batch1,ttft", help="comma list of W0, W1, batch1, ttft")
    p.add_argument("--num-prompts", type=int, default=256, help="first N requests of W0/W1 (default all 256)")
    p.add_argument("--output-cap", type=int, help="cap every request's max_tokens (smoke tests)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--peer", action="store_true", help="also run transformers' continuous batching on W1 (GPU)")
    p.add_argument("--peer-attn", default="sdpa",
                   help="attn_implementation for the peer's model (continuous batching pages it itself)")
    p.add_argument("--host-overhead", action="store_true",
                   help="also time host work (schedule, input prep, postprocess) against GPU work per decode step")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--chart", help="write a bar chart (PNG) if matplotlib is installed")
    args = p.parse_args(argv)
    if not 1 <= args.num_prompts <= 256:
        p.error(f"--num-prompts must be in [1, 256], got {args.num_prompts}")
    if args.output_cap is not None and args.output_cap < 1:
        p.error(f"--output-cap must be >= 1, got {args.output_cap}")
    return args


def main(argv=None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
