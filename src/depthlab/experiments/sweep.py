"""Sweeps: one base config, a grid or list of overrides, one run directory per point.

A sweep file (YAML)::

    name: depth                     # default: the file's stem
    base: ../cpu/tiny.yaml          # a run config path (relative to this file) or a mapping
    out_dir: runs/sweeps/depth      # default: runs/sweeps/<name>
    set:                            # overrides applied to every run
      train.max_steps: 150
      train.stats_interval: 10
    grid:                           # cartesian product over dotted config keys
      model.n_layers: [2, 4, 8]
      train.weight_decay: [0.0, 0.1]
    list:                           # and/or explicit points (each combined with every grid point)
      - {model.n_kv_heads: 1}
      - {name: mha, model.n_kv_heads: 4}   # `name` gives the run its name
    diagnose: false                 # run `depthlab diagnose` on each finished run

Runs are named from their overrides (`L8_wd0.1`), written to `OUT/NAME`, skipped when
complete (`summary.json` and the same config), resumed when interrupted (the trainer
resumes from its last checkpoint), run one at a time or `jobs` at a time as
`depthlab train` subprocesses, or submitted to SLURM through submitit. Every expanded
config is validated before anything runs. Progress is kept in `OUT/sweep_status.json`;
a failing run is recorded there and the sweep goes on.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from depthlab.config import RunConfig, apply_overrides, build_config, read_run_yaml, read_yaml
from depthlab.errors import ConfigError, DepthlabError
from depthlab.locks import exclusive
from depthlab.outdir import check_creatable_dir

STATUS_FILE = "sweep_status.json"
SWEEP_FILE = "sweep.yaml"
BASE_FILE = "base.yaml"
LOG_DIR = "logs"
SLURM_DIR = "slurm"
RESERVED_NAMES = (STATUS_FILE, SWEEP_FILE, BASE_FILE, LOG_DIR, SLURM_DIR)
"""What a sweep's OUT holds besides its runs: no run may take these names."""
SWEEP_KEYS = {"name", "base", "out_dir", "set", "grid", "list", "diagnose"}

# Short names for the knobs the paper sweeps (depth x lambda x T x G x MoE).
ABBREVIATIONS = {
    "model.n_layers": "L",
    "model.d_model": "d",
    "model.n_heads": "H",
    "model.n_kv_heads": "kv",
    "model.moe": "moe",
    "model.moe.num_experts": "E",
    "model.moe.top_k": "k",
    "model.norm_placement": "norm",
    "model.init": "init",
    "data.seq_len": "T",
    "data.tokenizer": "tok",
    "train.weight_decay": "wd",
    "train.lr": "lr",
    "train.max_steps": "steps",
    "train.batch_size": "bs",
    "train.seed": "seed",
}
_UNSAFE = re.compile(r"[^A-Za-z0-9.+-]+")
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._+-]+")
MAX_NAME = 100

StatusCallback = Callable[["SweepRun", dict[str, Any]], None]


# ----------------------------------------------------------------------------- keys


def _section_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (`MoEConfig | None` -> MoEConfig)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _section_model(arg)
            if found is not None:
                return found
    return None


def resolve_key(key: str) -> type[BaseModel] | None:
    """Check that dotted `key` names a RunConfig field; return its section model (or None
    for a leaf). Raises ConfigError naming the unknown part."""
    model: type[BaseModel] | None = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None or part not in model.model_fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"sweep key '{key}' is not a config key ({part!r} is not in {where})")
        model = _section_model(model.model_fields[part].annotation)
    return model


def flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values; a mapping given for a config *section* is merged key by key
    (so `train: {max_steps: 5}` never wipes the rest of `train`). Keys are checked."""
    out: dict[str, Any] = {}
    for raw_key, value in overrides.items():
        key = f"{prefix}{raw_key}"
        section = resolve_key(key)
        if section is not None and isinstance(value, dict) and value:
            out.update(flatten_overrides(value, f"{key}."))
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- names


def format_value(value: Any) -> str:
    """A short, stable, filesystem-safe rendering of an override value."""
    if value is None:
        return "off"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e6:
            return str(int(value)) if value != 0 else "0"
        return f"{value:g}"
    if isinstance(value, dict):
        if not value:
            return "on"
        return "-".join(
            f"{_abbrev(str(k), str(k))}{format_value(v)}" for k, v in sorted(value.items())
        )
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v) for v in value) or "none"
    return str(value)


def _abbrev(key: str, default: str) -> str:
    short = {"num_experts": "E", "top_k": "k", "expert_hidden": "eh",
             "shared_expert": "shared", "layers": "layers"}
    return ABBREVIATIONS.get(key, short.get(key, default))


def _safe(text: str, underscore: bool = False) -> str:
    """Filesystem-safe: letters, digits, `.+-` (and `_` where asked), no leading dot."""
    pattern = _UNSAFE_NAME if underscore else _UNSAFE
    text = re.sub(r"-{2,}", "-", pattern.sub("-", text)).strip("-.")
    return text or "run"


def part_name(key: str, value: Any, full: bool = False) -> str:
    """`model.n_layers`, 8 -> `L8`; `model.norm_placement`, 'post' -> `norm-post`."""
    label = key if full else ABBREVIATIONS.get(key, key.rsplit(".", 1)[-1])
    shown = format_value(value)
    sep = "" if (not full and key in ABBREVIATIONS and shown[:1].isdigit()) else "-"
    return _safe(f"{label}{sep}{shown}")


def run_name(overrides: dict[str, Any], full: bool = False) -> str:
    """Stable name from a run's varying overrides, e.g. `L8_wd0.1` (`base` when none)."""
    if not overrides:
        return "base"
    name = "_".join(part_name(k, v, full) for k, v in overrides.items())
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + _digest(overrides)
    return name


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- model


@dataclass
class SweepRun:
    """One point of a sweep."""

    name: str
    overrides: dict[str, Any]
    """The point's own overrides (grid/list), dotted keys."""
    cfg: RunConfig
    """The validated config (base + set + overrides, name and out_dir set)."""

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir


@dataclass
class Sweep:
    name: str
    out_dir: Path
    base: dict[str, Any]
    """The raw base config (a mapping), before `set`."""
    common: dict[str, Any] = field(default_factory=dict)
    """`set`: dotted overrides applied to every run."""
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)
    diagnose: bool = False
    source: Path | None = None

    # -- expansion
    def expand(self) -> list[tuple[str | None, dict[str, Any]]]:
        """(explicit name or None, overrides) for every point, in file order."""
        keys = list(self.grid)
        grid_points = [dict(zip(keys, combo, strict=True))
                       for combo in itertools.product(*(self.grid[k] for k in keys))]
        points = self.points or [{}]
        out = []
        for point in points:
            point = dict(point)
            explicit = point.pop("name", None)
            for gp in grid_points:
                ov = {**flatten_overrides(point), **gp}
                name = None
                if explicit is not None:
                    name = _safe(str(explicit), underscore=True)
                    if len(grid_points) > 1:
                        name = f"{name}_{run_name(gp)}"
                out.append((name, ov))
        return out

    def base_raw(self) -> dict[str, Any]:
        """Base config with the common `set` overrides applied (written to OUT/base.yaml)."""
        return apply_overrides(self.base, self.common) if self.common else copy.deepcopy(self.base)

    def runs(self) -> list[SweepRun]:
        """Every run, named and validated. Raises one DepthlabError listing every invalid
        run (nothing has run yet) or duplicate names."""
        expanded = self.expand()
        varying = _varying_keys([ov for _, ov in expanded])

        def names(full: bool) -> list[tuple[str, dict[str, Any]]]:
            return [(n or run_name({k: v for k, v in ov.items() if k in varying}, full), ov)
                    for n, ov in expanded]

        named = names(full=False)
        if len({n for n, _ in named}) < len(named):  # abbreviations collided: use full keys
            named = names(full=True)
        seen: dict[str, int] = {}
        for n, _ in named:
            seen[n] = seen.get(n, 0) + 1
        dups = sorted(n for n, c in seen.items() if c > 1)
        if dups:
            raise DepthlabError(f"sweep {self.name}: runs share the name(s) {', '.join(dups)}; "
                                "give list entries distinct `name`s or remove duplicate points")
        taken = sorted({n for n, _ in named} & set(RESERVED_NAMES))
        if taken:
            raise DepthlabError(f"sweep {self.name}: run name(s) {', '.join(taken)} are the "
                                f"sweep's own files in {self.out_dir}; rename those runs")
        base = self.base_raw()
        runs, errors = [], []
        for name, ov in named:
            try:
                cfg = build_config(base, {**ov, "name": name, "out_dir": str(self.out_dir)})
            except ConfigError as err:
                errors.append(f"run {name}: {err}")
                continue
            runs.append(SweepRun(name, ov, cfg))
        if errors:
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise ConfigError(f"sweep {self.name}: {len(errors)} of {len(named)} runs are invalid, "
                              f"nothing was run: {'; '.join(errors[:3])}{more}")
        return runs


