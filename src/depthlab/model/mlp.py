"""Dense SwiGLU feed-forward block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.model.fused import SwiGLUFunction, fused_autograd_ok


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) - the Llama/OLMo MLP."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wg, wu, wd = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if fused_autograd_ok(x, wg, wu, wd):
            # the same function with one [gate; up] matmul and a hand-written backward
            return SwiGLUFunction.apply(x, wg, wu, wd)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
