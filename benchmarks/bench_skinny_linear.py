"""Decode GEMMs of Qwen3-0.6B (bf16) at M = 1, 2, 4, 8 rows: skinny_linear against F.linear (cuBLAS).

At these M the weight is read once per call and is nearly all the bytes, so speed is weight bytes over the
median time, also as a fraction of the same-run device copy bandwidth (bytes read + written). Each call takes
the next of several weight copies (together >= 4x L2), so the weight comes from HBM, not L2. Calls are
captured back to back in a CUDA graph and timed per replay, as the engine runs them: host launch costs stay out,
the gaps between kernels in a graph stay in. The down projection is timed twice: plain, and with its
activation fused (silu_mul_skinny_linear) against torch's silu * up followed by F.linear.
Run with `pytest benchmarks/bench_skinny_linear.py -s`; the table prints at the end.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import cuda_time_ms, requires_cuda

from nanovllm_cpp import ops

DTYPE = torch.bfloat16
ELEM = 2
NUM_LAYERS = 28
# name: (N, K)
SHAPES = {"qkv_proj": (4096, 1024), "o_proj": (1024, 2048), "gate_up_proj": (6144, 1024), "down_proj": (1024, 3072),
          "lm_head": (151936, 1024)}
ROWS = [1, 2, 4, 8]
MIN_CALLS_PER_GRAPH = 16

step_us: dict[tuple[str, int], tuple[float, float]] = {}  # (variant, M) -> (ours, cuBLAS) per decode step


@pytest.fixture(scope="module")
def add_row(report, copy_bandwidth_gbps):
    l2_mb = torch.cuda.get_device_properties(0).L2_cache_size >> 20
    report(f"skinny GEMMs on {torch.cuda.get_device_name()}, bf16: copy bandwidth {copy_bandwidth_gbps:.0f} GB/s "
           f"(read+write); each call reads the next of `copies` weights (together >= 4x the {l2_mb} MB L2); "
           "times per call from CUDA-graph replays")
    report(f"{'op':<30}{'M':>3}{'MB':>7}{'copies':>7}{'us':>8}{'GB/s':>7}{'copy%':>7}{'cuBLAS us':>10}"
           f"{'cuBLAS GB/s':>12}{'speedup':>9}")

    def add(name: str, rows: int, weight_bytes: int, copies: int, ours_us: float, cublas_us: float):
        gbps = weight_bytes / ours_us / 1e3
        report(f"{name:<30}{rows:>3}{weight_bytes / 1e6:>7.1f}{copies:>7}{ours_us:>8.2f}{gbps:>7.0f}"
               f"{gbps / copy_bandwidth_gbps:>7.0%}{cublas_us:>10.2f}{weight_bytes / cublas_us / 1e3:>12.0f}"
               f"{cublas_us / ours_us:>9.2f}")
    yield add
    for rows in ROWS:
        plain = step_us.get(("plain", rows))
        fused = step_us.get(("fused", rows))
        if plain and fused:
            report(f"per decode step (28 layers x qkv, o, gate_up, down + LM head) at M={rows}: ours {plain[0]:.0f} us "
                   f"(fused down {fused[0]:.0f} us), cuBLAS {plain[1]:.0f} us (with silu*up {fused[1]:.0f} us)")


def graph_us_per_call(calls) -> float:
    """Median time per call of the closures `calls`, captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return cuda_time_ms(graph.replay, warmup=3, iters=20) * 1e3 / len(calls)


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    l2_bytes = torch.cuda.get_device_properties(0).L2_cache_size
    copies = max(2, math.ceil(4 * l2_bytes / (n * k * ELEM)))
    return [(torch.randn(n, k, device="cuda") / k**0.5).to(DTYPE) for _ in range(copies)]


def record_step(variant: str, name: str, rows: int, ours_us: float, cublas_us: float) -> None:
    times = step_us.get((variant, rows), (0.0, 0.0))
    layers = 1 if name == "lm_head" else NUM_LAYERS
    step_us[(variant, rows)] = (times[0] + layers * ours_us, times[1] + layers * cublas_us)


@requires_cuda
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("name", list(SHAPES))
def test_skinny_linear(add_row, name, rows):
    n, k = SHAPES[name]
    weights = weight_copies(n, k)
    x = torch.randn(rows, k, device="cuda", dtype=DTYPE)
    out = torch.empty(rows, n, device="cuda", dtype=DTYPE)
    calls_per_weight = math.ceil(MIN_CALLS_PER_GRAPH / len(weights))
    ours = graph_us_per_call([lambda w=w: ops.skinny_linear(out, x, w) for w in weights] * calls_per_weight)
    cublas = graph_us_per_call([lambda w=w: F.linear(x, w) for w in weights] * calls_per_weight)
    torch.testing.assert_close(out, F.linear(x, weights[-1]), rtol=2e-2, atol=2e-2)
    add_row(f"{name} [{n}, {k}]", rows, n * k * ELEM, len(weights), ours, cublas)
    for variant in ("plain", "fused") if name != "down_proj" else ("plain",):
        record_step(variant, name, rows, ours, cublas)


@requires_cuda
@pytest.mark.parametrize("rows", ROWS)
def test_silu_mul_skinny_linear(add_row, rows):
    n, k = SHAPES["down_proj"]
    weights = weight_copies(n, k)
    gate_up = torch.randn(rows, 2 * k, device="cuda", dtype=DTYPE)
    out = torch.empty(rows, n, device="cuda", dtype=DTYPE)

    def torch_down(w):
        gate, up = gate_up.split(k, dim=-1)
        return F.linear(F.silu(gate) * up, w)

    calls_per_weight = math.ceil(MIN_CALLS_PER_GRAPH / len(weights))
    ours = graph_us_per_call([lambda w=w: ops.silu_mul_skinny_linear(out, gate_up, w) for w in weights]
                             * calls_per_weight)
    cublas = graph_us_per_call([lambda w=w: torch_down(w) for w in weights] * calls_per_weight)
    torch.testing.assert_close(out, torch_down(weights[-1]), rtol=2e-2, atol=2e-2)
    add_row(f"silu*up + down_proj [{n}, {k}]", rows, n * k * ELEM, len(weights), ours, cublas)
    record_step("fused", "down_proj", rows, ours, cublas)
