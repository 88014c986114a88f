"""Downstream evaluation with lm-evaluation-harness, and held-out perplexity.

`run_lm_eval(MODEL, tasks)` evaluates a depthlab run/checkpoint or any Hugging
Face model dir (or hub id) with `lm_eval.simple_evaluate`:

* depthlab runs are exported to a temporary stock transformers checkpoint and
  evaluated with lm-eval's own `HFLM` (backend `hf`); models without an exact
  stock class (post-LN, Mix-LN, LayerNorm, ...) use the native `DepthLMEval`
  adapter (backend `native`). `auto` picks `hf` when possible.
* task data comes from the hub (lm-eval's defaults), or, with `data_dir`, from a
  folder of `datasets.save_to_disk` validation splits: each task config gets a
  `custom_dataset` that returns `DatasetDict({"validation": load_from_disk(...)})`
  and is pointed at that split (test/train splits unset, zero-shot), and the hub
  is switched off (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE).

The average is the unweighted mean over the chosen tasks, reported twice:
`acc` for every task, and `acc_norm` where lm-eval reports it (acc otherwise).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import os
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from depthlab.devices import resolve_device
from depthlab.errors import DepthlabError
from depthlab.probe.loading import check_hub_id, hub_reachable
from depthlab.text import perplexity


@dataclass(frozen=True)
class LocalTask:
    """A downstream set shipped as a saved validation split, and its lm-eval task."""

    folder: str
    task: str
    subdir: str
    """lm_eval/tasks/<subdir> holds the task's YAML (a hint: the full index is the fallback)."""
    prepare: Callable[[Any], Any] | None = None


def _boolq_label(ds: Any) -> Any:
    """google/boolq has `answer: bool`; lm-eval's boolq (super_glue) reads `label`."""
    if "label" in ds.column_names:
        return ds
    return ds.map(lambda row: {"label": int(bool(row["answer"]))})


LOCAL_TASKS: dict[str, LocalTask] = {
    t.folder: t
    for t in (
        LocalTask("arc_easy", "arc_easy", "arc"),
        LocalTask("arc_challenge", "arc_challenge", "arc"),
        LocalTask("piqa", "piqa", "piqa"),
        LocalTask("sciq", "sciq", "sciq"),
        LocalTask("winogrande", "winogrande", "winogrande"),
        LocalTask("openbookqa", "openbookqa", "openbookqa"),
        LocalTask("boolq", "boolq", "super_glue/boolq", _boolq_label),
        LocalTask("copa", "copa", "super_glue/copa"),
        LocalTask("commonsense_qa", "commonsense_qa", "commonsense_qa"),
        LocalTask("social_i_qa", "social_iqa", "siqa"),
    )
}
_BY_TASK = {t.task: t for t in LOCAL_TASKS.values()}
ALIASES = {"siqa": "social_i_qa", "social_iqa": "social_i_qa", "obqa": "openbookqa",
           "csqa": "commonsense_qa", "arc-easy": "arc_easy", "arc-challenge": "arc_challenge"}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "sciq", "winogrande", "openbookqa",
                 "boolq", "copa", "commonsense_qa", "social_i_qa")
METRICS = ("acc", "acc_norm")


def parse_tasks(text: str | list[str] | None) -> list[str]:
    if text is None:
        return []
    items = text if isinstance(text, list) else text.split(",")
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part and part not in out:
                out.append(part)
    return out


def _local_spec(name: str) -> LocalTask | None:
    key = ALIASES.get(name.lower(), name.lower())
    return LOCAL_TASKS.get(key) or _BY_TASK.get(key)


def resolve_local_tasks(names: list[str], data_dir: Path) -> list[tuple[LocalTask, Path]]:
    """Map task names to (task, saved split folder); one-line errors for bad input."""
    if not data_dir.is_dir():
        raise DepthlabError(f"--data-dir {data_dir}: no such directory")
    present = sorted(f for f in LOCAL_TASKS if (data_dir / f).is_dir())
    out = []
    for name in names:
        spec = _local_spec(name)
        if spec is None:
            close = difflib.get_close_matches(name, LOCAL_TASKS, n=3)
            raise DepthlabError(
                f"unknown task {name!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + " for --data-dir: local copies are read for "
                f"{', '.join(LOCAL_TASKS)} (present in {data_dir}: {', '.join(present) or 'none'}); "
                "drop --data-dir to read other lm-eval tasks from the hub"
            )
        folder = data_dir / spec.folder
        if not folder.is_dir():
            raise DepthlabError(
                f"data dir {data_dir} has no {spec.folder}/ for task {name!r} (expected a "
                f"datasets.save_to_disk folder; present: {', '.join(present) or 'none'})"
            )
        out.append((spec, folder))
    return out


