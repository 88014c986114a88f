"""What a report is drawn from: runs (found by config.yaml), diagnose results, ladder data.

A directory passed to `depthlab report` may be a run, a sweep (any folder holding runs),
a `depthlab diagnose` output folder (results.json), or a folder holding ladder.json.
Everything is read leniently: missing pieces become `None` and the page says what was
skipped; only "nothing at all to report" is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from depthlab.config import RUNTIME_KEYS
from depthlab.errors import DepthlabError
from depthlab.paths import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, enclosing_run, is_sweep_spec
from depthlab.text import perplexity

RESULTS_FILE = "results.json"
LADDER_FILE = "ladder.json"
SKIP_DIRS = {"checkpoints", "tensorboard", "tokenizer", "logs", "slurm", ".git", "__pycache__"}
IGNORED_KNOBS = RUNTIME_KEYS | {"name", "model.vocab_size", "data.cache_dir",
                                "train.eval_interval", "train.stats_interval"}
"""Config keys never shown as knobs: names, paths and when things are logged (the runtime
keys a run may change on resume), not what a run computes."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a metrics.jsonl (bad lines skipped and counted)."""
    records, bad = [], 0
    if not path.is_file():
        return records, bad
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)):
            records.append(rec)
        else:
            bad += 1
    return records, bad


def metric_results(results: Any) -> dict[str, dict[str, Any]]:
    """The per-metric dicts of a diagnose results.json (run_suite output or a flat dict)."""
    if not isinstance(results, dict):
        return {}
    metrics = results.get("metrics", results)
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, dict)}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def num(x: Any) -> float | None:
    """A finite float, or None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


SCORES = (("usefulness", "usefulness"), ("causal", "causal_pairs"),
          ("permutation", "permutation"))
"""The diagnose scores the report's tables and bar charts show: (metric, key in its results)."""


@dataclass
class Diagnosis:
    """One `depthlab diagnose` results.json."""

    path: Path
    label: str
    metrics: dict[str, dict[str, Any]]
    raw: dict[str, Any]

    def get(self, metric: str, key: str) -> Any:
        """A metric's value; a dotted key reads inside it ("mean.jacobian_norm")."""
        value: Any = self.metrics.get(metric, {})
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return value

    def layer_list(self, metric: str, key: str) -> list[float | None] | None:
        v = self.get(metric, key)
        if isinstance(v, list) and v and all(not isinstance(x, list) for x in v):
            return [num(x) for x in v]
        return None

    def matrix(self, metric: str) -> list[list[float | None]] | None:
        m = self.get(metric, "matrix")
        if isinstance(m, list) and m and all(isinstance(r, list) for r in m):
            return [[num(x) for x in r] for r in m]
        return None

    def scalar(self, metric: str, key: str) -> float | None:
        return num(self.get(metric, key))

    def measured_on(self, metric: str) -> str:
        """What a score was measured over when it is not the default set (metrics.md says
        the output must name it): "adjacent pairs", "pairs with block 3", "disjoint
        split", "4 of 30 layers", and "N=2" when the metric saw fewer sequences than the
        diagnosis; "" for the default set or no result."""
        parts = []
        if metric == "permutation":
            pairs = self.get("permutation", "pair_set")
            if pairs == "one-vs-rest":
                parts.append(f"pairs with block {self.get('permutation', 'anchor')}")
            elif isinstance(pairs, str) and pairs != "all":
                parts.append(f"{pairs} pairs")
        elif metric == "usefulness":
            split = self.get("usefulness", "split")
            if isinstance(split, str) and split != "same":
                parts.append(f"{split} split")
        elif metric == "jacobian":
            layers, L = self.get("jacobian", "layers"), self.n_layers
            if isinstance(layers, list) and L and len(layers) != L:
                parts.append(f"{len(layers)} of {L} layers")
        n, data_n = self.get(metric, "n_samples"), self.data.get("n_samples")
        if isinstance(n, int) and isinstance(data_n, int) and n != data_n:
            parts.append(f"N={n}")
        return ", ".join(parts)

    @property
    def data(self) -> dict[str, Any]:
        """The diagnosis's data section (n_samples, seq_len, source ...); {} if absent."""
        d = self.raw.get("data")
        return d if isinstance(d, dict) else {}

    @property
    def routing(self) -> Routing | None:
        """The `moe` metric's routing per MoE block; None without one."""
        layers = self.get("moe", "moe_layers")
        if not (isinstance(layers, list) and layers
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                        for x in layers)):
            return None
        n = len(layers)
        loads = self.get("moe", "fraction_routed")
        load = [[num(x) for x in row] if isinstance(row, list) else []
                for row in (loads if isinstance(loads, list) else [])][:n]
        return Routing("diagnose", max(self.n_layers or 0, max(layers) + 1), layers,
                       _per_layer(self.get("moe", "load_imbalance"), n),
                       _per_layer(self.get("moe", "router_entropy_normalized"), n),
                       load + [[]] * (n - len(load)), _same(self.get("moe", "num_experts")),
                       _same(self.get("moe", "top_k")))

    @property
    def n_layers(self) -> int | None:
        info = self.raw.get("model") if isinstance(self.raw.get("model"), dict) else None
        if info and isinstance(info.get("n_layers"), int):
            return info["n_layers"]
        for m in self.metrics.values():
            n = (m.get("info") or {}).get("n_layers") if isinstance(m.get("info"), dict) else None
            if isinstance(n, int):
                return n
        return None


