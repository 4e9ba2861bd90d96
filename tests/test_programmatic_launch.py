"""Programmatic dependent launch: a kernel may start while the one before it runs, so one that touched its inputs
before waiting for the earlier grids would read stale data. A chain of decode-sized ops (each reading the
previous one's output) replayed from a CUDA graph, where the kernels overlap, must equal the same chain run one op
at a time with a device synchronize between ops, where they cannot; bit for bit, since the kernels are the same.
"""

import pytest
import torch

from nanovllm_cpp import ops

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, INTERMEDIATE, LAYERS = 1024, 3072, 6


def decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens, between=lambda: None):
    """Per layer: fused add + RMSNorm, the gate_up GEMV, the fused SiLU-and-multiply down GEMV; then RMSNorm,
    the LM-head GEMV and sampling. `between` runs after every op."""
    for norm_weight, gate_up_weight, down_weight in weights:
        ops.fused_add_rms_norm(hidden, residual, norm_weight, 1e-6)
        between()
        gate_up = hidden.new_empty(hidden.shape[0], 2 * INTERMEDIATE)
        ops.skinny_linear(gate_up, hidden, gate_up_weight)
        between()
        ops.silu_mul_skinny_linear(hidden, gate_up, down_weight)
        between()
    normed = torch.empty_like(hidden)
    ops.rms_norm(normed, hidden, weights[0][0], 1e-6)
    between()
    logits = hidden.new_empty(hidden.shape[0], logits_weight.shape[0])
    ops.skinny_linear(logits, normed, logits_weight)
    between()
    ops.sample_tokens(tokens, logits, temperatures, keys)
    between()
    return logits


@requires_cuda
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_graph_replay_of_overlapping_kernels_equals_synchronized_ops(rows):
    torch.manual_seed(rows)
    device, dtype = "cuda", torch.bfloat16
    weights = [(1 + 0.1 * torch.randn(HIDDEN, device=device, dtype=dtype),
                torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=dtype) / HIDDEN ** 0.5,
                torch.randn(HIDDEN, INTERMEDIATE, device=device, dtype=dtype) / INTERMEDIATE ** 0.5)
               for _ in range(LAYERS)]
    logits_weight = torch.randn(32000, HIDDEN, device=device, dtype=dtype) / HIDDEN ** 0.5
    hidden = torch.empty(rows, HIDDEN, device=device, dtype=dtype)
    residual = torch.empty_like(hidden)
    temperatures = torch.full((rows,), 0.7, device=device)
    keys = torch.arange(rows, device=device, dtype=torch.int64)
    tokens = torch.empty(rows, device=device, dtype=torch.int64)

    def load(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        hidden.copy_(torch.randn(hidden.shape, device=device, generator=generator))
        residual.copy_(torch.randn(hidden.shape, device=device, generator=generator))

    load(0)
    decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens)  # warm-up before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_logits = decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens)
    for seed in range(1, 6):
        load(seed)
        graph.replay()
        got = (hidden.clone(), residual.clone(), graph_logits.clone(), tokens.clone())
        load(seed)
        logits = decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens,
                              between=torch.cuda.synchronize)
        for name, a, b in zip(("hidden", "residual", "logits", "tokens"), got, (hidden, residual, logits, tokens)):
            assert torch.equal(a, b), f"seed {seed}: {name} differs between the graph replay and synchronized ops"
