"""MoE routing statistics (metrics.md section 7).

Routing is read from the real forward pass: a forward hook on each MoE layer's
router (`stack.moe_router(l).router`) sees exactly the tensor that is routed and
the router's logits (its output; in a tuple, the first element, or the second for
Llama 4's (scores, logits)). The chosen experts are the router's own index output when
it returns one (an integer tensor with `top_k` columns: the Hugging Face routers whose
group limits and balancing biases are thereby honoured), else the top-k of
`softmax(logits)` (the rule of DepthLM's router, and of Llama 4's). Per MoE layer:

- fraction of tokens routed to each expert e: `n_e / tokens`, where `n_e` counts the
  tokens whose top-k includes e (so the fractions sum to k);
- load imbalance `max_e n_e / mean_e n_e` (1 = perfectly balanced);
- activation sparsity `k / E`;
- router entropy: mean over tokens of the entropy (nats) of `softmax(logits)` (for the
  sigmoid routers of DeepSeek-V3, GLM-4-MoE(-Lite), dots.llm1, MiniMax-M2 and Llama 4, of
  `sigmoid(logits)` normalised to sum to 1), also divided by `log E`;
- expert importance: the loss increase when the layer's whole MoE sublayer output
  is zeroed (`stack.moe_router(l).mlp`, which includes any shared expert), measured
  by rerunning from the cached h_l with a forward hook that zeroes that output.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from depthlab.probe.metrics._common import (
    DEFAULT_BATCH_SIZE,
    BlockCounter,
    HiddenStateCache,
    MetricResult,
    Progress,
    ProgressFn,
    check_ids,
    chunk_bounds,
    cost_dict,
    counting,
    hidden_states,
    loss_sum,
    mean_or_none,
    model_info,
    n_pred_tokens,
)


@dataclass(kw_only=True)
class MoEResult(MetricResult):
    moe_layers: list[int]
    """Indices of the blocks with an MoE sublayer; per-layer lists follow this order."""
    num_experts: list[int]
    top_k: list[int]
    tokens: int
    """Tokens routed per layer (N*T)."""
    expert_counts: list[list[int]]
    """n_e: tokens whose top-k includes expert e."""
    fraction_routed: list[list[float]]
    """n_e / tokens (sums to k over experts)."""
    load_imbalance: list[float]
    """max_e n_e / mean_e n_e."""
    activation_sparsity: list[float]
    """k / E."""
    router_entropy: list[float]
    """Mean over tokens of the entropy (nats) of the router's expert distribution."""
    router_scoring: list[str]
    """"softmax" (distribution softmax(logits)) or "sigmoid" (sigmoid(logits) / sum)."""
    router_entropy_normalized: list[float]
    """router_entropy / log(E)."""
    base_loss: float | None
    zeroed_loss: list[float] | None
    """Loss with the layer's MoE sublayer output zeroed."""
    importance: list[float] | None
    """zeroed_loss - base_loss."""
    importance_definition: str = (
        "loss increase when the layer's whole MoE sublayer output (routed experts and any "
        "shared expert) is replaced by zeros"
    )
    mean_load_imbalance: float | None = None
    mean_router_entropy_normalized: float | None = None
    mean_importance: float | None = None


def _assignments(out: object, logits: Tensor, top_k: int) -> Tensor:
    """[tokens, k] chosen experts: the router's own indices if it returns them."""
    if isinstance(out, (tuple, list)):
        for x in out[1:]:
            if isinstance(x, Tensor) and not x.is_floating_point() and x.shape[-1] == top_k:
                return x.reshape(-1, top_k)
    return logits.softmax(dim=-1).topk(top_k, dim=-1).indices


def _score_entropy(logits: Tensor, scoring: str) -> Tensor:
    """Per-token entropy (nats) of the router's expert distribution: softmax(logits), or
    for a sigmoid router its scores sigmoid(logits) normalised to sum to 1."""
    if scoring == "sigmoid":
        logp = F.logsigmoid(logits)
        logp = logp - logp.logsumexp(dim=-1, keepdim=True)
    else:
        logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(-1)


