"""Checkpoints: safetensors weights + sharded model/optimizer state + RNG + data position.

Layout of `RUN_DIR/checkpoints/step_0000100/`:

    model.safetensors  the full weights (tied tensors once), written by rank 0: what
                       inference, probes and export read; tensor names as the model's
    dcp/               torch.distributed.checkpoint of {"model", "optim"} with
                       fully-qualified names (get_state_dict/set_state_dict): each rank
                       writes its shard; it loads into any world size and DDP or FSDP2
    state.pt           step, the data loader's global position, rank 0's RNG, geometry

Single-process runs write the same layout (DCP without a process group), so a run can
move between 1 and N processes at any checkpoint. A checkpoint is written into a
temporary sibling directory and renamed into place by rank 0 after every rank has
finished writing, so a crash never leaves a half-written `step_*` directory behind.
Multi-node runs need the run directory on a filesystem every node sees.
Checkpoints of earlier versions (`optimizer.pt` instead of `dcp/`) still resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from depthlab.data.cache import umask_mode
from depthlab.errors import DepthlabError, first_line
from depthlab.interrupts import interrupts_deferred
from depthlab.paths import CKPT_DIR, WEIGHTS_FILE, checkpoint_dirs, checkpoint_step
from depthlab.train import distributed as D

DCP_DIR = "dcp"


def save_weights(weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors weights file with the mode any other file gets (safetensors alone
    writes 0600, unreadable to others on a shared file system)."""
    save_file(weights, str(path), metadata=metadata)
    umask_mode(path)


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


def export_names(model: nn.Module) -> list[str]:
    """The tensor names `model_state` keeps (tied tensors under their first name), for a
    plain, DDP-wrapped or FSDP2-sharded model."""
    names, seen = [], set()
    for name, t in D.unwrap(model).state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        names.append(name)
    return names


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model_state` of the whole model on rank 0 ({} elsewhere). Under a process group
    this gathers the (sharded) weights: every rank must call it."""
    if not D.is_distributed():
        return model_state(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not D.is_main():
        return {}
    return {n: full[n].detach().contiguous().cpu() for n in export_names(model)}


def rng_state() -> dict[str, Any]:
    """Every generator a run draws from. CUDA's only when this process uses CUDA (its
    model is there): asking creates a CUDA context, which a CPU run on a GPU node need
    not have (and cannot, on a GPU in exclusive-process mode that another job holds)."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_initialized():
        if D.is_distributed():  # this process's GPU only (no context on the others)
            state["cuda_current"] = torch.cuda.get_rng_state()
        else:
            state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if not torch.cuda.is_initialized():  # a CPU run (the model is on CUDA before this)
        return
    if "cuda" in state and not D.is_distributed() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    elif "cuda_current" in state:
        torch.cuda.set_rng_state(state["cuda_current"])


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it 'assumes' single-process use when there is no process group:
    that is intended here. It also logs each failed attempt to read a checkpoint's
    metadata, with its traceback, on the root logger before raising: the error that
    follows (one line, with both causes) says it all."""
    def not_from_dcp(record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.WARNING
                    and "torch/distributed/checkpoint" in record.pathname.replace("\\", "/"))

    root = logging.getLogger()
    root.addFilter(not_from_dcp)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            yield
    finally:
        root.removeFilter(not_from_dcp)


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep_last`.

    Under a process group every rank must call this (the weights are gathered and each
    rank writes its DCP shard); rank 0 writes the rest and renames the directory.
    `state` is rank 0's (the data position is global, the same on every rank).
    """
    with interrupts_deferred(f"writing checkpoint step_{step:07d}"):
        return _save_checkpoint(run_dir, step, model, optimizer, state, keep_last)


def _save_checkpoint(run_dir: Path, step: int, model: nn.Module,
                     optimizer: torch.optim.Optimizer, state: dict[str, Any],
                     keep_last: int) -> Path:
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / CKPT_DIR
    final = root / f"step_{step:07d}"
    tmp = root / D.broadcast_object(f".tmp_step_{step:07d}_{os.getpid()}")
    if D.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    D.barrier()
    try:
        weights = full_model_state(model)
        if D.is_main():
            with _write_errors(tmp / WEIGHTS_FILE):
                save_weights(weights, tmp / WEIGHTS_FILE, {"step": str(step)})
        del weights
        with _single_process_quiet(), _dcp_errors(f"cannot write checkpoint {tmp / DCP_DIR}",
                                                  lambda: _disk_full_note(root)):
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=str(tmp / DCP_DIR),
                     no_dist=not D.is_distributed())
        if D.is_main():
            with _write_errors(tmp / "state.pt"):
                torch.save({"step": step, "rng": rng_state(), "world_size": D.world_size(),
                            **state}, tmp / "state.pt")
    except BaseException:
        if D.is_main():  # a half-written checkpoint is no checkpoint (nor left on a full disk)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    D.barrier()
    if D.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    D.barrier()
    return final


def load_weights(model: nn.Module, ckpt_dir: Path) -> None:
    """Load `model.safetensors` into `model` (strict, tied weights restored)."""
    load_weights_file(model, Path(ckpt_dir) / WEIGHTS_FILE)


def weights_file(source: str | Path) -> Path:
    """The weights a path names: a `.safetensors` file, a checkpoint directory's
    model.safetensors, or a run directory's latest checkpoint."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if (path / "config.json").is_file() and not (path / "config.yaml").is_file():
        raise DepthlabError(
            f"{path} is a Hugging Face model directory: bring it in first with "
            f"`depthlab import-hf {path} OUT`, then use OUT")
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    ckpt = latest_checkpoint(path)
    if ckpt is None:
        raise DepthlabError(
            f"{path}: no model weights there (expected a run directory with checkpoints, "
            "a checkpoint directory or a .safetensors file)"
        )
    return ckpt / "model.safetensors"


