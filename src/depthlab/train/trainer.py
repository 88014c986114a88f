"""The training loop: one `RunConfig` in, a run directory out.

RUN_DIR/
  config.yaml         the validated config (vocab size filled in)
  data.json           what the data is (fingerprints, split lengths): a resume must give
                      the same data, however its paths are spelled
  tokenizer/          the tokenizer used (when the data has one)
  metrics.jsonl       one record per log/eval step
  tensorboard/        the same scalars for TensorBoard
  checkpoints/        step_XXXXXXX/{model.safetensors, dcp/, state.pt}
  summary.json        written when the run completes

Under `torchrun` with several processes the same loop runs data-parallel (DDP or
FSDP2, `train.distributed`; see depthlab.train.distributed and docs/distributed.md):
each process takes its share of every global batch, the logged losses are global
means, and rank 0 alone writes the run directory, logs and the progress bar.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import importlib.util
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from depthlab.config import (
    RUNTIME_KEYS,
    RunConfig,
    TrainConfig,
    build_config,
    load_config,
    read_yaml,
)
from depthlab.data.cache import atomic_write_text
from depthlab.data.corpus import BUILTIN_NAMES
from depthlab.devices import device_type
from depthlab.devices import resolve_device as _resolve_device
from depthlab.errors import DepthlabError
from depthlab.locks import Busy, FileLock
from depthlab.model import DepthLM
from depthlab.paths import (
    CONFIG_FILE,
    DATA_FILE,
    SUMMARY_FILE,
    TRAIN_LOCK,
    holds_other_files,
)
from depthlab.progress import clock, live_bar_shown
from depthlab.text import perplexity
from depthlab.train import distributed as D
from depthlab.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_weights,
    load_weights_file,
    save_checkpoint,
    set_rng_state,
    weights_file,
)
from depthlab.train.loggers import MetricLogger, NullLogger, open_logger, read_metrics
from depthlab.train.optim import build_optimizer
from depthlab.train.schedule import lr_at


def resolve_device(name: str) -> torch.device:
    return _resolve_device(name, what="train.device")


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")


def autocast_context(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (dtype auto/bf16), plain fp32 otherwise."""
    if uses_bf16(cfg, device):
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


PATH_KEYS = frozenset({"data.corpus", "data.tokenizer", "data.cache_dir", "train.init_from"})
"""Config keys that name files: two spellings of one path (relative, absolute, ~) agree."""


def _dotted(cfg: dict[str, Any], key: str) -> Any:
    section, name = key.split(".", 1)
    return (cfg.get(section) or {}).get(name)


def _same_path(a: Any, b: Any) -> bool:
    """Whether two config values name the same existing file or directory."""
    if not (isinstance(a, str) and isinstance(b, str)) or {a, b} & BUILTIN_NAMES:
        return False
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except (OSError, ValueError):
        return False


