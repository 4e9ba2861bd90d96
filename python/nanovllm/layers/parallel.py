"""Tensor-parallel rank, size and process group of the layers being built.

An engine with tensor_parallel_size > 1 builds its model inside `building_with(group)`; every layer keeps the
group it was built with, so several engines (each with its own group) can live in one process."""

import contextlib

import torch.distributed as dist

_building_group: dist.ProcessGroup | None = None


@contextlib.contextmanager
def building_with(group: dist.ProcessGroup | None):
    global _building_group
    previous, _building_group = _building_group, group
    try:
        yield
    finally:
        _building_group = previous


def tp_group() -> dist.ProcessGroup | None:
    return _building_group


def tp_rank_and_size(tp_rank: int | None, tp_size: int | None) -> tuple[int, int]:
    if tp_rank is not None and tp_size is not None:
        return tp_rank, tp_size
    if _building_group is not None:
        return _building_group.rank(), _building_group.size()
    return 0, 1


def check_shape(expected, loaded) -> None:
    """The checkpoint tensor must have the full (unsharded) shape the layer expects."""
    if tuple(expected) != tuple(loaded.shape):
        raise ValueError(f"expected shape {tuple(expected)}, checkpoint has {tuple(loaded.shape)}")