def load_weights_file(model: nn.Module, path: Path) -> torch.dtype | None:
    """Load a safetensors file of `model_state` tensors into `model` (strict: every tensor,
    same names, same shapes; tied weights restored). Mismatches are one-line errors.
    Returns the dtype the weights are stored in (the model keeps its own)."""
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises several types for corrupt files
        raise DepthlabError(f"cannot read checkpoint weights {path}: {err}") from None
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and own[name].shape != t.shape:
            raise DepthlabError(
                f"checkpoint {path} does not match the model: {name} has shape "
                f"{tuple(t.shape)} there but {tuple(own[name].shape)} in this config"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(weights)
    missing = [m for m in missing if m not in tied or not _is_tied(model, m)]
    if missing or unexpected:
        raise DepthlabError(
            f"checkpoint {path} does not match the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    return next((t.dtype for t in weights.values() if t.is_floating_point()), None)


def _is_tied(model: nn.Module, name: str) -> bool:
    params = dict(model.named_parameters(remove_duplicate=False))
    target = params.get(name)
    return target is not None and sum(p is target for p in params.values()) > 1


def load_training_state(ckpt_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(optimizer state dict, trainer state) of a checkpoint in the earlier single-process
    format (optimizer.pt + state.pt)."""
    try:
        opt = torch.load(Path(ckpt_dir) / "optimizer.pt", weights_only=False, map_location="cpu")
    except Exception as err:
        raise _unreadable(ckpt_dir, "optimizer.pt", err) from None
    return opt, _read_state(Path(ckpt_dir))


def _read_state(ckpt_dir: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt_dir / "state.pt", weights_only=False)
    except Exception as err:
        raise _unreadable(ckpt_dir, "state.pt", err) from None


def _unreadable(ckpt_dir: Path, name: str, err: Exception) -> DepthlabError:
    """Cut or corrupt files get the way out (resume from an earlier checkpoint); anything
    else (permissions, a library version that cannot unpickle it) only the cause."""
    damaged = isinstance(err, (EOFError, ValueError, pickle.UnpicklingError)) or (
        isinstance(err, RuntimeError) and "zip" in str(err).lower())
    way_out = _delete_to_resume(ckpt_dir) if damaged else ""
    return DepthlabError(f"cannot read {ckpt_dir / name} ({first_line(err)}){way_out}")


def _delete_to_resume(ckpt_dir: Path) -> str:
    """The way out of a damaged checkpoint: the one it would resume from without it."""
    step = checkpoint_step(ckpt_dir) or 0
    earlier = [c for c in checkpoint_dirs(ckpt_dir.parent.parent) if (checkpoint_step(c) or 0) < step]
    return (f"; if it is damaged, delete {ckpt_dir} to resume from "
            f"{earlier[-1].name if earlier else 'step 0 (no earlier checkpoint)'}")


def _disk_full_note(path: Path) -> str:
    """'; the disk holding it has 120 kB free' when that disk is (nearly) full: some
    writers report a full disk only as a short write ('unexpected pos 704 vs 598')."""
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f"; the disk holding it has {free / 1e3:,.0f} kB free" if free < 64 * 2**20 else ""


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """A failed write of a checkpoint file (a full disk, a quota) as one line naming it."""
    try:
        yield
    except DepthlabError:
        raise
    except Exception as err:  # OSError, safetensors' SafetensorError, torch's RuntimeError
        raise DepthlabError(f"cannot write checkpoint file {path}: {first_line(err)}"
                            f"{_disk_full_note(path.parent)}") from None


@contextlib.contextmanager
def _dcp_errors(what: str, way_out: Callable[[], str] = str):
    """torch.distributed.checkpoint wraps every failure, Ctrl-C included, in a
    CheckpointException (a BaseException): re-raise Ctrl-C as itself and anything else
    (a missing or cut shard, another model shape, a full disk) as one line."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except (CheckpointException, Exception) as err:
        causes = ([exc for exc, _trace in err.failures.values()]
                  if isinstance(err, CheckpointException) else []) or [err]
        if any(isinstance(c, KeyboardInterrupt) for c in causes):
            raise KeyboardInterrupt from None
        raise DepthlabError(f"{what}: {first_line(causes[0])}{way_out()}") from None


def load_checkpoint(ckpt_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore model and optimizer (resharded to this world size and strategy) and return
    the trainer state (step, data position, RNG). Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / DCP_DIR).is_dir():
        state = _read_state(ckpt_dir)
        sd = _dcp_state(model, optimizer)
        with _single_process_quiet(), _dcp_errors(
                f"cannot load the model/optimizer state in {ckpt_dir / DCP_DIR}",
                lambda: _delete_to_resume(ckpt_dir)):  # looked up only on failure
            dcp.load(sd, checkpoint_id=str(ckpt_dir / DCP_DIR), no_dist=not D.is_distributed())
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        return state
    if not (ckpt_dir / "optimizer.pt").is_file():
        raise DepthlabError(
            f"{ckpt_dir} holds weights only (no {DCP_DIR}/ or optimizer.pt): it can be "
            "loaded for inference or export but not resumed; to train from these weights, "
            f"start a new run with --set train.init_from={ckpt_dir.parent.parent}"
        )
    if D.is_distributed():
        raise DepthlabError(
            f"{ckpt_dir} is in the single-process format of earlier depthlab versions "
            "(optimizer.pt): resume it with one process first; its next checkpoints can "
            "then be resumed at any world size"
        )
    opt_state, state = load_training_state(ckpt_dir)
    load_weights(model, ckpt_dir)
    optimizer.load_state_dict(opt_state)
    return state