@dataclass
class Routing:
    """One model's MoE routing, per MoE block (metrics.md section 7), from the last
    training-time stats step that recorded it or from `depthlab diagnose`."""

    source: str
    """Where it was measured: "stats, step 60" or "diagnose"."""
    n_layers: int
    layers: list[int]
    """The MoE blocks; the lists below follow this order."""
    imbalance: list[float | None]
    """max_e n_e / mean_e n_e (1 = balanced, E/k = every token on the same k experts)."""
    entropy: list[float | None]
    """Router entropy / log E, token mean (1 = uniform over the experts)."""
    load: list[list[float | None]]
    """Fraction of tokens whose top-k includes expert e (sums to k over the experts)."""
    num_experts: int | None
    """E, when every MoE block has the same number of experts."""
    top_k: int | None

    @property
    def experts(self) -> str:
        """"E=8, k=2" (the parts that are known)."""
        return ", ".join(f"{n}={v}" for n, v in (("E", self.num_experts), ("k", self.top_k))
                         if v is not None)

    @property
    def mean_imbalance(self) -> float | None:
        return _mean(self.imbalance)

    @property
    def mean_entropy(self) -> float | None:
        return _mean(self.entropy)


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def _same(values: Any) -> int | None:
    """The one integer all entries of a list share, else None."""
    if isinstance(values, list) and values and all(isinstance(v, int) for v in values) \
            and len(set(values)) == 1:
        return values[0]
    return None


def _per_layer(values: Any, n: int) -> list[float | None]:
    """n numbers (None where missing or not finite) from a results list."""
    out = [num(v) for v in values[:n]] if isinstance(values, list) else []
    return out + [None] * (n - len(out))


