"""Linear layers that split across tensor-parallel ranks; each parameter's weight_loader takes the full
checkpoint tensor and copies this rank's shard (checking shapes)."""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import nanovllm_cpp
from nanovllm.layers.parallel import check_shape, tp_group, tp_rank_and_size


def _divide(n: int, d: int, what: str) -> int:
    if n % d:
        raise ValueError(f"{what}={n} is not divisible by tensor_parallel_size={d}")
    return n // d


def skinny_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, max_rows: int) -> bool:
    """A decode batch of at most max_rows rows on the GPU runs the skinny kernel instead of a GEMM: a GEMM has too
    few output tiles at these sizes to keep every SM reading weights, and the kernel's weight stream starts before
    the kernel in front of it has finished (programmatic dependent launch)."""
    return x.is_cuda and bias is None and weight.shape[1] % 8 == 0 and 0 < x.shape[0] <= max_rows


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, skinny_max_rows: int) -> torch.Tensor:
    """F.linear(x, weight, bias), by the skinny kernel up to skinny_max_rows rows."""
    if not skinny_applies(x, weight, bias, skinny_max_rows):
        return F.linear(x, weight, bias)
    y = x.new_empty(x.shape[0], weight.shape[0])
    nanovllm_cpp.skinny_linear(y, x, weight)
    return y


def add_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm, proj: "LinearBase"):
    """(proj(norm(x + residual)), x + residual) for an RMSNorm `norm` and a linear layer whose output needs no
    reduction; without a residual, (proj(norm(x)), x). Where the skinny kernel applies, one launch does the add,
    the norm and the projection (the new residual out of place)."""
    if not skinny_applies(x, proj.weight, proj.bias, proj.skinny_max_rows):
        if residual is None:
            return proj(norm(x)), x
        hidden, residual = norm(x, residual)
        return proj(hidden), residual
    y = x.new_empty(x.shape[0], proj.weight.shape[0])
    if residual is None:
        nanovllm_cpp.rms_norm_skinny_linear(y, x, norm.weight, norm.eps, proj.weight)
        return y, x
    residual_out = torch.empty_like(residual)
    nanovllm_cpp.add_rms_norm_skinny_linear(y, residual_out, x, residual, norm.weight, norm.eps, proj.weight)
    return y, residual_out


class LinearBase(nn.Module):
    """tp_dim: the weight dim split across ranks (0 = output features, 1 = input features). A bias is split
    with the output features and replicated otherwise."""

    # Most rows for which the skinny kernel beats cuBLAS in a decode graph (measured on an H200): every row count it
    # takes where K is 2-3x the hidden size (o_proj, down), up to 2 where K is the hidden size (qkv, gate_up).
    skinny_max_rows = nanovllm_cpp.SKINNY_LINEAR_MAX_ROWS

    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int,
                 tp_rank: int | None = None, tp_size: int | None = None):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank_and_size(tp_rank, tp_size)
        self.tp_group = tp_group()
        self.tp_dim = tp_dim
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        split = param.dim() > self.tp_dim  # a row-parallel bias (1-D) is replicated
        full = list(param.shape)
        if split:
            full[self.tp_dim] *= self.tp_size
        check_shape(full, loaded)
        if split:
            size = param.shape[self.tp_dim]
            loaded = loaded.narrow(self.tp_dim, self.tp_rank * size, size)
        param.data.copy_(loaded[:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.skinny_max_rows)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication."""
    skinny_max_rows = 2

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **tp):
        rank_size = tp_rank_and_size(tp.get("tp_rank"), tp.get("tp_size"))[1]
        super().__init__(input_size, _divide(output_size, rank_size, "output features"), bias, 0, **tp)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (gate_up); shard_id = index."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, **tp):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, **tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        self._load_slice(param, loaded, offset, size, self.output_sizes[shard_id])

    def _load_slice(self, param, loaded, offset: int, size: int, full_size: int) -> None:
        expected = (full_size, *param.shape[1:])
        check_shape(expected, loaded)
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused; heads split across ranks (kv heads replicated when fewer than ranks)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 **tp):
        tp_size = tp_rank_and_size(tp.get("tp_rank"), tp.get("tp_size"))[1]
        self.head_dim = head_dim
        self.num_heads = _divide(num_heads, tp_size, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // num_kv_heads)
        sizes = [self.num_heads * head_dim * tp_size, self.num_kv_heads * head_dim * tp_size,
                 self.num_kv_heads * head_dim * tp_size]
        super().__init__(hidden_size, sizes, bias, **tp)
        self.total_kv_size = num_kv_heads * head_dim

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            self._load_slice(param, loaded, 0, q, q * self.tp_size)
            return
        offset = q if shard_id == "k" else q + kv
        check_shape((self.total_kv_size, *param.shape[1:]), loaded)
        start = (self.tp_rank // self.kv_replicas) * kv
        param.data.narrow(0, offset, kv).copy_(loaded.narrow(0, start, kv))


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce (bias added once)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, **tp):
        rank_size = tp_rank_and_size(tp.get("tp_rank"), tp.get("tp_size"))[1]
        super().__init__(_divide(input_size, rank_size, "input features"), output_size, bias, 1, **tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(linear(x, self.weight, self.bias if self.tp_rank == 0 else None, self.skinny_max_rows))

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """self(silu(gate) * up) for the fused [tokens, 2 * input] gate_up projection."""
        if skinny_applies(gate_up, self.weight, self.bias, self.skinny_max_rows):
            y = gate_up.new_empty(gate_up.shape[0], self.weight.shape[0])
            nanovllm_cpp.silu_mul_skinny_linear(y, gate_up, self.weight)
            return self._reduce(y)
        activated = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
        nanovllm_cpp.silu_and_mul(activated, gate_up)
        return self.forward(activated)

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        if self.tp_size > 1:
            dist.all_reduce(y, group=self.tp_group)
        return y
