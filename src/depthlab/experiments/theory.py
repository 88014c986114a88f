"""Claim 8: sparsity slows the variance growth of a random pre-LN residual stack.

Set-up: a randomly initialised pre-LN DepthLM stack, `h_{l+1} = h_l + a_l + m_l` with
`a_l = M^a_l * Attn(norm(h_l))`, `m_l = M^m_l * MLP(norm(h_l + a_l))`, where each mask
`M` has i.i.d. Bernoulli(p) entries over (token, feature) (density p, no rescaling).

Growth law (docs/reproduce.md). For one coordinate, with `f` a sublayer output:
`E[(h + M f)^2] = E[h^2] + 2 E[M] E[h f] + E[M^2] E[f^2] = E[h^2] + p E[f^2]`, because the
sublayer's output projection `W_o` is zero-mean and drawn independently of `h`
(`E[h f] = sum_j E[W_ij] E[h x_j] = 0`) and `M^2 = M`. So, exactly in expectation,
`Var(h_L) = Var(h_0) + p * sum_{l<L} E[f_l^2]`. The norm in front of each sublayer removes
the scale of `h`, so a position-wise sublayer (the MLP) has `E[f^2] = v_mlp` whatever p.
Attention at random init is close to uniform: its output is a running mean of values over
positions, whose size is set by how correlated the normalised tokens are. That correlation
is built by earlier attention outputs, which are shared across positions; an independent
mask per (token, feature) keeps a fraction p of that shared part, so the attention term
carries one more factor p. With `v_attn`, `v_mlp` the branch output variances measured on
the unmasked stack (p = 1) at each block:

    Var(h_L) ~= Var(h_0) + sum_{l < L} (p * v_mlp_l + p^2 * v_attn_l)

linear in depth, with a slope between `p v` and `p^2 v`: sparser stacks grow more slowly,
and a deep block's relative update `(p v_mlp + p^2 v_attn) / Var(h_l)` stays large for more
layers. `simulate` measures Var(h_l) (metrics.md section 1 definition) for every l and p,
and the branch variances on the unmasked stack, so the law is tested with no fitted
constant.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from depthlab.config import ModelConfig
from depthlab.experiments.verdict import FAILS, HOLDS, INCONCLUSIVE
from depthlab.probe.metrics.variance import token_variance_sum


@dataclass
class TheoryResult:
    densities: list[float]
    depths: list[int]
    """1..max_depth: the stack of depth L is the first L blocks of the deepest one."""
    variance: dict[str, list[float]]
    """str(p) -> mean over seeds of Var(h_L) for each L in depths."""
    variance_sd: dict[str, list[float]]
    predicted: dict[str, list[float]]
    """str(p) -> the growth law's Var(h_L), from branch variances measured at p = 1."""
    slope: dict[str, float]
    """str(p) -> least-squares slope of the simulated Var(h_L) against L."""
    predicted_slope: dict[str, float]
    embedding_variance: float
    attn_branch_variance: float
    """Mean over blocks of v_attn_l (unmasked)."""
    mlp_branch_variance: float
    """Mean over blocks of v_mlp_l (unmasked)."""
    max_relative_error: float
    """Largest |simulated - predicted| / predicted over all p and L."""
    seeds: int
    d_model: int
    seq_len: int
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def _variance(h: torch.Tensor) -> float:
    """metrics.md section 1: per-token variance over features (unbiased), token-mean."""
    return token_variance_sum(h) / (h.numel() // h.shape[-1])


@torch.no_grad()
def _one_stack(cfg: ModelConfig, densities: Sequence[float], ids: torch.Tensor, seed: int
               ) -> tuple[dict[float, list[float]], list[tuple[float, float]]]:
    """Var(h_l), l = 0..L, for each density (same weights), and v_l at p = 1.

    The model's own blocks run; forward hooks on each block's branch modules mask the
    branch outputs (and, at p = 1, record their variances)."""
    from depthlab.model import DepthLM

    torch.manual_seed(seed)
    model = DepthLM(cfg).eval()
    out: dict[float, list[float]] = {}
    branch: list[float] = []
    p, gen, seen = 1.0, torch.Generator(), {}

    def mask(name: str):
        def hook(_mod: torch.nn.Module, _args: object, y: torch.Tensor) -> torch.Tensor:
            if p < 1:
                y = y * (torch.rand(y.shape, generator=gen) < p).to(y.dtype)
            else:
                seen[name] = _variance(y)
            return y
        return hook

    handles = [mod.register_forward_hook(mask(name)) for block in model.blocks
               for name, mod in block.branch_modules().items()]
    try:
        for p in densities:
            gen.manual_seed(seed * 1000 + 7)
            h = model.embed(ids)
            vars_ = [_variance(h)]
            for block in model.blocks:
                h = block(h)
                if p == 1.0:
                    branch.append((seen["attn"], seen["mlp"]))
                vars_.append(_variance(h))
            out[p] = vars_
    finally:
        for handle in handles:
            handle.remove()
    return out, branch


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def simulate(densities: Sequence[float] = (1.0, 0.5, 0.25, 0.1), max_depth: int = 32,
             d_model: int = 128, n_heads: int = 4, seq_len: int = 64, samples: int = 8,
             seeds: int = 3, vocab_size: int = 256, init: str = "normal",
             init_std: float = 0.02) -> TheoryResult:
    """Simulate Var(h_L) against L for each density p and compare with the growth law."""
    densities = sorted({float(p) for p in densities} | {1.0}, reverse=True)
    if any(not 0 < p <= 1 for p in densities):
        raise ValueError("densities must be in (0, 1]")
    cfg = ModelConfig(vocab_size=vocab_size, n_layers=max_depth, d_model=d_model,
                      n_heads=n_heads, max_seq_len=seq_len, init=init, init_std=init_std)
    runs, branches, h0 = [], [], []
    for s in range(seeds):
        ids = torch.randint(0, vocab_size, (samples, seq_len),
                            generator=torch.Generator().manual_seed(10_000 + s))
        var, branch = _one_stack(cfg, densities, ids, seed=s)
        runs.append(var)
        branches.append(branch)
        h0.append(var[1.0][0])
    depths = list(range(1, max_depth + 1))
    v_attn = [sum(b[i][0] for b in branches) / seeds for i in range(max_depth)]
    v_mlp = [sum(b[i][1] for b in branches) / seeds for i in range(max_depth)]
    var0 = sum(h0) / seeds
    cum_attn = list(itertools.accumulate(v_attn))  # sum_{l<L} v_attn_l at index L - 1
    cum_mlp = list(itertools.accumulate(v_mlp))
    variance, variance_sd, predicted, slope, predicted_slope = {}, {}, {}, {}, {}
    worst = 0.0
    for p in densities:
        key = f"{p:g}"
        columns = list(zip(*[[r[p][L] for L in depths] for r in runs], strict=True))
        mean = [sum(col) / seeds for col in columns]
        sd = [(sum((x - m) ** 2 for x in col) / max(seeds - 1, 1)) ** 0.5
              for col, m in zip(columns, mean, strict=True)]
        pred = [var0 + p * cum_mlp[L - 1] + p * p * cum_attn[L - 1] for L in depths]
        variance[key], variance_sd[key], predicted[key] = mean, sd, pred
        slope[key], predicted_slope[key] = _slope(depths, mean), _slope(depths, pred)
        worst = max(worst, max(abs(m - q) / q for m, q in zip(mean, pred, strict=True)))
    return TheoryResult(densities=densities, depths=depths, variance=variance,
                        variance_sd=variance_sd, predicted=predicted, slope=slope,
                        predicted_slope=predicted_slope, embedding_variance=var0,
                        attn_branch_variance=sum(v_attn) / max_depth,
                        mlp_branch_variance=sum(v_mlp) / max_depth, max_relative_error=worst,
                        seeds=seeds, d_model=d_model, seq_len=seq_len, samples=samples)


def theory_verdict(result: TheoryResult, tolerance: float = 0.15) -> tuple[str, str]:
    """Holds when the simulated slope falls with density at every step and the law predicts
    every Var(h_L) within `tolerance` (relative); does not hold when a sparser stack grows
    faster; inconclusive when the ordering holds but the law misses."""
    ps = result.densities  # descending
    slopes = [result.slope[f"{p:g}"] for p in ps]
    ordered = all(a > b for a, b in zip(slopes, slopes[1:], strict=False))
    ratio = ", ".join(f"p={p:g}: {s:.3g}" for p, s in zip(ps, slopes, strict=True))
    detail = (f"slope of Var(h_L) vs L: {ratio}; law's worst relative error "
              f"{result.max_relative_error:.1%} (tolerance {tolerance:.0%})")
    if not ordered:
        return FAILS, detail
    if result.max_relative_error <= tolerance and math.isfinite(result.max_relative_error):
        return HOLDS, detail
    return INCONCLUSIVE, detail
