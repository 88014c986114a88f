"""Report figures (matplotlib, object API: no pyplot state, no display needed).

Each `fig_*` function takes the collected `ReportData` and a run -> colour map and
returns a `Figure`, or a string saying why the figure was skipped (missing data never
raises). `make_figures` writes PNG and SVG files for each drawn figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator

from depthlab.plotstyle import heatmap_cmap
from depthlab.report.data import SCORES, Diagnosis, ReportData, RunData, ladder_scores, num

NAN = float("nan")
STYLE = {
    "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "svg.fonttype": "none",
}
VAR_LABEL = "variance across hidden dim (activation units²)"


@dataclass
class FigureOut:
    name: str
    title: str
    caption: str
    png: Path | None = None
    svg: Path | None = None
    note: str | None = None
    """Why the figure was skipped (png/svg are None then)."""


def palette(labels: list[str]) -> dict[str, str]:
    """One colour per run/model, the same in every figure (tab10, then tab20, then hsv)."""
    from matplotlib import colormaps

    n = len(labels)
    if n <= 10:
        cols = [colormaps["tab10"](i) for i in range(n)]
    elif n <= 20:
        cols = [colormaps["tab20"](i) for i in range(n)]
    else:
        cols = [colormaps["hsv"](i / n) for i in range(n)]
    from matplotlib.colors import to_hex

    return {lab: to_hex(c) for lab, c in zip(labels, cols, strict=True)}


def _fig(w: float = 6.4, h: float = 3.8, ncols: int = 1, nrows: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(w, h), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _vals(xs: list[Any]) -> list[float]:
    return [NAN if num(x) is None else float(x) for x in xs]


def _positive(xs: list[float]) -> list[float]:
    return [x if (not math.isnan(x) and x > 0) else NAN for x in xs]


def _layer_axis(ax: Any) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _set_depth_axis(ax: Any, depths: list[int]) -> Callable[..., list[float]]:
    """Label the x axis for models of these depths and return `place(L, layers=all)`, the
    x positions of blocks `layers` of a model of L blocks: the block index when every model
    has the same depth; the relative depth l / (L-1) when they differ, so an 8-block run
    and a 30-block model span the same axis."""
    same = len(set(depths)) <= 1
    ax.set_xlabel("block l" if same else "relative depth l / (L-1) (models differ in depth)")
    if same:
        _layer_axis(ax)

    def place(L: int, layers: Iterable[int] | None = None) -> list[float]:
        index = list(range(L) if layers is None else layers)
        return index if same else [i / max(L - 1, 1) for i in index]

    return place


def _log_if_wide(ax: Any, series: list[list[float]], decades: float = 1.3) -> bool:
    """A log y-axis only when the positive values span more than `decades` decades: a log
    axis over a narrow range shows one or two tick labels and no readable scale."""
    pos = [x for ys in series for x in ys if not math.isnan(x) and x > 0]
    if pos and math.log10(max(pos) / min(pos)) > decades:
        ax.set_yscale("log")
        if math.log10(max(pos) / min(pos)) < 3:  # labels at 1, 2, 5 x 10^k, not at 10^k only
            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        return True
    return False


def _legend(ax: Any, n: int) -> None:
    if n and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", ncols=1 if n <= 8 else 2, frameon=False)


# ----------------------------------------------------------------------------- training


def fig_loss_curves(data: ReportData, colors: dict[str, str]) -> Figure | str:
    runs = [r for r in data.runs if r.series("loss")[0] or r.series("val_loss")[0]]
    if not runs:
        return "no training or validation loss recorded in the runs"
    fig, axes = _fig(10, 3.8, ncols=2)
    ax_t, ax_v = axes[0]
    for r in runs:
        s, v = r.series("loss")
        if s:
            ax_t.plot(s, v, color=colors[r.label], label=r.label, lw=1.4)
        s, v = r.series("val_loss")
        if s:
            ax_v.plot(s, v, color=colors[r.label], label=r.label, lw=1.4, marker="o", ms=3)
    ax_t.set(title="training loss", xlabel="training step",
             ylabel="cross-entropy (nats/token)")
    ax_v.set(title="validation loss", xlabel="training step",
             ylabel="cross-entropy (nats/token)")
    _legend(ax_t, len(runs))
    return fig


def fig_last_layer_variance(data: ReportData, colors: dict[str, str]) -> Figure | str:
    runs = [r for r in data.runs if r.stats]
    if not runs:
        return "no layer statistics in the runs (train with train.stats_interval > 0)"
    fig, axes = _fig(6.4, 4.0)
    ax = axes[0][0]
    for r in runs:
        steps, vals = [], []
        for s in r.stats:
            v = s.get("var")
            if isinstance(v, list) and v:
                steps.append(s["_step"])
                vals.append(num(v[-1]))
        ax.plot(steps, _positive(_vals(vals)), color=colors[r.label], label=r.label, lw=1.4,
                marker="o", ms=2.5)
    ax.set_yscale("log")
    ax.set(title=r"last-layer variance over training (pre-final-norm, $\mathrm{var}_{L-1}$)",
           xlabel="training step", ylabel=VAR_LABEL + ", log scale")
    _legend(ax, len(runs))
    return fig


def _final_stats(r: RunData) -> dict[str, Any] | None:
    return r.stats[-1] if r.stats else None


def fig_variance_profile(data: ReportData, colors: dict[str, str]) -> Figure | str:
    lines = []
    for r in data.runs:
        st = _final_stats(r)
        if st and isinstance(st.get("var"), list):
            lines.append((f"{r.label} (stats, step {st['_step']})", r.label, st["var"], "-", "o"))
    for label, d in data.all_diagnoses:
        v = d.layer_list("variance", "variance")
        if v:
            lines.append((f"{label} (diagnose)", label, v, "--", "s"))
    if not lines:
        return "no variance profile: no stats records and no diagnose results"
    fig, axes = _fig(6.4, 4.0)
    ax = axes[0][0]
    place = _set_depth_axis(ax, [len(vals) for *_, vals, _, _ in lines])
    for text, label, vals, ls, marker in lines:
        # the stats line drawn wide and pale under the diagnose line: where they agree,
        # both stay visible
        solid = ls == "-"
        ax.plot(place(len(vals)), _positive(_vals(vals)), ls=ls,
                marker=marker, ms=4 if solid else 3, color=colors.get(label, "black"),
                label=text, lw=3.0 if solid else 1.2, alpha=0.45 if solid else 1.0)
    ax.set_yscale("log")
    ax.set(title=r"per-layer variance profile $\mathrm{var}_l$ (output of block l, "
                 "pre-final-norm)", ylabel=VAR_LABEL + ", log scale")
    _legend(ax, len(lines))
    return fig


def fig_layer_stats(data: ReportData, colors: dict[str, str]) -> Figure | str:
    runs = [r for r in data.runs if _final_stats(r)]
    if not runs:
        return "no layer statistics in the runs (train with train.stats_interval > 0)"
    panels = [
        ("update_ratio", r"residual update $\|h_{l+1}-h_l\| / \|h_l\|$", "ratio (token mean)",
         True),
        ("grad_norm", "gradient norm per block", "L2 norm (after clipping)", True),
        ("weight_sparsity", r"weight sparsity ($|w| < 10^{-3}$) per block",
         "fraction of entries", False),
        ("attn_entropy", "attention entropy per layer", "entropy / log(visible keys)", False),
    ]
    fig, axes = _fig(10, 6.4, ncols=2, nrows=2)
    for ax, (key, title, ylabel, log) in zip(axes.flat, panels, strict=True):
        series = [(r, _vals(v)) for r in runs if isinstance(v := _final_stats(r).get(key), list)
                  and any(num(x) is not None for x in v)]
        place = _set_depth_axis(ax, [len(y) for _, y in series])
        if log:
            log = _log_if_wide(ax, [_positive(y) for _, y in series])
        for r, y in series:
            ax.plot(place(len(y)), _positive(y) if log else y,
                    marker="o", ms=3, color=colors[r.label], label=r.label, lw=1.3)
        ax.set(title=title, ylabel=ylabel + (", log scale" if log else ""))
        if not series:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)
    _legend(axes[0][0], len(runs))
    fig.suptitle("layer statistics at each run's last stats step")
    return fig


def fig_moe_routing(data: ReportData, colors: dict[str, str]) -> Figure | str | None:
    """Routing health across depth: per MoE block, the load imbalance and the normalised
    router entropy of every MoE model, and the expert-load map (block x expert) of the
    model with the highest mean imbalance, the one to look at first."""
    import textwrap

    models = data.all_routing
    if not models and not any(r.moe for r in data.runs):
        return None  # no MoE anywhere: nothing to say
    if not models:
        return ("no MoE routing: no run or diagnosed model has MoE layers with routing "
                "statistics (MoE runs record them with train.stats_interval > 0, "
                "`depthlab diagnose` with the moe metric)")
    fig, axes = _fig(13, 4.2, ncols=3)
    ax_i, ax_e, ax_h = axes[0]
    depths = [rt.n_layers for _, rt in models]
    for ax, key in ((ax_i, "imbalance"), (ax_e, "entropy")):
        place = _set_depth_axis(ax, depths)
        for label, rt in models:
            # solid: training-time stats (as in the variance profile); dashed: diagnose
            stats = rt.source != "diagnose"
            what = ", ".join(q for q in (rt.experts, rt.source) if q)
            ax.plot(place(rt.n_layers, rt.layers), _vals(getattr(rt, key)),
                    ls="-" if stats else "--", marker="o" if stats else "s", ms=3.5, lw=1.3,
                    color=colors.get(label, "black"), label=f"{label} ({what})")
    ax_i.axhline(1.0, color="k", ls=":", lw=1, label="balanced (1)")
    ax_i.set_ylim(bottom=0)
    ax_i.set(title="load imbalance per MoE block",
             ylabel=r"$\mathrm{max}_e\, n_e / \mathrm{mean}_e\, n_e$ (1 = balanced)")
    ax_e.set_ylim(0, 1.05)
    ax_e.set(title="router entropy per MoE block",
             ylabel="entropy / log E (1 = uniform, 0 = one expert)")
    _legend(ax_i, len(models) + 1)

    label, rt = max(models, key=lambda m: m[1].mean_imbalance or 0.0)  # the first on ties
    n_experts = max((len(row) for row in rt.load), default=0)
    grid = [[NAN] * max(n_experts, 1) for _ in range(rt.n_layers)]
    for block, row in zip(rt.layers, rt.load, strict=True):
        loads = _vals(row)
        finite = [x for x in loads if not math.isnan(x)]
        mean = sum(finite) / len(finite) if finite else 0.0
        if mean > 0:  # n_e / mean_e n_e: 1 is an expert's balanced share
            grid[block][:len(loads)] = [x / mean for x in loads]
    vmax = max((x for row in grid for x in row if not math.isnan(x)), default=1.0) or 1.0
    image = ax_h.imshow(grid, cmap=heatmap_cmap(), vmin=0, vmax=vmax, origin="upper",
                        aspect="auto", interpolation="nearest")
    fig.colorbar(image, ax=ax_h, shrink=0.9, label=r"load $n_e / \mathrm{mean}_e\, n_e$")
    if len(rt.layers) * n_experts <= 64:  # few cells: their values (0 = an unused expert)
        for block in rt.layers:
            for e, x in enumerate(grid[block]):
                if not math.isnan(x):
                    ax_h.text(e, block, f"{x:.2g}", ha="center", va="center", fontsize=7,
                              color="black" if x > 0.6 * vmax else "white")
    worst = " (highest mean imbalance)" if len(models) > 1 else ""
    ax_h.set_title("\n".join(textwrap.wrap(f"expert load: {label}{worst}", 40)),
                   color=colors.get(label, "black"))
    dense = len(rt.layers) < rt.n_layers
    ax_h.set(xlabel="expert e" + ("\ngrey: dense block (no router)" if dense else ""),
             ylabel="block l")
    for axis, n in ((ax_h.xaxis, n_experts), (ax_h.yaxis, rt.n_layers)):
        if n <= 16:
            axis.set_ticks(range(n))
        else:
            axis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax_h.grid(False)
    fig.suptitle("MoE routing per block (runs: the last stats step; otherwise depthlab "
                 "diagnose)")
    return fig


# ----------------------------------------------------------------------------- diagnose


def _jacobian(d: Diagnosis) -> tuple[list[int], list[float | None], bool] | None:
    """(measured block indices, ||J_l - I||_F / d at each, whether those are Hutchinson
    estimates); None without a Jacobian result."""
    vals = d.layer_list("jacobian", "jacobian_norm")
    h = d.get("jacobian", "hutchinson")
    estimated = False
    if not vals and isinstance(h, dict) and isinstance(h.get("fro"), list):
        estimated = True
        n = d.get("jacobian", "info") or {}
        dm = n.get("d_model") if isinstance(n, dict) else None
        if dm:
            vals = [num(x) / dm if num(x) is not None else None for x in h["fro"]]
    if not vals:
        return None
    layers = d.get("jacobian", "layers")  # a subset when diagnose was given jacobian.layers
    if not (isinstance(layers, list) and len(layers) == len(vals)
            and all(isinstance(x, int) for x in layers)):
        layers = list(range(len(vals)))
    return layers, vals, estimated


def fig_jacobian(data: ReportData, colors: dict[str, str]) -> Figure | str:
    lines = [(label, d, v) for label, d in data.all_diagnoses if (v := _jacobian(d))]
    if not lines:
        return "no Jacobian results (run `depthlab diagnose RUN --out RUN/diagnose`)"
    fig, axes = _fig(6.4, 4.0)
    ax = axes[0][0]
    depth = {label: d.n_layers or len(v[0]) for label, d, v in lines}
    place = _set_depth_axis(ax, list(depth.values()))
    for label, d, (layers, vals, estimated) in lines:
        # a line only through consecutive measured blocks (jacobian.layers may skip some)
        joined = layers == list(range(layers[0], layers[0] + len(layers)))
        what = ", ".join(q for q in ("Hutchinson" if estimated else "", d.measured_on("jacobian"))
                         if q)
        ax.plot(place(depth[label], layers), _vals(vals), marker="o", ms=3,
                color=colors.get(label, "black"), label=f"{label} ({what})" if what else label,
                lw=1.3, ls="-" if joined else "none")
    ax.set(title="Jacobian deviation from identity per layer",
           ylabel=r"$\|J_l - I\|_F / d$ (dimensionless)")
    _legend(ax, len(lines))
    return fig


def fig_layer_scores(data: ReportData, colors: dict[str, str]) -> Figure | str:
    """Per block: the usefulness loss ratio (what the 0/1 'useful' count hides: a block at
    1.03 and one at 1.0 both count as not useful) and the loss increase when it is skipped."""
    panels = [("usefulness", "loss_ratio", "usefulness: loss with block l replaced by its "
               "affine fit", "L_lin / L_base"),
              ("layer_drop", "loss_increase", "layer drop: loss increase with block l skipped",
               "L_skip - L_base (nats/token)")]
    found = [[(label, d, v) for label, d in data.all_diagnoses if (v := d.layer_list(m, key))]
             for m, key, _, _ in panels]
    if not any(found):
        return "no usefulness or layer_drop results from `depthlab diagnose`"
    fig, axes = _fig(10, 3.8, ncols=2)
    depths = [len(v) for lines in found for _, _, v in lines]  # one depth axis for both
    for ax, (metric, _, title, ylabel), lines in zip(axes[0], panels, found, strict=True):
        place = _set_depth_axis(ax, depths)
        for label, d, vals in lines:
            on = d.measured_on(metric)
            ax.plot(place(len(vals)), _vals(vals), marker="o", ms=3,
                    lw=1.3, color=colors.get(label, "black"),
                    label=f"{label} ({on})" if on else label)
        if metric == "usefulness" and lines:
            ax.axhline(1.0, color="grey", ls="-", lw=0.6)
            thresholds = {num(d.get("usefulness", "threshold")) or 1.1 for _, d, _ in lines}
            for t in sorted(thresholds):
                ax.axhline(t, color="k", ls=":", lw=1, label=f"{t:g} (useful above)")
        if metric == "layer_drop":
            # one skipped first block can cost 8 nats and the rest 0.05: a linear axis near
            # 0, logarithmic beyond (increases may be negative, so not a plain log axis)
            sizes = sorted(abs(v) for _, _, vals in lines for v in _vals(vals)
                           if not math.isnan(v) and v != 0)
            if sizes and sizes[-1] > 20 * sizes[len(sizes) // 2]:
                ax.set_yscale("symlog", linthresh=sizes[len(sizes) // 2])
                ylabel += ", symlog"
        if not lines:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=title, ylabel=ylabel)
        _legend(ax, len(lines))
    return fig


def _bar_values(data: ReportData) -> list[tuple[str, dict[str, float | None], dict[str, str]]]:
    """(label, score per panel, what each score was measured over when not the default)."""
    return [(label, {m: d.scalar(m, k) for m, k in SCORES},
             {m: d.measured_on(m) for m, _ in SCORES}) for label, d in data.all_diagnoses]


_MARKS = ("*", "†", "‡", "§", "¶")


def _footnotes(qualifiers: list[str]) -> dict[str, str]:
    """A mark per distinct qualifier ('adjacent pairs' -> '*'), in order of appearance."""
    distinct = list(dict.fromkeys(q for q in qualifiers if q))
    return {q: _MARKS[i] if i < len(_MARKS) else f"[{i + 1}]" for i, q in enumerate(distinct)}


def fig_diagnostic_bars(data: ReportData, colors: dict[str, str]) -> Figure | str:
    rows = [(lab, v, on) for lab, v, on in _bar_values(data)
            if any(x is not None for x in v.values())]
    if not rows:
        return "no usefulness / causal / permutation results from `depthlab diagnose`"
    panels = [("usefulness", "usefulness", "fraction of useful layers"),
              ("causal", "causal score (causal_pairs)", "mean relative change of updates"),
              ("permutation", "permutation score", "mean relative loss change")]
    fig, axes = _fig(max(9.0, min(3 + 1.2 * len(rows), 15)), 3.8, ncols=3)
    labels = [lab for lab, _, _ in rows]
    tilt = len(rows) > 3 or max(len(lab) for lab in labels) > 8
    upright = len(rows) <= 5  # value labels turn vertical when the bars get narrow
    for ax, (key, title, ylabel) in zip(axes[0], panels, strict=True):
        vals = [v[key] for _, v, _ in rows]
        xs = list(range(len(rows)))
        bars = ax.bar(xs, [NAN if x is None else x for x in vals],
                      color=[colors.get(lab, "grey") for lab in labels])
        for bar, (_, _, on) in zip(bars, rows, strict=True):
            if on[key]:  # another quantity than its neighbours': hatched, not only marked
                bar.set_hatch("///")
                bar.set_edgecolor("white")
        # a score measured over another set than the default gets a mark, explained below
        # the panel, rather than a second text line that collides with its neighbours'
        marks = _footnotes([on[key] for _, _, on in rows])
        for x, val, (_, _, on) in zip(xs, vals, rows, strict=True):
            text = "n/a" if val is None else f"{val:.3g}{marks.get(on[key], '')}"
            ax.text(x, 0 if val is None else val, text, ha="center", va="bottom", fontsize=7,
                    rotation=0 if upright else 90)
        ax.set_xticks(xs, labels, rotation=30 if tilt else 0, ha="right" if tilt else "center")
        notes = "; ".join(f"{m} {q}" for q, m in marks.items())
        ax.set(title=title, ylabel=ylabel, xlabel="run" + (f"\n{notes}" if notes else ""))
        top = max((x for x in vals if x is not None), default=0.0)
        if key == "usefulness":
            ax.set_ylim(0, 1.15 if upright else 1.3)
        elif top > 0:  # room above the tallest bar for its label
            ax.set_ylim(0, top * (1.15 if upright else 1.35))
        ax.grid(axis="x", visible=False)
    return fig


def _heatmaps(data: ReportData, metric: str, title: str, xlabel: str, ylabel: str,
              colors: dict[str, str],
              undefined: tuple[Callable[[int, int], bool], str]) -> Figure | str:
    """One panel per model, each with its own colour scale: models differ in scale by
    orders of magnitude (a pretrained 30-block model against a 120-step toy), and a shared
    scale would flatten all but the largest. Grey: cells with no value (a pair outside a
    measured subset) and those where (row, column) is `undefined` (its text says which)."""
    import textwrap

    is_undefined, undefined_text = undefined
    mats = [(label, m, d.measured_on(metric)) for label, d in data.all_diagnoses
            if (m := d.matrix(metric))]
    if not mats:
        return f"no {metric} matrices from `depthlab diagnose`"
    n = len(mats)
    ncols = min(n, 4)
    nrows = math.ceil(n / ncols)
    width = max(3.7 * ncols, 5.2)  # one panel: room for its title and colour bar
    fig, axes = _fig(width, 3.6 * nrows + 0.5, ncols=ncols, nrows=nrows)
    cmap = heatmap_cmap()
    for ax, (label, m, on) in zip(axes.flat, mats, strict=False):
        L = len(m)
        grid = [[NAN if x is None or is_undefined(s, j) else x for j, x in enumerate(row)]
                for s, row in enumerate(m)]
        vmax = max((x for row in grid for x in row if not math.isnan(x)), default=1.0) or 1.0
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=vmax, origin="upper",
                          interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(label + (f" ({on})" if on else ""), 34)),
                     color=colors.get(label, "black"))
        ax.set(xlabel=xlabel, ylabel=ylabel)
        if L <= 16:
            ax.set_xticks(range(L))
            ax.set_yticks(range(L))
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.grid(False)
        fig.colorbar(image, ax=ax, shrink=0.8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    gaps = any(x is None and not is_undefined(s, j) for _, m, _ in mats
               for s, row in enumerate(m) for j, x in enumerate(row))
    grey = "; ".join(g for g in (undefined_text, "not measured" if gaps else "") if g)
    text = f"{title} (colour scale per panel; grey: {grey})"
    fig.suptitle("\n".join(textwrap.wrap(text, int(11 * width))))
    return fig


def fig_causal_heatmaps(data: ReportData, colors: dict[str, str]) -> Figure | str:
    return _heatmaps(data, "causal", "causal score C[s, l]", "later block l",
                     "skipped block s", colors, (lambda s, j: s >= j, "s >= l, no later block"))


def fig_permutation_heatmaps(data: ReportData, colors: dict[str, str]) -> Figure | str:
    return _heatmaps(data, "permutation", "permutation score P(l1, l2)", "block l2",
                     "block l1", colors, (lambda a, b: a == b, "l1 = l2, no swap"))


# ----------------------------------------------------------------------------- ladder


def fig_ladder(data: ReportData, colors: dict[str, str]) -> Figure | str:
    if not data.ladder:
        return "no ladder data (pass --ladder FILE or put ladder.json in a report directory)"
    score_name, rows = ladder_scores(data.ladder)
    if not any(s is not None for _, s, _ in rows):
        return "ladder data has no scores (ppl / val_ppl / accuracy / avg_accuracy)"
    fig, axes = _fig(max(5.0, 1.2 * len(rows) + 2), 4.0)
    ax = axes[0][0]
    xs = list(range(len(rows)))
    scores = [NAN if s is None else s for _, s, _ in rows]
    bars = ax.bar(xs, scores, color="#4c72b0", label=score_name)
    for b, s in zip(bars, scores, strict=True):
        if not math.isnan(s):
            ax.text(b.get_x() + b.get_width() / 2, s, f"{s:.1f}", ha="center", va="bottom",
                    fontsize=7)
    ax.set_xticks(xs, [lab for lab, _, _ in rows], rotation=20, ha="right")
    ax.set(title="ablation ladder", xlabel="recipe step (cumulative)", ylabel=score_name)
    finite = [s for s in scores if not math.isnan(s)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = (hi - lo) * 0.5 or abs(hi) * 0.05 or 1.0
        ax.set_ylim(max(0.0, lo - pad) if lo >= 0 else lo - pad, hi + pad)
    ax.grid(axis="x", visible=False)
    use = [u for _, _, u in rows]
    if any(u is not None for u in use):
        ax2 = ax.twinx()
        ax2.plot(xs, [NAN if u is None else u for u in use], color="#dd8452", marker="D",
                 ls="--", lw=1.2, label="usefulness")
        ax2.set_ylabel("usefulness (fraction of useful layers)")
        ax2.set_ylim(0, 1.05)
        ax2.grid(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", frameon=False)
    return fig


# ----------------------------------------------------------------------------- driver

FIGURES: list[tuple[str, str, str, Callable[[ReportData, dict[str, str]], Figure | str | None]]] = [
    ("loss_curves", "Training and validation loss",
     "Token-mean next-token cross-entropy; validation on the run's fixed validation batches.",
     fig_loss_curves),
    ("last_layer_variance", "Last-layer variance over training",
     "var of block L-1 (the last block): the mean over probe tokens of the variance across "
     "the hidden dimension of its output, before the final norm (metrics.md section 1), "
     "log scale.",
     fig_last_layer_variance),
    ("variance_profile", "Per-layer variance profile",
     "Solid: the last training-time stats step (fixed probe batch). Dashed: `depthlab diagnose` "
     "(its evaluation set).", fig_variance_profile),
    ("layer_stats", "Layer statistics at the last stats step",
     "Residual-update ratio, per-block gradient norm, weight sparsity and attention entropy "
     "from the training-time stats (docs/reporting.md).", fig_layer_stats),
    ("moe_routing", "MoE routing per block",
     "Left and middle, per MoE block of each MoE run or model (solid: its last training-time "
     "stats step, on the fixed probe batch; dashed: `depthlab diagnose`, on its evaluation "
     "set): load imbalance max_e n_e / mean_e n_e over the tokens' top-k assignments (1 = "
     "balanced, E/k = every token sent to the same k experts) and router entropy / log E "
     "(1 = the router spreads its weight uniformly, 0 = all on one expert; metrics.md "
     "section 7). Right: each expert's load n_e / mean_e n_e in each block of the model "
     "with the highest mean imbalance; grey rows are dense blocks. Dense runs are not "
     "drawn.", fig_moe_routing),
    ("jacobian", "Jacobian norm per layer",
     "||J_l - I||_F / d of each block (metrics.md section 2), from `depthlab diagnose`.",
     fig_jacobian),
    ("diagnostic_bars", "Usefulness, causal and permutation scores",
     "usefulness = useful layers / L (loss ratio > 1.1 when the block is replaced by its best "
     "affine map, evaluated on its fitting tokens); causal = causal_pairs; permutation = mean "
     "over all block pairs. A bar measured over another set (adjacent pairs, a disjoint "
     "split) carries a mark that the panel's axis label explains.",
     fig_diagnostic_bars),
    ("layer_scores", "Usefulness loss ratio and layer-drop loss per block",
     "Left: L_lin / L_base when block l is replaced by its least-squares affine map "
     "(metrics.md section 3; a block counts as useful above the dotted line). Right: the "
     "loss increase when block l is skipped (layer drop, section 6).", fig_layer_scores),
    ("causal_heatmaps", "Causal score matrices",
     "C[s, l]: relative change of block l's update when block s is skipped (defined for "
     "l > s only: grey on and below the diagonal). Each panel has its own colour scale.",
     fig_causal_heatmaps),
    ("permutation_heatmaps", "Permutation score matrices",
     "P(l1, l2) = |L_base - L_swap| / L_base for swapping blocks l1 < l2. Each panel has "
     "its own colour scale.",
     fig_permutation_heatmaps),
    ("ladder", "Ablation ladder",
     "Bars: the score of each cumulative recipe step; markers: usefulness.", fig_ladder),
]


def make_figures(data: ReportData, out_dir: Path, colors: dict[str, str],
                 formats: tuple[str, ...] = ("png", "svg"), dpi: int = 120) -> list[FigureOut]:
    """Draw every figure that has data; write `out_dir/NAME.{png,svg}`."""
    import matplotlib

    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for name, title, caption, fn in FIGURES:
        with matplotlib.rc_context(STYLE):
            result = fn(data, colors)
            if result is None:  # does not apply to these runs (MoE routing of dense runs)
                continue
            if isinstance(result, str):
                outs.append(FigureOut(name, title, caption, note=result))
                continue
            fo = FigureOut(name, title, caption)
            if "png" in formats:
                fo.png = out_dir / f"{name}.png"
                result.savefig(fo.png, dpi=dpi)
            if "svg" in formats:
                fo.svg = out_dir / f"{name}.svg"
                result.savefig(fo.svg)
        outs.append(fo)
    return outs
