"""Causal score: the effect of skipping a block on the later blocks (metrics.md section 4).

Base run: `Delta_l = h_{l+1} - h_l` from one hidden-state pass. Skipping block s
changes nothing before s, so the skipped run starts from the cached h_s
(h'_{s+1} = h_s) and runs blocks s+1..L-1 only, giving `Delta'_l` for l > s:

    C[s, l] = mean_tokens ||Delta'_l - Delta_l||_2 / mean_tokens ||Delta_l||_2

(0 when the denominator is <= 1e-8). `causal_pairs` is the mean of C over all
s < l; `causal_rows` the mean over s = 0..L-2 of the row means over l > s.
The skipped runs' final states also give the layer-drop losses for free
(`skip_loss`), which the suite reuses for `layer_drop`.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
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
    mean_or_none,
    model_info,
    n_pred_tokens,
    tokens_of,
)

DENOM_EPS = 1e-8


@dataclass(kw_only=True)
class CausalResult(MetricResult):
    matrix: list[list[float]]
    """C[s][l], L x L, zero on and below the diagonal."""
    causal_pairs: float | None
    """Mean of C[s, l] over all L(L-1)/2 pairs s < l."""
    causal_rows: float | None
    """Mean over s = 0..L-2 of the mean over l > s of C[s, l]."""
    row_means: list[float]
    """Mean over l > s of C[s, l], for s = 0..L-2."""
    base_delta_norm: list[float]
    """mean_tokens ||Delta_l||_2, l = 0..L-1."""
    base_loss: float | None
    skip_loss: list[float] | None
    """Loss with block s skipped (the layer-drop curve), when with_losses."""


def _token_norm_sum(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dim=-1).sum())


def compute_causal(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    with_losses: bool = True,
) -> CausalResult:
    """Causal-score matrix C[s, l] and its two scalar summaries.

    Cost: `L*N` (hidden states; 0 with a warm cache) + `N*L(L-1)/2` block forwards.
    """
    ids = check_ids(stack, ids)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds) * L)
    num = torch.zeros(L, L, dtype=torch.float64)
    den = [0.0] * L
    base = 0.0
    skip = [0.0] * L

    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            chunk = ids[a:b]
            states = hidden_states(stack, chunk, cache)
            deltas = [states[l + 1].float() - states[l].float() for l in range(L)]
            for l in range(L):
                den[l] += _token_norm_sum(deltas[l])
            if with_losses:
                base += loss_sum(stack, states[L], chunk)
            for s in range(L):
                h = states[s]  # h'_{s+1} = h_s: block s is the identity
                for l in range(s + 1, L):
                    h_next = stack.run_block(l, h)
                    d_new = h_next.float() - h.float()
                    num[s, l] += _token_norm_sum(d_new - deltas[l])
                    h = h_next
                if with_losses:
                    skip[s] += loss_sum(stack, h, chunk)
                prog.step()

    n_tok = tokens_of(ids)
    den_mean = [x / n_tok for x in den]
    C = [[0.0] * L for _ in range(L)]
    for s in range(L):
        for l in range(s + 1, L):
            C[s][l] = float(num[s, l]) / n_tok / den_mean[l] if den_mean[l] > DENOM_EPS else 0.0
    pairs = [C[s][l] for s in range(L) for l in range(s + 1, L)]
    rows = [mean_or_none([C[s][l] for l in range(s + 1, L)]) for s in range(L - 1)]
    n_pred = n_pred_tokens(ids)
    N = ids.shape[0]
    micro = 4
    cost = cost_dict(
        counter, n_layers=L, n_sequences=N, micro_batch=micro,
        reference_full_forwards=(L + 2) * math.ceil(N / micro),
        formula="L*N + N*L(L-1)/2", reference_formula="(L+2)*ceil(N/4) full forwards",
    )
    return CausalResult(
        metric="causal", info=model_info(stack, ids), cost=cost, matrix=C,
        causal_pairs=mean_or_none(pairs), causal_rows=mean_or_none(rows), row_means=rows,
        base_delta_norm=den_mean,
        base_loss=base / n_pred if with_losses else None,
        skip_loss=[x / n_pred for x in skip] if with_losses else None,
    )
