"""Permutation score: layer interchangeability (metrics.md section 5).

For a pair l1 < l2 the two whole blocks swap places (the plan runs block l2's
module at position l1 and block l1's at position l2; no parameter copies) and
`P(l1, l2) = |L_base - L_swap| / L_base`. The prefix before l1 is unchanged, so
the swapped run starts from the cached h_{l1} and costs L - l1 blocks.
`permutation` is the mean over the chosen pair set: "all" L(L-1)/2 pairs
(default), "adjacent" (l, l+1), or "one-vs-rest" (the anchor layer against every
other layer); the result names the set used.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from depthlab.errors import DepthlabError
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

PAIR_SETS = ("all", "adjacent", "one-vs-rest")


@dataclass(kw_only=True)
class PermutationResult(MetricResult):
    pair_set: str
    """"all", "adjacent" or "one-vs-rest"."""
    anchor: int | None
    """The anchor layer of "one-vs-rest"."""
    pairs: list[list[int]]
    """The (l1, l2) pairs measured, l1 < l2."""
    scores: list[float]
    """P(l1, l2) for each pair."""
    swap_loss: list[float]
    base_loss: float
    permutation: float | None
    """Mean of P over the pair set."""
    matrix: list[list[float | None]]
    """P symmetric (L x L); 0 on the diagonal, None for pairs not measured."""
    per_layer: list[float | None]
    """Mean of P over the measured pairs that involve layer l."""


def pair_list(L: int, pairs: str = "all", anchor: int | None = None) -> list[tuple[int, int]]:
    if pairs == "all":
        return [(a, b) for a in range(L) for b in range(a + 1, L)]
    if pairs == "adjacent":
        return [(a, a + 1) for a in range(L - 1)]
    if pairs == "one-vs-rest":
        if anchor is None:
            raise DepthlabError("permutation pairs='one-vs-rest' needs anchor=<layer index>")
        if not 0 <= anchor < L:
            raise DepthlabError(f"permutation anchor {anchor} out of range 0..{L - 1}")
        return [(min(anchor, m), max(anchor, m)) for m in range(L) if m != anchor]
    raise DepthlabError(f"permutation pairs must be one of {PAIR_SETS}, got {pairs!r}")


def swap_plan(L: int, l1: int, l2: int) -> list[int]:
    """Plan for positions l1..L-1 with blocks l1 and l2 swapped."""
    return [l2, *range(l1 + 1, l2), l1, *range(l2 + 1, L)]


def compute_permutation(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    pairs: str = "all", anchor: int | None = None,
) -> PermutationResult:
    """Permutation score over a pair set.

    Cost: `L*N` (hidden states; 0 with a warm cache) + `N * sum over pairs (L - l1)`
    block forwards; for all pairs that is `L*N + N*(L-1)L(L+1)/3`.
    """
    ids = check_ids(stack, ids)
    L = stack.n_layers
    plist = pair_list(L, pairs, anchor)
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds) * max(len(plist), 1))
    base = 0.0
    swap = [0.0] * len(plist)
    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            chunk = ids[a:b]
            states = hidden_states(stack, chunk, cache)
            base += loss_sum(stack, states[L], chunk)
            for i, (l1, l2) in enumerate(plist):
                h_L = stack.run(states[l1], l1, swap_plan(L, l1, l2))
                swap[i] += loss_sum(stack, h_L, chunk)
                prog.step()
    n = n_pred_tokens(ids)
    base_loss = base / n
    swap_loss = [x / n for x in swap]
    scores = [abs(base_loss - x) / base_loss for x in swap_loss]
    M: list[list[float | None]] = [[None] * L for _ in range(L)]
    for i in range(L):
        M[i][i] = 0.0
    for (l1, l2), p in zip(plist, scores, strict=True):
        M[l1][l2] = M[l2][l1] = p
    per_layer = [mean_or_none([p for (l1, l2), p in zip(plist, scores, strict=True)
                               if l in (l1, l2)]) for l in range(L)]
    N = ids.shape[0]
    micro = 4
    cost = cost_dict(
        counter, n_layers=L, n_sequences=N, micro_batch=micro,
        reference_full_forwards=(1 + len(plist)) * math.ceil(N / micro),
        formula="L*N + N*sum_pairs(L - l1)  (all pairs: L*N + N*(L-1)L(L+1)/3)",
        reference_formula="(1 + #pairs)*ceil(N/4) full forwards (#pairs = L(L-1)/2 for all)",
    )
    return PermutationResult(
        metric="permutation", info=model_info(stack, ids), cost=cost, pair_set=pairs,
        anchor=anchor if pairs == "one-vs-rest" else None, pairs=[list(p) for p in plist],
        scores=scores, swap_loss=swap_loss, base_loss=base_loss,
        permutation=mean_or_none(scores), matrix=M, per_layer=per_layer,
    )