def _varying_keys(points: list[dict[str, Any]]) -> set[str]:
    """Keys whose value is not the same in every point (only these name the runs)."""
    if len(points) <= 1:
        return {k for p in points for k in p}
    keys = {k for p in points for k in p}
    missing = object()
    return {k for k in keys
            if len({json.dumps(p.get(k, missing), sort_keys=True, default=str)
                    for p in points}) > 1}


def load_sweep(source: str | Path | dict[str, Any], *, out_dir: str | Path | None = None,
               overrides: list[str] | dict[str, Any] | None = None) -> Sweep:
    """Read and check a sweep (a YAML path or a mapping). `overrides` (`key=value`
    strings or a dict) are added to the sweep's `set`."""
    from depthlab.config import _split_override

    path = None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        here = Path.cwd()
    else:
        path = Path(source)
        raw = read_yaml(path, allow_empty=True)
        here = path.parent
    if not raw:
        raise ConfigError(f"sweep {path or ''}: empty; give at least `base` and a `grid` or "
                          "`list` (see `depthlab sweep --help`)")
    unknown = sorted(set(raw) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"sweep: unknown key(s) {', '.join(unknown)} "
                          f"(expected {', '.join(sorted(SWEEP_KEYS))})")
    name = _safe(str(raw.get("name") or (path.stem if path else "sweep")), underscore=True)
    if "base" not in raw:
        raise ConfigError(f"sweep {name}: no `base` (a run config file, or a mapping; "
                          "`base: {}` for the built-in defaults)")
    base = raw["base"]
    if isinstance(base, str):
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = here / base_path if (here / base_path).is_file() else base_path
        if base_path.is_dir():
            raise ConfigError(f"sweep {name}: base {base} is a directory; give a config file")
        if not base_path.is_file():
            raise ConfigError(f"sweep {name}: base config not found: {base}")
        base = read_run_yaml(base_path)
    elif base is None:
        base = {}
    elif not isinstance(base, dict):
        raise ConfigError(f"sweep {name}: base must be a config path or a mapping")
    common = raw.get("set") or {}
    if not isinstance(common, dict):
        raise ConfigError(f"sweep {name}: set must be a mapping of config keys to values")
    common = flatten_overrides(common)
    if overrides:
        items = overrides.items() if isinstance(overrides, dict) else map(_split_override, overrides)
        extra = dict(items)
        common.update(flatten_overrides(extra))
    for reserved in ("name", "out_dir"):
        common.pop(reserved, None)
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"sweep {name}: grid must map config keys to lists of values")
    for key, values in grid.items():
        resolve_key(key)
        if key in ("name", "out_dir"):
            raise ConfigError(f"sweep {name}: grid key {key} is set by the sweep itself")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep {name}: grid.{key} must be a non-empty list of values")
    points = raw.get("list") or []
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise ConfigError(f"sweep {name}: list must be a list of mappings (config key: value)")
    for p in points:
        flatten_overrides({k: v for k, v in p.items() if k != "name"})
    out = Path(out_dir) if out_dir is not None else Path(raw.get("out_dir") or f"runs/sweeps/{name}")
    check_creatable_dir(out, "sweep output directory")
    diagnose = raw.get("diagnose", False)
    if not isinstance(diagnose, bool):
        raise ConfigError(f"sweep {name}: diagnose must be true or false")
    return Sweep(name=name, out_dir=out, base=base, common=common, grid=grid, points=points,
                 diagnose=diagnose, source=path)


