"""Typed entry points of the nanovllm_cpp ops (schemas in csrc/torch_bindings.cpp).

Each op dispatches on its tensors' device: CUDA tensors run the hand-written kernels, CPU tensors run the
PyTorch references of nanovllm_cpp.reference. Every op writes its outputs in place and returns nothing, so
they are safe inside CUDA graphs and torch.compile (the fake implementations below do nothing).
"""

import warnings

import torch

from nanovllm_cpp import _C, reference

CUDA_ENABLED: bool = _C.CUDA_ENABLED
if not CUDA_ENABLED and torch.cuda.is_available():
    warnings.warn("nanovllm_cpp was built without its CUDA kernels (CPU-only torch or no nvcc at install time); "
                  "ops on CUDA tensors will raise. Reinstall with a CUDA build of torch: "
                  "pip install --no-build-isolation .", stacklevel=2)
_ops = torch.ops.nanovllm_cpp
_OP_NAMES = ("store_kvcache", "rms_norm", "fused_add_rms_norm", "rotary_embedding", "qk_norm_rotary_store",
             "silu_and_mul", "paged_attention_decode", "qk_norm_rotary_paged_attention", "sample_tokens",
             "skinny_linear", "silu_mul_skinny_linear", "add_rms_norm_skinny_linear",
             "rms_norm_skinny_linear", "copy_pinned", "gather_embedding")

# Most activation rows skinny_linear and silu_mul_skinny_linear take (kSkinnyLinearMaxRows in
# csrc/kernels/skinny_linear.h); larger batches belong to a GEMM.
SKINNY_LINEAR_MAX_ROWS: int = 8


def _not_built(name):
    def fail(*args, **kwargs):
        raise RuntimeError(
            f"nanovllm_cpp.{name} was called on CUDA tensors, but this build of nanovllm_cpp skipped its CUDA "
            "kernels (torch was a CPU build or nvcc was missing at install time). Reinstall with a CUDA build of "
            "torch and nvcc on PATH: pip install --no-build-isolation .")
    return fail


