"""Figures of `depthlab diagnose` (PNG, matplotlib Agg), drawn from a results dict.

One figure per metric that has a natural picture: the variance profile (with the
attention and MLP branch variances), the Jacobian norm against layer, the causal and
permutation heatmaps, the usefulness loss ratios (with the usefulness threshold) and
the layer-drop curve. Every title names the model; every axis is labelled.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from depthlab.plotstyle import heatmap_cmap
from depthlab.probe.results import FIG_DIR


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _nums(xs: list[Any] | None) -> list[float]:
    return [float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan
            for x in (xs or [])]


def _title(results: dict[str, Any], what: str, metric: dict[str, Any]) -> str:
    """Model, data and the N the metric itself ran on (`METRIC.samples=K` may lower it)."""
    import textwrap

    m, d = results["model"], results["data"]
    n = metric.get("n_samples") or d.get("n_samples")
    lines = [f"{what}: {results.get('model_name')}",
             f"L={m.get('n_layers')}, d={m.get('d_model')}; N={n} x "
             f"T={d.get('seq_len')} tokens of {d.get('source')}"]
    # wrapped to the narrowest figure's width: a long model name or path is not cut off
    return "\n".join(part for line in lines
                     for part in textwrap.wrap(line, 64, break_long_words=False))


def _save(fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:
        if ax.get_label() != "<colorbar>":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _positive(xs: list[float]) -> bool:
    vals = [x for x in xs if not math.isnan(x)]
    return bool(vals) and min(vals) > 0


def fig_variance(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    var = _nums(m.get("variance"))
    x = list(range(len(var)))
    ax.plot(x, var, "o-", label="residual stream $h_{l+1}$ (pre-final-norm)")
    for key, style, label in (("attn_variance", "s--", "attention branch output"),
                              ("mlp_variance", "^--", "MLP branch output")):
        v = _nums(m.get(key))
        if v:
            ax.plot(x, v, style, ms=4, label=label)
    if all(_positive(_nums(m.get(k))) or not m.get(k)
           for k in ("variance", "attn_variance", "mlp_variance")):
        ax.set_yscale("log")
    ax.set_xlabel("block l")
    ax.set_ylabel("mean per-token variance across d")
    ax.set_title(_title(results, "Variance profile", m), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def fig_jacobian(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    layers = m.get("layers") or list(range(results["model"]["n_layers"]))
    exact = _nums(m.get("jacobian_norm"))
    diag = _nums(m.get("diagonal_mean"))
    h = m.get("hutchinson") if isinstance(m.get("hutchinson"), dict) else None
    fig, axes = plt.subplots(1, 2 if diag else 1, figsize=(10 if diag else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    # blocks that jacobian.layers skipped are not interpolated: markers only
    line = "o-" if layers == list(range(layers[0], layers[0] + len(layers))) else "o"
    if exact:
        ax.plot(layers, exact, line, label="exact")
    if h is not None:
        ax.errorbar(layers, _nums(h.get("jacobian_norm")), yerr=_nums(h.get("jacobian_norm_se")),
                    fmt="s--", ms=4, capsize=2, label=f"Hutchinson ({h.get('probes')} probes)")
    ax.set_xlabel("block l")
    ax.set_ylabel(r"$\|J_l - I\|_F / d$")
    ax.set_title("Jacobian deviation from identity", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if diag:
        ax2 = axes[0][1]
        ax2.plot(layers, diag, line, color="C2", label="diagonal mean")
        ax2.axhline(0.5, color="k", ls=":", lw=1, label="0.5 (identity-preserving above)")
        finite = [x for x in diag if not math.isnan(x)] + [0.5]
        pad = 0.1 * (max(finite) - min(finite)) or 0.05
        ax2.set_ylim(min(finite) - pad, max(finite) + pad)  # the threshold line off the edge
        ax2.set_xlabel("block l")
        ax2.set_ylabel(r"mean of diag$(J_l)$")
        ip = m.get("identity_preservation")
        L = results["model"]["n_layers"]
        of = (f"\nover blocks {','.join(map(str, layers))} of {L}" if len(diag) != L else "")
        ax2.set_title(f"identity_preservation = {ip:.3f}{of}" if isinstance(ip, float)
                      else "diagonal mean", fontsize=9)
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.suptitle(_title(results, "Jacobian", m), fontsize=9)
    return _save(fig, path)


def _heatmap(results: dict[str, Any], m: dict[str, Any], matrix: list[list[Any]], path: Path,
             what: str,
             ylabel: str, xlabel: str, cbar: str, lower_blank: bool) -> Path:
    import numpy as np

    plt = _plt()
    M = np.array([_nums(r) for r in matrix], dtype=float)
    if lower_blank:
        M = np.where(np.triu(np.ones_like(M, dtype=bool), k=1), M, np.nan)
    L = M.shape[0]
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    cmap = heatmap_cmap()
    im = ax.imshow(np.ma.masked_invalid(M), cmap=cmap, origin="upper", interpolation="nearest")
    fig.colorbar(im, ax=ax, label=cbar)
    step = max(1, L // 16)
    ax.set_xticks(range(0, L, step))
    ax.set_yticks(range(0, L, step))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_title(results, what, m), fontsize=9)
    return _save(fig, path)


def fig_causal(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    cp, cr = m.get("causal_pairs"), m.get("causal_rows")
    what = "Causal score C[s, l]"
    if isinstance(cp, float) and isinstance(cr, float):
        what += f" (causal_pairs {cp:.3f}, causal_rows {cr:.3f})"
    return _heatmap(results, m, m["matrix"], path, what, "skipped block s", "later block l",
                    "relative change of the block update", lower_blank=True)


def fig_permutation(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    p = m.get("permutation")
    what = f"Permutation score P(l1, l2), {m.get('pair_set')} pairs"
    if isinstance(p, float):
        what += f" (mean {p:.3f})"
    return _heatmap(results, m, m["matrix"], path, what, "block l1", "block l2",
                    "|L_base - L_swap| / L_base", lower_blank=False)


def fig_usefulness(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    ratio = _nums(m.get("loss_ratio"))
    thr = float(m.get("threshold") or 1.1)
    useful = [bool(u) for u in (m.get("useful") or [r > thr for r in ratio])]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["C0" if u else "C3" for u in useful]
    ax.bar(range(len(ratio)), ratio, color=colors)
    ax.axhline(thr, color="k", ls="--", lw=1, label=f"threshold {thr:g} (useful above)")
    ax.axhline(1.0, color="gray", ls=":", lw=1)
    if _positive(ratio) and max(ratio) / min(ratio) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("block l (replaced by its least-squares affine map)")
    ax.set_ylabel("loss ratio L_lin / L_base")
    u, n = m.get("usefulness"), m.get("n_useful")
    what = "Usefulness"
    if isinstance(u, float):
        what += f" = {u:.3f} ({n}/{len(ratio)} useful)"
    ax.set_title(_title(results, what, m), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def fig_layer_drop(results: dict[str, Any], m: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    loss = _nums(m.get("loss"))
    base = m.get("base_loss")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(range(len(loss)), loss, "o-", label="loss with block l skipped")
    if isinstance(base, (int, float)):
        ax.axhline(base, color="k", ls="--", lw=1, label=f"base loss {base:.3f}")
    if _positive(loss) and max(loss) / min(loss) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("skipped block l")
    ax.set_ylabel("next-token cross-entropy (nats)")
    ax.set_title(_title(results, "Layer drop", m), fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


FIGURES: dict[str, tuple[str, Callable[[dict, dict, Path], Path]]] = {
    "variance": ("variance.png", fig_variance),
    "jacobian": ("jacobian.png", fig_jacobian),
    "causal": ("causal.png", fig_causal),
    "permutation": ("permutation.png", fig_permutation),
    "usefulness": ("usefulness.png", fig_usefulness),
    "layer_drop": ("layer_drop.png", fig_layer_drop),
}
"""metric -> (file name, drawing function)."""


def write_figures(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Draw every figure whose metric is in `results`; returns the PNG paths."""
    d = Path(out) / FIG_DIR
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (fname, draw) in FIGURES.items():
        m = results["metrics"].get(name)
        if not isinstance(m, dict):
            continue
        if name == "jacobian" and not (m.get("jacobian_norm") or m.get("hutchinson")):
            continue
        if name in ("causal", "permutation") and not m.get("matrix"):
            continue
        paths.append(draw(results, m, d / fname))
    return paths
