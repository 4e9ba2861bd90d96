"""Tensor-parallel rank and size: from torch.distributed when it is initialized, else a single rank."""

import torch.distributed as dist


def tp_rank_and_size(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    if tp_rank is not None and tp_size is not None:
        return tp_rank, tp_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_shape(expected, loaded) -> None:
    """The checkpoint tensor must have the full (unsharded) shape the layer expects."""
    if tuple(expected) != tuple(loaded.shape):
        raise ValueError(f"expected shape {tuple(expected)}, checkpoint has {tuple(loaded.shape)}")
