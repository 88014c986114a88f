"""Normalisation layers used by DepthLM."""

from __future__ import annotations

import torch
from torch import nn

from depthlab.model.fused import RMSNormFunction, fused_autograd_ok


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise x over its last dim in fp32, scale by `weight` (which broadcasts over
    x's trailing dims), cast back to x's dtype."""
    if fused_autograd_ok(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned gain (Llama/OLMo style), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """RMSNorm or LayerNorm (with bias), by config name."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm kind {kind!r}")
