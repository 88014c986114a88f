"""Causal self-attention with rotary embeddings, GQA and optional QK-norm.

Keys/values keep `n_kv_heads` heads in memory; PyTorch SDPA's `enable_gqa` shares
each K/V head across its group of `G = n_heads / n_kv_heads` query heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.model.norms import make_norm


class Rotary(nn.Module):
    """Rotary position embedding tables, shared by all blocks (half-split layout)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Rotate x of shape [B, H, T, head_dim] by its positions 0..T-1."""
        T = x.shape[-2]
        if T > self.cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cos.shape[0]}")
        cos = self.cos[:T].to(x.dtype)
        sin = self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head / grouped-query causal attention."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        rotary: Rotary,
        qk_norm: bool = False,
        norm_kind: str = "rmsnorm",
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.q_norm = make_norm(norm_kind, self.head_dim, norm_eps) if qk_norm else None
        self.k_norm = make_norm(norm_kind, self.head_dim, norm_eps) if qk_norm else None
        # Not a submodule: one Rotary is shared by every block of the model.
        object.__setattr__(self, "rotary", rotary)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary(q), self.rotary(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit causal attention weights [B, n_heads, T, T] for input x (for diagnostics)."""
        q, k, _ = self._qkv(x)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1)
