"""Tensor-parallel layers: the shards two ranks load from a checkpoint tensor reassemble to the one-rank layer
(checked on the CPU without torch.distributed by passing tp_rank / tp_size explicitly)."""

import pytest
import torch
import torch.nn.functional as F

from nanovllm.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from nanovllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear


def test_qkv_shards_split_heads():
    torch.manual_seed(0)
    x = torch.randn(3, 64)
    weights = {"q": torch.randn(4 * 16, 64), "k": torch.randn(2 * 16, 64), "v": torch.randn(2 * 16, 64)}

    def build(rank, size):
        layer = QKVParallelLinear(64, 16, num_heads=4, num_kv_heads=2, tp_rank=rank, tp_size=size)
        for shard, w in weights.items():
            layer.weight_loader(layer.weight, w, shard)
        return layer(x)
    full = build(0, 1)
    ranks = [build(r, 2) for r in range(2)]
    q = torch.cat([o[:, :32] for o in ranks], 1)
    k = torch.cat([o[:, 32:48] for o in ranks], 1)
    v = torch.cat([o[:, 48:] for o in ranks], 1)
    assert torch.equal(torch.cat([q, k, v], 1), full)


def test_gate_up_and_row_parallel_shards():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    gate, up, down, bias = torch.randn(48, 32), torch.randn(48, 32), torch.randn(32, 48), torch.randn(32)

    def mlp(rank, size):
        gate_up = MergedColumnParallelLinear(32, [48, 48], tp_rank=rank, tp_size=size)
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        row = RowParallelLinear(48, 32, bias=True, tp_rank=rank, tp_size=size)
        row.weight_loader(row.weight, down)
        row.weight_loader(row.bias, bias)
        g, u = gate_up(x).chunk(2, -1)
        # RowParallelLinear.forward would all-reduce; sum the partial outputs by hand instead.
        return F.linear(F.silu(g) * u, row.weight, row.bias if rank == 0 else None)
    assert torch.allclose(mlp(0, 2) + mlp(1, 2), mlp(0, 1), atol=1e-5)


def test_vocab_parallel_embedding_and_head():
    torch.manual_seed(0)
    table = torch.randn(10, 8)  # 10 rows over 2 ranks: 5 each
    ids = torch.tensor([0, 4, 5, 9])
    shards = []
    for rank in range(2):
        emb = VocabParallelEmbedding(10, 8, tp_rank=rank, tp_size=2)
        emb.weight_loader(emb.weight, table)
        shards.append(emb.weight.detach())
    assert torch.equal(torch.cat(shards), table)
    head = ParallelLMHead(10, 8, tp_rank=0, tp_size=1)
    head.weight_loader(head.weight, table)
    hidden = torch.randn(2, 8)
    assert torch.allclose(head(hidden), hidden @ table.T)
    emb = VocabParallelEmbedding(10, 8, tp_rank=0, tp_size=1)
    emb.weight_loader(emb.weight, table)
    assert torch.equal(emb(ids), table[ids])


def test_shape_mismatch_names_the_expected_shape():
    layer = RowParallelLinear(48, 32, tp_rank=1, tp_size=2)
    with pytest.raises(ValueError, match=r"expected shape \(32, 48\), checkpoint has \(32, 40\)"):
        layer.weight_loader(layer.weight, torch.randn(32, 40))
