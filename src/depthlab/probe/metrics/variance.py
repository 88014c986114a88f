"""Variance profile (metrics.md section 1): the curse-of-depth signal.

`var_l = mean over tokens of Var_d(h_{l+1})` (unbiased variance across the hidden
dimension of each token, then the mean over all N*T tokens), l = 0..L-1, and the
same on each branch's update before the residual add (`attn_var_l`, `mlp_var_l`,
captured with forward hooks on `stack.branch_modules(l)` during the one real pass).
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

from dataclasses import dataclass

import torch
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
    first_output,
    hidden_states,
    mean_or_none,
    model_info,
    tokens_of,
)


@dataclass(kw_only=True)
class VarianceResult(MetricResult):
    variance: list[float]
    """var_l = mean_tokens Var_d(h_{l+1}), l = 0..L-1 (pre-final-norm)."""
    attn_variance: list[float] | None
    """Same on the attention branch output before the residual add."""
    mlp_variance: list[float] | None
    """Same on the MLP (or MoE) branch output before the residual add."""
    embedding_variance: float
    """mean_tokens Var_d(h_0) (for reference; not one of the L layer values)."""
    last_layer_variance: float
    """var_{L-1}: the final residual stream before the final norm."""
    mean_variance: float


def token_variance_sum(x: Tensor) -> float:
    """Sum over tokens of the unbiased variance across the last dim, in fp32."""
    return float(x.float().var(dim=-1, unbiased=True).sum())


def compute_variance(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    sublayers: bool = True,
) -> VarianceResult:
    """Variance profile of the residual stream (and of each branch when `sublayers`).

    Cost: one hidden-state pass, `L*N` block forwards (0 when `cache` already holds
    the states and `sublayers=False`; the branch hooks need a real pass).
    """
    ids = check_ids(stack, ids, min_len=1)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds))
    var_sum = [0.0] * (L + 1)
    branch_sum = {"attn": [0.0] * L, "mlp": [0.0] * L}
    branch_seen = {"attn": [0] * L, "mlp": [0] * L}

    handles = []
    if sublayers:
        for l in range(L):
            for kind, mod in stack.branch_modules(l).items():
                if kind not in branch_sum:
                    continue

                def hook(_m, _a, out, l=l, kind=kind):
                    y = first_output(out)
                    branch_sum[kind][l] += token_variance_sum(y) * stack.branch_scale ** 2
                    branch_seen[kind][l] += int(y.numel() // y.shape[-1])

                handles.append(mod.register_forward_hook(hook))
    try:
        with counting(stack, counter), torch.no_grad():
            for a, b in bounds:
                chunk = ids[a:b]
                states = hidden_states(stack, chunk, cache, fresh=sublayers)
                for l, h in enumerate(states):
                    var_sum[l] += token_variance_sum(h)
                prog.step()
    finally:
        for hd in handles:
            hd.remove()

    n_tok = tokens_of(ids)
    variance = [v / n_tok for v in var_sum[1:]]
    attn = mlp = None
    if sublayers:
        # a branch module called more than once per block (or shared) would be double-counted:
        # normalise by the tokens its hook actually saw
        attn = [s / max(c, 1) for s, c in zip(branch_sum["attn"], branch_seen["attn"], strict=True)]
        mlp = [s / max(c, 1) for s, c in zip(branch_sum["mlp"], branch_seen["mlp"], strict=True)]
    return VarianceResult(
        metric="variance",
        info=model_info(stack, ids),
        cost=cost_dict(counter, n_layers=L, n_sequences=ids.shape[0], formula="L*N"),
        variance=variance,
        attn_variance=attn,
        mlp_variance=mlp,
        embedding_variance=var_sum[0] / n_tok,
        last_layer_variance=variance[-1],
        mean_variance=mean_or_none(variance),
    )