def read_data_record(run_dir: Path) -> dict[str, Any]:
    """RUN_DIR/data.json ({} for runs made before it existed). A damaged one is refused:
    read as {} it would silently switch off the check that a resume trains on the same data."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        raise DepthlabError(
            f"{path} is damaged (not a JSON record of the data this run trained on): restore "
            "it, or delete it to resume without checking that the data is the same")
    return record


def data_identity(splits: Any) -> dict[str, Any]:
    """What the token streams are: corpus and tokenizer fingerprints where the manifest has
    them, and the split lengths (all a directory of raw token files offers)."""
    manifest = splits.manifest or {}
    return {"corpus": (manifest.get("corpus") or {}).get("fingerprint"),
            "tokenizer": (manifest.get("tokenizer") or {}).get("fingerprint"),
            "train_tokens": len(splits.train), "val_tokens": len(splits.val)}


def resume_conflicts(theirs: dict[str, Any], mine: dict[str, Any],
                     identity_kept: bool = False) -> list[str]:
    """The differences between a run directory's config (`theirs`) and the config asked to
    resume it that change what is computed: RUNTIME_KEYS may differ, and `train.device`
    too unless it switches the precision (dtype auto: bf16 on CUDA, fp32 on CPU). An unset
    model.vocab_size (the tokenizer's) matches any. Paths (PATH_KEYS) may be spelled
    differently: when the run keeps its data identity (`identity_kept`, data.json), the
    data they give is compared with the run's after it is prepared; before data.json
    existed, they must name the same file from the current directory."""
    mine = {**mine, "model": dict(mine.get("model") or {})}
    if mine["model"].get("vocab_size") is None:
        mine["model"]["vocab_size"] = (theirs.get("model") or {}).get("vocab_size")
    conflicts = []
    for d in config_differences(theirs, mine):
        key = d.split(":")[0]
        if key in PATH_KEYS and (identity_kept or _same_path(_dotted(theirs, key),
                                                             _dotted(mine, key))):
            continue
        if key not in RUNTIME_KEYS:
            conflicts.append(d)
        elif key == "train.device" and (mine.get("train") or {}).get("dtype", "auto") == "auto":
            a, b = (device_type((c.get("train") or {}).get("device", "auto"))
                    for c in (theirs, mine))
            if a != b:
                conflicts.append(f"{d} (with train.dtype=auto this changes the precision)")
    return conflicts


def _token_dir_tokenizer_note(configured: str, splits: Any) -> str | None:
    """A prepared token directory brings its own tokenizer; say so when the config names
    another (it is the directory's tokenizer that the run uses and saves)."""
    recorded = splits.manifest.get("tokenizer") or {}
    kind = recorded.get("kind")
    if kind is None and splits.tokenizer is None and configured == "bpe":
        return (f"{splits.path} holds token ids without a tokenizer; the run trains on the ids "
                f"as they are (data.tokenizer={configured} applies only to raw text)")
    if kind is None or configured not in ("byte", "bpe") or kind == configured:
        return None
    return (f"{splits.path} holds tokens of the {recorded.get('name') or kind} tokenizer; the run "
            f"uses it (data.tokenizer={configured} applies only to raw text)")


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise DepthlabError(f"{run_dir} is not a depthlab run (no {CONFIG_FILE})")
    return build_config(read_yaml(path))


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
    """Builds data, model and optimiser for a config and runs (or resumes) training.

    Under torchrun (WORLD_SIZE > 1) it joins the process group, shards the data by rank
    and wraps the model per `train.distributed`; `self.model` is then the DDP/FSDP2
    module and `self.raw_model` the DepthLM inside (the same object for FSDP2 and for
    single-process runs).
    """

    def __init__(self, cfg: RunConfig, progress: bool = True) -> None:
        from depthlab.data import TrainLoader, eval_batches, open_splits
        from depthlab.data.prepare import tokenizer_notes

        tc = cfg.train
        if tc.wandb and importlib.util.find_spec("wandb") is None:
            raise DepthlabError("train.wandb=true needs the wandb package: "
                                "pip install 'depthlab[wandb]' (or wandb)")
        self.dist = D.setup(tc.distributed, tc.device, resolve_device)
        self.progress = progress and self.dist.is_main
        self.device = self.dist.device
        self.run_dir = cfg.run_dir
        self._lock = FileLock(self.run_dir / TRAIN_LOCK)  # held by rank 0 while fit() runs
        self._seconds_before, self._started = 0.0, 0.0  # earlier sessions; this one (fit)
        # a run directory holding another config, or being trained by another process, is
        # refused before any data is prepared or model built (on a GPU, a second model
        # could take the memory the running one needs)
        D.on_main_then_share(lambda: self._check_config(cfg.to_dict()))
        D.on_main_then_share(self._refuse_if_busy)
        if self.dist.enabled:
            self.splits = D.main_first(lambda: open_splits(cfg.data, progress=self.progress))
        else:
            self.splits = open_splits(cfg.data, progress=self.progress)
        if self.dist.is_main:
            for note in [cfg.model.placement_note(), _compile_moe_note(cfg),
                         _token_dir_tokenizer_note(cfg.data.tokenizer, self.splits),
                         *tokenizer_notes(self.splits.manifest, cfg.data.tokenizer)]:
                if note:
                    print(f"note: {note}", file=sys.stderr, flush=True)
        if cfg.model.vocab_size is None:
            cfg = build_config(cfg.to_dict(), {"model.vocab_size": self.splits.vocab_size})
        elif cfg.model.vocab_size < self.splits.vocab_size:
            raise DepthlabError(
                f"model.vocab_size ({cfg.model.vocab_size}) is smaller than the tokenizer's "
                f"vocabulary ({self.splits.vocab_size})"
            )
        self.cfg = cfg
        world = self.dist.world_size
        self.grad_accum, self.global_batch = tc.accumulation(world)
        self.loader = TrainLoader(self.splits.train, cfg.data.seq_len, tc.batch_size, tc.seed,
                                  rank=self.dist.rank, world_size=world,
                                  grad_accum=self.grad_accum)
        self.val_batches = eval_batches(
            self.splits.val, cfg.data.seq_len, tc.batch_size, tc.eval_batches
        )
        torch.manual_seed(tc.seed)
        self.raw_model = DepthLM(cfg.model)
        self.init_weights = self._init_from()
        self.raw_model.to(self.device)
        self.n_params = self.raw_model.num_params()
        self.n_active_params = self.raw_model.num_params(active=True)
        self.model = D.wrap_model(self.raw_model, self.dist, uses_bf16(tc, self.device))
        self.optimizer = build_optimizer(self.model, tc)
        self.forward = torch.compile(self.model) if tc.compile else self.model
        # evaluation runs rank-locally except under FSDP2 (whose forward is collective)
        local = self.raw_model if self.dist.strategy == "ddp" else self.model
        self._eval_forward = (
            self.forward if local is self.model else torch.compile(local) if tc.compile else local
        )
        self.step = 0
        self.logger: MetricLogger | None = None
        # grad_callbacks run after backward/clipping, before the optimiser step (grads live);
        # callbacks run after each completed step. Both get (trainer, step about to finish / finished).
        # They run on every rank; rank 0 alone has a logger (self.logger is None elsewhere).
        self.grad_callbacks: list[StepCallback] = []
        self.callbacks: list[StepCallback] = []
        if cfg.train.stats_interval > 0:
            from depthlab.train import stats

            if self.dist.strategy == "fsdp" and not getattr(stats, "FSDP_READY", False):
                D.print_main(
                    "warning: train.stats_interval is ignored under train.distributed=fsdp "
                    "(layer statistics are not FSDP-aware yet); use ddp for statistics"
                )
            else:
                stats.LayerStatsCallback(self).install()

    @property
    def tokens_per_step(self) -> int:
        """Tokens in one optimiser step over all processes."""
        return self.global_batch * self.cfg.data.seq_len

    def describe(self) -> str:
        """One line: strategy, processes and how the global batch is made."""
        tc, d = self.cfg.train, self.dist
        where = f"{d.strategy} over {d.world_size} processes ({d.backend}, {self.device.type})"
        return (
            f"{where if d.enabled else f'single process ({self.device})'}: global batch "
            f"{self.global_batch} sequences = {tc.batch_size} per micro-batch x "
            f"{self.grad_accum} accumulation x {d.world_size} processes "
            f"({self.tokens_per_step:,} tokens/step)"
        )

    def _init_from(self) -> Path | None:
        """Load the weights `train.init_from` names into the fresh model and return their
        file; None when it is unset or the run already has a checkpoint (it resumes)."""
        source = self.cfg.train.init_from
        if source is None or D.broadcast_object(latest_checkpoint(self.run_dir)) is not None:
            return None
        try:
            path = weights_file(source)
            load_weights_file(self.raw_model, path)
        except DepthlabError as err:
            raise DepthlabError(f"train.init_from: {err}") from None
        if self.progress:
            D.print_main(f"initialised from {path} (weights only; step 0, fresh optimizer)")
        return path

    # ---------------------------------------------------------------- run directory
    def _claim_run_dir(self) -> None:
        """Create the run dir, or check that an existing one holds this same config
        (rank 0 checks and writes; every rank raises its error)."""
        D.on_main_then_share(self._claim_run_dir_main)

    def _check_config(self, mine: dict[str, Any]) -> dict[str, Any] | None:
        """The run's data.json record ({} for runs from before it) when the run dir already
        holds a run, None when it is new; DepthlabError if its config differs."""
        path = self.run_dir / CONFIG_FILE
        if not path.is_file():
            if holds_other_files(self.run_dir):
                raise DepthlabError(
                    f"{self.run_dir} is not empty and is not a depthlab run (no {CONFIG_FILE}): "
                    "not writing into it; choose another name/out_dir")
            return None
        record = read_data_record(self.run_dir)
        diffs = resume_conflicts(read_yaml(path), mine, identity_kept="data" in record)
        if diffs:
            longer = any(d.startswith("train.max_steps") for d in diffs)
            hint = (f"; to train on from its weights, start a new run with --set "
                    f"train.init_from={self.run_dir}" if longer else "")
            raise DepthlabError(
                f"{self.run_dir} already holds a different config ({'; '.join(diffs[:3])}); "
                f"choose another name/out_dir or delete that run{hint}"
            )
        return record

    def _claim_run_dir_main(self) -> None:
        mine = self.cfg.to_dict()
        record = self._check_config(mine)
        if record is not None:
            before, identity = record.get("data"), data_identity(self.splits)
            if before is not None and before != identity:
                changed = ", ".join(f"{k} {before.get(k)} -> {v}" for k, v in identity.items()
                                    if before.get(k) != v)
                raise DepthlabError(
                    f"{self.run_dir} was trained on other data than the config gives now "
                    f"({changed}): resume it on the data it began with (a relative path is "
                    "read from the current directory), or start a new run")
            return  # a run from before data.json gets one once it resumed (fit)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, yaml.safe_dump(mine, sort_keys=False))
        tok = self.splits.tokenizer
        if tok is not None:
            tok.save(self.run_dir / "tokenizer")
        self._record_data()

    def _record_data(self) -> None:
        atomic_write_text(self.run_dir / DATA_FILE,
                          json.dumps({"data": data_identity(self.splits)}, indent=2))

    def _resume(self) -> None:
        ckpt = D.broadcast_object(latest_checkpoint(self.run_dir))
        if ckpt is None:
            return
        state = load_checkpoint(ckpt, self.model, self.optimizer)
        self.loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self._seconds_before = float(state.get("seconds", 0.0))
        if self.dist.is_main and self.step < self.cfg.train.max_steps:  # in every output mode
            print(f"note: resuming {self.run_dir} from {ckpt.name} (step {self.step}/"
                  f"{self.cfg.train.max_steps})", file=sys.stderr, flush=True)

    def _train_seconds(self) -> float:
        """Wall time spent training this run, over every session up to now."""
        return self._seconds_before + (time.time() - self._started)

    def _save(self) -> Path:
        # a run directory removed (or replaced) while training: stop, rather than write
        # checkpoints into a new, half-empty directory while metrics go to deleted files
        D.on_main_then_share(self._check_run_dir_still_there)
        return save_checkpoint(
            self.run_dir, self.step, self.model, self.optimizer,
            {"loader": self.loader.state_dict(), "global_batch": self.global_batch,
             "seconds": self._train_seconds()},
            self.cfg.train.keep_last,
        )

    # ---------------------------------------------------------------- steps
    def train_step(self, lr: float) -> tuple[float, float, float | None]:
        """One optimiser step over grad_accum micro-batches: (ce loss, grad norm, aux), the
        losses averaged over micro-batches and processes (the global batch mean)."""
        tc = self.cfg.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = self.grad_accum
        ce_parts: list[torch.Tensor] = []
        aux_parts: list[torch.Tensor] = []
        for i in range(accum):
            x, y = (t.to(self.device, non_blocking=True) for t in self.loader.next_batch())
            with D.set_grad_sync(self.model, i == accum - 1):
                with autocast_context(tc, self.device):
                    out = self.forward(x, y)
                loss = out.loss
                if out.aux_loss is not None:
                    aux_parts.append(out.aux_loss.detach().float())
                    loss = loss + out.aux_loss
                (loss / accum).backward()
            ce_parts.append(out.loss.detach().float())
        # read on the host once per step, not per micro-batch (each read waits for the GPU)
        values = torch.stack(ce_parts + aux_parts).tolist()
        ce_total = sum(v / accum for v in values[:accum])
        aux_total = sum(v / accum for v in values[accum:])
        has_aux = bool(aux_parts)
        if self.dist.enabled:
            mean = D.all_reduce_mean(torch.tensor([ce_total, aux_total], dtype=torch.float64))
            ce_total, aux_total = mean.tolist()
        max_norm = tc.grad_clip if tc.grad_clip > 0 else float("inf")
        grad_norm = D.total_grad_norm(self.model.parameters(), max_norm)
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
        """Mean next-token loss over the fixed validation batches (shared out over ranks)."""
        self.model.eval()
        try:
            if not self.dist.enabled:
                total = 0.0
                for x, y in self.val_batches:
                    total += self._eval_loss(x, y).item()
                return total / len(self.val_batches)
            n, world, rank = len(self.val_batches), self.dist.world_size, self.dist.rank
            # FSDP2's forward is collective: every rank runs the same number of batches
            rounds = math.ceil(n / world) if self.dist.strategy == "fsdp" else None
            mine = list(range(rank, n, world))
            if rounds is not None:
                mine += [-1] * (rounds - len(mine))
            total = torch.zeros((), dtype=torch.float64)
            for i in mine:
                loss = self._eval_loss(*self.val_batches[max(i, 0)])
                if i >= 0:
                    total += loss.double().cpu()
            return D.all_reduce_sum(total).item() / n
        finally:
            self.model.train()

    def _eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast_context(self.cfg.train, self.device):
            return self._eval_forward(x.to(self.device), y.to(self.device)).loss

    # ---------------------------------------------------------------- loop
    def fit(self) -> TrainSummary:
        """Train to max_steps, resuming from the run's last checkpoint; one process (group)
        per run directory at a time."""
        try:
            D.on_main_then_share(self._lock_run_dir)
            return self._fit()
        finally:
            self._lock.release()

    def _check_run_dir_still_there(self) -> None:
        if not (self.run_dir / CONFIG_FILE).is_file():
            raise DepthlabError(
                f"{self.run_dir} was removed while training (its {CONFIG_FILE} is gone): "
                f"stopped at step {self.step}; nothing more is written")

    def _refuse_if_busy(self) -> None:
        """Take and give back the run lock: an early refusal only (fit holds the lock);
        a new run directory cannot be busy and is not created here."""
        if self.run_dir.is_dir():
            self._lock_run_dir(quiet=True)
            self._lock.release()

    def _lock_run_dir(self, quiet: bool = False) -> None:
        try:
            self._lock.acquire()
        except Busy:
            raise DepthlabError(
                f"{self.run_dir} is being trained by another process right now; wait for it "
                "to finish (or stop it), then run the same command again to resume") from None
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a DepthlabError reaches every rank; an OSError on rank 0 alone would leave the
            # other ranks waiting
            raise DepthlabError(f"cannot write in {self.run_dir} ({exc.strerror}): training "
                                "needs a writable run directory") from None
        if self._lock.unsupported and not quiet:
            print(f"note: cannot lock {self._lock.path} ({self._lock.unsupported}): nothing "
                  "stops a second train on this run directory", file=sys.stderr, flush=True)

    def _fit(self) -> TrainSummary:
        self._claim_run_dir()
        summary_path = self.run_dir / SUMMARY_FILE
        self._resume()
        if self.dist.is_main and not (self.run_dir / DATA_FILE).is_file():
            self._record_data()
        tc = self.cfg.train
        if self.step >= tc.max_steps:
            done = D.broadcast_object(read_summary(summary_path))
            if done is not None:
                return TrainSummary(self.run_dir, self.step, done.get("train_loss"),
                                    done.get("val_loss"), done.get("tokens", 0), 0.0,
                                    "already complete")
        logger = open_logger(
            self.run_dir, tc.tensorboard, tc.wandb_project if tc.wandb else None,
            self.cfg.name, self.cfg.to_dict(), self.step,
        )
        self.logger = None if isinstance(logger, NullLogger) else logger
        if self.dist.enabled:
            D.print_main(self.describe())
        tokens_per_step = self.tokens_per_step
        self.model.train()
        self._started = window_time = time.time()
        window_tokens = 0
        # a resumed run reports its last logged losses even if no step is left to run
        done = read_metrics(self.run_dir) if self.step and self.dist.is_main else []
        train_loss = next((r["loss"] for r in reversed(done) if "loss" in r), None)
        val_loss = next((r["val_loss"] for r in reversed(done) if "val_loss" in r), None)
        finished = False
        try:
            with _progress_bar(self.progress, tc.max_steps, self.step, self.cfg.name) as bar:
                while self.step < tc.max_steps:
                    lr = lr_at(self.step, tc)
                    loss, grad_norm, aux = self.train_step(lr)
                    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                        self._stop_non_finite(loss, grad_norm, logger)
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
                                    "val_ppl": perplexity(val_loss)})
                    if self.step % tc.ckpt_interval == 0 or last:
                        self._save()
                    bar.update(self.step, loss, None)
            finished = True
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            ckpt = latest_checkpoint(self.run_dir)
            kept = f"checkpoints up to {ckpt.name} are intact" if ckpt else "no checkpoint yet"
            raise DepthlabError(
                f"training stopped after step {self.step}: {err.strerror} "
                f"({err.filename or self.run_dir}); {kept}; free space and run the same command "
                "again to resume") from None
        finally:
            if finished:
                logger.close()
            else:  # the error that stopped training is the one to report
                with contextlib.suppress(Exception):
                    logger.close()
        seconds = self._train_seconds()
        summary = TrainSummary(self.run_dir, self.step, train_loss, val_loss,
                               self.step * tokens_per_step, seconds)
        if self.dist.is_main:
            atomic_write_text(summary_path, json.dumps({
                "status": "complete", "step": self.step, "train_loss": train_loss,
                "val_loss": val_loss,
                "val_ppl": perplexity(val_loss),
                "tokens": summary.tokens, "seconds": seconds,
                "params": self.n_params, "active_params": self.n_active_params,
                "world_size": self.dist.world_size, "distributed": self.dist.strategy,
                "global_batch_size": self.global_batch, "grad_accum": self.grad_accum,
            }, indent=2))
        return summary

    def close(self) -> None:
        """Leave the process group this trainer started (no-op for single-process runs)."""
        D.teardown(self.dist)

    def _stop_non_finite(self, loss: float, grad_norm: float,
                         logger: MetricLogger | NullLogger) -> None:
        logger.log({"step": self.step + 1, "non_finite_loss": True})
        ckpt = latest_checkpoint(self.run_dir)
        kept = f"last good checkpoint kept: {ckpt}" if ckpt else "no checkpoint was written yet"
        what = (f"loss became non-finite ({loss})" if not math.isfinite(loss)
                else f"gradient norm became non-finite ({grad_norm}; loss {loss:.4f})")
        raise DepthlabError(
            f"{what} at step {self.step + 1}; training stopped, {kept}; to retry with a "
            f"lower train.lr or train.grad_clip, start a new run (--set name=...) or "
            f"delete {self.run_dir}"
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
        self._progress.update(self._task, completed=step, loss=f"{loss:.4f}", tps=self._tps)


class _LogLines:
    """Progress as plain lines at every log step, for output that is not a terminal
    (nohup, batch-job logs), where a live bar would print nothing until the end."""

    def __init__(self, name: str, total: int, start: int) -> None:
        self._name, self._total, self._start = name, total, start
        self._t0 = time.time()

    def update(self, step: int, loss: float, tps: float | None) -> None:
        if tps is None:
            return
        elapsed = time.time() - self._t0
        eta = elapsed / max(step - self._start, 1) * (self._total - step)
        print(f"{self._name}: step {step}/{self._total}  loss {loss:.4f}  {tps:,.0f} tok/s  "
              f"elapsed {clock(elapsed)}  ETA {clock(eta)}", flush=True)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, start: int, name: str):
    if not enabled:
        yield _Bar(None, None)
        return
    from rich.console import Console

    if not live_bar_shown(Console()):
        yield _LogLines(name, total, start)
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
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(name, total=total, completed=start, loss="-", tps=0.0)
        yield _Bar(progress, task)


