"""Metric sinks: JSONL (always), TensorBoard and wandb (optional).

In a multi-process run only rank 0 writes: `open_logger` gives the other ranks a
`NullLogger`, so the run directory has one metrics.jsonl and one event file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from depthlab.errors import DepthlabError
from depthlab.paths import METRICS_FILE


def _records(path: Path) -> list[dict[str, Any]]:
    """The JSON records of a metrics file. A cut-off last line (a process killed
    mid-write, a full disk) is dropped; a corrupt line before it is an error."""
    text = path.read_text(encoding="utf-8", errors="replace")  # bad bytes fail as JSON
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise DepthlabError(f"{path}: line {i + 1} is not valid JSON") from None
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise DepthlabError(f"{path}: line {i + 1} is not a metrics record (a JSON object "
                                "with an integer step)")
        records.append(record)
    return records


def truncate_after(path: Path, step: int) -> None:
    """Drop records with step > `step` (a resumed run rewrites them, no duplicates)."""
    if not path.is_file():
        return
    kept = [r for r in _records(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return _records(path)


def flatten_scalars(value: Any, prefix: str = ""):
    """Yield (`a/b/layer_03`, number) pairs from nested dicts/lists of finite numbers."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        if math.isfinite(value):
            yield prefix, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from flatten_scalars(v, f"{prefix}/{k}" if prefix else str(k))
    elif isinstance(value, (list, tuple)):
        width = len(str(max(len(value) - 1, 0)))
        for i, v in enumerate(value):
            yield from flatten_scalars(v, f"{prefix}/{i:0{width}d}")


class MetricLogger:
    """Writes every record to metrics.jsonl and scalar fields to TensorBoard/wandb."""

    def __init__(self, run_dir: Path, tensorboard: bool, wandb_project: str | None,
                 run_name: str, config: dict[str, Any], resume_step: int) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        truncate_after(self.path, resume_step)
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
        self._wandb = None
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                     resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = record["step"]
        scalars = dict(flatten_scalars({k: v for k, v in record.items() if k != "step"}))
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullLogger:
    """The logger of ranks other than 0: records are dropped (rank 0 logs global values)."""

    def log(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def open_logger(run_dir: Path, tensorboard: bool, wandb_project: str | None, run_name: str,
                config: dict[str, Any], resume_step: int) -> MetricLogger | NullLogger:
    """A MetricLogger on rank 0 (or without a process group), a NullLogger elsewhere."""
    from depthlab.train.distributed import is_main

    if not is_main():
        return NullLogger()
    return MetricLogger(run_dir, tensorboard, wandb_project, run_name, config, resume_step)
