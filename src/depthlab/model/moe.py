"""Mixture-of-experts SwiGLU layer with a softmax top-k router.

Routing: `probs = softmax(router(x))` over all experts, the top-k experts per token
are run and mixed with their probabilities (renormalised to sum to 1 when
`renormalize`). Auxiliary losses use the same weights in every layer: the
Switch-style load-balancing loss `E * sum_e f_e * P_e` and the router z-loss
`mean(logsumexp(logits)^2)` (ST-MoE). The paper's published code divides these
weights by the number of layers inside each layer; depthlab does not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.config import MoEConfig
from depthlab.model.mlp import SwiGLU


@dataclass
class Routing:
    """What the router decided for a flat batch of tokens."""

    logits: torch.Tensor  # [N, E] router logits (fp32)
    probs: torch.Tensor  # [N, E] softmax over all experts
    weights: torch.Tensor  # [N, k] mixing weights of the chosen experts
    experts: torch.Tensor  # [N, k] chosen expert indices


class Experts(nn.Module):
    """E independent SwiGLU experts stored as stacked weights [E, ...]."""

    def __init__(self, num_experts: int, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.up_proj = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(x @ self.gate_proj[e].t()) * (x @ self.up_proj[e].t())
        return h @ self.down_proj[e].t()


class MoE(nn.Module):
    """Token-choice top-k MoE replacing the dense MLP of a block."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.renormalize = cfg.renormalize
        self.lb_loss_weight = cfg.lb_loss_weight
        self.z_loss_weight = cfg.z_loss_weight
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_hidden)
        self.shared_expert = (
            SwiGLU(d_model, cfg.shared_expert_hidden or cfg.expert_hidden)
            if cfg.shared_expert
            else None
        )
        self.aux_loss: torch.Tensor | None = None

    def route(self, x_flat: torch.Tensor) -> Routing:
        """Route tokens [N, d]; exactly the computation of the forward pass."""
        logits = self.router(x_flat).float()
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, weights=weights, experts=experts)

    def aux_losses(self, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, router z-loss), unweighted."""
        n_tokens = r.experts.shape[0]
        counts = torch.zeros(self.num_experts, device=r.probs.device)
        counts.index_add_(0, r.experts.flatten(), torch.ones_like(r.experts.flatten(), dtype=counts.dtype))
        frac = counts / (n_tokens * self.top_k)
        lb = self.num_experts * (frac * r.probs.mean(dim=0)).sum()
        z = torch.logsumexp(r.logits, dim=-1).pow(2).mean()
        return lb, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        r = self.route(x_flat)
        out = torch.zeros_like(x_flat)
        flat_expert = r.experts.flatten()
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        w_sorted = r.weights.flatten()[order].to(x.dtype).unsqueeze(-1)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = token_of[start : start + n]
            y = self.experts.forward_expert(e, x_flat[idx]) * w_sorted[start : start + n]
            out.index_add_(0, idx, y)
            start += n
        if self.shared_expert is not None:
            out = out + self.shared_expert(x_flat)
        if self.training:
            lb, z = self.aux_losses(r)
            self.aux_loss = self.lb_loss_weight * lb + self.z_loss_weight * z
        else:
            self.aux_loss = None
        return out.view(shape)