def _load_local_split(folder: str, prepare: Callable[[Any], Any] | None = None,
                      **_: Any) -> Any:
    """`custom_dataset` for lm-eval: the saved split as the task's validation split."""
    from datasets import Dataset, DatasetDict, load_from_disk

    ds = load_from_disk(folder)
    if isinstance(ds, DatasetDict):
        key = "validation" if "validation" in ds else next(iter(ds))
        ds = ds[key]
    if not isinstance(ds, Dataset):
        raise DepthlabError(f"{folder}: not a saved datasets.Dataset")
    if prepare is not None:
        ds = prepare(ds)
    return DatasetDict({"validation": ds})


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """No dataset/model hub access while evaluating local data (env + live modules)."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    old_env = {k: os.environ.get(k) for k in keys}
    patched: list[tuple[Any, str, Any]] = []
    for k in keys:
        os.environ[k] = "1"
    for mod_name, attr in (("datasets.config", "HF_DATASETS_OFFLINE"),
                           ("datasets.config", "HF_HUB_OFFLINE"),
                           ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
        import importlib

        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        if hasattr(mod, attr):
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lm_eval_tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _task_manager(subdirs: list[str] | None = None):
    """A TaskManager over a few lm-eval task folders (fast), or over all of them."""
    from lm_eval.tasks import TaskManager

    if subdirs is None:
        return TaskManager()
    root = _lm_eval_tasks_root()
    paths = sorted({str(root / s) for s in subdirs if (root / s).is_dir()})
    return TaskManager(include_defaults=False, include_path=paths) if paths else TaskManager()


def local_task_configs(pairs: list[tuple[LocalTask, Path]]) -> tuple[list[dict], Any]:
    """lm-eval task config dicts reading the saved splits, and the TaskManager used."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tm = _task_manager([spec.subdir for spec, _ in pairs])
    if any(spec.task not in tm.task_index for spec, _ in pairs):
        tm = _task_manager(None)
    configs = []
    for spec, folder in pairs:
        entry = tm.task_index.get(spec.task)
        if entry is None or entry.yaml_path is None:
            raise DepthlabError(f"lm-eval has no task {spec.task!r} (installed lm_eval too old?)")
        cfg = dict(load_yaml(entry.yaml_path, resolve_func=True, recursive=True))
        for key in ("tag", "group", "task_list", "include"):
            cfg.pop(key, None)
        cfg.update(
            task=spec.task,
            custom_dataset=partial(_load_local_split, str(folder.resolve()), spec.prepare),
            training_split=None, validation_split="validation", test_split=None,
            fewshot_split=None,
        )
        cfg.pop("fewshot_config", None)
        configs.append(cfg)
    return configs, tm


