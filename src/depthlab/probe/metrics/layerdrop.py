"""Layer-drop loss (metrics.md section 6): the loss with block l skipped, for each l.

Skipping l changes nothing before l: the run starts from the cached h_l with the
plan `[None, l+1, ..., L-1]` (blocks l+1..L-1 only).
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
    hidden_states,
    loss_sum,
    model_info,
    n_pred_tokens,
)


@dataclass(kw_only=True)
class LayerDropResult(MetricResult):
    base_loss: float
    loss: list[float]
    """Loss with block l skipped (identity), l = 0..L-1."""
    loss_increase: list[float]
    """loss_l - base_loss."""
    loss_ratio: list[float]
    """loss_l / base_loss."""
    source: str = "direct"
    """"direct", or "causal" when taken from the causal score's skipped runs."""


def layer_drop_from_losses(info: dict, cost: dict, base: float, losses: list[float],
                           source: str = "direct") -> LayerDropResult:
    return LayerDropResult(
        metric="layer_drop", info=info, cost=cost, base_loss=base, loss=list(losses),
        loss_increase=[x - base for x in losses], loss_ratio=[x / base for x in losses],
        source=source,
    )


def compute_layer_drop(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
) -> LayerDropResult:
    """Loss with each block skipped. Cost: `L*N` (0 with a warm cache) + `N*L(L-1)/2`."""
    ids = check_ids(stack, ids)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds) * L)
    base = 0.0
    drop = [0.0] * L
    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            chunk = ids[a:b]
            states = hidden_states(stack, chunk, cache)
            base += loss_sum(stack, states[L], chunk)
            for l in range(L):
                h_L = stack.run(states[l], l, [None, *range(l + 1, L)])
                drop[l] += loss_sum(stack, h_L, chunk)
                prog.step()
    n = n_pred_tokens(ids)
    cost = cost_dict(counter, n_layers=L, n_sequences=ids.shape[0], formula="L*N + N*L(L-1)/2")
    return layer_drop_from_losses(model_info(stack, ids), cost, base / n, [x / n for x in drop])