# ----------------------------------------------------------------------------- state


def run_state(run: SweepRun) -> str:
    """'complete', 'partial' (started, resumable), 'new' or 'conflict' (the run dir holds a
    different config)."""
    from depthlab.paths import CONFIG_FILE, SUMMARY_FILE
    from depthlab.train.trainer import (
        read_data_record,
        read_summary,
        resume_conflicts,
    )

    saved = run.run_dir / CONFIG_FILE
    if not saved.is_file():
        return "new"
    try:
        kept = "data" in read_data_record(run.run_dir)
    except DepthlabError:  # a damaged data.json: training that run says so
        kept = True
    if resume_conflicts(read_yaml(saved), run.cfg.to_dict(), identity_kept=kept):
        return "conflict"
    done = read_summary(run.run_dir / SUMMARY_FILE) or {}
    step = done.get("step")
    if done.get("status") == "complete" and isinstance(step, int) and step >= run.cfg.train.max_steps:
        return "complete"
    return "partial"


def read_status(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir) / STATUS_FILE
    if not path.is_file():
        return {"runs": {}}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"runs": {}}


_UNLOCKED: set[Path] = set()


def _warn_no_lock(lock_path: Path, why: str) -> None:
    """Once per lock file: say that concurrent sweep calls are not serialised here."""
    if lock_path not in _UNLOCKED:
        _UNLOCKED.add(lock_path)
        print(f"note: cannot lock {lock_path} ({why}): two sweep calls "
              "writing to this directory at once may lose each other's status entries",
              file=sys.stderr)


