"""Per-step attention metadata, set by the model runner around each forward (as in nano-vLLM)."""

from dataclasses import dataclass

import torch


@dataclass
class Context:
    is_prefill: bool = False
    slot_mapping: torch.Tensor | None = None    # int64 [tokens]: where each new token's K/V goes
    # Prefill: ragged batch of new tokens; keys span the cached prefix plus the new tokens.
    cu_seqlens_q: torch.Tensor | None = None    # int32 [seqs + 1]
    cu_seqlens_k: torch.Tensor | None = None    # int32 [seqs + 1]
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    seqlens_q: list[int] | None = None          # host copies, for the CPU path
    seqlens_k: list[int] | None = None
    prefix_slots: torch.Tensor | None = None    # int64 [sum seqlens_k]: set when some sequence has a prefix
    # Decode: one token per sequence.
    context_lens: torch.Tensor | None = None    # int32 [seqs]
    block_tables: torch.Tensor | None = None    # int32 [seqs, max_blocks_per_seq]


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(context: Context) -> None:
    global _CONTEXT
    _CONTEXT = context


def reset_context() -> None:
    set_context(Context())
