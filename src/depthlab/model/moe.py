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
from depthlab.model.fused import (
    ExpertsFunction,
    TopKRoutingFunction,
    fused_autograd_ok,
    grouped_mm_available,
)
from depthlab.model.mlp import SwiGLU


@dataclass
class Routing:
    """What the router decided for a flat batch of tokens."""

    logits: torch.Tensor  # [N, E] router logits (fp32)
    probs: torch.Tensor  # [N, E] softmax over all experts
    weights: torch.Tensor  # [N, k] mixing weights of the chosen experts
    experts: torch.Tensor  # [N, k] chosen expert indices
    lse: torch.Tensor | None = None  # [N] logsumexp(logits) when already computed


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
        if fused_autograd_ok(logits):
            probs, weights, experts, lse = TopKRoutingFunction.apply(
                logits, self.top_k, self.renormalize
            )
            return Routing(logits=logits, probs=probs, weights=weights, experts=experts, lse=lse)
        probs = logits.softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return Routing(logits=logits, probs=probs, weights=weights, experts=experts)

    def aux_losses(self, r: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        """(load-balancing loss, router z-loss), unweighted."""
        return self._aux_losses(r, self._expert_counts(r.experts.flatten()))

    def _expert_counts(self, flat_experts: torch.Tensor) -> torch.Tensor:
        """Assignments per expert [E] (int64), without a device sync."""
        if flat_experts.device.type == "cpu":
            return torch.bincount(flat_experts, minlength=self.num_experts)
        counts = flat_experts.new_zeros(self.num_experts)
        return counts.index_add_(0, flat_experts, torch.ones_like(flat_experts))

    def _aux_losses(self, r: Routing, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_tokens = r.experts.shape[0]
        frac = counts.to(r.probs.dtype) / (n_tokens * self.top_k)
        lb = self.num_experts * (frac * r.probs.mean(dim=0)).sum()
        lse = r.lse if r.lse is not None else torch.logsumexp(r.logits, dim=-1)
        z = lse.pow(2).mean()
        return lb, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_flat = x.reshape(-1, shape[-1])
        r = self.route(x_flat)
        flat_expert = r.experts.flatten()
        counts = self._expert_counts(flat_expert)
        ex = self.experts
        if fused_autograd_ok(x_flat, ex.gate_proj, ex.up_proj, ex.down_proj):
            out = self._forward_grouped(x_flat, r, flat_expert, counts)
        else:
            out = self._forward_loop(x_flat, r, flat_expert, counts)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x_flat)
        if self.training:
            lb, z = self._aux_losses(r, counts)
            self.aux_loss = self.lb_loss_weight * lb + self.z_loss_weight * z
        else:
            self.aux_loss = None
        return out.view(shape)

    def _forward_grouped(self, x_flat: torch.Tensor, r: Routing, flat_expert: torch.Tensor,
                         counts: torch.Tensor) -> torch.Tensor:
        """Training path: sort the (token, slot) pairs by expert once, run all experts as
        grouped matmuls and mix each token's k outputs, all in one autograd node."""
        with torch.no_grad():
            order = flat_expert.argsort(stable=True)
            inv = torch.empty_like(order)
            inv[order] = torch.arange(order.numel(), device=order.device)
            token_of = order // self.top_k
            offs = counts.cumsum(0).to(torch.int32)
            # host-side counts only where the grouped matmul kernel is missing
            counts_list = None if grouped_mm_available() else counts.tolist()
        ex = self.experts
        out = ExpertsFunction.apply(x_flat, r.weights, ex.gate_proj, ex.up_proj, ex.down_proj,
                                    token_of, order, inv, offs, counts_list)
        return out.to(x_flat.dtype)

    def _forward_loop(self, x_flat: torch.Tensor, r: Routing, flat_expert: torch.Tensor,
                      counts: torch.Tensor) -> torch.Tensor:
        """Reference path (no backward wanted, or under torch.func transforms)."""
        out = torch.zeros_like(x_flat)
        order = flat_expert.argsort(stable=True)
        token_of = order // self.top_k
        w_sorted = r.weights.flatten()[order].to(x_flat.dtype).unsqueeze(-1)
        start = 0
        for e, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            idx = token_of[start : start + n]
            y = self.experts.forward_expert(e, x_flat[idx]) * w_sorted[start : start + n]
            out.index_add_(0, idx, y)
            start += n
        return out