class StatusFile:
    """`OUT/sweep_status.json`: one entry per run, rewritten atomically on every change.

    Each call owns the entries of the runs it selected (`--only`) and merges them into
    the file as it is on disk, under a lock: two calls on one sweep at the same time
    keep each other's entries."""

    def __init__(self, sweep: Sweep, runs: list[SweepRun], names: list[str]) -> None:
        """Entries for `runs` (this call's selection, e.g. `--only`); the sweep's other
        runs (`names`: all of them, in order) keep the entries earlier calls recorded."""
        self.path = sweep.out_dir / STATUS_FILE
        self.names = names
        old = read_status(sweep.out_dir).get("runs", {})
        self.owned: dict[str, dict[str, Any]] = {}
        for run in runs:
            entry = dict(old.get(run.name, {}))
            entry["overrides"] = run.overrides
            entry["run_dir"] = str(run.run_dir)
            self.owned[run.name] = entry
        self.sweep_name = sweep.name
        self.data: dict[str, Any] = {"sweep": sweep.name, "runs": {}}
        """The file as this call last wrote it (all runs' entries)."""

    def update(self, name: str, **fields: Any) -> None:
        self.owned[name].update(fields)
        self.write()

    def write(self) -> None:
        from depthlab.data.cache import atomic_write_text

        lock = self.path.with_name(".sweep_status.lock")
        with exclusive(lock, lambda why: _warn_no_lock(lock, why)):
            on_disk = read_status(self.path.parent).get("runs", {})
            merged = {**on_disk, **self.owned}
            # runs no longer in the sweep's spec are dropped
            runs = {name: merged[name] for name in self.names if name in merged}
            counts: dict[str, int] = {}
            for entry in runs.values():
                s = entry.get("status", "pending")
                counts[s] = counts.get(s, 0) + 1
            data = {"sweep": self.sweep_name, "runs": runs, "counts": counts,
                    "updated": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_text(self.path, json.dumps(data, indent=2, default=str))
        self.data = data


# ----------------------------------------------------------------------------- params


def param_counts(cfg: RunConfig) -> tuple[int | None, int | None, str]:
    """(total, active) parameter counts built on the meta device, and a note on the vocab."""
    import torch

    from depthlab.data.prepare import expected_vocab
    from depthlab.model import DepthLM

    vocab, note = cfg.model.vocab_size, ""
    if vocab is None:
        vocab, note = expected_vocab(cfg.data)
        note = f"vocab: {note}"
        if vocab is None:
            return None, None, note
    mcfg = cfg.model.model_copy(update={"vocab_size": vocab})
    with torch.device("meta"):
        model = DepthLM(mcfg)
    return model.num_params(), model.num_params(active=True), note


# ----------------------------------------------------------------------------- running


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("COLUMNS", "200")  # rich wraps at 80 columns in a log file otherwise
    return env


def visible_gpus() -> list[str]:
    """The CUDA devices this process may hand to jobs (CUDA_VISIBLE_DEVICES's entries, else
    0..n-1); empty without CUDA."""
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:  # noqa: BLE001  no usable CUDA: nothing to spread
        return []
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
              if x.strip()]
    return (listed or [str(i) for i in range(n)])[:n]


def job_gpu(run: SweepRun, slot: int, gpus: list[str]) -> str | None:
    """The GPU job slot `slot` runs on when parallel jobs share several GPUs (round robin);
    None to leave the job's devices alone: one GPU or none, or a run that names its own
    device (cuda:N, cpu)."""
    if len(gpus) < 2 or run.cfg.train.device not in ("auto", "cuda"):
        return None
    return gpus[slot % len(gpus)]


def _cli_value(value: Any) -> str:
    """A --set value that `depthlab.config.parse_value` (YAML) reads back unchanged."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9).strip()
    return text.removesuffix("...").strip()


def train_command(sweep: Sweep, run: SweepRun, nproc: int = 1) -> list[str]:
    """`depthlab train OUT/base.yaml --set k=v ...` (as `python -m depthlab.cli`), under
    torchrun with `nproc` processes (one per GPU) when nproc > 1. Its output goes to a log
    file, where the progress is one line per log_interval steps."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, "-m", "depthlab.cli", "train", str(sweep.out_dir / BASE_FILE)]
    for key, value in {**run.overrides, "name": run.name, "out_dir": str(sweep.out_dir)}.items():
        cmd += ["--set", f"{key}={_cli_value(value)}"]
    return cmd


def diagnose_command(run: SweepRun) -> list[str]:
    """`depthlab diagnose RUN` at the run's own training context (T)."""
    return [sys.executable, "-m", "depthlab.cli", "diagnose", str(run.run_dir),
            "--seq-len", str(run.cfg.data.seq_len), "--out", str(run.run_dir / "diagnose")]


def _write_inputs(sweep: Sweep) -> None:
    sweep.out_dir.mkdir(parents=True, exist_ok=True)
    (sweep.out_dir / LOG_DIR).mkdir(exist_ok=True)
    (sweep.out_dir / BASE_FILE).write_text(yaml.safe_dump(sweep.base_raw(), sort_keys=False))
    (sweep.out_dir / SWEEP_FILE).write_text(yaml.safe_dump({
        "name": sweep.name, "base": sweep.base, "out_dir": str(sweep.out_dir),
        "set": sweep.common, "grid": sweep.grid, "list": sweep.points,
        "diagnose": sweep.diagnose,
    }, sort_keys=False))


