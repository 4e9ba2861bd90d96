"""skinny_linear, silu_mul_skinny_linear, add_rms_norm_skinny_linear and rms_norm_skinny_linear (decode-sized
GEMMs, M <= 8) against fp64 references.

Every check draws fresh random inputs and writes into a view of a NaN-poisoned wider buffer: every element of
out must be written and nothing beside it. Relative error ||out - ref|| / ||ref|| <= 1e-2 for bf16, 2e-3 for
fp16 and 1e-5 for fp32 (one rounding of the output plus fp32 accumulation). Shapes: the Qwen3-0.6B decode
projections (qkv, o_proj, gate_up, down, LM head), odd N, and K long enough to be staged in several slices.
The CPU tests cover the reference implementations the ops run on CPU tensors.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from nanovllm_cpp import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
ROWS = list(range(1, ops.SKINNY_LINEAR_MAX_ROWS + 1))
# (N, K): qkv, o_proj, gate_up, down, LM head of Qwen3-0.6B; then odd N, and K staged in several slices
# (M = 8 stages 3072 columns at a time, M = 1 24576).
QWEN3_SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)]
ODD_SHAPES = [(1000, 1024), (4100, 520), (1, 8), (37, 8200), (100, 25000)]
DOWN_SHAPES = [(1024, 3072), (1000, 1024), (37, 8200)]  # (N, K) of the down projection; gate_up is [M, 2K]
# (N, K) after a (residual add +) RMSNorm: qkv and gate_up of Qwen3-0.6B, odd N, K staged in slices at M = 8.
NORM_SHAPES = [(4096, 1024), (6144, 1024), (1000, 520), (37, 8200)]

worst_errors: dict[str, float] = {}


@pytest.fixture(scope="module", autouse=True)
def print_worst_errors():
    yield
    if worst_errors:
        print("\nworst relative error vs fp64 reference (op, dtype):")
        for name, error in sorted(worst_errors.items()):
            print(f"  {name:<32} {error:.3e}")


@functools.lru_cache(maxsize=2)
def cached_weight(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """One random weight per shape and dtype (the LM head is 311 MB in bf16); scaled so outputs are O(1)."""
    return (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)


def poisoned_out(rows: int, n: int, dtype: torch.dtype, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """(buffer, out): out = buffer[:, :n], a row-strided view; the buffer is NaN everywhere."""
    buffer = torch.full((rows, n + 5), float("nan"), dtype=dtype, device=device)
    return buffer, buffer[:, :n]


def strided_rows(rows: int, cols: int, dtype: torch.dtype, device: str = "cuda") -> torch.Tensor:
    """[rows, cols] as a column slice of a wider tensor (row stride cols + 24, first column 8: still aligned)."""
    return torch.randn(rows, cols + 24, device=device).to(dtype)[:, 8 : 8 + cols]


def check(name: str, buffer: torch.Tensor, out: torch.Tensor, ref: torch.Tensor) -> None:
    n = out.shape[1]
    assert not out.isnan().any(), f"{name}: an element of out was not written"
    assert buffer[:, n:].isnan().all(), f"{name}: wrote outside out"
    error = ((out.double() - ref).norm() / ref.norm()).item()
    key = f"{name} {str(out.dtype).removeprefix('torch.')}"
    worst_errors[key] = max(worst_errors.get(key, 0.0), error)
    assert error <= TOLERANCE[out.dtype], f"{name}: relative error {error:.3e} > {TOLERANCE[out.dtype]:.0e}"


def silu_mul_fp64(gate_up: torch.Tensor, k: int) -> torch.Tensor:
    gate, up = gate_up.double().split(k, dim=-1)
    return F.silu(gate) * up


def rms_norm_fp64(x: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """The fp64 reference of rms_norm(x) * norm_weight, rounded to the dtype as the op rounds it."""
    normed = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * norm_weight.double()
    return normed.to(x.dtype).double()


def add_rms_norm_inputs(rows: int, k: int, dtype: torch.dtype, device: str = "cuda"):
    """x, residual and norm_weight, and the fp64 reference of the normalized rows (rounded to the dtype, as the
    op rounds them) and of x + residual (rounded likewise)."""
    x, residual = (torch.randn(rows, k, device=device).to(dtype) for _ in range(2))
    norm_weight = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
    summed = (x.double() + residual.double()).to(dtype)
    return x, residual, norm_weight, rms_norm_fp64(summed, norm_weight), summed


def check_add_rms_norm_skinny_linear(name, dtype, rows, n, k, weight, device="cuda"):
    x, residual, norm_weight, normed, summed = add_rms_norm_inputs(rows, k, dtype, device)
    buffer, out = poisoned_out(rows, n, dtype, device)
    residual_out = torch.full_like(residual, float("nan"))
    inputs = (x.clone(), residual.clone())
    ops.add_rms_norm_skinny_linear(out, residual_out, x, residual, norm_weight, 1e-6, weight)
    assert torch.equal(x, inputs[0]) and torch.equal(residual, inputs[1]), f"{name}: an input was written"
    assert torch.equal(residual_out, summed), f"{name}: residual_out is not x + residual rounded"
    check(name, buffer, out, normed @ weight.double().T)


def check_rms_norm_skinny_linear(name, dtype, rows, n, k, weight, x=None, device="cuda"):
    x = torch.randn(rows, k, device=device).to(dtype) if x is None else x
    norm_weight = (1 + 0.2 * torch.randn(k, device=device)).to(dtype)
    buffer, out = poisoned_out(rows, n, dtype, device)
    original = x.clone()
    ops.rms_norm_skinny_linear(out, x, norm_weight, 1e-6, weight)
    assert torch.equal(x, original), f"{name}: x was written"
    check(name, buffer, out, rms_norm_fp64(x, norm_weight) @ weight.double().T)


# ---------------------------------------------------------------------------------------------------- GPU


@requires_cuda
@pytest.mark.parametrize("shape", QWEN3_SHAPES + ODD_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_skinny_linear(dtype, rows, shape):
    n, k = shape
    weight = cached_weight(n, k, dtype)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    buffer, out = poisoned_out(rows, n, dtype)
    ops.skinny_linear(out, x, weight)
    check("skinny_linear", buffer, out, x.double() @ weight.double().T)


@requires_cuda
@pytest.mark.parametrize("shape", DOWN_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_skinny_linear(dtype, rows, shape):
    n, k = shape
    weight = cached_weight(n, k, dtype)
    gate_up = (torch.randn(rows, 2 * k, device="cuda") * 2).to(dtype)
    buffer, out = poisoned_out(rows, n, dtype)
    ops.silu_mul_skinny_linear(out, gate_up, weight)
    check("silu_mul_skinny_linear", buffer, out, silu_mul_fp64(gate_up, k) @ weight.double().T)


NORM_CHECKS = {"add_rms_norm_skinny_linear": check_add_rms_norm_skinny_linear,
               "rms_norm_skinny_linear": check_rms_norm_skinny_linear}


@requires_cuda
@pytest.mark.parametrize("shape", NORM_SHAPES, ids=lambda s: f"N{s[0]}-K{s[1]}")
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", NORM_CHECKS)
def test_norm_fused_skinny_linear(op, dtype, rows, shape):
    n, k = shape
    NORM_CHECKS[op](op, dtype, rows, n, k, cached_weight(n, k, dtype))


@requires_cuda
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_rms_norm_skinny_linear_equals_the_two_ops(rows):
    """The same function as rms_norm then skinny_linear, up to the order of the norm's sum."""
    n, k, dtype = 4096, 1024, torch.bfloat16
    weight = cached_weight(n, k, dtype)
    x = torch.randn(rows, k, device="cuda").to(dtype)
    norm_weight = (1 + 0.2 * torch.randn(k, device="cuda")).to(dtype)
    out = torch.empty(rows, n, device="cuda", dtype=dtype)
    ops.rms_norm_skinny_linear(out, x, norm_weight, 1e-6, weight)
    normed, separate = torch.empty_like(x), torch.empty_like(out)
    ops.rms_norm(normed, x, norm_weight, 1e-6)
    ops.skinny_linear(separate, normed, weight)
    assert ((out.double() - separate.double()).norm() / separate.double().norm()).item() < 1e-3


