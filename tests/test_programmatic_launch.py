"""Programmatic dependent launch: a kernel may start while the one before it runs, so one that touched its inputs
before waiting for the earlier grids would read stale data. A chain of decode-sized ops (each reading the
previous one's output: a decoder layer's GEMVs, the fused attention that stores the new token and reads the cache
early, the LM head and the sampler) replayed from a CUDA graph, where the kernels overlap, must equal the same
chain run one op at a time with a device synchronize between ops, where they cannot; bit for bit, since the
kernels are the same.
"""

from dataclasses import dataclass

import pytest
import torch

from nanovllm_cpp import ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

HIDDEN, INTERMEDIATE, LAYERS = 1024, 3072, 6
Q_HEADS, KV_HEADS, HEAD_DIM, BLOCK, MAX_CONTEXT = 16, 8, 128, 16, 2048


@dataclass
class AttentionInputs:
    """One decode step's paged-attention inputs, rows x MAX_CONTEXT tokens of cache per layer."""
    k_caches: list[torch.Tensor]
    v_caches: list[torch.Tensor]
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    cos_sin_cache: torch.Tensor
    workspace: torch.Tensor

    @classmethod
    def make(cls, rows: int, device: str, dtype: torch.dtype) -> "AttentionInputs":
        blocks = MAX_CONTEXT // BLOCK
        shape = (rows * blocks, BLOCK, KV_HEADS, HEAD_DIM)
        lens = torch.tensor([300 + 411 * r for r in range(rows)], dtype=torch.int32, device=device) % MAX_CONTEXT
        tables = torch.arange(rows * blocks, dtype=torch.int32, device=device).view(rows, blocks)
        last = (lens - 1).long()
        return cls([torch.randn(shape, device=device, dtype=dtype) for _ in range(LAYERS)],
                   [torch.randn(shape, device=device, dtype=dtype) for _ in range(LAYERS)], tables, lens, last,
                   tables[torch.arange(rows, device=device), last // BLOCK].long() * BLOCK + last % BLOCK,
                   reference.rotary_cos_sin_cache(HEAD_DIM, MAX_CONTEXT, 1e6).to(device),
                   ops.paged_attention_workspace(rows, Q_HEADS, HEAD_DIM, MAX_CONTEXT, device))


def attention_block(hidden, layer, qkv_weight, o_weight, norm_weight, attn: AttentionInputs, between):
    """The qkv GEMV, decode attention with its prologue fused in, the o_proj GEMV (into hidden)."""
    qkv = hidden.new_empty(hidden.shape[0], (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM)
    ops.skinny_linear(qkv, hidden, qkv_weight)
    between()
    q, k, v = qkv.view(-1, Q_HEADS + 2 * KV_HEADS, HEAD_DIM).split([Q_HEADS, KV_HEADS, KV_HEADS], 1)
    out = q.new_empty(q.shape)
    ops.qk_norm_rotary_paged_attention(out, q, k, v, attn.positions, norm_weight[:HEAD_DIM], norm_weight[-HEAD_DIM:],
                                       attn.cos_sin_cache, attn.k_caches[layer], attn.v_caches[layer], attn.slots,
                                       attn.block_tables, attn.context_lens, HEAD_DIM ** -0.5, MAX_CONTEXT,
                                       attn.workspace, 1e-6)
    between()
    ops.skinny_linear(hidden, out.flatten(1), o_weight)
    between()


def decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens, attn: AttentionInputs,
                 between=lambda: None):
    """Per layer: the attention block, fused add + RMSNorm, the gate_up GEMV, the fused SiLU-and-multiply down
    GEMV; then RMSNorm, the LM-head GEMV and sampling. `between` runs after every op."""
    for layer, (norm_weight, qkv_weight, o_weight, gate_up_weight, down_weight) in enumerate(weights):
        attention_block(hidden, layer, qkv_weight, o_weight, norm_weight, attn, between)
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
    qkv_rows = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    weights = [(1 + 0.1 * torch.randn(HIDDEN, device=device, dtype=dtype),
                torch.randn(qkv_rows, HIDDEN, device=device, dtype=dtype) / HIDDEN ** 0.5,
                torch.randn(HIDDEN, Q_HEADS * HEAD_DIM, device=device, dtype=dtype) / (Q_HEADS * HEAD_DIM) ** 0.5,
                torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=dtype) / HIDDEN ** 0.5,
                torch.randn(HIDDEN, INTERMEDIATE, device=device, dtype=dtype) / INTERMEDIATE ** 0.5)
               for _ in range(LAYERS)]
    logits_weight = torch.randn(32000, HIDDEN, device=device, dtype=dtype) / HIDDEN ** 0.5
    hidden = torch.empty(rows, HIDDEN, device=device, dtype=dtype)
    residual = torch.empty_like(hidden)
    temperatures = torch.full((rows,), 0.7, device=device)
    keys = torch.arange(rows, device=device, dtype=torch.int64)
    tokens = torch.empty(rows, device=device, dtype=torch.int64)
    attn = AttentionInputs.make(rows, device, dtype)

    def load(seed):
        generator = torch.Generator(device=device).manual_seed(seed)
        hidden.copy_(torch.randn(hidden.shape, device=device, generator=generator))
        residual.copy_(torch.randn(hidden.shape, device=device, generator=generator))

    load(0)
    decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens, attn)  # warm-up, pre-capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_logits = decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens, attn)
    for seed in range(1, 6):
        load(seed)
        graph.replay()
        got = (hidden.clone(), residual.clone(), graph_logits.clone(), tokens.clone())
        load(seed)
        logits = decode_chain(hidden, residual, weights, logits_weight, temperatures, keys, tokens, attn,
                              between=torch.cuda.synchronize)
        for name, a, b in zip(("hidden", "residual", "logits", "tokens"), got, (hidden, residual, logits, tokens)):
            assert torch.equal(a, b), f"seed {seed}: {name} differs between the graph replay and synchronized ops"
