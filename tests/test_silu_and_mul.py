"""silu_and_mul's CUDA kernel against the reference (fp32 math), its errors, opcheck and CUDA-graph capture.

Relative error ||out - ref|| / ||ref|| <= 1e-2 for bf16/fp16 and 1e-5 for fp32, as for the other elementwise
kernels. Widths that are not a multiple of a 16-byte pack, odd row strides and misaligned views take the scalar
path; the rest the 16-byte path.
"""

import pytest
import torch

from nanovllm_cpp import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}


def expected(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[1] // 2
    return (torch.nn.functional.silu(x[:, :d].float()) * x[:, d:].float()).to(x.dtype)


def check(out: torch.Tensor, x: torch.Tensor) -> None:
    assert not out.isnan().any(), "an element of out was not written"
    ref = expected(x).double()
    error = ((out.double() - ref).norm() / ref.norm()).item()
    assert error <= TOLERANCE[out.dtype], f"relative error {error:.3e} > {TOLERANCE[out.dtype]:.0e}"


def test_cpu_matches_the_formula():
    x = torch.randn(5, 2 * 24, dtype=torch.bfloat16)
    out = torch.empty(5, 24, dtype=torch.bfloat16)
    ops.silu_and_mul(out, x)
    assert torch.equal(out, expected(x))


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 7, 256, 4099])
@pytest.mark.parametrize("d", [1, 3, 8, 100, 3072, 8200])
def test_matches_reference(dtype, tokens, d):
    x = torch.randn(tokens, 2 * d, dtype=dtype, device="cuda") * 4
    out = torch.full((tokens, d), float("nan"), dtype=dtype, device="cuda")
    ops.silu_and_mul(out, x)
    check(out, x)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pad", [0, 1, 8])
def test_strided_rows(dtype, pad):
    # x is a column slice of a wider matrix (row stride free) and out a slice of another; pad 1 misaligns rows.
    tokens, d = 33, 256
    x = (torch.randn(tokens, 2 * d + pad, dtype=dtype, device="cuda") * 4)[:, pad:]
    storage = torch.full((tokens, d + pad), float("nan"), dtype=dtype, device="cuda")
    out = storage[:, pad:]
    ops.silu_and_mul(out, x)
    check(out, x)
    if pad:
        assert storage[:, :pad].isnan().all(), "wrote outside out"


@requires_cuda
def test_extreme_values():
    x = torch.tensor([[-1e4, 1e4, -20.0, 0.0, 3.0, 2.0, 5.0, -1.0]], device="cuda").repeat(2, 1)
    out = torch.empty(2, 4, device="cuda")
    ops.silu_and_mul(out, x)
    torch.testing.assert_close(out, expected(x), rtol=1e-6, atol=1e-6)


@requires_cuda
def test_empty():
    ops.silu_and_mul(torch.empty(0, 8, device="cuda"), torch.empty(0, 16, device="cuda"))


@requires_cuda
def test_cuda_graph_capture():
    x = torch.randn(64, 2 * 3072, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(64, 3072, dtype=torch.bfloat16, device="cuda")
    ops.silu_and_mul(out, x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.silu_and_mul(out, x)
    x.copy_(torch.randn_like(x))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check(out, x)


@requires_cuda
def test_rejects_bad_inputs():
    x = torch.randn(4, 16, device="cuda")
    out = torch.empty(4, 8, device="cuda")
    cases = [
        (out.half(), x, "dtype"),
        (out.int(), x.int(), "supported: float32"),
        (torch.empty(4, 7, device="cuda"), torch.randn(4, 14, device="cuda")[:, :13], "even"),
        (torch.empty(4, 9, device="cuda"), x, "out must have shape"),
        (torch.empty(3, 8, device="cuda"), x, "out must have shape"),
        (out, x.view(4, 2, 8), r"\[tokens, 2 \* d\]"),
        (out, torch.randn(16, 4, device="cuda").t(), "contiguous last dim"),
        (torch.empty(8, 4, device="cuda").t(), x, "contiguous last dim"),
        (out, x.cpu(), "CUDA tensor"),
        (out.cpu(), x, "is on cpu"),
    ]
    for bad_out, bad_x, message in cases:
        with pytest.raises(RuntimeError, match=message):
            ops.silu_and_mul(bad_out, bad_x)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_opcheck(device):
    x = torch.randn(6, 2 * 40, device=device)
    out = torch.empty(6, 40, device=device)
    torch.library.opcheck(torch.ops.nanovllm_cpp.silu_and_mul.default, (out, x))
