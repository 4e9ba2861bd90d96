"""Attention over the paged KV cache: prefill (ragged causal attention of new tokens over cached prefix + new
tokens) and decode (one token per sequence: nanovllm_cpp.qk_norm_rotary_paged_attention at small batches,
nanovllm_cpp.paged_attention_decode after the prologue kernel at large ones)."""

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import nanovllm_cpp
from nanovllm.utils.context import Context, get_context

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10: the CPU path still works
    varlen_attn = None

# The varlen_attn keywords changed across torch versions: 2.10 takes is_causal=, later ones a
# window_size=(left, right) where (-1, 0) is causal, and enable_gqa= for fewer kv heads than q heads.
_VARLEN_PARAMS = set(inspect.signature(varlen_attn).parameters) if varlen_attn else set()
_VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _VARLEN_PARAMS else {"is_causal": True}
_VARLEN_GQA = "enable_gqa" in _VARLEN_PARAMS


def varlen_causal_attention(q, k, v, ctx: Context, scale: float) -> torch.Tensor:
    """GPU: flash attention over the ragged batch; a query chunk shorter than its keys is aligned to the
    end of the keys (query i of a chunk after a prefix of p tokens sees keys 0..p+i). Fewer kv heads than q
    heads are read as they are, never expanded."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _VARLEN_GQA or k.shape[1] == q.shape[1]:
        kwargs = dict(_VARLEN_CAUSAL, scale=scale, **({"enable_gqa": True} if _VARLEN_GQA else {}))
        return varlen_attn(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q, ctx.max_seqlen_k,
                           **kwargs)
    # torch < 2.12: varlen_attn refuses GQA, but the flash kernel it calls takes it natively.
    return torch.ops.aten._flash_attention_forward(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                                   ctx.max_seqlen_k, 0.0, True, False, scale=scale)[0]


def sdpa_causal_attention(q, k, v, ctx: Context, scale: float) -> torch.Tensor:
    """CPU: one SDPA per sequence with an explicit bottom-right causal mask."""
    out = torch.empty_like(q)
    q_start = k_start = 0
    for len_q, len_k in zip(ctx.seqlens_q, ctx.seqlens_k):
        qs = q[q_start: q_start + len_q].transpose(0, 1)
        ks = k[k_start: k_start + len_k].transpose(0, 1)
        vs = v[k_start: k_start + len_k].transpose(0, 1)
        rows = torch.arange(len_q, device=q.device).unsqueeze(1) + (len_k - len_q)
        mask = torch.arange(len_k, device=q.device).unsqueeze(0) <= rows
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[q_start: q_start + len_q] = o.transpose(0, 1)
        q_start += len_q
        k_start += len_k
    return out


# Decode batches up to this size take the fused prologue: its kernel fetches the cache early but holds more
# registers, which costs bandwidth once the batch fills the GPU (the skinny GEMVs stop at the same size).
FUSED_PROLOGUE_MAX_ROWS = nanovllm_cpp.SKINNY_LINEAR_MAX_ROWS


@dataclass
class QKPrologue:
    """What turns a layer's raw q/k projections into attention's inputs: per-head q/k RMSNorm weights (Qwen3;
    None for neither), the rotary cos/sin table and the norm's eps."""
    q_norm_weight: torch.Tensor | None
    k_norm_weight: torch.Tensor | None
    cos_sin_cache: torch.Tensor
    eps: float


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        # Bound by the model runner once the KV cache is allocated.
        self.k_cache = self.v_cache = torch.empty(0)
        self.workspace = torch.empty(0)
        self.max_context_len = 0

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                prologue: QKPrologue) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]: the new tokens' raw projections (strided views).
        The prologue (q/k norm, rotary, KV-cache store) runs in one launch before attention; at small decode
        batches, where each launch's latency counts, inside the decode attention kernel."""
        ctx = get_context()
        fused = not ctx.is_prefill and q.shape[0] <= FUSED_PROLOGUE_MAX_ROWS
        if not fused:  # q and k are rotated in place
            nanovllm_cpp.qk_norm_rotary_store(positions, q, k, v, prologue.q_norm_weight, prologue.k_norm_weight,
                                              prologue.cos_sin_cache, self.k_cache, self.v_cache, ctx.slot_mapping,
                                              prologue.eps)
        if ctx.is_prefill:
            if ctx.prefix_slots is not None:  # some sequence has cached tokens: take everyone's keys from the cache
                k = self.k_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.prefix_slots]
                v = self.v_cache.view(-1, self.num_kv_heads, self.head_dim)[ctx.prefix_slots]
            attend = varlen_causal_attention if q.is_cuda else sdpa_causal_attention
            return attend(q, k, v, ctx, self.scale)
        out = q.new_empty(q.shape)  # contiguous; q itself is a strided view of the qkv output
        if fused:
            nanovllm_cpp.qk_norm_rotary_paged_attention(
                out, q, k, v, positions, prologue.q_norm_weight, prologue.k_norm_weight, prologue.cos_sin_cache,
                self.k_cache, self.v_cache, ctx.slot_mapping, ctx.block_tables, ctx.context_lens, self.scale,
                self.max_context_len, self.workspace, prologue.eps)
        else:
            nanovllm_cpp.paged_attention_decode(out, q, self.k_cache, self.v_cache, ctx.block_tables,
                                                ctx.context_lens, self.scale, self.max_context_len, self.workspace)
        return out
