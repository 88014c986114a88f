"""The outputs of `depthlab diagnose`: results.json (versioned schema), CSVs, headline table.

results.json (schema_version 1; field-by-field documentation in docs/diagnose.md):

    {
      "schema_version": 1,
      "depthlab_version": "0.1.0",
      "created": "2026-01-01T12:00:00Z",
      "model_name": "SmolLM2-135M-Instruct.Q4_1",
      "model":   {spec, name, kind, arch, n_layers, d_model, dtype, compute_dtype,
                  stored_dtype (of the files, "gguf" for GGUF; null for a given module), params,
                  max_seq_len, vocab_size, source},
      "data":    {source, split, tokenizer, n_samples, seq_len, seed, tokens,
                  available_tokens, ids_sha256},
      "run":     {batch_size, device, threads, torch_version, transformers_version,
                  load_seconds, data_seconds, total_seconds, command},
      "metrics": {name: {<the metric's per-layer lists and scalars>, cost, info, wall_s,
                         options, n_samples}},
      "skipped": {name: reason},
      "timings": {name: seconds},
      "block_forwards": {name: count},
      "jvp_block_forwards": {name: count}
    }

The per-metric dicts are exactly the metric results' `to_dict()` (definitions in
metrics.md) plus `wall_s`, `options` (every keyword option with its value, defaults
included) and `n_samples` (the sequences the metric saw: N unless `samples` was set).

CSVs (one per metric, `csv/<metric>.csv`): one row per layer, a column per per-layer
list of the metric (nested dicts flattened as `parent.key`); matrices as their own
`csv/<metric>_<key>.csv` (L x L with a header row of column indices and a first column
of row indices). Permutation additionally writes `csv/permutation_pairs.csv`.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from depthlab.data.cache import atomic_write_text
from depthlab.interrupts import interrupts_deferred
from depthlab.text import md_cell

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
CSV_DIR = "csv"
FIG_DIR = "figures"
SUMMARY_FILE = "summary.md"

TOP_LEVEL_KEYS = ("schema_version", "depthlab_version", "created", "model_name", "model", "data",
                  "run", "metrics", "skipped", "timings", "block_forwards", "jvp_block_forwards")
MODEL_KEYS = ("spec", "arch", "n_layers", "d_model", "dtype", "params")
DATA_KEYS = ("source", "n_samples", "seq_len", "seed", "tokens")

# per metric: the list that indexes its per-layer rows (default: 0..L-1)
_INDEX_KEYS = {"jacobian": "layers", "moe": "moe_layers"}
# keys that are bookkeeping, not per-layer data
_SKIP_KEYS = {"info", "cost", "options", "pairs", "scores", "swap_loss", "ranking",
              "best_start", "by_n", "per_matrix", "per_block"}


# ------------------------------------------------------------------ json


def _clean(x: Any) -> Any:
    """Plain JSON values; non-finite floats -> None (results.json is strict JSON)."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, (str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):
        return _clean(x.item())
    if isinstance(x, Path):
        return str(x)
    return str(x)


