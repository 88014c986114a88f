"""Batches from a token stream: deterministic, exactly resumable, shardable across ranks.

The stream is cut into non-overlapping windows of T+1 tokens at stride T (window i
is tokens[i*T : i*T+T+1]; x = window[:-1], y = window[1:], so consecutive windows
share one boundary token and every token is a target once). Epoch e visits the
windows in a permutation seeded by (seed, e). With a global batch of
G = B * world_size * grad_accum windows per optimiser step, each epoch uses the first
`n_windows // G * G` entries of that permutation, cut into blocks of B: optimiser
step s takes entries [s*G, (s+1)*G), and within it micro-batch a of rank r is block
a * world_size + r. So ranks run the same number of steps, no window is seen twice per
epoch (the few left over differ every epoch), and the windows of each optimiser step
depend only on (seed, G): 1 process x 2B, 2 processes x B and 1 process x B x 2
accumulation see the same global batches, the last two even the same micro-batches
(which matters for per-micro-batch quantities such as MoE load-balancing losses).
The state is a global position (epoch, windows consumed in it), so
`state_dict` / `load_state_dict` resume exactly, also at another world size or
micro-batch as long as G is the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from depthlab.errors import DepthlabError

STATE_VERSION = 2


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    """Rows tokens[s : s + length] for each start, as int64."""
    rows = np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)


def _split(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class TrainLoader:
    """Shuffled training batches (x, y), each a LongTensor [batch_size, seq_len]."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        grad_accum: int = 1,
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DepthlabError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        if not 0 <= rank < world_size:
            raise DepthlabError(f"rank {rank} must be in [0, world_size={world_size})")
        if grad_accum < 1:
            raise DepthlabError(f"grad_accum ({grad_accum}) must be >= 1")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.n_windows = max(0, (len(tokens) - 1) // seq_len)
        per_step = self.global_batch = batch_size * world_size * grad_accum
        self.steps_per_epoch = self.n_windows // per_step
        self.batches_per_epoch = self.steps_per_epoch * grad_accum
        """Micro-batches per epoch (each rank)."""
        if self.batches_per_epoch == 0:
            raise DepthlabError(
                f"train split has {len(tokens):,} tokens: too few for one batch of "
                f"{per_step} windows of seq_len={seq_len}+1 (needs "
                f"{per_step * seq_len + 1:,}); lower data.seq_len or batch size, or add data"
            )
        self.epoch = 0
        self.cursor = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    def _rank_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch."""
        if self._order_epoch != self.epoch or self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(self.n_windows)
            used = perm[: self.steps_per_epoch * self.global_batch]
            blocks = used.reshape(-1, self.world_size, self.batch_size)
            self._order = blocks[:, self.rank, :].reshape(-1)
            self._order_epoch = self.epoch
        return self._order

    def epoch_windows(self, epoch: int) -> np.ndarray:
        """Window indices this rank visits in `epoch`, in order (for checks and tools)."""
        saved = (self.epoch, self._order, self._order_epoch)
        self.epoch = epoch
        try:
            return self._rank_order().copy()
        finally:
            self.epoch, self._order, self._order_epoch = saved

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        order = self._rank_order()
        idx = order[self.cursor * self.batch_size : (self.cursor + 1) * self.batch_size]
        rows = _windows(self.tokens, idx * self.seq_len, self.seq_len + 1)
        self.cursor += 1
        if self.cursor == self.batches_per_epoch:
            self.epoch, self.cursor = self.epoch + 1, 0
        return _split(rows)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    @property
    def position(self) -> int:
        """Windows consumed so far in this epoch, over all ranks."""
        return self.cursor * self.batch_size * self.world_size

    def state_dict(self) -> dict[str, Any]:
        """The global position (the same on every rank); the geometry is kept for checks."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "cursor": self.cursor,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "grad_accum": self.grad_accum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off. The data (seed, seq_len, windows) and the global
        batch must be the same; world size, micro-batch and accumulation may differ."""
        version = int(state.get("version", 1))
        keys = ["seed", "seq_len", "n_windows"]
        if version < 2:  # a per-rank cursor: only the same geometry can continue it
            keys += ["batch_size", "world_size"]
        for key in keys:
            if key in state and int(state[key]) != getattr(self, key):
                raise DepthlabError(
                    f"cannot resume data position: {key} was {state[key]}, now "
                    f"{getattr(self, key)} (resume with the same data and batch settings)"
                )
        if version < 2:
            position = int(state["cursor"]) * self.batch_size * self.world_size
        else:
            if int(state["global_batch"]) != self.global_batch:
                raise DepthlabError(
                    f"cannot resume data position: the global batch was {state['global_batch']} "
                    f"sequences per step, now {self.global_batch} (batch_size {self.batch_size} x "
                    f"grad_accum {self.grad_accum} x world size {self.world_size}); keep it, e.g. "
                    "with train.global_batch_size, to resume at another world size"
                )
            position = int(state["position"])
        per_call = self.batch_size * self.world_size
        if position % per_call or not 0 <= position // per_call < self.batches_per_epoch:
            raise DepthlabError(
                f"cannot resume data position: position {position} is not a micro-batch "
                f"boundary in range for {per_call} windows per micro-batch"
            )
        self.epoch, self.cursor = int(state["epoch"]), position // per_call


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set: the first n_batches * batch_size windows, in order."""
    need = n_batches * batch_size
    available = max(0, (len(tokens) - 1) // seq_len)
    if available < need:
        raise DepthlabError(
            f"validation split has {len(tokens):,} tokens: too few for {n_batches} batches of "
            f"{batch_size} windows of seq_len={seq_len}+1 (needs {need * seq_len + 1:,}); "
            "lower train.eval_batches, batch size or seq_len"
        )
    rows = _windows(tokens, np.arange(need) * seq_len, seq_len + 1)
    return [_split(rows[i * batch_size : (i + 1) * batch_size]) for i in range(n_batches)]


def sample_sequences(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """n distinct non-overlapping windows of seq_len tokens, chosen with a fixed seed."""
    available = len(tokens) // seq_len if seq_len > 0 else 0
    if n < 1 or n > available:
        raise DepthlabError(
            f"cannot sample N={n} sequences of T={seq_len} tokens from {len(tokens):,} tokens "
            f"({available} non-overlapping sequences available)"
        )
    idx = np.random.default_rng(seed).choice(available, size=n, replace=False)
    return _windows(tokens, idx * seq_len, seq_len)
