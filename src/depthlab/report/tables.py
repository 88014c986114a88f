"""Report tables: one row per run (validation PPL, usefulness, ...) in the paper's layout.

Each table renders to HTML (for the page), GitHub markdown and CSV (written beside it).
"""

from __future__ import annotations

import csv
import html
import io
from dataclasses import dataclass
from typing import Any

from depthlab.report.data import Diagnosis, ReportData, ladder_scores, num
from depthlab.text import fmt_params as _fmt_params

ABBREV = {
    "model.n_layers": "L", "model.d_model": "d", "model.n_heads": "heads",
    "model.n_kv_heads": "kv heads", "model.moe": "MoE", "model.moe.num_experts": "E",
    "model.moe.top_k": "top-k", "data.seq_len": "T", "train.weight_decay": "λ (wd)",
    "train.lr": "lr", "train.max_steps": "max steps", "train.batch_size": "batch",
    "model.norm_placement": "norm",
}

MISSING = "–"
"""A cell with no value."""

# The knobs the runs table shows first when runs differ in more than fit: the paper's
# depth and sparsity levers, then shape, then optimisation.
KNOB_ORDER = ("model.n_layers", "train.weight_decay", "data.seq_len", "model.n_kv_heads",
              "model.norm_placement", "model.moe.num_experts", "model.moe.top_k",
              "model.d_model", "model.n_heads", "train.lr", "train.batch_size",
              "train.max_steps")


def shown_knobs(keys: list[str], limit: int = 6) -> list[str]:
    """Up to `limit` of the differing config keys, those in KNOB_ORDER first."""
    rank = {k: i for i, k in enumerate(KNOB_ORDER)}
    return sorted(keys, key=lambda k: rank.get(k, len(rank)))[:limit]


@dataclass
class Table:
    name: str
    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""

    def to_markdown(self) -> str:
        cells = [self.headers] + self.rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]

        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        out = [f"**{self.title}**", "", line(self.headers), sep, *(line(r) for r in self.rows)]
        if self.note:
            out += ["", self.note]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """The cells as shown, for spreadsheets and pandas: plain headers (no ↓/↑ marks)
        and an empty cell where the table shows '–' (no value)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow([h.removesuffix(" ↓").removesuffix(" ↑") for h in self.headers])
        w.writerows([["" if c == MISSING else c for c in r] for r in self.rows])
        return buf.getvalue()

    def to_html(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(
                f'<td class="{"num" if i else "name"}">{e(c)}</td>' for i, c in enumerate(r)
            ) + "</tr>" for r in self.rows)
        note = f'<p class="caption">{e(self.note)}</p>' if self.note else ""
        return (f'<table id="table-{e(self.name)}"><caption>{e(self.title)}</caption>'
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}")


def fmt(x: Any, digits: int = 4) -> str:
    """A number for a table cell: `digits` significant digits, `–` when missing."""
    v = num(x)
    if v is None:
        return MISSING
    if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
        return f"{v:.{max(digits - 2, 1)}e}"
    if abs(v) >= 10 ** digits:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def fmt_score(d: Diagnosis | None, metric: str, key: str) -> str:
    """A diagnose score, with what it was measured over when that is not the default set
    (e.g. "0.0487 (adjacent pairs)")."""
    if d is None:
        return "–"
    text = fmt(d.scalar(metric, key))
    on = d.measured_on(metric)
    return f"{text} ({on})" if on and text != "–" else text


def fmt_value(v: Any) -> str:
    if v is None:
        return "off"
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items())
    return str(v)


def fmt_params(n: int | None) -> str:
    return _fmt_params(n, missing="–")


def knob_name(key: str) -> str:
    return ABBREV.get(key, key.rsplit(".", 1)[-1])


def runs_table(data: ReportData) -> Table | None:
    """Paper-style table: the knobs, then validation PPL and usefulness per run."""
    if not data.runs:
        return None
    knobs = shown_knobs(data.knob_keys)
    headers = ["run", *(knob_name(k) for k in knobs), "params", "steps", "val loss",
               "val PPL ↓", "usefulness ↑", "causal", "permutation", "last-layer var"]
    rows = []
    for r in data.runs:
        d = r.diagnosis
        st = r.stats[-1] if r.stats else None
        last_var = st["var"][-1] if st and isinstance(st.get("var"), list) and st["var"] else None
        if last_var is None and d is not None:
            last_var = d.scalar("variance", "last_layer_variance")
        steps = str(r.final_step) + ("" if r.complete else " (incomplete)")
        rows.append([
            r.label, *(fmt_value(r.knobs.get(k)) for k in knobs), fmt_params(r.params()), steps,
            fmt(r.val_loss()), fmt(r.val_ppl()),
            fmt_score(d, "usefulness", "usefulness"),
            fmt_score(d, "causal", "causal_pairs"),
            fmt_score(d, "permutation", "permutation"),
            fmt(last_var),
        ])
    note = ("val PPL: exp(validation loss) at the run's last evaluation. usefulness, causal "
            "(causal_pairs) and permutation come from `depthlab diagnose` (– when not run; "
            "permutation over all block pairs and usefulness evaluated on its fitting tokens "
            "unless the cell names another set). "
            "last-layer var: the last stats step (pre-final-norm), or diagnose's variance "
            "for runs trained without stats.")
    rest = [k for k in data.knob_keys if k not in knobs]
    if rest:
        note += f" Further differing keys: {', '.join(rest)}."
    return Table("runs", "Validation perplexity and layer usefulness per run", headers, rows,
                 note)


def diagnoses_table(data: ReportData) -> Table | None:
    """Models diagnosed outside any run (e.g. Hugging Face checkpoints)."""
    if not data.diagnoses:
        return None
    headers = ["model", "layers", "usefulness ↑", "causal", "permutation", "mean ||J-I||/d",
               "last-layer var"]
    rows = []
    for d in data.diagnoses:
        jac = d.get("jacobian", "mean")
        jac_mean = jac.get("jacobian_norm") if isinstance(jac, dict) else None
        rows.append([d.label, str(d.n_layers or "–"), fmt_score(d, "usefulness", "usefulness"),
                     fmt_score(d, "causal", "causal_pairs"),
                     fmt_score(d, "permutation", "permutation"), fmt(jac_mean),
                     fmt(d.scalar("variance", "last_layer_variance"))])
    return Table("diagnoses", "Diagnosed models", headers, rows)


def ladder_table(data: ReportData) -> Table | None:
    if not data.ladder:
        return None
    score_name, rows = ladder_scores(data.ladder)
    return Table("ladder", "Ablation ladder", ["step", score_name, "usefulness ↑"],
                 [[lab, fmt(s), fmt(u)] for lab, s, u in rows])


def make_tables(data: ReportData) -> list[Table]:
    return [t for t in (runs_table(data), diagnoses_table(data), ladder_table(data)) if t]
