"""The training loop: one `RunConfig` in, a run directory out.

RUN_DIR/
  config.yaml         the validated config (vocab size filled in)
  tokenizer/          the tokenizer used (when the data has one)
  metrics.jsonl       one record per log/eval step
  tensorboard/        the same scalars for TensorBoard
  checkpoints/        step_XXXXXXX/{model.safetensors, optimizer.pt, state.pt}
  summary.json        written when the run completes
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from depthlab.config import RunConfig, TrainConfig, build_config
from depthlab.errors import DepthlabError
from depthlab.model import DepthLM
from depthlab.train.checkpoint import (
    latest_checkpoint,
    load_training_state,
    load_weights,
    save_checkpoint,
    set_rng_state,
)
from depthlab.train.loggers import MetricLogger
from depthlab.train.optim import build_optimizer
from depthlab.train.schedule import lr_at

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DepthlabError(f"train.device={name} but CUDA is not available on this machine")
    return device


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (dtype auto/bf16), plain fp32 otherwise."""
    use_bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def config_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    diffs = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            diffs += config_differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            diffs.append(f"{prefix}{key}: {va!r} -> {vb!r}")
    return diffs


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DepthlabError(f"{run_dir} is not a depthlab run (no {CONFIG_FILE})")
    return build_config(yaml.safe_load(path.read_text()) or {})


@dataclass
class TrainSummary:
    run_dir: Path
    step: int
    train_loss: float | None
    val_loss: float | None
    tokens: int
    seconds: float
    status: str = "complete"
    extra: dict[str, Any] = field(default_factory=dict)


StepCallback = Callable[["Trainer", int], None]


