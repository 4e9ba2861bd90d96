import torch
from torch import nn

import nanovllm_cpp


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: rms_norm(x). With it: (rms_norm(x + residual), x + residual), updated in place."""
        if residual is None:
            out = torch.empty_like(x)
            nanovllm_cpp.rms_norm(out, x, self.weight, self.eps)
            return out
        nanovllm_cpp.fused_add_rms_norm(x, residual, self.weight, self.eps)
        return x, residual
