"""DepthLM: a decoder-only transformer whose depth and sparsity are config knobs.

Read top to bottom: `Block` (attention + SwiGLU/MoE with a chosen norm placement),
then `DepthLM` (embedding -> blocks -> final norm -> head). Each block maps the
residual stream `h -> h` on its own (it owns its causal mask and shares the rotary
table), so a generic LayerStack can run, skip, swap or replace blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig
from depthlab.model.attention import Attention, Rotary
from depthlab.model.mlp import SwiGLU
from depthlab.model.moe import Experts, MoE
from depthlab.model.norms import make_norm


class Block(nn.Module):
    """One transformer block; `layer_idx` fixes its norm placement.

    pre:    h + f(norm(h))                 (default, GPT-2/Llama)
    post:   norm(h + f(h))                 (original Transformer)
    mix:    post for the first `mix_ln_fraction` of blocks, pre after (Mix-LN)
    scaled: h + f(norm(h) / sqrt(l + 1))   (LayerNorm Scaling)
    peri:   h + norm_out(f(norm(h)))       (Peri-LN)
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.post_ln = cfg.is_post_ln(layer_idx)
        self.peri_ln = cfg.norm_placement == "peri"
        self.norm_scale = 1.0 / math.sqrt(layer_idx + 1) if cfg.norm_placement == "scaled" else 1.0
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(
            cfg.d_model, cfg.n_heads, cfg.kv_heads, rotary, cfg.qk_norm, cfg.norm, cfg.norm_eps
        )
        self.mlp_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = (
            MoE(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.d_model, cfg.hidden)
        )
        if self.peri_ln:
            self.attn_out_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
            self.mlp_out_norm = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)

    def branch_modules(self) -> dict[str, nn.Module]:
        """Modules whose forward output is each branch's update before the residual add."""
        if self.peri_ln:
            return {"attn": self.attn_out_norm, "mlp": self.mlp_out_norm}
        return {"attn": self.attn, "mlp": self.mlp}

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        # x * 1.0 is x: skip the elementwise pass (and its backward) unless LN-scaling
        return x if self.norm_scale == 1.0 else x * self.norm_scale

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            h = self.attn_norm(h + self.attn(h))
            return self.mlp_norm(h + self.mlp(h))
        a = self.attn(self._scaled(self.attn_norm(h)))
        if self.peri_ln:
            a = self.attn_out_norm(a)
        h = h + a
        m = self.mlp(self._scaled(self.mlp_norm(h)))
        if self.peri_ln:
            m = self.mlp_out_norm(m)
        return h + m


@dataclass
class LMOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    """Token-mean next-token cross-entropy (without auxiliary losses)."""
    aux_loss: torch.Tensor | None = None
    """Sum of the MoE layers' weighted auxiliary losses (training mode only)."""


class DepthLM(nn.Module):
    """Decoder-only LM: embed -> blocks -> final norm -> head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building DepthLM")
        self.cfg = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, self.rotary) for i in range(cfg.n_layers))
        self.norm_f = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight
        self.reset_parameters()

    # ---- the LayerStack view: embed, blocks[l], norm_f, head
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_embeddings(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> LMOutput:
        h = self.embed(ids)
        for block in self.blocks:
            h = block(h)
        logits = self.head(self.norm_f(h))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        aux = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return LMOutput(logits, loss, torch.stack(aux).sum() if aux else None)

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoE)]

    # ---- parameters
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise per `cfg.init` (see ModelConfig.init)."""
        std = 0.02 if self.cfg.init == "paper" else self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.init == "scaled" else std
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # norm gains are 1 and biases 0 from their constructors
            is_output = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
            nn.init.normal_(p, mean=0.0, std=out_std if is_output else std)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.reset_parameters()
            elif hasattr(m, "weight") and m.__class__.__name__ == "RMSNorm":
                m.weight.fill_(1.0)

    def num_params(self, active: bool = False, include_embeddings: bool = True) -> int:
        """Total (or per-token active, for MoE) parameter count; tied weights counted once."""
        seen: set[int] = set()
        total = 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not include_embeddings and name.startswith(("tok_embeddings", "lm_head")):
                continue
            total += p.numel()
        if active:
            for m in self.moe_layers():
                per_expert = sum(p[0].numel() for p in m.experts.parameters())
                total -= (m.num_experts - m.top_k) * per_expert
        return total


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Stacked expert weights (useful for per-matrix statistics)."""
    return [p for m in module.modules() if isinstance(m, Experts) for p in m.parameters()]
