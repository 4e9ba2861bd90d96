"""nanovllm_cpp: the compiled core of nano-vLLM C++.

- BlockAllocator: the paged KV cache's block manager with prefix caching (C++, pybind11).
- store_kvcache, rms_norm, fused_add_rms_norm, rotary_embedding, qk_norm_rotary_store, silu_and_mul,
  paged_attention_decode (and qk_norm_rotary_paged_attention, decode with the attention prologue fused in), the skinny
  decode GEMVs (skinny_linear, silu_mul_skinny_linear, add_rms_norm_skinny_linear, rms_norm_skinny_linear),
  copy_pinned (pinned host memory to or from the device by a kernel: a step's staged inputs and sampled tokens),
  gather_embedding (a decode step's input-id gather and embedding lookup in one launch): torch ops
  (torch.ops.nanovllm_cpp.*) with hand-written CUDA kernels and PyTorch references on the CPU.
- CUDA_ENABLED: False when the build skipped the CUDA kernels (CPU-only torch or no nvcc).
"""

import importlib.machinery
import os
import sys

import torch  # noqa: F401  (loads libtorch before the extension that links it)


def _find_compiled_core() -> None:
    """Run from a source checkout (`python example.py` at the repo root), this folder shadows the installed
    package and has no compiled _C: borrow the installed copy's."""
    here = os.path.dirname(os.path.abspath(__file__))
    if importlib.machinery.PathFinder.find_spec("_C", [here]) is not None:
        return
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or "."), "nanovllm_cpp")
        if candidate != here and importlib.machinery.PathFinder.find_spec("_C", [candidate]) is not None:
            __path__.append(candidate)
            return
    raise ImportError("nanovllm_cpp._C (the compiled core) is not built or installed: run "
                      "`pip install --no-build-isolation .` in the repository")


_find_compiled_core()

from nanovllm_cpp._C import AllocatorStats, BlockAllocator, OutOfBlocksError
from nanovllm_cpp.ops import (
    CUDA_ENABLED,
    SKINNY_LINEAR_MAX_ROWS,
    add_rms_norm_skinny_linear,
    copy_pinned,
    fused_add_rms_norm,
    gather_embedding,
    paged_attention_decode,
    paged_attention_workspace,
    paged_attention_workspace_size,
    qk_norm_rotary_paged_attention,
    qk_norm_rotary_store,
    rms_norm,
    rms_norm_skinny_linear,
    rotary_embedding,
    silu_and_mul,
    silu_mul_skinny_linear,
    skinny_linear,
    store_kvcache,
)

__all__ = [
    "AllocatorStats", "BlockAllocator", "OutOfBlocksError", "CUDA_ENABLED", "add_rms_norm_skinny_linear",
    "copy_pinned", "fused_add_rms_norm", "gather_embedding",
    "paged_attention_decode", "paged_attention_workspace", "paged_attention_workspace_size",
    "qk_norm_rotary_paged_attention", "qk_norm_rotary_store",
    "rms_norm", "rms_norm_skinny_linear", "rotary_embedding", "silu_and_mul", "silu_mul_skinny_linear", "skinny_linear",
    "SKINNY_LINEAR_MAX_ROWS", "store_kvcache",
]
