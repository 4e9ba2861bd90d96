"""Elementwise kernels at a Qwen3-0.6B prefill shape: 16K tokens, hidden 1024, 16 q / 8 kv heads of 128, bf16.

For each op: our CUDA kernel, the plain PyTorch reference (nanovllm_cpp.reference) and torch.compile of the
reference's functional form. Speed is bytes that must move (inputs read once, outputs written once) over the
median time, also as a fraction of the same-run device copy bandwidth. One buffer set is ~32-200 MB, near the
50 MB L2, so every timed call takes the next of several input sets (together >= 4x L2): the numbers are HBM
numbers. Run with `pytest benchmarks/bench_elementwise.py -s`; the table prints at the end.

The `speed` tests time our kernels alone, at 1 token (decode: latency per launch inside a CUDA graph of
GRAPH_CALLS back-to-back calls, inputs L2-resident as they are after the previous kernel) and at 16K tokens
(HBM bandwidth): the attention prologue fused (qk_norm_rotary_store) against its four separate launches, and
the RMSNorms, silu_and_mul against torch's two kernels at 1, 256 and 16K tokens of the MLP width, and
copy_pinned against torch's copy-engine copy_ (each followed by a kernel, in a graph). They use no torch.compile,
so they are quick to compare between two builds.
"""

import itertools
import math

import pytest
import torch
from conftest import cuda_time_ms, requires_cuda

from nanovllm_cpp import ops, reference

TOKENS, HIDDEN, Q_HEADS, KV_HEADS, HEAD_DIM = 16384, 1024, 16, 8, 128
DTYPE = torch.bfloat16
EPS = 1e-6
ELEM = torch.tensor([], dtype=DTYPE).element_size()
QKV_WIDTH = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
GRAPH_CALLS = 28  # one per layer of Qwen3-0.6B
MAX_POSITION, BLOCK_SIZE = 40960, 16


def rotating_sets(make_set, bytes_per_set: int):
    """A callable returning the next of enough input sets that together they exceed 4x the L2 cache."""
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    sets = [make_set() for _ in range(max(2, math.ceil(4 * l2_bytes / bytes_per_set)))]
    cycle = itertools.cycle(sets)
    return lambda: next(cycle), len(sets)


def qkv_split(qkv: torch.Tensor):
    q = qkv[:, : Q_HEADS * HEAD_DIM].view(-1, Q_HEADS, HEAD_DIM)
    k = qkv[:, Q_HEADS * HEAD_DIM : (Q_HEADS + KV_HEADS) * HEAD_DIM].view(-1, KV_HEADS, HEAD_DIM)
    v = qkv[:, (Q_HEADS + KV_HEADS) * HEAD_DIM :].view(-1, KV_HEADS, HEAD_DIM)
    return q, k, v


# Functional forms of the references, for torch.compile (it fuses them into one kernel where it can).
def rms_norm_functional(x, weight):
    return reference.rms_norm_fp32(x, weight, EPS).to(x.dtype)


def fused_add_rms_norm_functional(x, residual, weight):
    summed = (residual.float() + x.float()).to(residual.dtype)
    return reference.rms_norm_fp32(summed, weight, EPS).to(x.dtype), summed


def rotary_functional(positions, query, key, cos_sin_cache):
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    return (reference._rotate(query, cos, sin).to(query.dtype), reference._rotate(key, cos, sin).to(key.dtype))


def store_functional(key, value, k_rows, v_rows, slots):
    # The scatter mutates the cache by nature; with every slot valid (as here) no mask is needed.
    k_rows[slots] = key
    v_rows[slots] = value


@pytest.fixture(scope="module")
def add_row(report, copy_bandwidth_gbps):
    l2_mb = torch.cuda.get_device_properties(0).L2_cache_size >> 20
    report(f"elementwise kernels on {torch.cuda.get_device_name()}, bf16: copy bandwidth {copy_bandwidth_gbps:.0f} "
           f"GB/s (read+write); each call takes the next of `sets` input sets (together >= 4x the {l2_mb} MB L2); "
           "torch x / compile x = their time over ours")
    report("copy% = our GB/s over that copy bandwidth; same-size copy% = over a rotated torch copy moving as many "
           "bytes (launch and tail costs included, as in ours)")
    report(f"{'op':<38}{'sets':>5}{'us':>8}{'GB/s':>7}{'copy%':>7}{'same-size copy%':>17}{'torch x':>9}"
           f"{'compile x':>11}")

    def add(name: str, sets: int, moved_bytes: int, ours_ms: float, torch_ms: float, compiled_ms: float):
        gbps = moved_bytes / ours_ms / 1e6
        report(f"{name:<38}{sets:>5}{ours_ms * 1e3:>8.1f}{gbps:>7.0f}{gbps / copy_bandwidth_gbps:>7.0%}"
               f"{gbps / same_size_copy_gbps(moved_bytes):>17.0%}{torch_ms / ours_ms:>9.2f}"
               f"{compiled_ms / ours_ms:>11.2f}")
    return add