def write_json(results: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_FILE
    atomic_write_text(path, json.dumps(_clean(results), indent=1, allow_nan=False) + "\n")
    return path


def read_results(path: str | Path) -> dict[str, Any]:
    """A results.json (or the folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / RESULTS_FILE
    return json.loads(p.read_text())


def validate_results(results: dict[str, Any]) -> list[str]:
    """Problems with a results dict against schema_version 1 (empty list = valid)."""
    problems = []
    for k in TOP_LEVEL_KEYS:
        if k not in results:
            problems.append(f"missing top-level key {k!r}")
    if results.get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version is {results.get('schema_version')!r}, "
                        f"expected {SCHEMA_VERSION}")
    for section, keys in (("model", MODEL_KEYS), ("data", DATA_KEYS)):
        sec = results.get(section)
        if not isinstance(sec, dict):
            problems.append(f"{section} is not an object")
            continue
        problems += [f"missing {section}.{k}" for k in keys if k not in sec]
    metrics = results.get("metrics")
    if not isinstance(metrics, dict):
        return [*problems, "metrics is not an object"]
    for name, m in metrics.items():
        if not isinstance(m, dict):
            problems.append(f"metrics.{name} is not an object")
            continue
        for k in ("wall_s", "options", "cost", "n_samples"):
            if k not in m:
                problems.append(f"missing metrics.{name}.{k}")
        for table in ("timings", "block_forwards"):
            if name not in (results.get(table) or {}):
                problems.append(f"missing {table}.{name}")
    return problems


# ------------------------------------------------------------------- csv


def _is_scalar(x: Any) -> bool:
    return x is None or isinstance(x, (int, float, bool, str))


def _is_matrix(x: Any) -> bool:
    return (isinstance(x, list) and len(x) > 0 and all(isinstance(r, list) for r in x)
            and all(_is_scalar(v) for r in x for v in r))


def _fmt(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, float):
        return repr(x)
    return x


def per_layer_columns(name: str, metric: dict[str, Any], n_layers: int
                      ) -> tuple[list[int], dict[str, list[Any]]]:
    """(row index, {column: values}) of a metric's per-layer lists."""
    index_key = _INDEX_KEYS.get(name)
    index = metric.get(index_key) if index_key else None
    if not isinstance(index, list):
        index = list(range(n_layers))
    n = len(index)
    cols: dict[str, list[Any]] = {}

    def visit(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if k in _SKIP_KEYS or k == index_key:
                continue
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                visit(f"{key}.", v)
            elif isinstance(v, list) and len(v) == n and n and all(_is_scalar(x) for x in v):
                cols[key] = v

    visit("", metric)
    if name == "weight_sparsity":
        for kind, entry in (metric.get("per_kind") or {}).items():
            for stat in ("fraction_below_tau_by_layer", "hoyer_by_layer"):
                vals = entry.get(stat) if isinstance(entry, dict) else None
                if isinstance(vals, list) and len(vals) == n:
                    cols[f"{kind}.{stat.removesuffix('_by_layer')}"] = vals
        cols = {k: v for k, v in cols.items() if not k.startswith("per_kind.")}
    return index, cols


def _write_rows(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([_fmt(x) for x in r])


def write_matrix_csv(path: Path, matrix: list[list[Any]], corner: str = "row",
                     index: list[Any] | None = None) -> None:
    """A matrix with its row labels (`index`, default 0..n-1) in the first column."""
    width = max(len(r) for r in matrix)
    index = list(range(len(matrix))) if index is None else index
    _write_rows(path, [corner, *map(str, range(width))],
                ([i, *r] for i, r in zip(index, matrix, strict=True)))


def _matrices(name: str, metric: dict[str, Any]) -> dict[str, list[list[Any]]]:
    out = {}
    for k, v in metric.items():
        if k in ("info", "cost", "options", "pairs", "by_n"):
            continue
        if _is_matrix(v):
            out[k] = v
    if name == "attention_sparsity":  # [layer][head], None for layers without maps
        for k in ("normalized_entropy", "top_mass_fraction"):
            v = metric.get(k)
            if isinstance(v, list) and any(isinstance(r, list) for r in v):
                width = max((len(r) for r in v if isinstance(r, list)), default=0)
                out[k] = [r if isinstance(r, list) else [None] * width for r in v]
    if name == "angular_distance" and isinstance(metric.get("by_n"), list):
        by_n = metric["by_n"]
        width = max((len(r) for r in by_n), default=0)
        out["by_n"] = [list(r) + [None] * (width - len(r)) for r in by_n]
    return out


_CORNERS = {"causal": "skipped_s\\layer_l", "permutation": "l1\\l2",
            "angular_distance": "state_i\\state_j", "layer_similarity": "state_i\\state_j",
            "attention_sparsity": "layer\\head", "moe": "layer\\expert"}


def write_csvs(results: dict[str, Any], out: Path) -> list[Path]:
    """One CSV per metric (per-layer rows) plus one per matrix; returns the paths."""
    d = out / CSV_DIR
    d.mkdir(parents=True, exist_ok=True)
    L = int(results["model"]["n_layers"])
    written = []
    for name, metric in results["metrics"].items():
        index, cols = per_layer_columns(name, metric, L)
        if cols:
            p = d / f"{name}.csv"
            _write_rows(p, ["layer", *cols], ([i, *(c[j] for c in cols.values())]
                                              for j, i in enumerate(index)))
            written.append(p)
        for key, matrix in _matrices(name, metric).items():
            corner = _CORNERS.get(name, "row")
            if name == "angular_distance" and key == "by_n":
                corner = "n_minus_1\\start_l"
            p = d / f"{name}_{key}.csv"
            # MoE matrices have one row per MoE layer: label the rows with block indices
            index = metric.get("moe_layers") if name == "moe" else None
            write_matrix_csv(p, matrix, corner, index)
            written.append(p)
        if name == "permutation" and isinstance(metric.get("pairs"), list):
            p = d / "permutation_pairs.csv"
            _write_rows(p, ["l1", "l2", "score", "swap_loss"],
                        ([a, b, s, x] for (a, b), s, x in
                         zip(metric["pairs"], metric["scores"], metric["swap_loss"], strict=True)))
            written.append(p)
    return written


# -------------------------------------------------------------- headlines


def _f(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != 0 and (abs(x) >= 1e4 or abs(x) < 1e-3):
            return f"{x:.3e}"
        return f"{x:.{digits}f}"
    return str(x)


def _argmax(xs: list[Any]) -> int | None:
    vals = [(v, i) for i, v in enumerate(xs) if isinstance(v, (int, float))]
    return max(vals)[1] if vals else None


def headline(name: str, m: dict[str, Any], n_layers: int) -> list[tuple[str, str]]:
    """The headline scalars of one metric as (label, formatted value) pairs."""
    rows: list[tuple[str, str]] = []
    if name == "variance":
        rows += [("last-layer variance", _f(m.get("last_layer_variance"))),
                 ("mean variance", _f(m.get("mean_variance")))]
    elif name == "jacobian":
        mean = m.get("mean") or {}
        layers = m.get("layers") or []
        # a mean over some of the blocks is not comparable with one over all of them
        over = (f" over layers {','.join(map(str, layers))}"
                if n_layers and len(layers) != n_layers else "")
        if mean:
            rows += [(f"mean jacobian_norm{over}", _f(mean.get("jacobian_norm"))),
                     (f"identity_preservation{over}", _f(m.get("identity_preservation"))),
                     (f"mean diagonal_mean{over}", _f(mean.get("diagonal_mean")))]
        h = m.get("hutchinson")
        if isinstance(h, dict):
            rows.append((f"mean jacobian_norm{over} (Hutchinson, {h.get('probes')} probes)",
                         _f(h.get("mean_jacobian_norm"))))
    elif name == "usefulness":
        rows += [("usefulness", f"{_f(m.get('usefulness'))} ({m.get('n_useful')}/{n_layers})"),
                 ("base loss", _f(m.get("base_loss")))]
    elif name == "causal":
        rows += [("causal_pairs", _f(m.get("causal_pairs"))),
                 ("causal_rows", _f(m.get("causal_rows")))]
    elif name == "permutation":
        rows.append((f"permutation ({m.get('pair_set')} pairs: {len(m.get('pairs') or [])})",
                     _f(m.get("permutation"))))
    elif name == "layer_drop":
        inc = m.get("loss_increase") or []
        i = _argmax(inc)
        small = min((v for v in inc if isinstance(v, (int, float))), default=None)
        rows += [("base loss", _f(m.get("base_loss"))),
                 ("max loss increase", f"{_f(inc[i])} (block {i})" if i is not None else "–"),
                 ("min loss increase", _f(small))]
    elif name == "block_influence":
        rank = m.get("ranking") or []
        rows += [("mean block influence", _f(m.get("mean_block_influence"))),
                 ("least influential block", str(rank[0]) if rank else "–")]
    elif name == "angular_distance":
        adj = [x for x in (m.get("adjacent") or []) if isinstance(x, (int, float))]
        rows.append(("mean adjacent distance", _f(sum(adj) / len(adj) if adj else None)))
    elif name == "layer_similarity":
        adj = [x for x in (m.get("adjacent") or []) if isinstance(x, (int, float))]
        rows.append(("mean adjacent similarity", _f(sum(adj) / len(adj) if adj else None)))
    elif name == "weight_sparsity":
        o = m.get("overall") or {}
        rows += [("Hoyer (all block weights)", _f(o.get("hoyer"))),
                 (f"fraction |w| < {m.get('tau')}", _f(o.get("fraction_below_tau")))]
    elif name == "attention_sparsity":
        rows += [("mean normalized entropy", _f(m.get("mean_normalized_entropy"))),
                 ("mean top-90% key fraction", _f(m.get("mean_top_mass_fraction")))]
        if m.get("group_size"):
            rows.append(("KV group size G", str(m.get("group_size"))))
    elif name == "moe":
        if not m.get("moe_layers"):
            rows.append(("MoE layers", "none"))
        else:
            rows += [("MoE layers", str(len(m["moe_layers"]))),
                     ("mean load imbalance", _f(m.get("mean_load_imbalance"))),
                     ("mean router entropy / log E", _f(m.get("mean_router_entropy_normalized"))),
                     ("mean expert importance", _f(m.get("mean_importance")))]
    return rows


def headline_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: name, headline pairs, seconds, block forwards, JVP block forwards."""
    L = int(results["model"]["n_layers"])
    out = []
    for name, m in results["metrics"].items():
        out.append({
            "metric": name,
            "values": headline(name, m, L),
            "seconds": (results.get("timings") or {}).get(name),
            "block_forwards": (results.get("block_forwards") or {}).get(name),
            "jvp_block_forwards": (results.get("jvp_block_forwards") or {}).get(name) or 0,
            "n_samples": m.get("n_samples"),
        })
    return out


def result_warnings(results: dict[str, Any]) -> list[str]:
    """Caveats a reader of the headline table must not miss (printed under it)."""
    out = []
    d = results["model"].get("d_model")
    use = results["metrics"].get("usefulness")
    if use and use.get("underdetermined"):
        effect = ("its loss ratios are ~1 by construction" if use.get("split") == "same"
                  else "its fit is unreliable")
        out.append(f"usefulness: the affine fit saw {use.get('fit_tokens'):,} tokens, fewer than "
                   f"the d+1 = {d + 1 if d else 'd+1'} unknowns per output, so {effect}; "
                   "use more tokens (--samples x --seq-len)")
    elif use and d and isinstance(use.get("fit_tokens"), int) and use["fit_tokens"] < 10 * (d + 1):
        if use.get("split") == "same":
            ratios = [r for r in use.get("loss_ratio") or [] if isinstance(r, (int, float))]
            below = sum(r < 1 for r in ratios)
            seen = f" ({below} of {len(ratios)} loss ratios are below 1)" if below else ""
            effect = (f"it is scored on those same tokens, so it partly memorises them and "
                      f"the ratios read low{seen}")
        else:
            effect = ("the fit is loose, so on held-out tokens the ratios read high and blocks "
                      "can look useful that are not")
        out.append(f"usefulness: the affine fit saw {use.get('fit_tokens'):,} tokens for d+1 = "
                   f"{d + 1} unknowns per output, under 10 per unknown: {effect}; use more "
                   "tokens (--samples x --seq-len)")
    return out


def dtype_label(model: dict[str, Any]) -> str:
    """The dtype the model ran in, with the stored one when they differ ("float32 (stored
    bfloat16)"): a cast changes the numbers a reader compares."""
    ran, stored = model.get("dtype"), model.get("stored_dtype")
    return f"{ran} (stored {stored})" if stored and stored != ran else str(ran)


def summary_markdown(results: dict[str, Any]) -> str:
    """The headline table as Markdown (also written to OUT/summary.md)."""
    model, data = results["model"], results["data"]
    lines = [
        f"# depthlab diagnose: {results.get('model_name')}",
        "",
        f"- model: {model.get('arch')}, L={model.get('n_layers')}, d={model.get('d_model')}, "
        f"{model.get('params'):,} parameters, dtype {dtype_label(model)}",
        f"- data: {data.get('source')} ({data.get('split')}), N={data.get('n_samples')} x "
        f"T={data.get('seq_len')} tokens, seed {data.get('seed')}",
        "",
        "| metric | headline | value | seconds | block forwards |",
        "|---|---|---|---:|---:|",
    ]
    for r in headline_rows(results):
        bf = r["block_forwards"]
        bf_s = f"{bf:,}" if isinstance(bf, int) else "–"
        if r["jvp_block_forwards"]:
            bf_s += f" + {r['jvp_block_forwards']:,} JVP"
        n = r["n_samples"]
        note = f" (N={n})" if n is not None and n != data.get("n_samples") else ""
        secs = f"{r['seconds']:.1f}" if isinstance(r["seconds"], (int, float)) else "–"
        for i, (label, value) in enumerate(r["values"] or [("–", "–")]):
            first = i == 0
            lines.append(f"| {r['metric'] + note if first else ''} | {md_cell(label)} | "
                         f"{md_cell(value)} | "
                         f"{secs if first else ''} | {bf_s if first else ''} |")
    for name, why in (results.get("skipped") or {}).items():
        lines.append(f"| {name} | skipped | {md_cell(why)} | | |")
    warnings = result_warnings(results)
    if warnings:
        lines += [""] + [f"**Warning**: {w}" for w in warnings]
    total = (results.get("run") or {}).get("total_seconds")
    if isinstance(total, (int, float)):
        lines += ["", f"Total {total:.1f} s (model load {results['run'].get('load_seconds', 0):.1f} s)."]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict[str, Any], out: str | Path, *, figures: bool = True
                  ) -> dict[str, Any]:
    """results.json, summary.md, CSVs and (optionally) figures under `out`; returns the paths.
    A Ctrl-C or SIGTERM meanwhile waits for the set to be written (never new files beside
    an old results.json)."""
    with interrupts_deferred("writing the outputs"):
        return _write_outputs(results, Path(out), figures)


def _write_outputs(results: dict[str, Any], out: Path, figures: bool) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    previous = _previous_outputs(out)
    summary = out / SUMMARY_FILE
    atomic_write_text(summary, summary_markdown(results))
    paths: dict[str, Any] = {"results": out / RESULTS_FILE, "summary": summary,
                             "csv": write_csvs(results, out)}
    if figures:
        from depthlab.probe.figures import write_figures

        paths["figures"] = write_figures(results, out)
    results["outputs"] = {k: [str(p) for p in v] if isinstance(v, list) else str(v)
                          for k, v in paths.items()}
    write_json(results, out)
    # files an earlier diagnosis wrote here that this one did not: stale, remove them
    current = {(Path(p).parent.name, Path(p).name) for k in ("csv", "figures")
               for p in paths.get(k, [])}
    for sub, name in previous - current:
        (out / sub / name).unlink(missing_ok=True)
    return paths


def _previous_outputs(out: Path) -> set[tuple[str, str]]:
    """(csv|figures, file name) of the files listed by the results.json already in `out`.
    By name within `out`: the listed paths may be spelled from another working directory."""
    try:
        old = json.loads((out / RESULTS_FILE).read_text()).get("outputs") or {}
    except (OSError, ValueError, AttributeError):
        return set()
    files = [Path(p) for k in ("csv", "figures") for p in (old.get(k) or [])
             if isinstance(p, str)]
    return {(p.parent.name, p.name) for p in files if p.parent.name in (CSV_DIR, FIG_DIR)}
