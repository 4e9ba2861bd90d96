"""paged_attention_decode on the Qwen3-0.6B shape (16 q / 8 kv heads, head_dim 128, bf16).

Bytes that must move = K + V of every context token, plus q and out. Each row also times
torch.nn.functional.scaled_dot_product_attention (enable_gqa=True) on the same keys already gathered into
contiguous [batch, kv_heads, ctx, dim] tensors, and the plain PyTorch reference. Small cases rotate over
enough copies of their inputs to keep them out of L2. `max ctx` = 40960 is the CUDA-graph case: the launch is
shaped for the model's limit while the sequences are short.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from conftest import cuda_time_ms, requires_cuda
from nanovllm_cpp import ops, reference

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16
GRAPH_MAX_CONTEXT = 40960
ROTATE_BYTES = 256 * 2**20  # > 5x the H100's 50 MB L2
_header_printed: list[bool] = []

CASES = [  # (batch, context, block_size, max_context_len is 40960)
    (256, 1024, 16, False), (256, 1024, 16, True), (256, 512, 16, False), (64, 1024, 16, False),
    (64, 4096, 16, False), (64, 4096, 16, True),
    (1, 32768, 16, False), (1, 32768, 16, True),
    (1, 1024, 16, False), (1, 1024, 16, True),
    (256, 1024, 256, False),
]


@requires_cuda
@pytest.mark.parametrize("batch,context,block_size,graph_bound", CASES)
def test_paged_attention_decode(batch, context, block_size, graph_bound, copy_bandwidth_gbps, report):
    torch.manual_seed(0)
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, -(-ROTATE_BYTES // kv_bytes))
    blocks_per_seq = -(-context // block_size)
    num_blocks = copies * batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    max_context_len = GRAPH_MAX_CONTEXT if graph_bound else context
    width = -(-max_context_len // block_size)
    order = torch.randperm(num_blocks, device="cuda").int().view(copies, batch, blocks_per_seq)
    tables = []
    for copy in range(copies):
        table = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
        table[:, :blocks_per_seq] = order[copy]
        tables.append(table)
    queries = [torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(copies)]
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    out = torch.empty(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    workspace = ops.paged_attention_workspace(batch, NUM_Q_HEADS, HEAD_DIM, max_context_len, "cuda")
    scale = HEAD_DIM ** -0.5

    turn = itertools.cycle(range(copies))

    def kernel():
        i = next(turn)
        ops.paged_attention_decode(out, queries[i], k_cache, v_cache, tables[i], lens, scale, max_context_len,
                                   workspace)

    ms = cuda_time_ms(kernel, warmup=20, iters=200)

    def gathered(cache, table):  # [batch, kv_heads, context, dim], contiguous
        tokens = cache[table[:, :blocks_per_seq].long()].flatten(1, 2)[:, :context]
        return tokens.transpose(1, 2).contiguous()

    sdpa_copies = copies
    keys = [gathered(k_cache, tables[i]) for i in range(sdpa_copies)]
    values = [gathered(v_cache, tables[i]) for i in range(sdpa_copies)]
    sdpa_turn = itertools.cycle(range(sdpa_copies))

    def sdpa():
        i = next(sdpa_turn)
        F.scaled_dot_product_attention(queries[i].unsqueeze(2), keys[i], values[i], scale=scale, enable_gqa=True)

    sdpa_ms = cuda_time_ms(sdpa, warmup=10, iters=100)
    del keys, values

    # Correctness of the timed configuration, then the reference's time (it gathers fp32 copies: slow).
    expect = torch.zeros(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda")
    reference.paged_attention_decode(expect, queries[0], k_cache, v_cache, tables[0], lens, scale, max_context_len,
                                     workspace)
    ops.paged_attention_decode(out, queries[0], k_cache, v_cache, tables[0], lens, scale, max_context_len, workspace)
    error = float((out.float() - expect).norm() / expect.norm())
    assert error < 1e-2
    ref_ms = cuda_time_ms(lambda: reference.paged_attention_decode(expect, queries[0], k_cache, v_cache, tables[0],
                                                                   lens, scale, max_context_len, workspace),
                          warmup=2, iters=5)

    moved = kv_bytes + 2 * batch * NUM_Q_HEADS * HEAD_DIM * DTYPE.itemsize
    gbps = moved / ms / 1e6
    if not _header_printed:
        _header_printed.append(True)
        report(f"paged_attention_decode, {torch.cuda.get_device_name()}, Qwen3-0.6B shape (16q/8kv x 128, bf16); "
               f"copy bandwidth {copy_bandwidth_gbps:.0f} GB/s; SDPA = enable_gqa=True on contiguous K/V")
        report(f"{'batch':>5} {'ctx':>6} {'blk':>4} {'max ctx':>7} {'ms':>8} {'GB/s':>6} {'of copy':>7} "
               f"{'sdpa ms':>8} {'vs sdpa':>7} {'ref ms':>8} {'vs ref':>7} {'rel err':>8}")
    report(f"{batch:>5} {context:>6} {block_size:>4} {max_context_len:>7} {ms:>8.4f} {gbps:>6.0f} "
           f"{gbps / copy_bandwidth_gbps:>7.1%} {sdpa_ms:>8.4f} {sdpa_ms / ms:>6.2f}x {ref_ms:>8.3f} "
           f"{ref_ms / ms:>6.0f}x {error:>8.1e}")


DECODE_LAYERS, DECODE_MAX_CONTEXT = 28, 2048


@requires_cuda
@pytest.mark.parametrize("context", [128, 512, 1024, 2048])
def test_decode_graph_per_layer(context, report):
    """Batch-1 decode as the engine runs it: a CUDA graph of 28 layers, each with its own cache, all launched for
    max_context_len 2048; µs per layer = graph time / 28 (launch gaps included). Three variants: attention alone
    (q and the cache ready), the attention block's prologue kernel (qk_norm_rotary_store) then attention, and
    the two in one launch (qk_norm_rotary_paged_attention)."""
    torch.manual_seed(0)
    blocks = -(-context // 16)
    table = torch.arange(blocks, dtype=torch.int32, device="cuda")
    table = torch.cat([table, table.new_zeros(DECODE_MAX_CONTEXT // 16 - blocks)]).view(1, -1)
    lens = torch.full((1,), context, dtype=torch.int32, device="cuda")
    positions = (lens - 1).long()
    slots = positions.clone()  # the table maps token t to slot t
    cos_sin_cache = reference.rotary_cos_sin_cache(HEAD_DIM, DECODE_MAX_CONTEXT, 1e6).to("cuda")
    norm_weights = [torch.randn(HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(2)]
    out = torch.empty(1, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    workspace = ops.paged_attention_workspace(1, NUM_Q_HEADS, HEAD_DIM, DECODE_MAX_CONTEXT, "cuda")
    heads = NUM_Q_HEADS + 2 * NUM_KV_HEADS
    layers = [(torch.randn(1, heads, HEAD_DIM, device="cuda", dtype=DTYPE).split([NUM_Q_HEADS, NUM_KV_HEADS,
                                                                                 NUM_KV_HEADS], 1),
               torch.randn(blocks, 16, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE),
               torch.randn(blocks, 16, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)) for _ in range(DECODE_LAYERS)]

    def attention(q, k, v, k_cache, v_cache):
        ops.paged_attention_decode(out, q, k_cache, v_cache, table, lens, HEAD_DIM ** -0.5, DECODE_MAX_CONTEXT,
                                   workspace)

    def separate(q, k, v, k_cache, v_cache):
        ops.qk_norm_rotary_store(positions, q, k, v, *norm_weights, cos_sin_cache, k_cache, v_cache, slots, 1e-6)
        attention(q, k, v, k_cache, v_cache)

    def fused(q, k, v, k_cache, v_cache):
        ops.qk_norm_rotary_paged_attention(out, q, k, v, positions, *norm_weights, cos_sin_cache, k_cache, v_cache,
                                           slots, table, lens, HEAD_DIM ** -0.5, DECODE_MAX_CONTEXT, workspace, 1e-6)

    times = {}
    for name, layer_ops in (("attention", attention), ("prologue + attention", separate), ("fused", fused)):
        def step():
            for (q, k, v), k_cache, v_cache in layers:
                layer_ops(q, k, v, k_cache, v_cache)

        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        times[name] = cuda_time_ms(graph.replay, warmup=20, iters=200) * 1e3 / DECODE_LAYERS
    report(f"decode graph, batch 1, max ctx {DECODE_MAX_CONTEXT}, {DECODE_LAYERS} layers: ctx {context:>5} "
           + ", ".join(f"{name} {us:6.2f}" for name, us in times.items()) + " us per layer")


@requires_cuda
@pytest.mark.parametrize("batch,mean_context", [(40, 1450), (80, 1270), (112, 1120), (160, 950), (224, 700)])
def test_paged_attention_mixed_lengths(batch, mean_context, copy_bandwidth_gbps, report):
    """Decode batches like W0's middle and tail: context lengths drawn from [mean / 4, 7 mean / 4), the launch
    shaped for max_context_len 2048 (the benchmark's CUDA graphs). Speed is the bytes of the real lengths."""
    max_context_len, block_size = 2048, 16
    g = torch.Generator().manual_seed(batch)
    lowest, bound = mean_context // 4, min(7 * mean_context // 4, max_context_len)
    lens = torch.randint(lowest, bound, (batch,), generator=g, dtype=torch.int32)
    kv_bytes = 2 * int(lens.sum()) * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    copies = max(1, -(-ROTATE_BYTES // kv_bytes))
    width = max_context_len // block_size
    num_blocks = copies * batch * width
    k_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").int().view(copies, batch, width)
    queries = [torch.randn(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE) for _ in range(copies)]
    lens = lens.cuda()
    out = torch.empty(batch, NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    workspace = ops.paged_attention_workspace(batch, NUM_Q_HEADS, HEAD_DIM, max_context_len, "cuda")
    turn = itertools.cycle(range(copies))

    def kernel():
        i = next(turn)
        ops.paged_attention_decode(out, queries[i], k_cache, v_cache, tables[i], lens, HEAD_DIM ** -0.5,
                                   max_context_len, workspace)

    ms = cuda_time_ms(kernel, warmup=20, iters=200)
    gbps = kv_bytes / ms / 1e6
    report(f"paged_attention_decode mixed lengths: batch {batch:>3}, contexts {lowest}-{bound - 1} "
           f"(max ctx {max_context_len}): {ms * 1e3:7.1f} us "
           f"{gbps:6.0f} GB/s ({gbps / copy_bandwidth_gbps:.1%} of copy)")