def same_size_copy_gbps(moved_bytes: int) -> float:
    """Bandwidth of a device copy that reads and writes moved_bytes in total, over rotated buffers."""
    half = moved_bytes // 2
    next_set, _ = rotating_sets(lambda: (torch.empty(half, dtype=torch.uint8, device="cuda").random_(),
                                         torch.empty(half, dtype=torch.uint8, device="cuda")), moved_bytes)

    def copy():
        src, dst = next_set()
        dst.copy_(src)
    return 2 * half / cuda_time_ms(copy) / 1e6


def time_variants(next_set, ours, plain, compiled):
    """Median ms of each variant, each call on the next input set."""
    return tuple(cuda_time_ms(lambda fn=fn: fn(*next_set())) for fn in (ours, plain, compiled))


@requires_cuda
@pytest.mark.parametrize("hidden", [HIDDEN, 4096])
def test_rms_norm(add_row, hidden):
    weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
    row_bytes = TOKENS * hidden * ELEM

    def make_set():
        x = torch.randn(TOKENS, hidden, device="cuda", dtype=DTYPE)
        return torch.empty_like(x), x

    next_set, sets = rotating_sets(make_set, 2 * row_bytes)
    compiled = torch.compile(rms_norm_functional, dynamic=False)
    times = time_variants(next_set, lambda out, x: ops.rms_norm(out, x, weight, EPS),
                          lambda out, x: reference.rms_norm(out, x, weight, EPS),
                          lambda out, x: compiled(x, weight))
    add_row(f"rms_norm [{TOKENS}, {hidden}]", sets, 2 * row_bytes + hidden * ELEM, *times)


@requires_cuda
@pytest.mark.parametrize("hidden", [HIDDEN, 4096])
def test_fused_add_rms_norm(add_row, hidden):
    weight = torch.randn(hidden, device="cuda", dtype=DTYPE)
    row_bytes = TOKENS * hidden * ELEM

    def make_set():
        return (torch.randn(TOKENS, hidden, device="cuda", dtype=DTYPE),
                torch.randn(TOKENS, hidden, device="cuda", dtype=DTYPE))

    next_set, sets = rotating_sets(make_set, 4 * row_bytes)
    compiled = torch.compile(fused_add_rms_norm_functional, dynamic=False)
    times = time_variants(next_set, lambda x, r: ops.fused_add_rms_norm(x, r, weight, EPS),
                          lambda x, r: reference.fused_add_rms_norm(x, r, weight, EPS),
                          lambda x, r: compiled(x, r, weight))
    add_row(f"fused_add_rms_norm [{TOKENS}, {hidden}]", sets, 4 * row_bytes + hidden * ELEM, *times)


@requires_cuda
def test_rms_norm_per_head(add_row):
    """Qwen3's q norm: rows of head_dim inside the fused qkv output, normalised in place."""
    weight = torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE)
    q_bytes = TOKENS * Q_HEADS * HEAD_DIM * ELEM

    def make_set():
        q = qkv_split(torch.randn(TOKENS, QKV_WIDTH, device="cuda", dtype=DTYPE))[0]
        return (q,)

    next_set, sets = rotating_sets(make_set, 2 * q_bytes)
    compiled = torch.compile(rms_norm_functional, dynamic=False)
    times = time_variants(next_set, lambda q: ops.rms_norm(q, q, weight, EPS),
                          lambda q: reference.rms_norm(q, q, weight, EPS),
                          lambda q: compiled(q, weight))
    add_row(f"rms_norm per-head q [{TOKENS}, {Q_HEADS}, {HEAD_DIM}]", sets, 2 * q_bytes + HEAD_DIM * ELEM, *times)


@requires_cuda
def test_rotary_embedding(add_row):
    cos_sin_cache = reference.rotary_cos_sin_cache(HEAD_DIM, 40960, base=1e6).cuda()
    positions = torch.randperm(40960, device="cuda")[:TOKENS]  # distinct rows: the cache is read once per token
    qk_bytes = TOKENS * (Q_HEADS + KV_HEADS) * HEAD_DIM * ELEM

    def make_set():
        q, k, _ = qkv_split(torch.randn(TOKENS, QKV_WIDTH, device="cuda", dtype=DTYPE))
        return positions, q, k, cos_sin_cache

    next_set, sets = rotating_sets(make_set, 2 * qk_bytes)
    compiled = torch.compile(rotary_functional, dynamic=False)
    times = time_variants(next_set, ops.rotary_embedding, reference.rotary_embedding, compiled)
    moved = 2 * qk_bytes + TOKENS * (8 + HEAD_DIM * 4)
    add_row(f"rotary q+k [{TOKENS}, {Q_HEADS}+{KV_HEADS}, {HEAD_DIM}]", sets, moved, *times)


