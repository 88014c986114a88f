"""The reproduce report: a Markdown page with the verdict table, one measurement table
per claim, and figures (PNG) of each claim's metrics against its knob."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from depthlab.probe.figures import _plt

REPORT_FILE = "report.md"
METRIC_LABELS = {
    "val_ppl": "val PPL",
    "last_layer_variance": "last-layer var",
    "usefulness": "usefulness",
    "linear_excess_loss": "lin. loss incr.",
    "causal_pairs": "causal",
    "permutation": "permutation",
}


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _figure(claim: dict[str, Any], runs: dict[str, Any], out: Path) -> str | None:
    """Each metric (mean over seeds, seed runs as dots) against the claim's conditions."""
    conds = claim["conditions"]
    if not conds:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(METRIC_LABELS), figsize=(3.0 * len(METRIC_LABELS), 2.8))
    xs = list(range(len(conds)))
    for ax, (key, label) in zip(axes, METRIC_LABELS.items(), strict=True):
        ax.plot(xs, [c["means"][key] for c in conds], marker="o", color="#4c72b0")
        for x, c in zip(xs, conds, strict=True):
            seeds = [runs[n].get(key) for n in c["runs"] if n in runs]
            ax.scatter([x] * len(seeds), seeds, s=8, color="#999999", zorder=3)
        ax.set_xticks(xs, [c["label"] for c in conds], rotation=30, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"claim {claim['id']}: {claim['title']}", fontsize=10)
    fig.tight_layout()
    name = f"claim{claim['id']}.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def _theory_figure(theory: dict[str, Any], out: Path) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (p, ys) in enumerate(theory["variance"].items()):
        color = f"C{i}"
        ax.plot(theory["depths"], ys, color=color, label=f"simulated p={p}")
        ax.plot(theory["depths"], theory["predicted"][p], color=color, ls="--", lw=1)
    ax.set(xlabel="depth L", ylabel="Var(h_L)", title="random pre-LN stack, masked sublayers "
           "(dashed: growth law)")
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(out / "claim8_theory.png", dpi=110)
    plt.close(fig)
    return "claim8_theory.png"


def _scale_paragraph(results: dict[str, Any]) -> str:
    """How big the re-check was, so a reader can weigh it against the paper's ~1B-parameter
    runs: the base model and data, tokens seen per run, and the parameter range."""
    base = results.get("base") or {}
    model, data, train = (base.get(k) or {} for k in ("model", "data", "train"))
    if not model:
        return ""
    seq, batch = data.get("seq_len"), train.get("batch_size")
    per_step = seq * batch if isinstance(seq, int) and isinstance(batch, int) else None
    steps = results.get("steps")
    seen = (f", {per_step:,} tokens per step, {per_step * steps / 1e6:.1f}M tokens per run"
            if per_step and isinstance(steps, int) else "")
    runs = [r for r in (results.get("runs") or {}).values() if isinstance(r, dict)]
    totals = [r["params"] for r in runs if isinstance(r.get("params"), int)]
    moe = [r for r in runs if isinstance(r.get("params"), int)
           and isinstance(r.get("active_params"), int) and r["active_params"] < r["params"]]
    params = (f" Parameters per run: {min(totals) / 1e6:.2f}M to {max(totals) / 1e6:.2f}M"
              + (f" (the MoE runs: {max(r['params'] for r in moe) / 1e6:.1f}M total, "
                 f"{max(r['active_params'] for r in moe) / 1e6:.1f}M active per token)"
                 if moe else "") + "." if totals else "")
    return (f"Scale: base model L={model.get('n_layers')}, d={model.get('d_model')}, "
            f"{model.get('n_heads')} heads, init {model.get('init', 'normal')}; "
            f"{data.get('tokenizer', 'byte')} tokenizer on {data.get('corpus', 'kjv')}; "
            f"T={seq}, batch {batch}{seen}, lr {train.get('lr')}. Each claim changes one knob "
            f"of this base (its conditions below; a longer T comes with a smaller batch, so "
            f"tokens per step stay equal).{params} The paper's runs have ~1B parameters and "
            "billions of tokens.")


def write_report(results: dict[str, Any], out: Path) -> Path:
    """Write OUT/report.md (and its figures) from reproduce's results dict."""
    runs = results.get("runs", {})
    lines = [f"# depthlab reproduce: scale `{results['scale']}`", ""]
    if results.get("command"):
        lines += ["Command:", "", f"    {results['command']}", ""]
    lines += [f"{results['seeds']} seed(s) per condition, {results['steps']} training steps per "
              f"run, {len(runs)} runs. Diagnostics per run: {', '.join(results['diagnose']['metrics'])} "
              f"on about {results['diagnose']['eval_tokens']} held-out tokens at the run's own "
              f"sequence length.", ""]
    if scale := _scale_paragraph(results):
        lines += [scale, ""]
    wall = results.get("wall")
    if wall:
        device = wall["cuda"] or f"{wall['cpus']} CPU core(s)"
        lines += [f"Wall time of this invocation: {wall['seconds'] / 60:.1f} min with --jobs "
                  f"{wall['jobs']} on {device}, torch {wall['torch']} (runs already finished "
                  f"in the output folder are reused, not re-timed).", ""]
    lines += [f"Verdict rule: {results['rule']}.", ""]
    rows = []
    for claim in results["claims"]:
        measured = "; ".join(f"{t['label']}: {t['status']} ({t['detail']})"
                             for t in claim["tests"] if t["primary"])
        rows.append([str(claim["id"]), claim["title"], claim["paper"], measured,
                     f"**{claim['verdict']}**"])
    lines += ["## Verdicts", ""]
    lines += _table(["#", "claim", "paper's numbers", "our measurement", "holds?"], rows)
    lines.append("")
    for claim in results["claims"]:
        lines += [f"## Claim {claim['id']}: {claim['title']}", "",
                  f"Paper: {claim['paper']}. Knob: {claim['knob']}.", ""]
        if claim["conditions"]:
            header = ["condition", "runs"] + list(METRIC_LABELS.values())
            body = [[c["label"], str(len(c["runs"]))] +
                    [_fmt(c["means"][k]) for k in METRIC_LABELS] for c in claim["conditions"]]
            lines += _table(header, body) + [""]
        lines += _table(["test", "primary", "status", "detail"],
                        [[t["label"], "yes" if t["primary"] else "no (companion)", t["status"],
                          t["detail"]] for t in claim["tests"]]) + [""]
        fig = _figure(claim, runs, out)
        if fig:
            lines += [f"![claim {claim['id']}]({fig})", ""]
    theory = results.get("theory")
    if theory:
        fig = _theory_figure(theory, out)
        lines += [f"![growth law]({fig})", "",
                  f"Simulation: d={theory['d_model']}, {theory['samples']} x {theory['seq_len']} "
                  f"random tokens, {theory['seeds']} seeds; Var(h_0) = "
                  f"{theory['embedding_variance']:.3g}, mean branch variances (p=1): attention "
                  f"{theory['attn_branch_variance']:.3g}, MLP {theory['mlp_branch_variance']:.3g}. "
                  "Derivation: docs/reproduce.md.", ""]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines))
    return path
