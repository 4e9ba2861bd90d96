"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import nanovllm_cpp
from nanovllm.layers.linear import linear
from nanovllm.layers.parallel import check_shape, tp_group, tp_rank_and_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.tp_group = tp_group()
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // self.tp_size)
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        check_shape((self.vocab_size, param.shape[1]), loaded)
        shard = loaded[self.vocab_start: self.vocab_start + self.shard_size]
        param.data[: shard.shape[0]].copy_(shard)
        param.data[shard.shape[0]:].zero_()  # the last rank's padding rows

    def forward(self, input_ids: torch.Tensor, id_rows: torch.Tensor | None = None) -> torch.Tensor:
        """The embeddings of input_ids, or of input_ids[id_rows] when id_rows is given (one launch on the GPU)."""
        row_bytes = self.weight.shape[1] * self.weight.element_size()
        if id_rows is not None and self.tp_size == 1 and self.weight.is_cuda and row_bytes % 16 == 0:
            out = self.weight.new_empty(id_rows.shape[0], self.weight.shape[1])
            nanovllm_cpp.gather_embedding(out, self.weight, input_ids, id_rows)
            return out
        if id_rows is not None:
            input_ids = input_ids.index_select(0, id_rows)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local.clamp(0, self.shard_size - 1), self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y, group=self.tp_group)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    # Most rows for which the skinny kernel beats cuBLAS (and the memset before its GEMM) in a decode graph
    # (measured on an H200).
    skinny_max_rows = 1

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the full vocabulary (gathered across ranks), [tokens, vocab] in the model's dtype (a view
        with the padded row stride: the sampler reads it as it is)."""
        logits = linear(hidden, self.weight, None, self.skinny_max_rows)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits, group=self.tp_group)
            logits = torch.cat(parts, -1)
        return logits[:, : self.vocab_size]
