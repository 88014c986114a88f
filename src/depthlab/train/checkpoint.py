"""Checkpoints: safetensors weights + optimizer + RNG + data position, atomically.

Layout: `RUN_DIR/checkpoints/step_0000100/{model.safetensors, optimizer.pt, state.pt}`.
A checkpoint is written into a temporary sibling directory and renamed into place,
so a crash never leaves a half-written `step_*` directory behind.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from depthlab.errors import DepthlabError

CKPT_DIR = "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        key = t.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous().cpu()
    return out


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"step": str(step)})
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"step": step, "rng": rng_state(), **state}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Load `model.safetensors` into `model` (strict, tied weights restored)."""
    path = Path(ckpt_dir) / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise DepthlabError(f"cannot read checkpoint weights {path}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(weights)
    missing = [m for m in missing if m not in tied or not _is_tied(model, m)]
    if missing or unexpected:
        raise DepthlabError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )


def _is_tied(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and sum(p is target for p in params.values()) > 1


def load_training_state(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state dict, trainer state) of a checkpoint."""
    try:
        opt = torch.load(Path(ckpt_dir) / "optimizer.pt", weights_only=False)
        state = torch.load(Path(ckpt_dir) / "state.pt", weights_only=False)
    except Exception as err:
        raise DepthlabError(f"cannot read training state in {ckpt_dir}: {err}") from None
    return opt, state
