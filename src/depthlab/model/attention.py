"""Causal self-attention with rotary embeddings, GQA and optional QK-norm.

Keys/values keep `n_kv_heads` heads in memory; PyTorch SDPA's `enable_gqa` shares
each K/V head across its group of `G = n_heads / n_kv_heads` query heads (except fp32 on
CUDA, where `causal_attention` repeats them: see there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.model.fused import QKVRopeFunction, RotaryFunction, fused_autograd_ok
from depthlab.model.norms import RMSNorm, make_norm, rms_norm


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
        self._freqs_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def freqs_cis(self, T: int, n_heads: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(e^{i t w_j}, e^{-i t w_j}) tiled over heads: complex [T, n_heads * head_dim / 2],
        for features stored in interleaved pairs (see Attention._qkv)."""
        if T > self.cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cos.shape[0]}")
        key = (T, n_heads, dtype, self.cos.device, self.cos.data_ptr())
        hit = self._freqs_cache.get(key)
        if hit is None:
            half = self.cos.shape[1] // 2
            cos = self.cos[:T, :half].to(dtype)
            sin = self.sin[:T, :half].to(dtype)
            hit = (torch.complex(cos, sin).repeat(1, n_heads),
                   torch.complex(cos, -sin).repeat(1, n_heads))
            if len(self._freqs_cache) > 16:
                self._freqs_cache.clear()
            self._freqs_cache[key] = hit
        return hit

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

    def rotate_bthd(self, x: torch.Tensor) -> torch.Tensor:
        """Same rotation for x of shape [B, T, heads, head_dim] (positions 0..T-1)."""
        T = x.shape[-3]
        if T > self.cos.shape[0]:
            raise ValueError(f"sequence length {T} exceeds max_seq_len {self.cos.shape[0]}")
        cos = self.cos[:T, None].to(x.dtype)
        if fused_autograd_ok(x):
            sin_half = self.sin[:T, None, : x.shape[-1] // 2].to(x.dtype)
            return RotaryFunction.apply(x, cos, sin_half)
        sin = self.sin[:T, None].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin


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
        # Training fast path (_qkv_interleaved): q/k features in interleaved RoPE pairs
        # (2j, 2j + 1) instead of halves (j, j + head_dim / 2), by permuting the q/k weight
        # rows (and QK-norm gains) at call time. The same permutation of q and k leaves q.k,
        # hence the attention output, unchanged; parameters and checkpoints keep the
        # half-split layout.

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd], k and v [B, H_kv, T, hd] (normed and rotated as configured).

        One matmul with the q/k/v weights concatenated per call (the parameters stay
        separate); QK-norm and RoPE run on q and k together in [B, T, heads, hd] layout.
        """
        if self._interleaved_ok(x):
            return self._qkv_interleaved(x)
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        qk, v = F.linear(x, w).view(B, T, H + 2 * Hkv, hd).split([H + Hkv, Hkv], dim=2)
        if self.q_norm is not None:
            qk = self._qk_norm(qk)
        q, k = self.rotary.rotate_bthd(qk).split([H, Hkv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _interleaved_ok(self, x: torch.Tensor) -> bool:
        return (
            x.dtype in (torch.float32, torch.float64)
            and not torch.is_autocast_enabled(x.device.type)
            and fused_autograd_ok(x, self.q_proj.weight)
            and (self.q_norm is None or self._rms_qk_norm())
        )

    def _rms_qk_norm(self) -> bool:
        qn, kn = self.q_norm, self.k_norm
        return isinstance(qn, RMSNorm) and isinstance(kn, RMSNorm) and qn.eps == kn.eps

    def _qkv_interleaved(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        B, T, _ = x.shape
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        d = x.shape[-1]

        def pairs(w: torch.Tensor, n: int) -> torch.Tensor:  # [n*hd, ...] -> [n, hd/2, 2, ...]
            return w.view(n, 2, hd // 2, *w.shape[1:]).transpose(1, 2)

        w = torch.cat([
            pairs(self.q_proj.weight, H), pairs(self.k_proj.weight, Hkv),
            self.v_proj.weight.view(Hkv, hd // 2, 2, d),  # v keeps its order
        ]).view(-1, d)
        qkv = F.linear(x, w).view(B, T, H + 2 * Hkv, hd)
        freqs, freqs_conj = self.rotary.freqs_cis(T, H + Hkv, qkv.dtype)
        gains, eps = None, 0.0
        if self.q_norm is not None:
            qn, kn = self.q_norm, self.k_norm
            gains = torch.cat([
                pairs(qn.weight, 1).expand(H, -1, -1), pairs(kn.weight, 1).expand(Hkv, -1, -1)
            ]).view(H + Hkv, hd).to(qkv.dtype)
            eps = qn.eps
        q, k, v = QKVRopeFunction.apply(qkv, gains, freqs, freqs_conj, H, Hkv, eps)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _qk_norm(self, qk: torch.Tensor) -> torch.Tensor:
        H, Hkv = self.n_heads, self.n_kv_heads
        qn, kn = self.q_norm, self.k_norm
        if self._rms_qk_norm():
            # per-head gains [H + H_kv, hd]: one norm call for all q and k heads
            w = torch.cat([qn.weight.expand(H, -1), kn.weight.expand(Hkv, -1)])
            return rms_norm(qk, w, qn.eps)
        q, k = qk.split([H, Hkv], dim=2)
        return torch.cat([qn(q), kn(k)], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self._qkv(x)
        return self.o_proj(causal_attention(q, k, v).transpose(1, 2).reshape(B, T, -1))

    @torch.no_grad()
    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """Explicit causal attention weights [B, n_heads, T, T] for input x (for diagnostics)."""
        q, k, _ = self._qkv(x)
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / self.head_dim**0.5
        T = x.shape[1]
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return scores.masked_fill(mask, float("-inf")).softmax(-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of q [B, H, T, hd] over k, v [B, H_kv, T, hd], GQA without repeated
    K/V in memory. Except in fp32/fp64 on CUDA: there only flash takes `enable_gqa`, and it
    needs fp16/bf16, so SDPA would silently take the math kernel (a [B, H, T, T] score
    matrix: 1 GiB per sequence and layer at T=4096, H=16); repeating K/V keeps the
    memory-efficient kernel."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and q.is_cuda and q.dtype not in (torch.float16, torch.bfloat16):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        groups = 1
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=groups > 1)
