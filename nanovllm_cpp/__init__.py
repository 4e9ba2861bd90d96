"""nanovllm_cpp: the compiled core of nano-vLLM C++.

- BlockAllocator: the paged KV cache's block manager with prefix caching (C++, pybind11).
- store_kvcache, rms_norm, fused_add_rms_norm, rotary_embedding, paged_attention_decode: torch ops
  (torch.ops.nanovllm_cpp.*) with hand-written CUDA kernels and PyTorch references on the CPU.
- CUDA_ENABLED: False when the build skipped the CUDA kernels (CPU-only torch or no nvcc).
"""

import torch  # noqa: F401  (loads libtorch before the extension that links it)

from nanovllm_cpp._C import AllocatorStats, BlockAllocator, OutOfBlocksError
from nanovllm_cpp.ops import (
    CUDA_ENABLED,
    fused_add_rms_norm,
    paged_attention_decode,
    paged_attention_workspace,
    paged_attention_workspace_size,
    rms_norm,
    rotary_embedding,
    store_kvcache,
)

__all__ = [
    "AllocatorStats", "BlockAllocator", "OutOfBlocksError", "CUDA_ENABLED", "fused_add_rms_norm",
    "paged_attention_decode", "paged_attention_workspace", "paged_attention_workspace_size", "rms_norm",
    "rotary_embedding", "store_kvcache",
]
