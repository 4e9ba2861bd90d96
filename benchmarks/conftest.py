"""Shared pieces of the kernel micro-benchmarks (`pytest benchmarks/`).

Speeds are reported as a fraction of the device copy bandwidth measured in the same run, as llm.c does:
bytes a kernel must move (inputs read once, outputs written once) over its median time.
"""

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_time_ms(fn, warmup: int = 10, iters: int = 100) -> float:
    """Median time of fn() in milliseconds, from CUDA events around each call, after a warm-up."""
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for start, end in zip(starts, ends):
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return sorted(s.elapsed_time(e) for s, e in zip(starts, ends))[iters // 2]


@pytest.fixture(scope="session")
def copy_bandwidth_gbps() -> float:
    """Device-to-device copy bandwidth (bytes read + written) of this GPU, measured now on 2 GiB."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=5, iters=30)
    return 2 * src.numel() / ms / 1e6


@pytest.fixture(scope="session")
def report():
    """Collects one row per measurement and prints the table at the end of the session."""
    rows: list[str] = []
    yield rows.append
    if rows:
        print("\n" + "\n".join(rows))