class Trainer:
    """Builds data, model and optimiser for a config and runs (or resumes) training."""

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
        from depthlab.data import TrainLoader, eval_batches, open_splits

        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        self.splits = open_splits(cfg.data)
        if cfg.model.vocab_size is None:
            cfg = build_config(cfg.to_dict(), {"model.vocab_size": self.splits.vocab_size})
        elif cfg.model.vocab_size < self.splits.vocab_size:
            raise DepthlabError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({self.splits.vocab_size})"
            )
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        tc = cfg.train
        self.loader = TrainLoader(self.splits.train, cfg.data.seq_len, tc.batch_size, tc.seed)
        self.val_batches = eval_batches(
            self.splits.val, cfg.data.seq_len, tc.batch_size, tc.eval_batches
        )
        torch.manual_seed(tc.seed)
        self.model = DepthLM(cfg.model).to(self.device)
        self.optimizer = build_optimizer(self.model, tc)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        self.step = 0
        self.logger: MetricLogger | None = None
        # grad_callbacks run after backward/clipping, before the optimiser step (grads live);
        # callbacks run after each completed step. Both get (trainer, step about to finish / finished).
        self.grad_callbacks: list[StepCallback] = []
        self.callbacks: list[StepCallback] = []
        if cfg.train.stats_interval > 0:
            from depthlab.train.stats import LayerStatsCallback

            LayerStatsCallback(self).install()

    # ---------------------------------------------------------------- run directory
    def _claim_run_dir(self) -> None:
        """Create the run dir, or check that an existing one holds this same config."""
        path = self.run_dir / CONFIG_FILE
        mine = self.cfg.to_dict()
        if path.is_file():
            theirs = yaml.safe_load(path.read_text()) or {}
            diffs = config_differences(theirs, mine)
            if diffs:
                raise DepthlabError(
                    f"{self.run_dir} already holds a different config ({'; '.join(diffs[:3])}); "
                    "choose another name/out_dir or delete that run"
                )
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(mine, sort_keys=False))
        tok = self.splits.tokenizer
        if tok is not None:
            tok.save(self.run_dir / "tokenizer")

    def _resume(self) -> None:
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            return
        load_weights(self.model, ckpt)
        opt_state, state = load_training_state(ckpt)
        self.optimizer.load_state_dict(opt_state)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])

    def _save(self) -> Path:
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer,
            {"loader": self.loader.state_dict()}, self.cfg.train.keep_last,
        )

    # ---------------------------------------------------------------- steps
    def train_step(self, lr: float) -> tuple[float, float, float | None]:
        """One optimiser step over grad_accum micro-batches: (ce loss, grad norm, aux)."""
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ce_total, aux_total = 0.0, 0.0
        has_aux = False
        for _ in range(tc.grad_accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            with autocast_context(tc, self.device):
                out = self.forward(x, y)
            loss = out.loss
            if out.aux_loss is not None:
                has_aux = True
                aux_total += out.aux_loss.item() / tc.grad_accum
                loss = loss + out.aux_loss
            (loss / tc.grad_accum).backward()
            ce_total += out.loss.item() / tc.grad_accum
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        for callback in self.grad_callbacks:
            callback(self, self.step + 1)
        if not (math.isfinite(ce_total) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return ce_total, grad_norm, aux_total if has_aux else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return ce_total, grad_norm, aux_total if has_aux else None

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over the fixed validation batches."""
        self.model.eval()
        total = 0.0
        for x, y in self.val_batches:
            with autocast_context(self.cfg.train, self.device):
                out = self.forward(x.to(self.device), y.to(self.device))
            total += out.loss.item()
        self.model.train()
        return total / len(self.val_batches)

    # ---------------------------------------------------------------- loop
    def fit(self) -> TrainSummary:
        self._claim_run_dir()
        summary_path = self.run_dir / SUMMARY_FILE
        self._resume()
        tc = self.cfg.train
        if self.step >= tc.max_steps and summary_path.is_file():
            done = json.loads(summary_path.read_text())
            return TrainSummary(self.run_dir, self.step, done.get("train_loss"),
                                done.get("val_loss"), done.get("tokens", 0), 0.0, "already complete")
        logger = self.logger = MetricLogger(
            self.run_dir, tc.tensorboard, tc.wandb_project if tc.wandb else None,
            self.cfg.name, self.cfg.to_dict(), self.step,
        )
        tokens_per_step = tc.batch_size * tc.grad_accum * self.cfg.data.seq_len
        self.model.train()
        start_time, window_time, window_tokens = time.time(), time.time(), 0
        train_loss = val_loss = None
        try:
            with _progress_bar(self.progress, tc.max_steps, self.step, self.cfg.name) as bar:
                while self.step < tc.max_steps:
                    lr = lr_at(self.step, tc)
                    loss, grad_norm, aux = self.train_step(lr)
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self._stop_non_finite(loss, logger)
                    self.step += 1
                    train_loss = loss
                    window_tokens += tokens_per_step
                    for callback in self.callbacks:
                        callback(self, self.step)
                    last = self.step == tc.max_steps
                    if self.step % tc.log_interval == 0 or last:
                        now = time.time()
                        tps = window_tokens / max(now - window_time, 1e-9)
                        window_time, window_tokens = now, 0
                        record = {"step": self.step, "loss": loss, "lr": lr,
                                  "grad_norm": grad_norm, "tokens": self.step * tokens_per_step,
                                  "tokens_per_s": tps}
                        if aux is not None:
                            record["aux_loss"] = aux
                        logger.log(record)
                        bar.update(self.step, loss, tps)
                    if self.step % tc.eval_interval == 0 or last:
                        val_loss = self.evaluate()
                        logger.log({"step": self.step, "val_loss": val_loss,
                                    "val_ppl": math.exp(min(val_loss, 50.0))})
                    if self.step % tc.ckpt_interval == 0 or last:
                        self._save()
                    bar.update(self.step, loss, None)
        finally:
            logger.close()
        seconds = time.time() - start_time
        summary = TrainSummary(self.run_dir, self.step, train_loss, val_loss,
                               self.step * tokens_per_step, seconds)
        summary_path.write_text(json.dumps({
            "status": "complete", "step": self.step, "train_loss": train_loss,
            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)) if val_loss else None,
            "tokens": summary.tokens, "seconds": seconds,
            "params": self.model.num_params(), "active_params": self.model.num_params(active=True),
        }, indent=2))
        return summary

    def _stop_non_finite(self, loss: float, logger: MetricLogger) -> None:
        logger.log({"step": self.step + 1, "non_finite_loss": True})
        ckpt = latest_checkpoint(self.run_dir)
        kept = f"last good checkpoint kept: {ckpt}" if ckpt else "no checkpoint was written yet"
        raise DepthlabError(
            f"loss became non-finite ({loss}) at step {self.step + 1}; training stopped, "
            f"{kept}; try a lower train.lr or train.grad_clip"
        )


class _Bar:
    """A rich progress bar showing loss, tokens/s and ETA (no-op when disabled)."""

    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task, self._tps = progress, task, 0.0

    def update(self, step: int, loss: float, tps: float | None) -> None:
        if self._progress is None:
            return
        if tps is not None:
            self._tps = tps
        self._progress.update(self._task, completed=step, loss=loss, tps=self._tps)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(name, total=total, completed=start, loss=float("nan"), tps=0.0)
        yield _Bar(progress, task)


def train(cfg: RunConfig, progress: bool = True) -> TrainSummary:
    """Train (or resume) the run described by `cfg`."""
    return Trainer(cfg, progress=progress).fit()


def load_run_model(run_dir: Path, device: str = "cpu") -> tuple[DepthLM, RunConfig, Path]:
    """The model of a run's latest checkpoint (or of a checkpoint dir inside a run)."""
    run_dir = Path(run_dir)
    ckpt = run_dir if (run_dir / "model.safetensors").is_file() else latest_checkpoint(run_dir)
    cfg_dir = run_dir.parent.parent if ckpt == run_dir else run_dir
    cfg = read_run_config(cfg_dir)
    if ckpt is None:
        raise DepthlabError(f"{run_dir} has no checkpoint yet")
    model = DepthLM(cfg.model)
    load_weights(model, ckpt)
    return model.to(device).eval(), cfg, ckpt
