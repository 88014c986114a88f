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
from depthlab.text import html_text, md_cell

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
    csv_headers: list[str] | None = None
    """The CSV's columns when they differ from the shown ones (None: `headers`)."""
    csv_rows: list[list[Any]] | None = None
    """The CSV's rows: unrounded numbers, None for no value (None: the shown cells)."""

    def to_markdown(self) -> str:
        cells = [[md_cell(c) for c in r] for r in [self.headers, *self.rows]]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.headers))]

        def line(r: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        out = [f"**{self.title}**", "", line(cells[0]), sep, *(line(r) for r in cells[1:])]
        if self.note:
            out += ["", self.note]
        return "\n".join(out) + "\n"

    def to_csv(self) -> str:
        """For spreadsheets and pandas: plain headers (no ↓/↑ marks), full-precision
        numbers where the builder gave them, and an empty cell for no value."""
        headers = self.csv_headers or self.headers
        rows = self.csv_rows if self.csv_rows is not None else self.rows
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([h.removesuffix(" ↓").removesuffix(" ↑") for h in headers])
        w.writerows([["" if c is None or c == MISSING else c for c in r] for r in rows])
        return buf.getvalue()

    def to_html(self) -> str:
        e = html.escape
        head = "".join(f"<th>{e(h)}</th>" for h in self.headers)
        body = "".join(
            "<tr>" + "".join(
                f'<td class="{"num" if i else "name"}">{e(c)}</td>' for i, c in enumerate(r)
            ) + "</tr>" for r in self.rows)
        note = f'<p class="caption">{html_text(self.note)}</p>' if self.note else ""
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
        return MISSING
    text = fmt(d.scalar(metric, key))
    on = d.measured_on(metric)
    return f"{text} ({on})" if on and text != MISSING else text


SCORES = (("usefulness", "usefulness"), ("causal", "causal_pairs"),
          ("permutation", "permutation"))
"""The diagnose scores the tables show: (metric, key in its results)."""


CSV_SCORE_NAMES = {"mean.jacobian_norm": "mean jacobian_norm"}


def score_csv(diagnoses: list[Diagnosis | None], scores: tuple[tuple[str, str], ...] = SCORES
              ) -> tuple[list[str], list[list[Any]]]:
    """The CSV columns of `scores` for these rows: each score's number, followed by a
    "<score> set" column (what it was measured over) when any row used a non-default set."""
    headers: list[str] = []
    columns: list[list[Any]] = []
    for metric, key in scores:
        headers.append(CSV_SCORE_NAMES.get(key, metric))
        columns.append([d.scalar(metric, key) if d else None for d in diagnoses])
        sets = [d.measured_on(metric) if d else "" for d in diagnoses]
        if any(sets):
            headers.append(f"{headers[-1]} set")
            columns.append([s or None for s in sets])
    return headers, [list(row) for row in zip(*columns, strict=True)]


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


def csv_value(v: Any) -> Any:
    """A config value for the CSV: numbers and text as they are, the rest as shown."""
    if isinstance(v, (int, float, str)) and not isinstance(v, bool):
        return v
    return fmt_value(v)


def fmt_params(n: int | None) -> str:
    return _fmt_params(n, missing="–")


def knob_name(key: str) -> str:
    return ABBREV.get(key, key.rsplit(".", 1)[-1])


def runs_table(data: ReportData) -> Table | None:
    """Paper-style table: the knobs, then validation PPL and usefulness per run."""
    if not data.runs:
        return None
    knobs = shown_knobs(data.knob_keys)
    # MoE and dense runs are compared at matched ACTIVE parameters (the paper's axis)
    sparse = any(r.params(active=True) != r.params() for r in data.runs)
    params = ["params", "active params"] if sparse else ["params"]
    headers = ["run", *(knob_name(k) for k in knobs), *params, "steps", "val loss",
               "val PPL ↓", "usefulness ↑", "causal", "permutation", "last-layer var"]
    rows, raw = [], []
    for r in data.runs:
        d = r.diagnosis
        st = r.stats[-1] if r.stats else None
        last_var = st["var"][-1] if st and isinstance(st.get("var"), list) and st["var"] else None
        if last_var is None and d is not None:
            last_var = d.scalar("variance", "last_layer_variance")
        steps = str(r.final_step) + ("" if r.complete else " (incomplete)")
        rows.append([
            r.label, *(fmt_value(r.knobs.get(k)) for k in knobs),
            *(fmt_params(r.params(active=a)) for a in (False, True)[:len(params)]), steps,
            fmt(r.val_loss()), fmt(r.val_ppl()),
            *(fmt_score(d, metric, key) for metric, key in SCORES),
            fmt(last_var),
        ])
        raw.append([r.label, *(csv_value(r.knobs.get(k)) for k in knobs),
                    *(r.params(active=a) for a in (False, True)[:len(params)]),
                    r.final_step, r.complete, r.val_loss(), r.val_ppl(), num(last_var)])
    note = ("One row per training run, one seed each: the "
            "report does not estimate seed-to-seed noise, so repeat a comparison over seeds "
            "(a sweep grid over train.seed) before reading a small difference. "
            + ("active params: those one token uses (MoE: the routed top-k experts); compare "
               "MoE and dense runs at equal active params. " if sparse else "")
            + "val PPL: exp(validation loss) at the run's last evaluation. usefulness, causal "
            "(causal_pairs) and permutation come from `depthlab diagnose` (– when not run; "
            "permutation over all block pairs and usefulness evaluated on its fitting tokens "
            "unless the cell names another set). "
            "last-layer var: the last stats step (pre-final-norm), or diagnose's variance "
            "for runs trained without stats.")
    rest = [k for k in data.knob_keys if k not in knobs]
    if rest:
        note += f" Further differing keys: {', '.join(rest)}."
    score_headers, scores = score_csv([r.diagnosis for r in data.runs])
    csv_headers = ["run", *knobs, *params, "steps", "complete", "val loss", "val PPL",
                   *score_headers, "last-layer var"]
    csv_rows = [[*a[:-1], *s, a[-1]] for a, s in zip(raw, scores, strict=True)]
    return Table("runs", "Validation perplexity and layer usefulness per run", headers, rows,
                 note, csv_headers, csv_rows)


def diagnoses_table(data: ReportData) -> Table | None:
    """Models diagnosed outside any run (e.g. Hugging Face checkpoints)."""
    if not data.diagnoses:
        return None
    headers = ["model", "layers", "N x T", "usefulness ↑", "causal", "permutation",
               "mean ||J-I||/d", "last-layer var"]
    scores = [*SCORES, ("jacobian", "mean.jacobian_norm")]
    rows, raw = [], []
    for d in data.diagnoses:
        n, t = d.data.get("n_samples"), d.data.get("seq_len")
        last_var = d.scalar("variance", "last_layer_variance")
        rows.append([d.label, str(d.n_layers or MISSING), f"{n} x {t}" if n and t else MISSING,
                     *(fmt_score(d, metric, key) for metric, key in scores), fmt(last_var)])
        raw.append([d.label, d.n_layers, n, t, last_var])
    score_headers, values = score_csv(list(data.diagnoses), scores)
    csv_headers = ["model", "layers", "N", "T", *score_headers, "last-layer var"]
    csv_rows = [[*a[:4], *v, a[4]] for a, v in zip(raw, values, strict=True)]
    note = ("Each model's evaluation set is N sequences of T tokens; a score measured over "
            "fewer sequences, a subset of layers or pairs, or a held-out split names it.")
    return Table("diagnoses", "Diagnosed models", headers, rows, note, csv_headers, csv_rows)


def ladder_table(data: ReportData) -> Table | None:
    if not data.ladder:
        return None
    score_name, rows = ladder_scores(data.ladder)
    headers = ["step", score_name, "usefulness ↑"]
    return Table("ladder", "Ablation ladder", headers,
                 [[lab, fmt(s), fmt(u)] for lab, s, u in rows],
                 csv_rows=[list(r) for r in rows])


def make_tables(data: ReportData) -> list[Table]:
    return [t for t in (runs_table(data), diagnoses_table(data), ladder_table(data)) if t]
