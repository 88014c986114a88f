"""Representation-similarity metrics (metrics.md section 6), from one hidden-state pass.

- Block influence (ShortGPT): `BI_l = 1 - mean_tokens cos(h_l, h_{l+1})`, l = 0..L-1.
- Angular distance (Gromov et al.): `arccos(cos(h_i, h_j)) / pi` per token, then the
  token mean; the full (L+1) x (L+1) matrix and its n-block view
  `by_n[n-1][l] = D(l, l+n)`. Computed as `2*atan2(||u_i - u_j||, ||u_i + u_j||) / pi`
  on unit vectors u (the same angle, numerically stable for nearly parallel states).
- Layer similarity: cosine between the token-mean states of every two layers (the
  mean over all N*T tokens, i.e. every chunk weighted by its token count).
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
    mean_or_none,
    model_info,
    tokens_of,
)

COS_EPS = 1e-8


def token_cosine(a: Tensor, b: Tensor, eps: float = COS_EPS) -> Tensor:
    """Per-token cosine across the last dim, fp32; a zero vector gives cosine 0."""
    a, b = a.float(), b.float()
    na = torch.linalg.vector_norm(a, dim=-1).clamp_min(eps)
    nb = torch.linalg.vector_norm(b, dim=-1).clamp_min(eps)
    return (a * b).sum(-1) / (na * nb)


def _unit(a: Tensor, eps: float = COS_EPS) -> Tensor:
    a = a.float()
    return a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(eps)


def _unit_angle(ua: Tensor, ub: Tensor) -> Tensor:
    diff = torch.linalg.vector_norm(ua - ub, dim=-1)
    summ = torch.linalg.vector_norm(ua + ub, dim=-1)
    return 2.0 * torch.atan2(diff, summ) / math.pi


def token_angle(a: Tensor, b: Tensor, eps: float = COS_EPS) -> Tensor:
    """Per-token angle between a and b divided by pi (in [0, 1]), fp32."""
    return _unit_angle(_unit(a, eps), _unit(b, eps))


@dataclass(kw_only=True)
class BlockInfluenceResult(MetricResult):
    block_influence: list[float]
    """BI_l = 1 - mean_tokens cos(h_l, h_{l+1}), l = 0..L-1."""
    mean_block_influence: float | None
    ranking: list[int]
    """Blocks from least to most influential (ShortGPT prunes from the front)."""


@dataclass(kw_only=True)
class AngularDistanceResult(MetricResult):
    matrix: list[list[float]]
    """D[i][j] = mean_tokens arccos(cos(h_i, h_j)) / pi over hidden states 0..L."""
    by_n: list[list[float]]
    """by_n[n-1][l] = D[l][l+n]: n-block distances, n = 1..L, l = 0..L-n."""
    best_start: list[int]
    """For each n: the l minimising D[l][l+n] (Gromov et al.'s block to prune)."""
    adjacent: list[float]
    """D[l][l+1], l = 0..L-1 (= by_n[0])."""


@dataclass(kw_only=True)
class LayerSimilarityResult(MetricResult):
    matrix: list[list[float]]
    """S[i][j] = cos(mean_tokens h_i, mean_tokens h_j) over hidden states 0..L."""
    adjacent: list[float]
    """S[l][l+1], l = 0..L-1."""


def _pass(stack, ids, batch_size, progress, counter, cache, fn) -> None:
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds))
    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            fn(hidden_states(stack, ids[a:b], cache))
            prog.step()


def compute_block_influence(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
) -> BlockInfluenceResult:
    """ShortGPT block influence. Cost: `L*N` block forwards (0 with a warm cache)."""
    ids = check_ids(stack, ids, min_len=1)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    sums = [0.0] * L

    def acc(states: list[Tensor]) -> None:
        for l in range(L):
            sums[l] += float(token_cosine(states[l], states[l + 1]).sum())

    _pass(stack, ids, batch_size, progress, counter, cache, acc)
    n = tokens_of(ids)
    bi = [1.0 - s / n for s in sums]
    return BlockInfluenceResult(
        metric="block_influence", info=model_info(stack, ids),
        cost=cost_dict(counter, n_layers=L, n_sequences=ids.shape[0], formula="L*N"),
        block_influence=bi, mean_block_influence=mean_or_none(bi),
        ranking=sorted(range(L), key=lambda i: bi[i]),
    )


def compute_angular_distance(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
) -> AngularDistanceResult:
    """Angular distance between every two hidden states. Cost: `L*N` (0 with a warm cache)."""
    ids = check_ids(stack, ids, min_len=1)
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    S = torch.zeros(L + 1, L + 1, dtype=torch.float64)

    def acc(states: list[Tensor]) -> None:
        units = [_unit(h) for h in states]
        for i in range(L + 1):
            for j in range(i + 1, L + 1):
                S[i, j] += float(_unit_angle(units[i], units[j]).sum())

    _pass(stack, ids, batch_size, progress, counter, cache, acc)
    D = S / tokens_of(ids)
    D = D + D.T
    M = D.tolist()
    by_n = [[M[l][l + n] for l in range(L + 1 - n)] for n in range(1, L + 1)]
    return AngularDistanceResult(
        metric="angular_distance", info=model_info(stack, ids),
        cost=cost_dict(counter, n_layers=L, n_sequences=ids.shape[0], formula="L*N"),
        matrix=M, by_n=by_n, best_start=[min(range(len(r)), key=r.__getitem__) for r in by_n],
        adjacent=by_n[0],
    )


def compute_layer_similarity(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
) -> LayerSimilarityResult:
    """Cosine of token-mean states between layers. Cost: `L*N` (0 with a warm cache)."""
    ids = check_ids(stack, ids, min_len=1)
    L, d = stack.n_layers, stack.d_model
    counter = counter if counter is not None else BlockCounter()
    sums = torch.zeros(L + 1, d, dtype=torch.float64)

    def acc(states: list[Tensor]) -> None:
        for l, h in enumerate(states):
            sums[l] += h.float().reshape(-1, d).sum(0).double().cpu()

    _pass(stack, ids, batch_size, progress, counter, cache, acc)
    means = (sums / tokens_of(ids)).float()
    unit = means / torch.linalg.vector_norm(means, dim=-1, keepdim=True).clamp_min(COS_EPS)
    M = (unit @ unit.T).tolist()
    return LayerSimilarityResult(
        metric="layer_similarity", info=model_info(stack, ids),
        cost=cost_dict(counter, n_layers=L, n_sequences=ids.shape[0], formula="L*N"),
        matrix=M, adjacent=[M[l][l + 1] for l in range(L)],
    )
