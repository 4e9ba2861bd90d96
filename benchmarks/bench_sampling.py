"""sample_tokens at Qwen3's vocabulary (151,936), bf16 logits: our kernel against the eager sort-free PyTorch
reference. Speed is logits bytes read over the median time, also as a fraction of the device copy bandwidth.
Run with `pytest benchmarks/bench_sampling.py -s`."""

import pytest
import torch
from conftest import cuda_time_ms, requires_cuda

from nanovllm_cpp import ops, reference

VOCAB = 151936


@requires_cuda
@pytest.mark.parametrize("rows", [1, 16, 256])
@pytest.mark.parametrize("greedy", [False, True])
def test_sample_tokens_speed(rows, greedy, report, copy_bandwidth_gbps):
    logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
    temperatures = torch.zeros(rows, device="cuda") if greedy else torch.full((rows,), 0.6, device="cuda")
    keys = torch.arange(rows, dtype=torch.int64, device="cuda")
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    ours = cuda_time_ms(lambda: ops.sample_tokens(out, logits, temperatures, keys))
    plain = cuda_time_ms(lambda: reference.sample_tokens(out, logits, temperatures, keys), iters=10)
    gbps = logits.numel() * logits.element_size() / ours / 1e6
    report(f"sample_tokens rows={rows:<4} {'greedy' if greedy else 'T=0.6 '}: {ours * 1e3:8.1f} us  {gbps:6.0f} GB/s "
           f"({gbps / copy_bandwidth_gbps:4.0%} of copy)  reference {plain * 1e3:9.1f} us  ({plain / ours:.0f}x)")
