"""Sampling on the device: greedy, temperature, top-k, top-p, with per-request seeds.

Random draws come from a counter-based hash of (request seed, token index, vocabulary id) instead of a
global generator, so a request's tokens do not depend on what else is in the batch. Sampling from
softmax(logits / T) is done as the Gumbel-max argmax(logits / T - log(-log(u))), which the sample_tokens op
computes in one pass over the logits (hand-written kernel on the GPU, its PyTorch reference on the CPU).
"""

import torch
from torch import nn

from nanovllm_cpp import ops


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                keys: torch.Tensor, filtered: bool, out: torch.Tensor | None = None) -> torch.Tensor:
        """logits [n, vocab]; temperatures float32 [n] (0 = greedy); top_ks int64 [n] (vocab = off);
        top_ps [n]; keys int64 [n]: per-row random stream. Returns int64 [n] token ids (written into out if
        given). Without filtered, top_ks and top_ps are not read."""
        tokens = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device) if out is None else out
        if not filtered:
            ops.sample_tokens(tokens, logits, temperatures, keys)
            return tokens
        # Rare path: filter the scaled logits by sorting, then sample them at temperature 1 (greedy rows keep 0).
        greedy = temperatures == 0
        scaled = self._top_k_top_p(logits.float() / torch.where(greedy, 1.0, temperatures).unsqueeze(1), top_ks,
                                   top_ps)
        ops.sample_tokens(tokens, scaled, greedy.logical_not().float(), keys)
        tokens.copy_(torch.where(greedy, logits.argmax(-1), tokens))
        return tokens
    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_ks.unsqueeze(1), float("-inf"))
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_ps.unsqueeze(1), float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
