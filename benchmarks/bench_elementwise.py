"""Elementwise kernels at a Qwen3-0.6B prefill shape: 16K tokens, hidden 1024, 16 q / 8 kv heads of 128, bf16.

For each op: our CUDA kernel, the plain PyTorch reference (nanovllm_cpp.reference) and torch.compile of the
reference's functional form. Speed is bytes that must move (inputs read once, outputs written once) over the
median time, also as a fraction of the same-run device copy bandwidth. One buffer set is ~32-200 MB, near the
50 MB L2, so every timed call takes the next of several input sets (together >= 4x L2): the numbers are HBM
numbers. Run with `pytest benchmarks/bench_elementwise.py -s`; the table prints at the end.
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
