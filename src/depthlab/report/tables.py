"""Report tables: one row per run (validation PPL, usefulness, ...) in the paper's layout.

Each table renders to HTML (for the page), GitHub markdown and CSV (written beside it).
"""

from __future__ import annotations

import csv
import html
import io
import json
from dataclasses import dataclass
from typing import Any

from depthlab.report.data import SCORES, Diagnosis, ReportData, ladder_scores, num
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
    csv_records: list[dict[str, Any]] | None = None
    """The CSV's rows, one dict per row with the same keys (the columns): unrounded numbers,
    None for no value. None: the shown cells."""

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
        numbers where the builder gave them, true/false, and an empty cell for no value."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if self.csv_records is None:
            w.writerow([h.removesuffix(" ↓").removesuffix(" ↑") for h in self.headers])
            w.writerows([["" if c == MISSING else c for c in r] for r in self.rows])
        else:
            columns = list(self.csv_records[0]) if self.csv_records else []
            w.writerow(columns)
            w.writerows([[_csv_cell(r[c]) for c in columns] for r in self.csv_records])
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


def score_fields(d: Diagnosis | None, scores: tuple[tuple[str, str], ...] = SCORES
                 ) -> dict[str, Any]:
    """A row's CSV fields for `scores`: each score's number and, in "<score> set", what it
    was measured over when not the default set (empty otherwise)."""
    out: dict[str, Any] = {}
    for metric, key in scores:
        name = CSV_SCORE_NAMES.get(key, metric)
        out[name] = d.scalar(metric, key) if d else None
        out[f"{name} set"] = (d.measured_on(metric) or None) if d else None
    return out


CSV_SCORE_NAMES = {"mean.jacobian_norm": "mean jacobian_norm"}


def _csv_cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return v


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
    # MoE and dense runs are compared at matched ACTIVE parameters (the paper's axis)
    sparse = any(r.params(active=True) != r.params() for r in data.runs)
    params = ["params", "active params"] if sparse else ["params"]
    headers = ["run", *(knob_name(k) for k in knobs), *params, "steps", "val loss",
               "val PPL ↓", "usefulness ↑", "causal", "permutation", "last-layer var"]
    every_knob = shown_knobs(data.knob_keys, limit=len(data.knob_keys))  # the CSV has all
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
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
        records.append({"run": r.label, **{k: r.knobs.get(k) for k in every_knob},
                        "params": r.params(), "active params": r.params(active=True),
                        "steps": r.final_step, "complete": r.complete,
                        "val loss": r.val_loss(), "val PPL": r.val_ppl(), **score_fields(d),
                        "last-layer var": num(last_var)})
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
    return Table("runs", "Validation perplexity and layer usefulness per run", headers, rows,
                 note, records)


def diagnoses_table(data: ReportData) -> Table | None:
    """Models diagnosed outside any run (e.g. Hugging Face checkpoints)."""
    if not data.diagnoses:
        return None
    headers = ["model", "layers", "N x T", "usefulness ↑", "causal", "permutation",
               "mean ||J-I||/d", "last-layer var"]
    scores = [*SCORES, ("jacobian", "mean.jacobian_norm")]
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for d in data.diagnoses:
        n, t = d.data.get("n_samples"), d.data.get("seq_len")
        last_var = d.scalar("variance", "last_layer_variance")
        rows.append([d.label, str(d.n_layers or MISSING), f"{n} x {t}" if n and t else MISSING,
                     *(fmt_score(d, metric, key) for metric, key in scores), fmt(last_var)])
        records.append({"model": d.label, "layers": d.n_layers, "N": n, "T": t,
                        **score_fields(d, scores), "last-layer var": last_var})
    note = ("Each model's evaluation set is N sequences of T tokens; a score measured over "
            "fewer sequences, a subset of layers or pairs, or a held-out split names it.")
    return Table("diagnoses", "Diagnosed models", headers, rows, note, records)


def _at_block(values: list[float | None], layers: list[int], pick: Any) -> tuple[Any, Any]:
    """(the `pick` (max or min) of the values, its block index); (None, None) if none."""
    found = [(v, layer) for v, layer in zip(values, layers, strict=True) if v is not None]
    return pick(found, key=lambda x: x[0]) if found else (None, None)