@dataclass
class RunData:
    path: Path
    label: str
    config: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None
    diagnosis: Diagnosis | None = None
    bad_lines: int = 0
    knobs: dict[str, Any] = field(default_factory=dict)
    """The config values that differ between the report's runs."""

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a scalar key over the records (last record per step wins)."""
        by_step: dict[int, float] = {}
        for r in self.records:
            v = num(r.get(key))
            if v is not None:
                by_step[int(r["step"])] = v
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    @property
    def stats(self) -> list[dict[str, Any]]:
        """Stats records in step order (the last one wins per step)."""
        by_step: dict[int, dict[str, Any]] = {}
        for r in self.records:
            if isinstance(r.get("stats"), dict):
                by_step[int(r["step"])] = r["stats"]
        return [dict(by_step[s], _step=s) for s in sorted(by_step)]

    @property
    def final_step(self) -> int:
        steps = [int(r["step"]) for r in self.records]
        if self.summary and isinstance(self.summary.get("step"), int):
            steps.append(self.summary["step"])
        return max(steps, default=0)

    @property
    def max_steps(self) -> int | None:
        v = (self.config.get("train") or {}).get("max_steps")
        return v if isinstance(v, int) else None

    @property
    def complete(self) -> bool:
        return bool(self.summary) and self.summary.get("status") == "complete"

    @property
    def n_layers(self) -> int | None:
        v = (self.config.get("model") or {}).get("n_layers")
        return v if isinstance(v, int) else None

    def val_loss(self) -> float | None:
        if self.summary and num(self.summary.get("val_loss")) is not None:
            return num(self.summary.get("val_loss"))
        _, vals = self.series("val_loss")
        return vals[-1] if vals else None

    def val_ppl(self) -> float | None:
        if self.summary and num(self.summary.get("val_ppl")) is not None:
            return num(self.summary.get("val_ppl"))
        v = self.val_loss()
        return perplexity(v)

    @property
    def moe(self) -> dict[str, Any] | None:
        """The run's model.moe config; None for a dense run."""
        moe = (self.config.get("model") or {}).get("moe")
        return moe if isinstance(moe, dict) else None

    @property
    def routing(self) -> Routing | None:
        """MoE routing at the last stats step that recorded it (training-time stats:
        moe_load, moe_imbalance, router_entropy, null for dense blocks), else from the
        run's diagnosis; None for a dense run or one without either."""
        for st in reversed(self.stats):
            loads = st.get("moe_load")
            if not isinstance(loads, list):
                continue
            layers = [i for i, row in enumerate(loads) if isinstance(row, list) and row]
            if not layers:
                continue
            imb, ent = st.get("moe_imbalance"), st.get("router_entropy")
            k = self.moe.get("top_k") if self.moe else None
            return Routing(
                f"stats, step {st['_step']}", len(loads), layers,
                [num(imb[i]) if isinstance(imb, list) and i < len(imb) else None
                 for i in layers],
                [num(ent[i]) if isinstance(ent, list) and i < len(ent) else None
                 for i in layers],
                [[num(x) for x in loads[i]] for i in layers],
                _same([len(loads[i]) for i in layers]), k if isinstance(k, int) else None)
        return self.diagnosis.routing if self.diagnosis is not None else None

    def params(self, active: bool = False) -> int | None:
        """Total parameters, or (active) those one token uses: MoE runs differ."""
        key = "active_params" if active else "params"
        if self.summary and isinstance(self.summary.get(key), int):
            return self.summary[key]
        return self.params() if active else None


@dataclass
class ReportData:
    runs: list[RunData]
    diagnoses: list[Diagnosis]
    """results.json files not inside a run (e.g. a diagnosed Hugging Face model)."""
    ladder: list[dict[str, Any]] | None
    ladder_source: Path | None
    knob_keys: list[str]
    warnings: list[str]
    sources: list[Path]

    @property
    def all_diagnoses(self) -> list[tuple[str, Diagnosis]]:
        out = [(r.label, r.diagnosis) for r in self.runs if r.diagnosis is not None]
        return out + [(d.label, d) for d in self.diagnoses]

    @property
    def all_routing(self) -> list[tuple[str, Routing]]:
        """(label, MoE routing) of every run and diagnosed model that has MoE layers."""
        out = [(r.label, rt) for r in self.runs if (rt := r.routing)]
        return out + [(d.label, rt) for d in self.diagnoses if (rt := d.routing)]


# ----------------------------------------------------------------------------- discovery


