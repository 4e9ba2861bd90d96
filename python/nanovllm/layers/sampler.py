"""Sampling on the device: greedy, temperature, top-k, top-p, with per-request seeds.

Random draws come from a counter-based hash of (request seed, token index, vocabulary id) instead of a
global generator, so a request's tokens do not depend on what else is in the batch. Sampling from
softmax(logits) is done as argmax(probs / Exp(1) noise), which needs one uniform per vocabulary entry.
"""

import torch
from torch import nn

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) on int64 lanes holding values < 2**32."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """float32 [rows, vocab] in (0, 1), a pure function of each row's int64 key (< 2**32)."""
    vocab = torch.arange(vocab_size, device=keys.device, dtype=torch.int64)
    bits = _mix32(_mix32(keys).unsqueeze(1) ^ ((vocab * 0x9E3779B1) & _MASK32))
    return (bits.float() + 0.5) / 4294967296.0


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor,
                keys: torch.Tensor, all_greedy: bool, filtered: bool) -> torch.Tensor:
        """logits float32 [n, vocab]; temperatures [n] (0 = greedy); top_ks int64 [n] (vocab = off);
        top_ps [n]; keys int64 [n]: per-row random stream. Returns int64 [n] token ids."""
        greedy = logits.argmax(-1)
        if all_greedy:
            return greedy
        scaled = logits / temperatures.clamp(min=1e-5).unsqueeze(1)
        if filtered:
            scaled = self._top_k_top_p(scaled, top_ks, top_ps)
        probs = scaled.softmax(-1)
        noise = -torch.log(uniform_noise(keys, logits.shape[1]))
        sampled = (probs / noise).argmax(-1)
        return torch.where(temperatures == 0, greedy, sampled)

    @staticmethod
    def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
        sorted_logits, order = logits.sort(-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
        sorted_logits = sorted_logits.masked_fill(ranks >= top_ks.unsqueeze(1), float("-inf"))
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
        sorted_logits = sorted_logits.masked_fill(probs.cumsum(-1) - probs >= top_ps.unsqueeze(1), float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