for _name in _OP_NAMES:
    torch.library.impl(f"nanovllm_cpp::{_name}", "CPU")(getattr(reference, _name))
    torch.library.register_fake(f"nanovllm_cpp::{_name}")(lambda *args, **kwargs: None)
    if not CUDA_ENABLED:
        torch.library.impl(f"nanovllm_cpp::{_name}", "CUDA")(_not_built(_name))


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values into the paged cache.

    key, value: [num_tokens, num_kv_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size, num_kv_heads,
    head_dim]; slot_mapping: int64 [num_tokens], slot = block * block_size + offset, -1 = skip (padding).
    """
    _ops.store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def rms_norm(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """out = x / sqrt(mean(x**2) + eps) * weight over the last dim ([tokens, hidden] or [tokens, heads, dim])."""
    _ops.rms_norm(out, x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> None:
    """In place: residual += x, then x = rms_norm(residual) * weight."""
    _ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> None:
    """NeoX (rotate-half) rotary embedding of query [tokens, q_heads, dim] and key [tokens, kv_heads, dim], in place.

    positions: int64 [tokens]; cos_sin_cache: float32 [max_position, dim], cos | sin halves
    (see reference.rotary_cos_sin_cache).
    """
    _ops.rotary_embedding(positions, query, key, cos_sin_cache)


def qk_norm_rotary_store(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None,
                         cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, eps: float) -> None:
    """The attention prologue in one launch: q/k norm per head, rotary in place, then the KV-cache store.

    If the [head_dim] norm weights are given (both, as in Qwen3; None for neither), query and key heads become
    rms_norm(head) * weight; then the NeoX rotary of query and key at positions, written back into query/key;
    then key/value go to k_cache/v_cache at slot_mapping (-1 = skip). The same as rms_norm (in place),
    rotary_embedding and store_kvcache called in turn; shapes as theirs, query/key/value may be strided views.
    """
    _ops.qk_norm_rotary_store(positions, query, key, value, q_norm_weight, k_norm_weight, cos_sin_cache, k_cache,
                              v_cache, slot_mapping, eps)


def silu_and_mul(out: torch.Tensor, x: torch.Tensor) -> None:
    """The gated MLP's activation in one pass: out [tokens, d] = silu(x[:, :d]) * x[:, d:] for x [tokens, 2 * d],
    in fp32, rounded once to the dtype."""
    _ops.silu_and_mul(out, x)


def copy_pinned(dst: torch.Tensor, src: torch.Tensor, nbytes: int) -> None:
    """dst[:nbytes] = src[:nbytes] between a CUDA and a pinned CPU buffer, either way (contiguous uint8, 16-byte
    aligned, nbytes a multiple of 16), copied by a kernel that reaches the host memory itself: no copy-engine
    transfer, so the kernels around it follow without the copy engine's hand-off (inside a CUDA graph it is a
    kernel node). Ordered on the current stream like a kernel; on CPU tensors, a copy."""
    _ops.copy_pinned(dst, src, nbytes)


def gather_embedding(out: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, rows: torch.Tensor) -> None:
    """out[r] = weight[ids[rows[r]]] in one launch: a decode step's input ids, gathered from the table of sampled
    and staged ids, looked up in the embedding. A row of zeros where rows[r] is outside ids or the id outside
    [0, vocab) (a kernel cannot raise).

    weight: contiguous [vocab, hidden] with rows of a multiple of 16 bytes; ids, rows: int64 vectors; out:
    contiguous [len(rows), hidden] of weight's dtype.
    """
    _ops.gather_embedding(out, weight, ids, rows)


def paged_attention_decode(out: torch.Tensor, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context_len: int, workspace: torch.Tensor) -> None:
    """Attention of one query token per sequence over its paged KV cache (GQA, split-K on the GPU).

    out, query: [num_seqs, num_q_heads, head_dim]; block_tables: int32 [num_seqs, max_blocks];
    context_lens: int32 [num_seqs] (0 marks a padding row, left untouched); max_context_len: host-side upper
    bound of context_lens; workspace: from paged_attention_workspace().
    """
    _ops.paged_attention_decode(out, query, k_cache, v_cache, block_tables, context_lens, scale, max_context_len,
                                workspace)


def qk_norm_rotary_paged_attention(out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                   positions: torch.Tensor, q_norm_weight: torch.Tensor | None,
                                   k_norm_weight: torch.Tensor | None, cos_sin_cache: torch.Tensor,
                                   k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                                   block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                                   max_context_len: int, workspace: torch.Tensor, eps: float) -> None:
    """Decode attention with the attention block's prologue in the same launch: qk_norm_rotary_store then
    paged_attention_decode, except that query and key (the raw projections, [num_seqs, heads, head_dim] views)
    are left as they are.

    positions, slot_mapping: int64 [num_seqs], each sequence's new token: its rotary position and its cache slot,
    which must be that of token context_lens[s] - 1 in the block table. The kernel reads the cache's older tokens
    while the kernel in front of it still runs: they must not come from an op launched just before this one.
    """
    _ops.qk_norm_rotary_paged_attention(out, query, key, value, positions, q_norm_weight, k_norm_weight,
                                        cos_sin_cache, k_cache, v_cache, slot_mapping, block_tables, context_lens,
                                        scale, max_context_len, workspace, eps)


def paged_attention_workspace_size(max_num_seqs: int, num_q_heads: int, head_dim: int, max_context_len: int) -> int:
    """float32 elements of scratch the decode kernel needs for any batch up to these bounds.

    Split-K keeps, per (sequence, query head, partition), a partial output row plus its running max and sum, and
    per (sequence, kv head) a counter of the partitions done. Partitions hold at least 64 tokens (the fused
    prologue's new token takes one more) and one launch splits into at most 4096 (sequence, partition) pairs, so
    the size is min(max_num_seqs * (ceil(max_context_len / 64) + 1), 4096) * num_q_heads * (head_dim + 3)
    (34 MB for 512 seqs x 16 heads x head_dim 128 at any context). Mirrors csrc/kernels/paged_attention.h.
    """
    min_partition_tokens, max_split_rows = 64, 4096
    rows = min(max_num_seqs * (-(-max_context_len // min_partition_tokens) + 1), max_split_rows)
    return rows * num_q_heads * (head_dim + 3)


def paged_attention_workspace(max_num_seqs: int, num_q_heads: int, head_dim: int, max_context_len: int,
                              device: torch.device | str) -> torch.Tensor:
    """Allocate once, reuse for every decode step (no allocation per call, so CUDA graphs can capture it). Zeroed:
    the split counters start at zero, and every launch leaves them there."""
    device = torch.device(device)
    if device.type != "cuda":
        return torch.empty(0, dtype=torch.float32, device=device)
    size = paged_attention_workspace_size(max_num_seqs, num_q_heads, head_dim, max_context_len)
    return torch.zeros(size, dtype=torch.float32, device=device)


def sample_tokens(out: torch.Tensor, logits: torch.Tensor, temperatures: torch.Tensor, keys: torch.Tensor) -> None:
    """One token per row of logits [rows, vocab] into out (int64 [rows]), in one pass over the logits.

    temperatures: float32 [rows], 0 = greedy (argmax); keys: int64 [rows] (< 2**32), each row's random stream:
    the same key and logits give the same token whatever else is in the batch. Ties go to the lowest id.
    """
    _ops.sample_tokens(out, logits, temperatures, keys)


def skinny_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """out[M, N] = x[M, K] @ weight[N, K]^T (torch Linear layout), fp32 accumulation, for decode batches.

    1 <= M <= SKINNY_LINEAR_MAX_ROWS, K a multiple of 8, one dtype for all three; weight contiguous, x and out
    with contiguous rows (x's row stride may be wider than K, e.g. a column slice). On the GPU it splits the
    weight over many more blocks than a GEMM's tiles would, each streaming its rows once.
    """
    _ops.skinny_linear(out, x, weight)


def silu_mul_skinny_linear(out: torch.Tensor, gate_up: torch.Tensor, weight: torch.Tensor) -> None:
    """The MLP down projection with its activation fused: out = (silu(gate) * up) @ weight^T.

    gate_up: [M, 2K] = [gate | up]; weight: [N, K]; the activation is computed in fp32 and never stored. The
    same limits as skinny_linear.
    """
    _ops.silu_mul_skinny_linear(out, gate_up, weight)


def add_rms_norm_skinny_linear(out: torch.Tensor, residual_out: torch.Tensor, x: torch.Tensor,
                               residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                               weight: torch.Tensor) -> None:
    """fused_add_rms_norm then skinny_linear in one launch, out of place: residual_out = x + residual and
    out = rms_norm(residual_out) * norm_weight @ weight^T, rounded to the dtype at the same points.

    residual and residual_out: contiguous, x's shape, residual_out apart from both inputs; norm_weight: [K]. The
    same limits as skinny_linear. Every block of the GEMV normalizes the (few) rows itself, so the norm costs no
    launch of its own.
    """
    _ops.add_rms_norm_skinny_linear(out, residual_out, x, residual, norm_weight, eps, weight)


def rms_norm_skinny_linear(out: torch.Tensor, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                           weight: torch.Tensor) -> None:
    """rms_norm then skinny_linear in one launch (the first layer's projection, with no residual yet):
    out = rms_norm(x) * norm_weight @ weight^T, the norm rounded to the dtype as rms_norm rounds it.

    norm_weight: [K]. The same limits as skinny_linear.
    """
    _ops.rms_norm_skinny_linear(out, x, norm_weight, eps, weight)