def _load_yaml(path: Path) -> Any:
    """The YAML in `path`, or None when it cannot be read as YAML text."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _looks_like_run_config(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "train" in data


def _is_run_config(path: Path) -> bool:
    return _looks_like_run_config(_load_yaml(path))


def _walk(root: Path, name: str) -> list[Path]:
    """Files called `name` under root, not descending into run internals."""
    found = []
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(d.iterdir())
        except OSError:
            continue
        for e in entries:
            if e.is_dir() and e.name not in SKIP_DIRS and not e.name.startswith("."):
                stack.append(e)
            elif e.is_file() and e.name == name:
                found.append(e)
    return sorted(found)


def find_runs(root: Path) -> list[Path]:
    """Run directories under (or at) root: those holding a run config.yaml."""
    if (root / CONFIG_FILE).is_file() and _is_run_config(root / CONFIG_FILE):
        return [root]
    return [p.parent for p in _walk(root, CONFIG_FILE) if _is_run_config(p)]


def _diagnosis_of_run(run: Path) -> Path | None:
    for cand in (run / "diagnose" / RESULTS_FILE, run / RESULTS_FILE):
        if cand.is_file():
            return cand
    return None


def _unique_labels(paths: list[Path]) -> list[str]:
    """Shortest path suffixes that tell the paths apart (`L8`, or `depth/L8` and `wd/L8`)."""
    parts = [p.resolve().parts for p in paths]
    depth = 1
    while True:
        labels = ["/".join(pp[-depth:]) for pp in parts]
        if len(set(labels)) == len(labels) or depth >= max((len(pp) for pp in parts), default=1):
            return labels
        depth += 1


def _sort_key(value: Any) -> tuple:
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, bool):
        return (1, float(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    return (2, 0.0, json.dumps(value, sort_keys=True, default=str))


def read_ladder(path: Path, *, need_scores: bool = True) -> list[dict[str, Any]]:
    """Ladder steps from JSON/YAML: a list, or {"steps": [...]} / {"ladder": [...]}.
    Each step: name/label, a score (ppl/val_ppl, accuracy/avg_accuracy) and usefulness."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, json.JSONDecodeError, yaml.YAMLError) as err:
        raise DepthlabError(f"cannot read ladder data {path}: {err.__class__.__name__}") from None
    if isinstance(data, dict):
        data = data.get("steps", data.get("ladder", data.get("rows")))
    if not isinstance(data, list) or not all(isinstance(s, dict) for s in data):
        raise DepthlabError(f"ladder data {path} must be a list of steps (mappings)")
    if need_scores and not any(score is not None for _, score, _ in ladder_scores(data)[1]):
        raise DepthlabError(f"ladder data {path}: no step has a numeric score (ppl, val_ppl, "
                            "accuracy or avg_accuracy)")
    return data


def ladder_scores(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[str, float | None,
                                                                     float | None]]]:
    """(score name, [(step name, score, usefulness)]) of ladder data."""
    score_keys = [("avg_accuracy", "average accuracy (%)"), ("accuracy", "accuracy (%)"),
                  ("val_ppl", "validation perplexity"), ("ppl", "perplexity")]
    key, name = next(((k, n) for k, n in score_keys if any(k in r for r in rows)),
                     ("score", "score"))
    out = []
    for i, r in enumerate(rows):
        label = str(r.get("name", r.get("label", r.get("step", f"step {i}"))))
        out.append((label, num(r.get(key)), num(r.get("usefulness"))))
    return name, out


def _inside_run_hint(path: Path) -> str | None:
    run = enclosing_run(path)
    return None if run is None else (f"{path} is inside run {run}: give the run directory "
                                     f"(depthlab report {run})")


def _file_hint(path: Path) -> str:
    """What a file given to report is instead of a results.json, and what to give."""
    inside = _inside_run_hint(path)
    if inside:
        return inside
    raw = _load_yaml(path) if path.suffix in (".yaml", ".yml") else None
    if _looks_like_run_config(raw):
        return (f"{path} is a run config: report reads the run's directory (OUT_DIR/NAME) once "
                "it has trained")
    if isinstance(raw, dict) and is_sweep_spec(raw):
        return (f"{path} is a sweep spec: report its output directory (the sweep's out_dir, "
                "runs/sweeps/NAME by default; `depthlab sweep SPEC --dry-run` names it)")
    return (f"{path} is a file: report reads directories (runs, sweeps, diagnose outputs) and "
            f"diagnose {RESULTS_FILE} files")


