"""Verdicts for paper claims, computed from measurements with one stated rule.

A claim compares conditions (e.g. L=2 vs L=16), each measured on one or more seeds.
The rule (docs/reproduce.md):

- noise: the pooled seed-to-seed standard deviation `s` over all conditions that have at
  least 2 seeds; the standard error of a difference of two condition means is
  `se = s * sqrt(1/n_a + 1/n_b)`.
- an effect is *resolved* when `|effect| >= max(2 * se, min_rel * |reference|)`: larger
  than twice its standard error AND than a small relative floor (so that ties of a discrete
  metric, where the spread is 0, never count as effects). With a single seed there is no
  spread; the relative floor is then `single_seed_rel` (10 % by default) and the verdict
  says "1 seed".
- `holds` when the resolved effect has the claimed direction, `does not hold` when it has
  the opposite direction, `inconclusive` when the effect is not resolved.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
MIN_REL = 0.01
SINGLE_SEED_REL = 0.10
SIGMAS = 2.0


@dataclass
class Verdict:
    """The outcome of one test, with the numbers behind it."""

    status: str
    effect: float
    """Measured difference (b - a, or the best-vs-endpoint margin), in the metric's units."""
    threshold: float
    """The size an effect must reach to count (max of 2 se and the relative floor)."""
    detail: str
    seeds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs))


def pooled_sd(groups: Sequence[Sequence[float]]) -> float | None:
    """Pooled within-condition standard deviation over groups with >= 2 values (None if none)."""
    num = den = 0.0
    for g in groups:
        if len(g) >= 2:
            num += statistics.variance(g) * (len(g) - 1)
            den += len(g) - 1
    return math.sqrt(num / den) if den else None


def _threshold(na: int, nb: int, sd: float | None, reference: float,
               min_rel: float) -> tuple[float, int]:
    seeds = min(na, nb)
    if sd is None:
        return SINGLE_SEED_REL * abs(reference), seeds
    se = sd * math.sqrt(1 / na + 1 / nb)
    return max(SIGMAS * se, min_rel * abs(reference)), seeds


def _status(signed_effect: float, threshold: float) -> str:
    if abs(signed_effect) < threshold or signed_effect == 0:
        return INCONCLUSIVE
    return HOLDS if signed_effect > 0 else FAILS


def _check_groups(*groups: Sequence[float]) -> None:
    for g in groups:
        if not g or any(not math.isfinite(x) for x in g):
            raise ValueError("every condition needs at least one finite measurement")


def compare(a: Sequence[float], b: Sequence[float], direction: int, *,
            sd: float | None = None, min_rel: float = MIN_REL) -> Verdict:
    """Does going from condition `a` to `b` move the metric in `direction` (+1 up, -1 down)?

    `sd`: the pooled seed spread of the whole experiment (default: pooled over a and b).
    """
    _check_groups(a, b)
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    if sd is None:
        sd = pooled_sd([a, b])
    effect = _mean(b) - _mean(a)
    threshold, seeds = _threshold(len(a), len(b), sd, _mean(a), min_rel)
    status = _status(direction * effect, threshold)
    word = "rises" if effect > 0 else "falls"
    detail = (f"{_mean(a):.4g} -> {_mean(b):.4g} ({word} by {abs(effect):.3g}; "
              f"needs {threshold:.3g})")
    if seeds < 2:
        detail += "; 1 seed"
    return Verdict(status, effect, threshold, detail, seeds)


def trend(groups: Sequence[Sequence[float]], direction: int, *, min_rel: float = MIN_REL
          ) -> Verdict:
    """A monotone claim over ordered conditions, tested on its endpoints (first vs last);
    the detail also counts how many adjacent steps go the claimed way."""
    _check_groups(*groups)
    if len(groups) < 2:
        raise ValueError("a trend needs at least two conditions")
    v = compare(groups[0], groups[-1], direction, sd=pooled_sd(groups), min_rel=min_rel)
    means = [_mean(g) for g in groups]
    steps = sum(1 for x, y in zip(means, means[1:], strict=False) if direction * (y - x) > 0)
    v.detail += f"; {steps}/{len(means) - 1} steps in the claimed direction"
    return v


def interior_optimum(groups: Sequence[Sequence[float]], *, minimize: bool = True,
                     min_rel: float = MIN_REL) -> tuple[Verdict, int]:
    """Is the best condition strictly inside the range (a 'sweet spot')?

    Returns (verdict, index of the best mean). Holds when the best is interior and beats
    both endpoints by a resolved margin; does not hold when an endpoint is best and beats
    every interior condition by a resolved margin; inconclusive otherwise.
    """
    _check_groups(*groups)
    if len(groups) < 3:
        raise ValueError("a sweet spot needs at least three conditions")
    sign = -1.0 if minimize else 1.0  # sign * mean: larger is better
    means = [_mean(g) for g in groups]
    sd = pooled_sd(groups)
    best = max(range(len(groups)), key=lambda i: sign * means[i])
    if 0 < best < len(groups) - 1:
        rivals = [0, len(groups) - 1]
    else:
        rivals = list(range(1, len(groups) - 1))
    margins = []
    for j in rivals:
        thr, _ = _threshold(len(groups[best]), len(groups[j]), sd, means[j], min_rel)
        margins.append((sign * (means[best] - means[j]), thr))
    margin, thr = min(margins, key=lambda m: m[0] - m[1])
    seeds = min(len(g) for g in groups)
    resolved = margin >= thr and margin > 0
    interior = 0 < best < len(groups) - 1
    status = INCONCLUSIVE if not resolved else (HOLDS if interior else FAILS)
    where = "inside the range" if interior else "at an end of the range"
    detail = (f"best at condition {best + 1} of {len(groups)} ({where}), margin {margin:.3g} "
              f"over the nearest rival (needs {thr:.3g})")
    if seeds < 2:
        detail += "; 1 seed"
    return Verdict(status, sign * margin, thr, detail, seeds), best


def not_worse(a: Sequence[float], b: Sequence[float], *, lower_is_better: bool = True,
              sd: float | None = None, tolerance_rel: float = 0.02) -> Verdict:
    """Is `b` at least as good as `a` ('at equal PPL')? Holds unless b is worse by more than
    max(2 se, tolerance_rel * |a|); then it does not hold. Never inconclusive."""
    _check_groups(a, b)
    if sd is None:
        sd = pooled_sd([a, b])
    effect = _mean(b) - _mean(a)
    worse = effect if lower_is_better else -effect
    threshold, seeds = _threshold(len(a), len(b), sd, _mean(a), tolerance_rel)
    threshold = max(threshold, tolerance_rel * abs(_mean(a)))
    status = FAILS if worse > threshold else HOLDS
    detail = f"{_mean(a):.4g} -> {_mean(b):.4g} (tolerance {threshold:.3g})"
    if seeds < 2:
        detail += "; 1 seed"
    return Verdict(status, effect, threshold, detail, seeds)


def combine(parts: Sequence[Verdict]) -> str:
    """A claim with several parts: holds if all hold, does not hold if any does not hold,
    inconclusive otherwise."""
    statuses = [p.status for p in parts]
    if any(s == FAILS for s in statuses):
        return FAILS
    if all(s == HOLDS for s in statuses):
        return HOLDS
    return INCONCLUSIVE