def _failure(rc: int, log: Path) -> str:
    """Why a run's process failed: the signal that killed it (or, under torchrun, one of
    its ranks: torchrun itself then exits 1), else its log's error line."""
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        who = "killed"
    else:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            return "no log"
        name, who = _torchrun_rank_signal(text), "a rank was killed"
        if name is None:
            return _last_error(text)
    hint = " (likely out of memory)" if name == "SIGKILL" else ""
    return f"{who} by {name}{hint}; see {log}"


def _torchrun_rank_signal(text: str) -> str | None:
    """The signal that killed the rank torchrun names as the root cause of its failure
    ("Signal 9 (SIGKILL) received by PID"); None when the root cause is a Python error
    (another rank may have died by a signal as a consequence)."""
    _, marker, root = text.rpartition("Root Cause (first observed failure):")
    found = re.search(r"Signal \d+ \((SIG[A-Z0-9]+)\) received by PID", root) if marker else None
    return found.group(1) if found else None


def _last_error(text: str) -> str:
    """The most useful line of a failed run's log (the CLI's one-line error, if any)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):  # the CLI never wraps it; under torchrun its report follows
            return line.removeprefix("error:").strip()[:2000]
    return lines[-1] if lines else "no output"


@dataclass
class _Job:
    run: SweepRun
    proc: subprocess.Popen
    log: Any
    started: float
    phase: str = "train"
    slot: int = 0


def _prepare_data(runs: list[SweepRun]) -> None:
    """Tokenize each distinct corpus once before parallel jobs (no two jobs race on a cache)."""
    try:
        from depthlab.data import prepare
    except ImportError:
        return
    seen = set()
    for run in runs:
        d = run.cfg.data
        key = (d.corpus, d.tokenizer, d.bpe_vocab_size, d.val_fraction, d.text_key, d.cache_dir)
        if key in seen:
            continue
        seen.add(key)
        try:
            prepare(d, progress=False)
        except DepthlabError:
            pass  # that run fails on its own and is recorded as failed


def run_local(sweep: Sweep, runs: list[SweepRun], status: StatusFile, jobs: int = 1,
              diagnose: bool = False, on_status: StatusCallback | None = None,
              poll: float = 0.2, undiagnosed: list[SweepRun] | None = None) -> None:
    """Train `runs` as `depthlab train` subprocesses, at most `jobs` at a time, each with
    cores // jobs torch threads, and diagnose `undiagnosed` (complete) runs. Failures are
    recorded; the sweep goes on."""
    threads = max(1, available_cores() // max(jobs, 1))
    gpus = visible_gpus() if jobs > 1 else []  # else every job would share cuda:0
    queue = [(r, "train") for r in runs] + [(r, "diagnose") for r in undiagnosed or []]
    active: list[_Job] = []

    def note(run: SweepRun, **fields: Any) -> None:
        status.update(run.name, **fields)
        if on_status is not None:
            on_status(run, status.owned[run.name])

    def start(run: SweepRun, phase: str) -> _Job:
        log_path = sweep.out_dir / LOG_DIR / f"{run.name}.log"
        cmd = train_command(sweep, run) if phase == "train" else diagnose_command(run)
        slot = min(set(range(max(jobs, 1))) - {j.slot for j in active}, default=0)
        env = thread_env(threads)
        gpu = job_gpu(run, slot, gpus)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = log_path.open("a" if phase != "train" else "w")
        log.write(f"$ {'' if gpu is None else f'CUDA_VISIBLE_DEVICES={gpu} '}{' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=os.getcwd())
        if phase == "train":
            note(run, status="running", pid=proc.pid, log=str(log_path), threads=threads,
                 started=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None, returncode=None)
        return _Job(run, proc, log, time.time(), phase, slot)

    try:
        while queue or active:
            while queue and len(active) < max(jobs, 1):
                active.append(start(*queue.pop(0)))
            time.sleep(poll)
            for job in list(active):
                rc = job.proc.poll()
                if rc is None:
                    continue
                active.remove(job)
                job.log.close()
                log_path = sweep.out_dir / LOG_DIR / f"{job.run.name}.log"
                seconds = round(time.time() - job.started, 1)
                if job.phase == "diagnose":
                    ok = rc == 0
                    note(job.run, diagnose="complete" if ok else "failed",
                         diagnose_error=None if ok else _failure(rc, log_path))
                    continue
                if rc == 0 and run_state(job.run) == "complete":
                    note(job.run, status="complete", returncode=0, seconds=seconds, pid=None)
                    if diagnose:
                        active.append(start(job.run, "diagnose"))
                else:
                    note(job.run, status="failed", returncode=rc, seconds=seconds, pid=None,
                         error=_failure(rc, log_path))
    except BaseException:
        for job in active:  # only the processes this sweep started
            if job.proc.poll() is None:
                job.proc.terminate()
        for job in active:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log.close()
            if job.phase == "train":
                status.update(job.run.name, status="interrupted", pid=None)
        raise


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise DepthlabError(
            "SLURM submission needs submitit, which is not installed: "
            "pip install 'depthlab[slurm]' (or pip install submitit)"
        ) from None
    return submitit


def submit_slurm(sweep: Sweep, runs: list[SweepRun], status: StatusFile, *,
                 partition: str | None = None, timeout_min: int = 240, gpus: int = 0,
                 cpus: int = 8, mem_gb: int | None = None, diagnose: bool = False,
                 on_status: StatusCallback | None = None) -> list[str]:
    """Submit one SLURM job per run through submitit; returns the job ids."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=str(sweep.out_dir / SLURM_DIR / "%j"))
    params: dict[str, Any] = {
        "name": f"depthlab-{sweep.name}", "timeout_min": timeout_min, "nodes": 1,
        "tasks_per_node": 1, "cpus_per_task": cpus,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    if mem_gb:
        params["mem_gb"] = mem_gb
    if partition:
        params["slurm_partition"] = partition
    executor.update_parameters(**params)
    ids = []
    for run in runs:
        cmd = train_command(sweep, run, nproc=max(gpus, 1))  # one process per GPU
        if diagnose:
            script = " && ".join(" ".join(_quote(c) for c in part)
                                 for part in (cmd, diagnose_command(run)))
            cmd = ["bash", "-c", script]
        threads = max(1, cpus // max(gpus, 1))
        fn = submitit.helpers.CommandFunction(cmd, cwd=os.getcwd(), env=thread_env(threads))
        job = executor.submit(fn)
        ids.append(str(job.job_id))
        status.update(run.name, status="submitted", job_id=str(job.job_id),
                      submitted=time.strftime("%Y-%m-%dT%H:%M:%S"), error=None)
        if on_status is not None:
            on_status(run, status.owned[run.name])
    return ids


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@dataclass
class SweepOutcome:
    runs: list[SweepRun]
    states: dict[str, str]
    """State of each run before this call: new / partial / complete."""
    status: dict[str, Any]
    """The final content of sweep_status.json."""

    @property
    def failed(self) -> list[str]:
        """The runs of this call that failed (the status file may also hold other runs)."""
        return [r.name for r in self.runs
                if self.status["runs"][r.name].get("status") == "failed"]


def missing_inputs(runs: list[SweepRun], states: dict[str, str]) -> str | None:
    """One line naming the corpus / tokenizer / init_from files that runs still to train
    would not find from the current directory (where relative paths are read), or None."""
    from depthlab.data.corpus import BUILTIN_NAMES

    missing: dict[str, None] = {}
    for run in runs:
        if states.get(run.name) == "complete":
            continue
        d = run.cfg.data
        named = {"data.corpus": d.corpus, "data.tokenizer": d.tokenizer}
        if states.get(run.name) == "new":  # a resumed run takes its weights from checkpoints
            named["train.init_from"] = run.cfg.train.init_from
        for key, value in named.items():
            if value and value not in BUILTIN_NAMES and not Path(
                    value).expanduser().exists():
                missing[f"{key} {value!r}"] = None
    if not missing:
        return None
    return (f"{', '.join(missing)} not found from {Path.cwd()} (relative paths in a config are "
            "read from the current directory)")


def select_runs(sweep: Sweep, only: list[str] | None = None,
                runs: list[SweepRun] | None = None) -> list[SweepRun]:
    """The sweep's runs (`runs` when already built), or those named in `only` (every name
    must exist)."""
    runs = sweep.runs() if runs is None else runs
    if only:
        unknown = sorted(set(only) - {r.name for r in runs})
        if unknown:
            names = [r.name for r in runs]
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12
                                             else "")
            raise DepthlabError(f"sweep {sweep.name} has no run(s) named {', '.join(unknown)} "
                                f"(its runs: {shown})")
        runs = [r for r in runs if r.name in only]
    return runs


def run_sweep(sweep: Sweep, *, jobs: int = 1, slurm: dict[str, Any] | None = None,
              diagnose: bool | None = None, only: list[str] | None = None,
              on_status: StatusCallback | None = None) -> SweepOutcome:
    """Validate every run, then train those that are not complete (resuming partial ones).

    `slurm`: keyword arguments for `submit_slurm` (submit instead of running locally).
    Raises DepthlabError before running anything when any config is invalid or a run
    directory holds a different config.
    """
    if jobs < 1:
        raise DepthlabError(f"--jobs must be >= 1, got {jobs}")
    if slurm is not None:
        _submitit()  # before anything is written
    every = sweep.runs()
    runs = select_runs(sweep, only, every)
    states = {r.name: run_state(r) for r in runs}
    conflicts = [n for n, s in states.items() if s == "conflict"]
    if conflicts:
        raise DepthlabError(
            f"sweep {sweep.name}: {', '.join(conflicts)} already hold(s) a different config in "
            f"{sweep.out_dir}; delete those run dirs or use another --out"
        )
    missing = missing_inputs(runs, states)
    if missing:
        raise DepthlabError(f"sweep {sweep.name}: {missing}; run it from the directory they "
                            "are relative to, or make them absolute")
    _write_inputs(sweep)
    status = StatusFile(sweep, runs, [r.name for r in every])
    todo = []
    for run in runs:
        if states[run.name] == "complete":
            status.owned[run.name].update(status="complete", skipped=True)
        else:
            status.owned[run.name].update(
                status="pending", skipped=False,
                resumed=states[run.name] == "partial")
            todo.append(run)
    status.write()
    for run in runs:
        if on_status is not None:
            on_status(run, status.owned[run.name])
    diagnose = sweep.diagnose if diagnose is None else diagnose
    # complete runs that were never diagnosed (or whose diagnosis failed) get one, locally
    # (not under --slurm: a job may still be diagnosing its run, and a login node is no
    # place for it)
    undiagnosed = [r for r in runs if diagnose and slurm is None
                   and states[r.name] == "complete"
                   and not (r.run_dir / "diagnose" / "results.json").is_file()]
    if slurm is not None and todo:
        submit_slurm(sweep, todo, status, diagnose=diagnose, on_status=on_status, **slurm)
    local = todo if slurm is None else []
    if local or undiagnosed:
        if jobs > 1:
            _prepare_data(local)
        run_local(sweep, local, status, jobs=jobs, diagnose=diagnose, on_status=on_status,
                  undiagnosed=undiagnosed)
    return SweepOutcome(runs, states, status.data)
