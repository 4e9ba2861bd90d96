"""sample_tokens: the CUDA kernel against its PyTorch reference (exact tokens), the reference's distribution,
and the op's registration (opcheck)."""

import pytest
import torch

from nanovllm_cpp import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(rows, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    temperatures = torch.rand(rows, generator=g) * 1.5 + 0.1
    temperatures[::3] = 0  # every third row greedy
    keys = torch.randint(0, 2**32, (rows,), generator=g, dtype=torch.int64)
    return logits.to(device), temperatures.to(device), keys.to(device)


def _reference_tokens(logits, temperatures, keys):
    out = torch.empty(logits.shape[0], dtype=torch.int64)
    reference.sample_tokens(out, logits.cpu(), temperatures.cpu(), keys.cpu())
    return out


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(1, 151936), (37, 32000), (256, 151936), (5, 1001)])
def test_kernel_matches_reference(dtype, rows, vocab):
    logits, temperatures, keys = _inputs(rows, vocab, dtype, "cuda")
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    ops.sample_tokens(out, logits, temperatures, keys)
    assert torch.equal(out.cpu(), _reference_tokens(logits, temperatures, keys))


@requires_cuda
def test_kernel_ties_go_to_the_lowest_id_and_rows_are_independent():
    vocab = 4099  # not a multiple of the 16-byte pack: exercises the tail
    logits = torch.zeros(4, vocab, dtype=torch.bfloat16, device="cuda")
    logits[:, [7, 100, 4098]] = 5.0
    temperatures = torch.zeros(4, device="cuda")
    keys = torch.arange(4, dtype=torch.int64, device="cuda")
    out = torch.empty(4, dtype=torch.int64, device="cuda")
    ops.sample_tokens(out, logits, temperatures, keys)
    assert out.tolist() == [7, 7, 7, 7]
    # A row's sample depends only on its own logits, temperature and key, not on its neighbours.
    big, t, k = _inputs(64, 32000, torch.bfloat16, "cuda", seed=1)
    full = torch.empty(64, dtype=torch.int64, device="cuda")
    ops.sample_tokens(full, big, t, k)
    part = torch.empty(3, dtype=torch.int64, device="cuda")
    ops.sample_tokens(part, big[10:13], t[10:13].contiguous(), k[10:13].contiguous())
    assert torch.equal(part, full[10:13])


@requires_cuda
def test_kernel_reads_a_strided_row_view():
    logits, temperatures, keys = _inputs(8, 2048, torch.bfloat16, "cuda", seed=2)
    wide = torch.zeros(8, 2056, dtype=torch.bfloat16, device="cuda")
    wide[:, 3:2051] = logits  # misaligned for 16-byte loads
    out = torch.empty(8, dtype=torch.int64, device="cuda")
    ops.sample_tokens(out, wide[:, 3:2051], temperatures, keys)
    assert torch.equal(out.cpu(), _reference_tokens(logits, temperatures, keys))


def test_reference_follows_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = 20000
    logits = probs.log().expand(rows, -1).contiguous()
    temperatures = torch.ones(rows)
    keys = torch.arange(rows, dtype=torch.int64) * 7919
    out = torch.empty(rows, dtype=torch.int64)
    ops.sample_tokens(out, logits, temperatures, keys)
    freq = torch.bincount(out, minlength=4).float() / rows
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_reference_greedy_rows_take_the_argmax_and_nan_never_wins():
    logits = torch.tensor([[1.0, float("nan"), 3.0, 3.0], [float("nan")] * 4])
    out = torch.empty(2, dtype=torch.int64)
    ops.sample_tokens(out, logits, torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    assert out.tolist() == [2, 0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_opcheck(device):
    logits, temperatures, keys = _inputs(6, 1000, torch.float32, device)
    out = torch.empty(6, dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.nanovllm_cpp.sample_tokens, (out, logits, temperatures, keys),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@requires_cuda
def test_bad_input_is_named():
    logits = torch.zeros(2, 10, device="cuda")
    with pytest.raises(RuntimeError, match="temperatures"):
        ops.sample_tokens(torch.empty(2, dtype=torch.int64, device="cuda"), logits, torch.zeros(3, device="cuda"),
                          torch.zeros(2, dtype=torch.int64, device="cuda"))