def collect(dirs: str | Path | list[str | Path], ladder: str | Path | None = None
            ) -> ReportData:
    """Find and read every run, diagnosis and ladder under `dirs` (one path or a list)."""
    roots = [Path(dirs)] if isinstance(dirs, (str, Path)) else [Path(d) for d in dirs]
    if not roots:
        raise DepthlabError("no directory given: name runs, sweeps or diagnose outputs")
    missing = [str(r) for r in roots if not r.exists()]
    if missing:
        raise DepthlabError(f"no such directory: {', '.join(missing)}")
    for r in roots:
        if r.is_file() and r.name != RESULTS_FILE:
            raise DepthlabError(_file_hint(r))
    warnings: list[str] = []
    run_paths: list[Path] = []
    found = {r: False for r in roots}  # whether a root holds anything a report reads
    for r in roots:
        if r.is_file():
            continue
        for p in find_runs(r):
            found[r] = True
            if p.resolve() not in {q.resolve() for q in run_paths}:
                run_paths.append(p)
    run_set = {p.resolve() for p in run_paths}

    diag_paths: list[Path] = []
    for r in roots:
        cands = [r] if r.is_file() else _walk(r, RESULTS_FILE)
        found[r] = found[r] or bool(cands)
        for c in cands:
            inside_run = any(parent in run_set for parent in c.resolve().parents)
            if not inside_run and c.resolve() not in {d.resolve() for d in diag_paths}:
                diag_paths.append(c)

    for r in roots:  # a run's checkpoints/ or tensorboard/: name the run
        inside = None if found[r] else _inside_run_hint(r)
        if inside:
            raise DepthlabError(inside)

    ladder_path = Path(ladder) if ladder is not None else None
    if ladder_path is None:
        for r in roots:
            if r.is_dir() and (r / LADDER_FILE).is_file():
                ladder_path = r / LADDER_FILE
                break
    ladder_steps = None
    if ladder_path is not None:
        if not ladder_path.is_file():
            raise DepthlabError(f"ladder file not found: {ladder_path}")
        # a file named by --ladder must hold scores; a found one may be skipped with a note
        ladder_steps = read_ladder(ladder_path, need_scores=ladder is not None)

    if not run_paths and not diag_paths and ladder_steps is None:
        raise DepthlabError(
            f"no depthlab runs (config.yaml) or diagnose results (results.json) under "
            f"{', '.join(str(r) for r in roots)}"
        )

    labels = _unique_labels(run_paths) if run_paths else []
    runs = []
    for path, label in zip(run_paths, labels, strict=True):
        try:
            config = yaml.safe_load((path / CONFIG_FILE).read_text()) or {}
        except (OSError, yaml.YAMLError):
            config = {}
        records, bad = read_records(path / METRICS_FILE)
        summary = _read_json(path / SUMMARY_FILE)
        if not isinstance(summary, dict):
            summary = None
        diag = None
        dpath = _diagnosis_of_run(path)
        if dpath is not None:
            raw = _read_json(dpath)
            if isinstance(raw, dict):
                diag = Diagnosis(dpath, label, metric_results(raw), raw)
            else:
                warnings.append(f"{label}: {dpath} is not readable JSON; diagnose figures skip it")
        run = RunData(path, label, config, records, summary, diag, bad)
        if bad:
            warnings.append(f"{label}: {bad} unreadable line(s) in metrics.jsonl were skipped")
        if not records:
            warnings.append(f"{label}: no metrics recorded yet")
        runs.append(run)

    diag_labels = _unique_labels([p.parent for p in diag_paths]) if diag_paths else []
    diagnoses = []
    for p, label in zip(diag_paths, diag_labels, strict=True):
        raw = _read_json(p)
        if not isinstance(raw, dict):
            warnings.append(f"{p} is not readable JSON; skipped")
            continue
        name = raw.get("model_name") or raw.get("source") or label
        diagnoses.append(Diagnosis(p, str(name) if isinstance(name, str) else label,
                                   metric_results(raw), raw))

    # the knobs: config values that differ between runs
    flat = [flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - IGNORED_KNOBS)
    knob_keys = [k for k in keys
                 if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]
    for r, f in zip(runs, flat, strict=True):
        r.knobs = {k: f.get(k) for k in knob_keys}
    runs.sort(key=lambda r: (tuple(_sort_key(r.knobs[k]) for k in knob_keys), r.label))

    # step bookkeeping
    if runs:
        finals = {r.label: r.final_step for r in runs}
        if len(set(finals.values())) > 1:
            shown = ", ".join(f"{k} {v}" for k, v in finals.items())
            warnings.append(f"runs end at different steps ({shown}); curves show what each run "
                            "logged, final-step numbers are not at equal training budgets")
        for r in runs:
            if not r.complete and r.records:
                target = f" of {r.max_steps}" if r.max_steps else ""
                why = ("its summary.json is not readable JSON" if (r.path / SUMMARY_FILE).exists()
                       else "no summary.json")
                warnings.append(f"{r.label}: incomplete ({why}), last logged step "
                                f"{r.final_step}{target}")
    data = ReportData(runs, diagnoses, ladder_steps, ladder_path, knob_keys, warnings, roots)
    if data.all_diagnoses:  # the caveats diagnose printed under its table
        from depthlab.probe.results import result_warnings  # (imports torch: only if needed)

        for label, d in data.all_diagnoses:
            if isinstance(d.raw.get("model"), dict):
                warnings += [f"{label}: {w}" for w in result_warnings(
                    {"model": d.raw["model"], "metrics": d.metrics})]
    return data
