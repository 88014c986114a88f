"""Verdicts for paper claims, computed from measurements with one stated rule.

A claim compares conditions (e.g. L=2 vs L=16), each measured on one or more seeds.
The rule (docs/reproduce.md):

- noise: the pooled seed-to-seed standard deviation `s` over all conditions that have at
  least 2 seeds, with `df = sum(n_i - 1)` degrees of freedom; the standard error of a
  difference of two condition means is `se = s * sqrt(1/n_a + 1/n_b)`.
- an effect is *resolved* when `|effect| >= max(t * se, min_rel * max(|a|, |b|))`, where
  `t` is the two-sided 95 % Student-t quantile at `df` (4.30 at df=2, 2.31 at df=8; with
  a handful of seeds the spread itself is uncertain, so a fixed 2 se would pass a true
  null far more often than 5 %), AND larger than a small relative floor (so that ties of
  a discrete metric, where the spread is 0, never count as effects). With a single seed
  there is no spread; the relative floor is then `single_seed_rel` (10 % by default) and
  the verdict says "1 seed".
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
CONFIDENCE = 0.95

# Two-sided 95 % Student-t quantiles t_{0.975}(df), df = 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """t_{0.975}(df): exact table to df=30, then 1.96 + 2.4/df (within 0.003 of the exact
    quantile for every df > 30)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


@dataclass(frozen=True)
class Spread:
    """Pooled seed-to-seed standard deviation and its degrees of freedom."""

    sd: float
    df: int


@dataclass
class Verdict:
    """The outcome of one test, with the numbers behind it."""

    status: str
    effect: float
    """Measured difference (b - a, or the best-vs-endpoint margin), in the metric's units."""
    threshold: float
    """The size an effect must reach to count (max of t se and the relative floor)."""
    detail: str
    seeds: int

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs)


def _seed_note(seeds: int) -> str:
    return "; 1 seed" if seeds < 2 else ""


def pooled_spread(groups: Sequence[Sequence[float]]) -> Spread | None:
    """Pooled within-condition spread over groups with >= 2 values (None if there are none)."""
    num, df = 0.0, 0
    for g in groups:
        if len(g) >= 2:
            num += statistics.variance(g) * (len(g) - 1)
            df += len(g) - 1
    return Spread(math.sqrt(num / df), df) if df else None


def _threshold(na: int, nb: int, spread: Spread | None, reference: float,
               min_rel: float, single_seed_rel: float = SINGLE_SEED_REL) -> tuple[float, int]:
    """(threshold an effect must reach, seeds of the smaller condition); `reference` is the
    magnitude the relative floor applies to."""
    seeds = min(na, nb)
    if spread is None:
        return single_seed_rel * abs(reference), seeds
    se = spread.sd * math.sqrt(1 / na + 1 / nb)
    return max(t_critical(spread.df) * se, min_rel * abs(reference)), seeds


def _scale(*means: float) -> float:
    """The relative floor's reference: the larger magnitude, so that a condition whose mean
    is 0 (a discrete metric at its floor) does not make the floor vanish."""
    return max(abs(m) for m in means)


def _status(signed_effect: float, threshold: float) -> str:
    if abs(signed_effect) < threshold or signed_effect == 0:
        return INCONCLUSIVE
    return HOLDS if signed_effect > 0 else FAILS


def _check_groups(*groups: Sequence[float]) -> None:
    for g in groups:
        if not g or any(not math.isfinite(x) for x in g):
            raise ValueError("every condition needs at least one finite measurement")


def compare(a: Sequence[float], b: Sequence[float], direction: int, *,
            spread: Spread | None = None, min_rel: float = MIN_REL) -> Verdict:
    """Does going from condition `a` to `b` move the metric in `direction` (+1 up, -1 down)?

    `spread`: the pooled seed spread of the whole experiment (default: pooled over a and b).
    """
    _check_groups(a, b)
    if direction not in (1, -1):
        raise ValueError("direction must be +1 or -1")
    if spread is None:
        spread = pooled_spread([a, b])
    ma, mb = _mean(a), _mean(b)
    effect = mb - ma
    threshold, seeds = _threshold(len(a), len(b), spread, _scale(ma, mb), min_rel)
    status = _status(direction * effect, threshold)
    word = "rises" if effect > 0 else "falls"
    detail = (f"{ma:.4g} -> {mb:.4g} ({word} by {abs(effect):.3g}; needs {threshold:.3g})"
              + _seed_note(seeds))
    return Verdict(status, effect, threshold, detail, seeds)


def trend(groups: Sequence[Sequence[float]], direction: int, *, min_rel: float = MIN_REL
          ) -> Verdict:
    """A monotone claim over ordered conditions, tested on its endpoints (first vs last);
    the detail also counts how many adjacent steps go the claimed way."""
    _check_groups(*groups)
    if len(groups) < 2:
        raise ValueError("a trend needs at least two conditions")
    v = compare(groups[0], groups[-1], direction, spread=pooled_spread(groups), min_rel=min_rel)
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
    spread = pooled_spread(groups)
    best = max(range(len(groups)), key=lambda i: sign * means[i])
    interior = 0 < best < len(groups) - 1
    rivals = [0, len(groups) - 1] if interior else list(range(1, len(groups) - 1))
    margins = []
    for j in rivals:
        thr, _ = _threshold(len(groups[best]), len(groups[j]), spread,
                            _scale(means[best], means[j]), min_rel)
        margins.append((sign * (means[best] - means[j]), thr))
    margin, thr = min(margins, key=lambda m: m[0] - m[1])
    seeds = min(len(g) for g in groups)
    resolved = margin >= thr and margin > 0
    status = INCONCLUSIVE if not resolved else (HOLDS if interior else FAILS)
    where = "inside the range" if interior else "at an end of the range"
    detail = (f"best at condition {best + 1} of {len(groups)} ({where}), margin {margin:.3g} "
              f"over the nearest rival (needs {thr:.3g})" + _seed_note(seeds))
    return Verdict(status, sign * margin, thr, detail, seeds), best


def not_worse(a: Sequence[float], b: Sequence[float], *, lower_is_better: bool = True,
              spread: Spread | None = None, tolerance_rel: float = 0.02) -> Verdict:
    """Is `b` at least as good as `a` ('at equal PPL')? Holds unless b is worse by more than
    max(t se, tolerance_rel * |a|) (tolerance_rel alone with one seed); then it does not
    hold. Never inconclusive: absence of a resolved harm counts as 'not worse'."""
    _check_groups(a, b)
    if spread is None:
        spread = pooled_spread([a, b])
    ma, mb = _mean(a), _mean(b)
    effect = mb - ma
    worse = effect if lower_is_better else -effect
    threshold, seeds = _threshold(len(a), len(b), spread, ma, tolerance_rel,
                                  single_seed_rel=tolerance_rel)
    status = FAILS if worse > threshold else HOLDS
    detail = f"{ma:.4g} -> {mb:.4g} (tolerance {threshold:.3g})" + _seed_note(seeds)
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
