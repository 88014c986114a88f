"""A study: train a set of named configs (through the sweep runner), diagnose each finished
run with the paper's layer metrics, and collect one row of measurements per run.

`reproduce` and `ablate` are both studies; this module is the one place that trains,
diagnoses and reads back their numbers.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from depthlab.errors import DepthlabError
from depthlab.experiments.sweep import Sweep, SweepRun, run_sweep

DIAGNOSE_METRICS = ("variance", "usefulness", "causal", "permutation")
DIAGNOSE_FILE = "study_diagnose.json"
METRIC_KEYS = ("val_ppl", "last_layer_variance", "usefulness", "linear_excess_loss",
               "causal_pairs", "permutation")
"""The numbers of a Measurement that studies average over seeds and report."""


@dataclass
class Point:
    """One run of a study: a name and its config overrides (dotted keys)."""

    name: str
    overrides: dict[str, Any]


@dataclass
class Measurement:
    """What a study reads from one finished run."""

    name: str
    val_ppl: float
    val_loss: float
    last_layer_variance: float
    usefulness: float
    """Fraction of blocks whose affine replacement raises the loss by > 10 % (metrics.md 3)."""
    linear_excess_loss: float
    """Mean over blocks of (loss_ratio - 1): a continuous companion of usefulness."""
    causal_pairs: float
    permutation: float
    n_layers: int
    params: int | None = None
    active_params: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mean_metrics(group: list[Measurement]) -> dict[str, float]:
    """Seed means of every METRIC_KEYS number over the runs of one condition."""
    return {k: statistics.fmean(getattr(m, k) for m in group) for k in METRIC_KEYS}


def seed_run_name(name: str, seed: int) -> str:
    """The run of point `name` trained with seed index `seed`."""
    return f"{name}_s{seed}"


@dataclass
class DiagnoseSettings:
    """How each run is diagnosed: N sequences of the run's own training length T, with N
    chosen so that every run sees about `eval_tokens` tokens (at least `min_samples`)."""

    eval_tokens: int = 2048
    min_samples: int = 8
    seed: int = 0
    metrics: tuple[str, ...] = DIAGNOSE_METRICS

    def samples(self, seq_len: int) -> int:
        return max(self.min_samples, self.eval_tokens // seq_len)


def make_sweep(name: str, base: dict[str, Any], points: list[Point], out_dir: Path) -> Sweep:
    """The sweep that trains every point, runs named by point name (Sweep.runs validates
    every config and refuses duplicate names before anything trains)."""
    return Sweep(name=name, out_dir=out_dir, base=base,
                 points=[{"name": p.name, **p.overrides} for p in points])


def diagnose_run(run: SweepRun, settings: DiagnoseSettings) -> dict[str, Any]:
    """Diagnose a finished run (cached in RUN/study_diagnose.json for the same settings)."""
    from depthlab.data.cache import atomic_write_text
    from depthlab.probe.diagnose import diagnose

    path = run.run_dir / DIAGNOSE_FILE
    seq_len = run.cfg.data.seq_len
    key = {"metrics": list(settings.metrics), "samples": settings.samples(seq_len),
           "seq_len": seq_len, "seed": settings.seed}
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            cached = None  # a damaged cache (an interrupted copy, an edit): measured again
        if isinstance(cached, dict) and cached.get("settings") == key \
                and isinstance(cached.get("results"), dict):
            return cached["results"]
    results = diagnose(str(run.run_dir), metrics=list(settings.metrics), samples=key["samples"],
                       seq_len=seq_len, seed=settings.seed, figures=False, progress=False,
                       out=run.run_dir / "diagnose")
    atomic_write_text(path, json.dumps({"settings": key, "results": results}, default=str))
    return results


def measure(run: SweepRun, results: dict[str, Any]) -> Measurement:
    """One row of numbers from a run's summary.json and its diagnosis."""
    summary_path = run.run_dir / "summary.json"
    if not summary_path.is_file():
        raise DepthlabError(f"run {run.name} has no summary.json (did it finish?)")
    summary = json.loads(summary_path.read_text())
    if summary.get("val_loss") is None:
        raise DepthlabError(f"run {run.name} has no validation loss in {summary_path}")
    m = results["metrics"]
    ratios = m["usefulness"]["loss_ratio"]
    return Measurement(
        name=run.name, val_ppl=float(summary["val_ppl"]), val_loss=float(summary["val_loss"]),
        last_layer_variance=float(m["variance"]["last_layer_variance"]),
        usefulness=float(m["usefulness"]["usefulness"]),
        linear_excess_loss=sum(r - 1.0 for r in ratios) / len(ratios),
        causal_pairs=float(m["causal"]["causal_pairs"]),
        permutation=float(m["permutation"]["permutation"]),
        n_layers=run.cfg.model.n_layers, params=summary.get("params"),
        active_params=summary.get("active_params"),
    )


def run_study(sweep: Sweep, *, jobs: int = 1, settings: DiagnoseSettings | None = None,
              on_status: Callable[[SweepRun, dict[str, Any]], None] | None = None,
              on_diagnose: Callable[[int, int, str], None] | None = None,
              ) -> dict[str, Measurement]:
    """Train (skipping complete runs, resuming partial ones), diagnose, measure every run."""
    settings = settings or DiagnoseSettings()
    outcome = run_sweep(sweep, jobs=jobs, on_status=on_status)
    if outcome.failed:
        raise DepthlabError(
            f"{len(outcome.failed)} of {len(outcome.runs)} runs failed ({', '.join(outcome.failed)});"
            f" see {sweep.out_dir / 'sweep_status.json'} and the logs in {sweep.out_dir / 'logs'}")
    out: dict[str, Measurement] = {}
    for i, run in enumerate(outcome.runs):
        if on_diagnose is not None:
            on_diagnose(i, len(outcome.runs), run.name)
        out[run.name] = measure(run, diagnose_run(run, settings))
    return out
