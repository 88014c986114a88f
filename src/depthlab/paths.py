"""What a directory is (a training run, a checkpoint) and what a path a user typed is part
of. Torch-free, so commands can tell a user they gave the wrong path before loading anything."""

from __future__ import annotations

import os
from pathlib import Path

# what a training run directory holds
CONFIG_FILE = "config.yaml"
DATA_FILE = "data.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CKPT_DIR = "checkpoints"
WEIGHTS_FILE = "model.safetensors"
TRAIN_LOCK = ".train.lock"
"""Held (flock) by the process training the run, and removed when it is done."""
_RUN_MARKS = (CKPT_DIR, METRICS_FILE, DATA_FILE)
"""Files a training run writes beside its config before (or without) a first checkpoint."""


def trained_on_bare_ids(run_dir: Path | None, corpus: str) -> bool:
    """Whether a run (RUN, its data.corpus) was trained on token files that kept no
    tokenizer (raw or .npy ids): it has no text tokenizer at all."""
    from depthlab.data.corpus import is_token_dir

    return (not (run_dir is not None and (Path(run_dir) / "tokenizer").is_dir())
            and corpus != "kjv" and is_token_dir(Path(corpus).expanduser()))


def is_run_dir(path: Path) -> bool:
    """A training run directory: its config.yaml beside something only a run writes."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and any((path / m).exists() for m in _RUN_MARKS)


def holds_other_files(path: Path) -> bool:
    """A non-empty directory with no run config: someone else's files, which a command that
    creates a run must not write among (a left-over train lock does not count)."""
    path = Path(path)
    return (path.is_dir() and not (path / CONFIG_FILE).exists()
            and any(p.name != TRAIN_LOCK for p in path.iterdir()))


def checkpoint_step(path: Path) -> int | None:
    """N for a directory named step_N (digits only), else None."""
    name = Path(path).name
    digits = name[5:]
    return int(digits) if name.startswith("step_") and digits.isascii() and digits.isdecimal() \
        else None


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """A run's complete checkpoints (checkpoints/step_N holding model.safetensors), oldest
    first. A user's copy under another name (step_100_mine, best) is not one: never loaded
    as the latest, never pruned."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if checkpoint_step(p) is not None and p.is_dir() and (p / WEIGHTS_FILE).is_file()]
    return sorted(found, key=lambda p: checkpoint_step(p) or 0)


def source_run_dir(path: Path) -> Path | None:
    """The run directory of a run directory (config.yaml) or of a checkpoint directory
    inside one; None for any other path."""
    path = Path(path)
    return path if (path / CONFIG_FILE).is_file() else run_of_checkpoint(path)


def run_of_checkpoint(path: Path) -> Path | None:
    """The run directory of a checkpoint directory (RUN/checkpoints/step_N holding
    model.safetensors, RUN holding config.yaml); None for any other path, such as a
    Hugging Face export saved somewhere inside a run."""
    full = Path(os.path.abspath(path))
    if (full.parent.name == CKPT_DIR and checkpoint_step(full) is not None
            and (full / WEIGHTS_FILE).is_file() and (full.parent.parent / CONFIG_FILE).is_file()):
        return _as_typed(path, full.parent.parent)
    return None


def enclosing_run(path: Path, depth: int = 3) -> Path | None:
    """The training run directory that `path` lies inside (its checkpoints/ folder, one
    checkpoint, or a file in either), or None. `path` itself being a run does not count."""
    for parent in Path(os.path.abspath(path)).parents[:depth]:
        if is_run_dir(parent):
            return _as_typed(path, parent)
    return None


def _as_typed(path: Path, found: Path) -> Path:
    """`found` (absolute) spelled relative to the working directory when the user's `path`
    was relative, so messages echo the user's spelling."""
    return found if Path(path).is_absolute() else Path(os.path.relpath(found))


def is_sweep_spec(raw: dict) -> bool:
    """A sweep spec names a `base` config and has no `model` of its own."""
    return "base" in raw and "model" not in raw