def _zero_output(_m, _a, out):
    if isinstance(out, tuple):
        return (torch.zeros_like(out[0]), *out[1:])
    return torch.zeros_like(out)


def compute_moe(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    importance: bool = True,
) -> MoEResult:
    """Routing statistics of every MoE layer, and (optionally) each layer's importance.

    Cost: `L*N` (one real pass, the router hooks need it) + `N * sum over MoE layers
    (L - l)` block forwards for the importance reruns.
    """
    ids = check_ids(stack, ids)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    infos = {l: stack.moe_router(l) for l in range(L)}
    layers = [l for l, i in infos.items() if i is not None]
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds) * (1 + (len(layers) if importance else 0)))
    counts = {l: torch.zeros(infos[l].num_experts, dtype=torch.long) for l in layers}
    ent = dict.fromkeys(layers, 0.0)
    seen = dict.fromkeys(layers, 0)
    base = 0.0
    zeroed = dict.fromkeys(layers, 0.0)

    def make_hook(l: int):
        info = infos[l]

        def hook(_m, _args, out):
            logits = out[info.logits_at] if isinstance(out, tuple) else out
            logits = logits.detach().float().reshape(-1, info.num_experts)
            chosen = _assignments(out, logits, info.top_k)
            counts[l] += torch.bincount(chosen.reshape(-1).cpu(), minlength=info.num_experts)
            ent[l] += float(_score_entropy(logits, info.scoring).sum())
            seen[l] += logits.shape[0]

        return hook

    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            chunk = ids[a:b]
            handles = [infos[l].router.register_forward_hook(make_hook(l)) for l in layers]
            try:
                states = hidden_states(stack, chunk, cache, fresh=True)
            finally:
                for h in handles:
                    h.remove()
            prog.step()
            if not importance or not layers:
                continue
            base += loss_sum(stack, states[L], chunk)
            for l in layers:
                handle = infos[l].mlp.register_forward_hook(_zero_output)
                try:
                    h_L = stack.run(states[l], l)
                finally:
                    handle.remove()
                zeroed[l] += loss_sum(stack, h_L, chunk)
                prog.step()

    n_tok = int(ids.shape[0] * ids.shape[1])
    n_pred = n_pred_tokens(ids)
    E = [infos[l].num_experts for l in layers]
    K = [infos[l].top_k for l in layers]
    frac = [(counts[l].double() / max(seen[l], 1)).tolist() for l in layers]
    imb = [float(counts[l].max()) / max(float(counts[l].double().mean()), 1e-12) for l in layers]
    r_ent = [ent[l] / max(seen[l], 1) for l in layers]
    r_ent_n = [e / math.log(n) if n > 1 else 0.0 for e, n in zip(r_ent, E, strict=True)]
    base_loss = base / n_pred if importance and layers else None
    zl = [zeroed[l] / n_pred for l in layers] if importance and layers else None
    imp = [z - base_loss for z in zl] if zl is not None else None
    cost = cost_dict(counter, n_layers=L, n_sequences=ids.shape[0],
                     formula="L*N + N*sum_{MoE l}(L - l)")
    return MoEResult(
        metric="moe", info=model_info(stack, ids), cost=cost, moe_layers=layers, num_experts=E,
        top_k=K, tokens=n_tok, expert_counts=[counts[l].tolist() for l in layers],
        fraction_routed=frac, load_imbalance=imb,
        activation_sparsity=[k / e for k, e in zip(K, E, strict=True)],
        router_entropy=r_ent, router_scoring=[infos[l].scoring for l in layers],
        router_entropy_normalized=r_ent_n, base_loss=base_loss,
        zeroed_loss=zl, importance=imp, mean_load_imbalance=mean_or_none(imb),
        mean_router_entropy_normalized=mean_or_none(r_ent_n),
        mean_importance=mean_or_none(imp) if imp else None,
    )