@requires_cuda
def test_store_kvcache(add_row):
    block_size = 16
    num_blocks = 2 * TOKENS // block_size
    kv_bytes = TOKENS * KV_HEADS * HEAD_DIM * ELEM

    def make_set():
        _, key, value = qkv_split(torch.randn(TOKENS, QKV_WIDTH, device="cuda", dtype=DTYPE))
        k_cache = torch.empty(num_blocks, block_size, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
        slots = torch.randperm(num_blocks * block_size, device="cuda")[:TOKENS]
        return key, value, k_cache, torch.empty_like(k_cache), slots

    next_set, sets = rotating_sets(make_set, 4 * kv_bytes)
    compiled = torch.compile(store_functional, dynamic=False)
    times = time_variants(next_set, ops.store_kvcache, reference.store_kvcache,
                          lambda key, value, k_cache, v_cache, slots: compiled(
                              key, value, k_cache.view(-1, KV_HEADS, HEAD_DIM), v_cache.view(-1, KV_HEADS, HEAD_DIM),
                              slots))
    add_row(f"store_kvcache [{TOKENS}, {KV_HEADS}, {HEAD_DIM}] x2", sets, 4 * kv_bytes + TOKENS * 8, *times)


# ------------------------------------------------------------------------------------- speed: ours, 1 and 16K


def graph_us_per_call(fn, calls: int = GRAPH_CALLS) -> float:
    """Median µs of one fn() inside a CUDA graph of `calls` back-to-back fn() calls (launch gaps included)."""
    fn()  # first-call setup stays out of the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return cuda_time_ms(graph.replay, warmup=20, iters=200) * 1e3 / calls


@pytest.fixture(scope="module")
def add_speed_row(report, copy_bandwidth_gbps):
    report(f"\nour kernels alone, bf16, on {torch.cuda.get_device_name()}: 1 token = µs per call in a CUDA graph of "
           f"{GRAPH_CALLS} back-to-back calls; {TOKENS} tokens = µs per call on rotated input sets (>= 4x L2), "
           f"GB/s of bytes that must move, copy% of the {copy_bandwidth_gbps:.0f} GB/s copy")
    report(f"{'kernel':<62}{'tokens':>7}{'us':>9}{'GB/s':>7}{'copy%':>7}")

    def add(name: str, tokens: int, us: float, moved_bytes: int | None = None):
        bandwidth = "" if moved_bytes is None else (f"{moved_bytes / us / 1e3:>7.0f}"
                                                     f"{moved_bytes / us / 1e3 / copy_bandwidth_gbps:>7.0%}")
        report(f"{name:<62}{tokens:>7}{us:>9.2f}{bandwidth}")
    return add


def prologue_set(tokens: int, cos_sin_cache: torch.Tensor):
    """qk_norm_rotary_store's arguments at the Qwen3-0.6B shape: q/k/v are views of one fused qkv output."""
    query, key, value = qkv_split(torch.randn(tokens, QKV_WIDTH, device="cuda", dtype=DTYPE))
    num_blocks = -(-2 * tokens // BLOCK_SIZE)
    k_cache = torch.empty(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    positions = torch.randperm(MAX_POSITION, device="cuda")[:tokens]
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device="cuda")[:tokens]
    q_weight, k_weight = (torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(2))
    return (positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, torch.empty_like(k_cache),
            slots, EPS)


def fused_prologue(*args):
    ops.qk_norm_rotary_store(*args)


def separate_prologue(positions, query, key, value, q_weight, k_weight, cos_sin_cache, k_cache, v_cache, slots, eps):
    ops.rms_norm(query, query, q_weight, eps)
    ops.rms_norm(key, key, k_weight, eps)
    ops.rotary_embedding(positions, query, key, cos_sin_cache)
    ops.store_kvcache(key, value, k_cache, v_cache, slots)


PROLOGUES = {"fused": ("qk_norm_rotary_store (1 launch)", fused_prologue),
             "separate": ("rms_norm q, rms_norm k, rotary, store_kvcache (4)", separate_prologue)}


@requires_cuda
@pytest.mark.parametrize("tokens", [1, TOKENS])
@pytest.mark.parametrize("variant", list(PROLOGUES))
def test_prologue_speed(add_speed_row, variant, tokens):
    cos_sin_cache = reference.rotary_cos_sin_cache(HEAD_DIM, MAX_POSITION, base=1e6).cuda()
    name, prologue = PROLOGUES[variant]
    if tokens == 1:
        args = prologue_set(1, cos_sin_cache)
        add_speed_row(name, 1, graph_us_per_call(lambda: prologue(*args)))
        return
    # q, k, v read; q, k written back; k, v written to the cache; a cos|sin row, a position and a slot per token
    head_bytes = tokens * HEAD_DIM * ELEM
    moved = head_bytes * (Q_HEADS + 2 * KV_HEADS + Q_HEADS + KV_HEADS + 2 * KV_HEADS) + tokens * (HEAD_DIM * 4 + 16)
    set_bytes = head_bytes * (Q_HEADS + 2 * KV_HEADS) + 2 * 2 * head_bytes * KV_HEADS  # qkv + both caches
    next_set, _ = rotating_sets(lambda: prologue_set(tokens, cos_sin_cache), set_bytes)
    add_speed_row(name, tokens, cuda_time_ms(lambda: prologue(*next_set())) * 1e3, moved)


@requires_cuda
@pytest.mark.parametrize("tokens", [1, TOKENS])
@pytest.mark.parametrize("op", ["rms_norm", "fused_add_rms_norm"])
def test_norm_speed(add_speed_row, op, tokens):
    weight = torch.randn(HIDDEN, device="cuda", dtype=DTYPE)
    row_bytes = tokens * HIDDEN * ELEM

    def make_set():
        return (torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE),
                torch.randn(tokens, HIDDEN, device="cuda", dtype=DTYPE))

    if op == "rms_norm":
        run, moved = (lambda out, x: ops.rms_norm(out, x, weight, EPS)), 2 * row_bytes + HIDDEN * ELEM
    else:
        run, moved = (lambda x, r: ops.fused_add_rms_norm(x, r, weight, EPS)), 4 * row_bytes + HIDDEN * ELEM
    name = f"{op} [tokens, {HIDDEN}]"
    if tokens == 1:
        args = make_set()
        add_speed_row(name, 1, graph_us_per_call(lambda: run(*args)))
        return
    next_set, _ = rotating_sets(make_set, 2 * row_bytes)
    add_speed_row(name, tokens, cuda_time_ms(lambda: run(*next_set())) * 1e3, moved)


MLP_WIDTH = 3072  # Qwen3-0.6B intermediate size


@requires_cuda
@pytest.mark.parametrize("tokens", [1, 256, TOKENS])
@pytest.mark.parametrize("variant", ["silu_and_mul", "torch"])
def test_silu_and_mul_speed(add_speed_row, variant, tokens):
    # Below 16K tokens the input is L2-resident, as it is right after the gate/up GEMM: timed inside a graph.
    def make_set():
        return (torch.empty(tokens, MLP_WIDTH, device="cuda", dtype=DTYPE),
                torch.randn(tokens, 2 * MLP_WIDTH, device="cuda", dtype=DTYPE))

    if variant == "silu_and_mul":
        name, run = f"silu_and_mul [tokens, 2 x {MLP_WIDTH}]", ops.silu_and_mul
    else:
        name = f"torch F.silu(gate) * up [tokens, 2 x {MLP_WIDTH}]"

        def run(out, x):
            torch.mul(torch.nn.functional.silu(x[:, :MLP_WIDTH]), x[:, MLP_WIDTH:], out=out)
    moved = 3 * tokens * MLP_WIDTH * ELEM
    if tokens < TOKENS:
        args = make_set()
        add_speed_row(name, tokens, graph_us_per_call(lambda: run(*args)), moved)
        return
    next_set, _ = rotating_sets(make_set, moved)
    add_speed_row(name, tokens, cuda_time_ms(lambda: run(*next_set())) * 1e3, moved)


@requires_cuda
@pytest.mark.parametrize("nbytes", [48 << 10, 1 << 20])  # a batch-1 decode step's staged inputs at 512 seqs; 1 MB
@pytest.mark.parametrize("direction", ["to device", "to host"])
@pytest.mark.parametrize("variant", ["copy_pinned", "torch"])
def test_copy_pinned_speed(add_speed_row, variant, direction, nbytes):
    # Each call is the copy and a one-thread kernel after it, as a decode step's first kernel follows its inputs'
    # copy: the copy engine's hand-off to the SMs counts, as it does in the engine.
    host = torch.randint(0, 256, (nbytes,), dtype=torch.uint8).pin_memory()
    device = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    dst, src = (device, host) if direction == "to device" else (host, device)
    after = torch.zeros(1, device="cuda")
    if variant == "copy_pinned":
        name, copy = f"copy_pinned {direction} + a kernel", lambda: ops.copy_pinned(dst, src, nbytes)
    else:
        name, copy = f"torch copy_ {direction} (copy engine) + a kernel", lambda: dst.copy_(src, non_blocking=True)

    def call():
        copy()
        after.add_(1)
    add_speed_row(f"{name} [{nbytes >> 10} KB]", 1, graph_us_per_call(call), nbytes)