def resolve_hub_tasks(names: list[str]) -> tuple[list[str], Any]:
    """lm-eval task names for hub data (our folder names map to lm-eval's)."""
    tm = _task_manager(None)
    out = []
    for name in names:
        spec = _local_spec(name)
        task = spec.task if spec is not None else name
        if task not in tm.task_index:
            close = difflib.get_close_matches(name, tm.all_tasks, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise DepthlabError(
                f"unknown task {name!r}{hint} (paper tasks: {', '.join(DEFAULT_TASKS)}; "
                "`lm-eval ls tasks` lists all)"
            )
        out.append(task)
    return out, tm


# --------------------------------------------------------------------------- models


@dataclass
class EvalModel:
    """An lm-eval `LM` ready to run, and where it came from."""

    lm: Any
    kind: str
    """'depthlab' or 'hf'."""
    backend: str
    """'hf' (stock HFLM) or 'native' (DepthLMEval)."""
    source: Path | str
    run_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    _tmp: Any = None

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _hflm(path: str, device: str, batch_size: int | str, max_length: int | None = None,
          name: str | None = None):
    """lm-eval's HFLM on a Hugging Face directory or hub id (`name`: what errors call it,
    e.g. the depthlab run exported to `path`)."""
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoConfig

    from depthlab.probe.adapters import is_wrapper
    from depthlab.probe.loading import load_hf_lm

    name = name or path
    common: dict[str, Any] = {"batch_size": batch_size}
    if max_length:
        common["max_length"] = max_length
    try:
        config = AutoConfig.from_pretrained(path)
        _check_causal_lm(config, name)
        tokenizer = _hf_tokenizer(path, name)  # before the weights load
        if tokenizer.bos_token_id is None and tokenizer.eos_token_id is None:
            raise DepthlabError(
                f"{name}: its tokenizer has no end-of-text (or beginning-of-text) "
                "token, which lm-eval needs as the context of requests that have none; give it "
                "one (eos_token) or use --ppl")
        if not is_wrapper(config.model_type):
            return HFLM(pretrained=path, tokenizer=tokenizer, device=device, dtype="float32",
                        **common)
        # an image-text checkpoint: HFLM would not load its text model as we do
        model = load_hf_lm(path, config, torch.float32).to(device).eval()
        with _lm_eval_quiet():  # its "pretrained is not a str" advice is for its own CLI
            return HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", **common)
    except (OSError, ValueError) as err:  # no such model, or no causal-LM class for it
        raise DepthlabError(f"{name}: cannot load with transformers "
                            f"({str(err).splitlines()[0]})") from None


def _hf_tokenizer(source: str, name: str) -> Any:
    """The model's own tokenizer (eval tokenizes text with it), with vocabulary."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as err:
        raise DepthlabError(
            f"{name}: no usable tokenizer ({str(err).splitlines()[0].strip()}); put the "
            "model's tokenizer files (tokenizer.json or tokenizer.model, ...) next to its "
            "weights") from None
    _check_vocabulary(name, tokenizer)
    return tokenizer


def _check_causal_lm(config: Any, name: str) -> None:
    """Refuse bidirectional encoders (BERT, RoBERTa, ...) and encoder-decoder models that
    transformers would load as a causal LM anyway: their scores would not be next-token
    likelihoods."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    mt = config.model_type
    encoder = mt in MODEL_FOR_MASKED_LM_MAPPING_NAMES and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if getattr(config, "is_encoder_decoder", False) or (
            encoder and not (getattr(config, "is_decoder", False) or getattr(config, "causal", False))):
        raise DepthlabError(
            f"{name}: model_type {mt!r} is not a causal language model (bidirectional "
            "attention, or an encoder-decoder): eval scores next-token likelihoods")


def _check_vocabulary(model: str | Path, tokenizer: Any) -> None:
    """Refuse a tokenizer without vocabulary: every task would be scored on <unk> strings."""
    from depthlab.probe.loading import has_vocabulary

    if not has_vocabulary(tokenizer):
        raise DepthlabError(
            f"{model}: its tokenizer ({type(tokenizer).__name__}) has no vocabulary (words "
            "map to nothing or to <unk>); put the model's tokenizer files "
            "(tokenizer.json or tokenizer.model, ...) next to its weights")


def _check_hf_dir(path: Path) -> None:
    """A local MODEL that is not a depthlab run must be a Hugging Face model directory."""
    if (path / "config.json").is_file():
        return
    raise DepthlabError(f"{path} is neither a depthlab run (config.yaml), a Hugging Face "
                        "model dir (config.json) nor a .gguf file")


def _gguf_file(model: str | Path) -> Path | None:
    """The GGUF file MODEL names (`smollm2`, a .gguf path, or a folder holding one and no
    config.json), else None."""
    from depthlab.probe.loading import gguf_file, resolve_spec

    return gguf_file(Path(resolve_spec(model)).expanduser())


def _load_gguf(path: Path, device: str) -> tuple[Any, Any]:
    """(transformers model in fp32, its tokenizer) from a GGUF file: the loader diagnose uses."""
    from depthlab.probe.loading import load_model

    hf, tok, _ = load_model(path, dtype="fp32", device=device)
    if tok is None:
        raise DepthlabError(f"{path}: the GGUF file carries no tokenizer")
    return hf, tok


def open_eval_model(model: str | Path, backend: str = "auto", device: str = "auto",
                    batch_size: int | str = 8) -> EvalModel:
    """Load MODEL (depthlab run/checkpoint dir, HF dir or hub id) as an lm-eval LM."""
    from depthlab.interop.arch import choose_arch
    from depthlab.interop.hf_export import (
        export_model,
        is_depthlab_source,
        load_source,
        run_tokenizer,
        to_hf_tokenizer,
    )

    if backend not in ("auto", "hf", "native"):
        raise DepthlabError(f"--backend {backend!r}: choose auto, hf or native")
    device = str(resolve_device(device))
    path = Path(str(model)).expanduser()
    if path.exists() and is_depthlab_source(path):
        net, cfg, run_dir, _ = load_source(path)
        tok = run_tokenizer(run_dir, cfg)
        notes = []
        if backend == "auto":
            try:
                choose_arch(net.cfg)
                backend = "hf"
            except ValueError as err:
                backend = "native"
                notes.append(f"no exact transformers class ({err}); using the native adapter")
        if backend == "native":
            from depthlab.interop.lm_eval_adapter import DepthLMEval

            bs = batch_size if isinstance(batch_size, int) else 8
            return EvalModel(DepthLMEval(net, tok, bs, device), "depthlab", "native", path,
                             run_dir, notes)
        tmp = tempfile.TemporaryDirectory(prefix="depthlab-export-")
        out = Path(tmp.name) / "hf"
        try:
            export_model(net, out, to_hf_tokenizer(tok, net.cfg.max_seq_len))
            lm = _hflm(str(out), device, batch_size, name=str(model))
        except BaseException:
            tmp.cleanup()
            raise
        return EvalModel(lm, "depthlab", "hf", path, run_dir, notes, tmp)
    if backend == "native":
        raise DepthlabError(f"{model}: --backend native needs a depthlab run or checkpoint dir")
    gguf = _gguf_file(model)
    if gguf is not None:
        from lm_eval.models.huggingface import HFLM

        hf, tok = _load_gguf(gguf, device)
        with _lm_eval_quiet():  # its "pretrained is not a str" advice is for its own CLI
            lm = HFLM(pretrained=hf, tokenizer=tok, batch_size=batch_size)
        return EvalModel(lm, "hf", "hf", gguf, notes=[f"dequantized from {gguf.name} to fp32"])
    if path.exists():
        _check_hf_dir(path)
        return EvalModel(_hflm(str(path), device, batch_size), "hf", "hf", path)
    check_hub_id(model)
    return EvalModel(_hflm(str(model), device, batch_size), "hf", "hf", str(model))


# --------------------------------------------------------------------------- lm-eval


@dataclass
class EvalReport:
    results: dict[str, Any]
    """lm-eval's results dict (as returned by simple_evaluate)."""
    rows: list[dict[str, Any]]
    """task, metric, value, stderr, n."""
    averages: dict[str, float]
    model: str
    backend: str
    seconds: float
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def summarize(results: dict[str, Any], tasks: list[str]) -> tuple[list[dict], dict[str, float]]:
    """Compact rows (acc/acc_norm per task) and the two paper-style averages."""
    rows = []
    acc, paper = [], []
    res = results.get("results", {})
    n_samples = results.get("n-samples", {})
    for task in tasks:
        r = res.get(task, {})
        n = n_samples.get(task, {}).get("effective")
        found = {}
        for metric in METRICS:
            key = f"{metric},none"
            if key not in r or not isinstance(r[key], (int, float)):
                continue
            stderr = r.get(f"{metric}_stderr,none")
            stderr = float(stderr) if isinstance(stderr, (int, float)) else None
            found[metric] = float(r[key])
            rows.append({"task": task, "metric": metric, "value": float(r[key]),
                         "stderr": stderr, "n": n})
        if "acc" in found:
            acc.append(found["acc"])
            paper.append(found.get("acc_norm", found["acc"]))
    averages = {}
    if acc:
        averages["acc"] = float(np.mean(acc))
        averages["acc_norm|acc"] = float(np.mean(paper))
    return rows, averages


def run_lm_eval(
    model: str | Path,
    tasks: list[str] | str,
    limit: int | float | None = None,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    batch_size: int | str = 8,
    backend: str = "auto",
    device: str = "auto",
    num_fewshot: int | None = None,
) -> EvalReport:
    """Evaluate MODEL on lm-eval tasks; write results JSON + summary when out_dir is set."""
    names = parse_tasks(tasks)
    if not names:
        raise DepthlabError(f"no tasks given (e.g. --tasks {','.join(DEFAULT_TASKS[:3])})")
    if limit is not None and limit <= 0:
        raise DepthlabError("--limit must be positive")
    if num_fewshot is not None and num_fewshot < 0:
        raise DepthlabError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    start = time.time()
    offline = data_dir is not None
    # without a reachable Hub, go offline at once: cached task data still loads, missing
    # data fails in seconds instead of after huggingface_hub's retry back-off
    ctx = offline_hub() if offline or not hub_reachable() else contextlib.nullcontext()
    with ctx:
        if offline:
            pairs = resolve_local_tasks(names, Path(data_dir).expanduser())
            task_specs, tm = local_task_configs(pairs)
            task_names = [spec.task for spec, _ in pairs]
        else:
            task_names, tm = resolve_hub_tasks(names)
            task_specs = list(task_names)
        em = open_eval_model(model, backend, device, batch_size)
        try:
            try:
                results = _simple_evaluate(em.lm, task_specs, tm, limit, num_fewshot, offline)
            except ContextTooShort as err:
                if backend != "auto" or em.run_dir is None:
                    raise
                # a depthlab run: the native adapter scores a long continuation's tail
                em.close()
                em = open_eval_model(model, "native", device, batch_size)
                em.notes.append(f"a continuation is longer than the model's context "
                                f"({err.context} tokens): scored with the native adapter, "
                                "which scores its tail")
                results = _simple_evaluate(em.lm, task_specs, tm, limit, num_fewshot, offline)
        finally:
            em.close()
    rows, averages = summarize(results, task_names)
    report = EvalReport(results, rows, averages, str(model), em.backend, time.time() - start,
                        notes=em.notes)
    target = Path(out_dir).expanduser() if out_dir is not None else (
        em.run_dir / "eval" if em.run_dir is not None else None)
    if target is not None:
        report.files = write_report(report, target, {
            "tasks": task_names, "limit": limit, "data_dir": str(data_dir) if data_dir else None,
            "num_fewshot": num_fewshot or 0,
        })
    return report


def _git_commit_hash() -> str | None:
    """lm-eval's `git describe --always` of the working directory, with git's stderr
    muted (outside a repository git prints "fatal: not a git repository" otherwise)."""
    from lm_eval.loggers.utils import get_commit_from_path

    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


@contextlib.contextmanager
def _lm_eval_quiet() -> Iterator[None]:
    """lm-eval's own log lines (warnings meant for its CLI) only at ERROR."""
    quiet = logging.getLogger("lm_eval")
    level = quiet.level
    quiet.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _git_probe_muted() -> Iterator[None]:
    """Run simple_evaluate with `_git_commit_hash` as its git probe (same value, no noise)."""
    import lm_eval.evaluator as evaluator

    probe = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = _git_commit_hash
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = probe


class ContextTooShort(DepthlabError):
    """lm-eval's HFLM met a continuation longer than the model's context."""

    def __init__(self, context: int) -> None:
        self.context = context
        super().__init__(f"lm-eval's HFLM cannot score a continuation longer than the model's "
                         f"context ({context} tokens); use --backend native for depthlab runs "
                         "(scores its tail)")


def _simple_evaluate(lm: Any, task_specs: list, tm: Any, limit: Any, num_fewshot: int | None,
                     local_data: bool = False):
    from lm_eval import simple_evaluate

    if isinstance(limit, float) and limit.is_integer() and limit >= 1:
        limit = int(limit)
    try:
        with _lm_eval_quiet(), _git_probe_muted():
            results = simple_evaluate(
                model=lm, tasks=task_specs, task_manager=tm, limit=limit,
                num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=1000,
            )
    except DepthlabError:
        raise
    except ValueError as err:
        if num_fewshot and "larger than population" in str(err):
            raise DepthlabError(f"--num-fewshot {num_fewshot}: more examples than a task has "
                                "to draw them from; use fewer") from None
        raise
    except AssertionError:
        if type(lm).__name__ != "HFLM":
            raise
        raise ContextTooShort(lm.max_length) from None
    except (ConnectionError, OSError) as err:
        advice = ("check that each task folder under --data-dir is a datasets.save_to_disk "
                  "copy of its validation split" if local_data
                  else "use --data-dir with local copies offline")
        raise DepthlabError(f"lm-eval could not load task data ({str(err).splitlines()[0]}); "
                            f"{advice}") from None
    if results is None:
        raise DepthlabError("lm-eval returned no results")
    return results


def write_report(report: EvalReport, out_dir: Path, extra: dict[str, Any]) -> list[Path]:
    from lm_eval.utils import handle_non_serializable

    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    full = out_dir / f"lm_eval_results_{stamp}.json"
    full.write_text(json.dumps(report.results, indent=2, default=handle_non_serializable) + "\n")
    summary = out_dir / f"summary_{stamp}.json"
    summary.write_text(json.dumps({
        "model": report.model, "backend": report.backend, **extra, "rows": report.rows,
        "averages": report.averages,
        "average_definition": {
            "acc": "unweighted mean of acc over the tasks",
            "acc_norm|acc": "unweighted mean over the tasks of acc_norm where lm-eval reports "
                            "it, else acc",
        },
        "seconds": round(report.seconds, 2), "notes": report.notes,
    }, indent=2) + "\n")
    return [full, summary]


# --------------------------------------------------------------------------- perplexity


@dataclass
class PplReport:
    model: str
    data: str
    loss: float
    ppl: float | None  # None for a non-finite loss
    tokens: int
    seq_len: int
    windows: int
    bits_per_byte: float | None = None
    run_dir: Path | None = None  # the depthlab run evaluated (its eval/ is the default output)
    seconds: float = 0.0


def write_ppl_report(report: PplReport, out_dir: Path) -> Path:
    """OUT/ppl_<time>.json: the numbers printed, with what produced them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"ppl_{time.strftime('%Y%m%d-%H%M%S')}.json"
    fields = {k: v for k, v in report.__dict__.items() if k != "run_dir"}
    fields["seconds"] = round(report.seconds, 2)
    path.write_text(json.dumps(fields, indent=2) + "\n")
    return path


def _nll_over_windows(forward: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray,
                      seq_len: int, batch_size: int, max_windows: int | None,
                      device: str) -> tuple[float, int, int]:
    """(summed NLL, predicted tokens, windows) over non-overlapping windows of seq_len+1."""
    n = (len(tokens) - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise DepthlabError(f"held-out text has {len(tokens)} tokens: fewer than one window of "
                            f"seq_len={seq_len}+1; lower --seq-len")
    total, count = 0.0, 0
    with torch.no_grad():
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size)) * seq_len
            rows = torch.from_numpy(np.stack([np.asarray(tokens[i : i + seq_len + 1],
                                                         dtype=np.int64) for i in idx]))
            x, y = rows[:, :-1].to(device), rows[:, 1:].to(device)
            logits = forward(x).float()
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total, count, n


def _held_out_texts(data: str) -> list[str]:
    from depthlab.config import DataConfig
    from depthlab.data import load_corpus
    from depthlab.data.corpus import read_user_text

    if data == "kjv":
        return load_corpus(DataConfig(corpus="kjv")).texts("val")
    path = Path(data).expanduser()
    if not path.exists():
        raise DepthlabError(f"--data {data}: not 'kjv' nor an existing text/JSONL file or folder")
    if path.is_file() and path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        return [read_user_text(path)]  # refused when not UTF-8, as train and diagnose do
    corpus = load_corpus(DataConfig(corpus=str(path)))
    return corpus.texts("train") + corpus.texts("val")


def _load_hf_for_ppl(model: str | Path, path: Path, device: str) -> tuple[Any, Any]:
    """(transformers model, tokenizer) of a GGUF file, HF dir or hub id."""
    gguf = _gguf_file(model)
    if gguf is not None:
        return _load_gguf(gguf, device)
    if path.exists():
        _check_hf_dir(path)
    else:
        check_hub_id(model)
    from transformers import AutoConfig

    from depthlab.probe.loading import load_hf_lm

    try:
        config = AutoConfig.from_pretrained(str(model))
        _check_causal_lm(config, str(model))
        hf_tok = _hf_tokenizer(str(model), str(model))
        hf = load_hf_lm(str(model), config, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise DepthlabError(f"{model}: cannot load with transformers "
                            f"({str(err).splitlines()[0]})") from None
    return hf, hf_tok


def run_perplexity(model: str | Path, data: str | None = None, batch_size: int | None = None,
                   seq_len: int | None = None, limit: int | None = None,
                   device: str = "auto") -> PplReport:
    """Token-level perplexity on held-out text.

    depthlab run, no `data`: the run's own validation split (`open_splits` +
    `eval_batches`, the windows the trainer's val loss uses). `data` = 'kjv' (its
    validation chapters) or a text/JSONL file/folder (all of it): tokenized with the
    model's tokenizer, documents joined by EOS, non-overlapping windows.
    `limit` caps the number of windows.
    """
    from depthlab.interop.hf_export import is_depthlab_source, load_source, run_tokenizer

    start = time.time()
    run_dir: Path | None = None
    device = str(resolve_device(device))
    path = Path(str(model)).expanduser()
    if path.exists() and is_depthlab_source(path):
        net, cfg, run_dir, _ = load_source(path)
        net = net.to(device).eval()
        T = seq_len or cfg.data.seq_len
        if T > cfg.model.max_seq_len:
            raise DepthlabError(f"--seq-len {T} exceeds the model's max_seq_len "
                                f"{cfg.model.max_seq_len}")
        bs = batch_size or cfg.train.batch_size
        forward = lambda x: net(x).logits  # noqa: E731
        if data is None:
            from depthlab.data import open_splits

            # the windows eval_batches gives the trainer, in the same order; all of them,
            # a last short batch included, so --limit N scores exactly N windows
            val = open_splits(cfg.data, progress=False).val
            if (len(val) - 1) // T < 1:
                raise DepthlabError(f"the run's validation split has {len(val)} tokens: "
                                    f"fewer than one window of {T}+1")
            total, count, n = _nll_over_windows(forward, val, T, bs, limit, device)
            loss = total / count
            return PplReport(str(model), f"run validation split ({cfg.data.corpus})", loss,
                             perplexity(loss), count, T, n,
                             run_dir=run_dir, seconds=time.time() - start)
        tok = run_tokenizer(run_dir, cfg)
        texts = _held_out_texts(data)
        tokens = tok.encode_documents(texts)
    else:
        hf, hf_tok = _load_hf_for_ppl(model, path, device)
        hf = hf.to(device).eval()
        text_config = hf.config.get_text_config()  # an image-text wrapper's text model
        max_len = int(getattr(text_config, "max_position_embeddings", 1024) or 1024)
        T = seq_len or min(1024, max_len)
        bs = batch_size or 8
        forward = lambda x: hf(input_ids=x).logits  # noqa: E731
        texts = _held_out_texts(data or "kjv")
        eos = hf_tok.eos_token_id
        ids: list[int] = []
        for text in texts:
            ids += hf_tok.encode(text, add_special_tokens=False, verbose=False)
            if eos is not None:
                ids.append(int(eos))
        tokens = np.asarray(ids, dtype=np.int64)
    total, count, n = _nll_over_windows(forward, tokens, T, bs, limit, device)
    loss = total / count
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    covered = count / max(1, len(tokens) - 1)
    bpb = (total / math.log(2)) / (n_bytes * covered) if n_bytes else None
    return PplReport(str(model), data or "kjv", loss, perplexity(loss), count, T, n, bpb,
                     run_dir=run_dir, seconds=time.time() - start)