@requires_cuda
@pytest.mark.parametrize("rows", [1, 2, 8])
def test_add_rms_norm_skinny_linear_equals_the_two_ops(rows):
    """The same function as fused_add_rms_norm then skinny_linear, up to the order of the norm's sum."""
    n, k, dtype = 4096, 1024, torch.bfloat16
    weight = cached_weight(n, k, dtype)
    x, residual, norm_weight, _, _ = add_rms_norm_inputs(rows, k, dtype)
    out, residual_out = torch.empty(rows, n, device="cuda", dtype=dtype), torch.empty_like(residual)
    ops.add_rms_norm_skinny_linear(out, residual_out, x, residual, norm_weight, 1e-6, weight)
    ops.fused_add_rms_norm(x, residual, norm_weight, 1e-6)
    separate = torch.empty_like(out)
    ops.skinny_linear(separate, x, weight)
    assert torch.equal(residual_out, residual)
    assert ((out.double() - separate.double()).norm() / separate.double().norm()).item() < 1e-3


@requires_cuda
@pytest.mark.parametrize("rows", [1, 5, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_activations(dtype, rows):
    """x and gate_up as column slices of wider tensors (a row stride wider than K)."""
    n, k = 1000, 1024
    weight = cached_weight(n, k, dtype)
    x = strided_rows(rows, k, dtype)
    buffer, out = poisoned_out(rows, n, dtype)
    ops.skinny_linear(out, x, weight)
    check("skinny_linear strided", buffer, out, x.double() @ weight.double().T)

    gate_up = strided_rows(rows, 2 * k, dtype)
    buffer, out = poisoned_out(rows, n, dtype)
    ops.silu_mul_skinny_linear(out, gate_up, weight)
    check("silu_mul_skinny_linear strided", buffer, out, silu_mul_fp64(gate_up, k) @ weight.double().T)
    check_rms_norm_skinny_linear("rms_norm_skinny_linear strided", dtype, rows, n, k, weight,
                                 x=strided_rows(rows, k, dtype))


@requires_cuda
def test_cuda_graph_replay_with_new_inputs():
    n, k, rows, dtype = 4100, 1024, 6, torch.bfloat16
    weight = cached_weight(n, k, dtype)
    x = torch.empty(rows, k, device="cuda", dtype=dtype)
    gate_up = torch.empty(rows, 2 * k, device="cuda", dtype=dtype)
    buffer, out = poisoned_out(rows, n, dtype)
    down_buffer, down_out = poisoned_out(rows, n, dtype)

    def step():
        ops.skinny_linear(out, x, weight)
        ops.silu_mul_skinny_linear(down_out, gate_up, weight)

    x.normal_()
    gate_up.normal_()
    stream = torch.cuda.Stream()  # warm-up off the capture stream, as torch.cuda.graphs recommends
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(2):
        x.normal_()
        gate_up.normal_()
        buffer.fill_(float("nan"))
        down_buffer.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check("skinny_linear graph", buffer, out, x.double() @ weight.double().T)
        check("silu_mul_skinny_linear graph", down_buffer, down_out, silu_mul_fp64(gate_up, k) @ weight.double().T)


@requires_cuda
def test_rejects_bad_input():
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x, weight, out = torch.randn(4, 64, **bf16), torch.randn(32, 64, **bf16), torch.empty(4, 32, **bf16)
    limit = ops.SKINNY_LINEAR_MAX_ROWS
    cases = [
        ("weight has dtype", (out, x, weight.half())),
        ("out has dtype", (out.float(), x, weight)),
        ("x has dtype", (out.int(), x.int(), weight.int())),
        ("K = 60 .* multiple of 8", (out, x[:, :60], weight[:, :60].contiguous())),
        (f"9 rows; this kernel takes 1 to {limit}",
         (torch.empty(limit + 1, 32, **bf16), torch.randn(limit + 1, 64, **bf16), weight)),
        ("0 rows", (out[:0], x[:0], weight)),
        ("weight must be a CUDA tensor", (out, x, weight.cpu())),
        ("out must be a CUDA tensor", (out.cpu(), x, weight)),
        (r"x must be \[4, 64\]", (out, torch.randn(4, 72, **bf16), weight)),
        (r"out must be \[4, 32\]", (torch.empty(4, 31, **bf16), x, weight)),
        ("weight must be contiguous", (out, x, torch.randn(64, 32, **bf16).t())),
        ("x must have a contiguous last dim", (out, torch.randn(64, 4, **bf16).t(), weight)),
        ("16-byte aligned", (out, torch.randn(4, 65, **bf16)[:, 1:], weight)),
        ("must be 2-D", (out, x.unsqueeze(0), weight)),
    ]
    for message, args in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.skinny_linear(*args)
    with pytest.raises(RuntimeError, match=r"gate_up must be \[4, 128\] \(gate \| up"):
        ops.silu_mul_skinny_linear(out, x, weight)
    with pytest.raises(RuntimeError, match="gate_up has dtype"):
        ops.silu_mul_skinny_linear(out.float(), torch.randn(4, 128, device="cuda").int(), weight.float())
    residual, norm_weight = torch.randn(4, 64, **bf16), torch.ones(64, **bf16)
    norm_cases = [
        ("residual must be a contiguous", (out, torch.empty(4, 64, **bf16), x, residual[:, :32], norm_weight)),
        ("residual_out must be a contiguous", (out, torch.empty(4, 64, 2, **bf16)[..., 0], x, residual,
                                                norm_weight)),
        ("residual_out must be a contiguous", (out, torch.empty(4, 64, device="cuda"), x, residual, norm_weight)),
        (r"norm_weight must be a contiguous, 16-byte aligned BFloat16 \[64\]",
         (out, torch.empty(4, 64, **bf16), x, residual, torch.ones(32, **bf16))),
        ("residual_out must not overlap x or residual", (out, residual, x, residual, norm_weight)),
        ("residual_out must not overlap x or residual", (out, x, x, residual, norm_weight)),
        ("residual must be on", (out, torch.empty(4, 64, **bf16), x, residual.cpu(), norm_weight)),
    ]
    for message, (o, r_out, xx, r, w) in norm_cases:
        with pytest.raises(RuntimeError, match=message):
            ops.add_rms_norm_skinny_linear(o, r_out, xx, r, w, 1e-6, weight)
    for message, (o, xx, w) in [
        (r"norm_weight must be a contiguous, 16-byte aligned BFloat16 \[64\]", (out, x, torch.ones(32, **bf16))),
        ("norm_weight must be a contiguous", (out, x, torch.ones(64, device="cuda"))),
        (r"x must be \[4, 64\]", (out, torch.randn(4, 72, **bf16), norm_weight)),
    ]:
        with pytest.raises(RuntimeError, match=message):
            ops.rms_norm_skinny_linear(o, xx, w, 1e-6, weight)
    # The limit itself is accepted.
    ops.skinny_linear(torch.empty(limit, 32, **bf16), torch.randn(limit, 64, **bf16), weight)


@requires_cuda
@pytest.mark.parametrize("rows", [1, 8])
def test_cuda_opcheck(rows):
    x = torch.randn(rows, 64, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(40, 64, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros(rows, 40, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nanovllm_cpp.skinny_linear.default, (out, x, weight))
    gate_up = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nanovllm_cpp.silu_mul_skinny_linear.default, (out, gate_up, weight))
    residual, residual_out = torch.randn_like(x), torch.empty_like(x)
    torch.library.opcheck(torch.ops.nanovllm_cpp.add_rms_norm_skinny_linear.default,
                          (out, residual_out, x, residual, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6,
                           weight))
    torch.library.opcheck(torch.ops.nanovllm_cpp.rms_norm_skinny_linear.default,
                          (out, x, torch.ones(64, device="cuda", dtype=torch.bfloat16), 1e-6, weight))


# ---------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_reference(dtype):
    x = strided_rows(3, 64, dtype, device="cpu")
    weight = torch.randn(40, 64).to(dtype)
    buffer, out = poisoned_out(3, 40, dtype, device="cpu")
    ops.skinny_linear(out, x, weight)
    check("skinny_linear cpu", buffer, out, x.double() @ weight.double().T)
    gate_up = torch.randn(3, 128).to(dtype)
    buffer, out = poisoned_out(3, 40, dtype, device="cpu")
    ops.silu_mul_skinny_linear(out, gate_up, weight)
    check("silu_mul_skinny_linear cpu", buffer, out, silu_mul_fp64(gate_up, 64) @ weight.double().T)
    check_add_rms_norm_skinny_linear("add_rms_norm_skinny_linear cpu", dtype, 3, 40, 64, weight, device="cpu")
    check_rms_norm_skinny_linear("rms_norm_skinny_linear cpu", dtype, 3, 40, 64, weight, device="cpu")


def test_cpu_opcheck():
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    weight = torch.randn(40, 64, dtype=torch.bfloat16)
    out = torch.zeros(3, 40, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.nanovllm_cpp.skinny_linear.default, (out, x, weight))
    torch.library.opcheck(torch.ops.nanovllm_cpp.silu_mul_skinny_linear.default,
                          (out, torch.randn(3, 128, dtype=torch.bfloat16), weight))
    torch.library.opcheck(torch.ops.nanovllm_cpp.add_rms_norm_skinny_linear.default,
                          (out, torch.empty_like(x), x, torch.randn_like(x), torch.ones(64, dtype=torch.bfloat16), 1e-6,
                           weight))
    torch.library.opcheck(torch.ops.nanovllm_cpp.rms_norm_skinny_linear.default,
                          (out, x, torch.ones(64, dtype=torch.bfloat16), 1e-6, weight))
