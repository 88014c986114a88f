"""Dense SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) - the Llama/OLMo MLP."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Plain ops on purpose: a hand-written fused version (one [gate; up] matmul, custom
        # backward) measured slower on CPU than autograd over these three matmuls.
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