def moe_table(data: ReportData) -> Table | None:
    """One row per run or model with MoE layers: its routing summed up over depth (the
    `moe_routing` figure per block; the CSV has the per-block values)."""
    models = data.all_routing
    if not models:
        return None
    headers = ["model", "measured", "MoE blocks", "experts", "imbalance (mean)",
               "imbalance (max)", "router entropy (mean)", "router entropy (min)"]
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    for label, rt in models:
        worst, worst_at = _at_block(rt.imbalance, rt.layers, max)
        low, low_at = _at_block(rt.entropy, rt.layers, min)
        rows.append([label, rt.source, f"{len(rt.layers)} of {rt.n_layers}",
                     rt.experts or MISSING, fmt(rt.mean_imbalance),
                     MISSING if worst is None else f"{fmt(worst)} (block {worst_at})",
                     fmt(rt.mean_entropy),
                     MISSING if low is None else f"{fmt(low)} (block {low_at})"])
        records.append({"model": label, "measured": rt.source, "layers": rt.n_layers,
                        "moe blocks": rt.layers, "num_experts": rt.num_experts,
                        "top_k": rt.top_k, "mean load imbalance": rt.mean_imbalance,
                        "max load imbalance": worst, "max load imbalance block": worst_at,
                        "mean router entropy": rt.mean_entropy, "min router entropy": low,
                        "min router entropy block": low_at, "load imbalance": rt.imbalance,
                        "router entropy": rt.entropy, "expert load": rt.load})
    note = ("load imbalance: max_e n_e / mean_e n_e over the tokens' top-k assignments in a "
            "block (1 = balanced, E/k = every token sent to the same k experts); router "
            "entropy: entropy of the router's distribution / log E, token mean (1 = uniform). "
            "measured: a run's last training-time stats step (the fixed probe batch), else "
            "`depthlab diagnose` (its evaluation set). The CSV adds the per-block values "
            "(JSON lists, in the order of `moe blocks`) and each expert's load (fraction of "
            "tokens routed to it).")
    return Table("moe", "MoE routing per model", headers, rows, note, records)


def ladder_table(data: ReportData) -> Table | None:
    if not data.ladder:
        return None
    score_name, rows = ladder_scores(data.ladder)
    headers = ["step", score_name, "usefulness ↑"]
    return Table("ladder", "Ablation ladder", headers,
                 [[lab, fmt(s), fmt(u)] for lab, s, u in rows],
                 csv_records=[{"step": lab, score_name: s, "usefulness": u}
                              for lab, s, u in rows])


def make_tables(data: ReportData) -> list[Table]:
    return [t for t in (runs_table(data), diagnoses_table(data), moe_table(data),
                        ladder_table(data)) if t]


HEADLINE_SCORES = ("usefulness", "causal", "permutation", "last-layer var")
"""The scores of a runs or diagnoses table row that the console headline shows."""


def headline(tables: list[Table], limit: int = 8, more: str = "") -> list[str]:
    """The console's summary of a report: one line per run, then per diagnosed model,
    with the cells its table row shows (a cell without a value is left out), e.g.
    `L8  step 300  val loss 1.62 (PPL 5.05)  usefulness 0.75  last-layer var 0.31`;
    at most `limit` lines, then `... N more` and `more` (where they are)."""
    lines: list[tuple[str, str]] = []
    for t in tables:
        if t.name not in ("runs", "diagnoses"):
            continue
        names = [h.removesuffix(" ↓").removesuffix(" ↑") for h in t.headers]
        for row in t.rows:
            cells = {n: c for n, c in zip(names, row, strict=True) if c != MISSING}
            parts = [f"step {cells['steps']}"] if "steps" in cells else []
            if "val loss" in cells:  # as `depthlab train` prints it
                ppl = f" (PPL {cells['val PPL']})" if "val PPL" in cells else ""
                parts.append(f"val loss {cells['val loss']}{ppl}")
            parts += [f"{key} {cells[key]}" for key in HEADLINE_SCORES if key in cells]
            lines.append((row[0], "  ".join(parts)))
    width = min(max((len(label) for label, _ in lines[:limit]), default=0), 32)
    out = [f"  {label.ljust(width)}  {text}".rstrip() for label, text in lines[:limit]]
    if len(lines) > limit:
        out.append(f"  ... {len(lines) - limit} more" + (f" ({more})" if more else ""))
    return out