def _compile_moe_note(cfg: RunConfig) -> str | None:
    """torch.compile cannot trace the eager grouped-matmul experts: say what runs instead."""
    if not (cfg.train.compile and cfg.model.moe):
        return None
    return ("train.compile with MoE: the experts run as a per-expert loop, which "
            "torch.compile splits into several graphs (the routing counts are read on the "
            "host in each MoE layer); time a few steps against train.compile=false")


def read_summary(path: Path) -> dict[str, Any] | None:
    """A completed run's summary.json; None when absent or unreadable (the run is then
    finished again: no steps left, so only the summary is rewritten)."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) else None


def train(cfg: RunConfig | str | Path | dict[str, Any], progress: bool = True) -> TrainSummary:
    """Train (or resume) the run described by `cfg`: a RunConfig, a YAML file (as `depthlab
    train FILE`) or a config dict (validated as a YAML file's would be). One process, or one
    rank of a torchrun job: then an error is recorded for torchrun's failure report before
    it propagates."""
    if isinstance(cfg, (str, Path)):
        cfg = load_config(cfg)
    elif isinstance(cfg, dict):
        cfg = build_config(cfg)
    elif not isinstance(cfg, RunConfig):
        raise DepthlabError(f"train() takes a RunConfig, a YAML path or a config dict, got "
                            f"{type(cfg).__name__}")
    if D.launched():
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(_train)(cfg, progress)
    return _train(cfg, progress)


def _clear_frames(err: BaseException) -> None:
    """Drop the locals of every frame in `err`'s traceback and in those of the errors it
    was raised from or during (`raise ... from None` still keeps __context__)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def _train(cfg: RunConfig, progress: bool) -> TrainSummary:
    had_group = D.is_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, progress=progress)
        summary = trainer.fit()
    except BaseException as err:
        if D.is_distributed():
            # As below; the traceback's frames hold the trainer, so their locals go (the
            # report keeps files and lines). The other ranks may be anywhere (waiting in
            # a collective, or gone), so a group we started is left without a barrier.
            _clear_frames(err)
            trainer = None
            gc.collect()
            if not had_group:
                D.abandon()
        raise
    trainer.close()
    if trainer.dist.world_size > 1:
        # FSDP2 modules sit in reference cycles and would live until interpreter shutdown,
        # keeping the process group and its C++ worker threads alive that long, where a
        # thread that needs the GIL can abort a finished job ("terminate called without an
        # active exception"). Free them now, while Python is whole.
        del trainer
        gc.collect()
    return summary


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
