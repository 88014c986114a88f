"""Shared machinery of the metrics: block-forward counting, sequence chunks,
hidden-state capture (and an optional bounded cache of it), chunked losses,
progress reporting and JSON conversion.

Cost unit. A *block forward* is one block applied to one sequence of the
evaluation set (a `run_block` call on a batch of b sequences counts b).
`F(b)`, one full forward over b sequences in `metrics.md` section 8, is
`L * b` block forwards; the published scripts' costs are converted to this
unit in each result's `cost` entry. Forward-mode products (Jacobian) are
counted apart, as *JVP block forwards*: one tangent through one block for
one sequence.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from depthlab.errors import DepthlabError

ProgressFn = Callable[[int, int], None]
"""progress(done, total): called as work units complete."""

DEFAULT_BATCH_SIZE = 8
DEFAULT_CACHE_BYTES = 2 * 1024**3


# ------------------------------------------------------------------ counting


@dataclass
class BlockCounter:
    """How much block computation a metric ran (see the module docstring for units)."""

    block_calls: int = 0
    """`run_block` invocations (each on a batch of sequences)."""
    block_forwards: int = 0
    """Single-block forwards of one sequence: sum over calls of the batch size."""
    jvp_calls: int = 0
    """Batched forward-mode calls through one block."""
    jvp_block_forwards: int = 0
    """Tangent x sequence products through one block (exact Jacobian: d per sequence and layer)."""
    attention_prob_calls: int = 0
    """`attention_probs` invocations (attention sparsity)."""
    _mode: str = field(default="forward", repr=False)

    def add(self, other: BlockCounter) -> None:
        self.block_calls += other.block_calls
        self.block_forwards += other.block_forwards
        self.jvp_calls += other.jvp_calls
        self.jvp_block_forwards += other.jvp_block_forwards
        self.attention_prob_calls += other.attention_prob_calls

    def to_dict(self) -> dict[str, int]:
        return {
            "block_calls": self.block_calls,
            "block_forwards": self.block_forwards,
            "jvp_calls": self.jvp_calls,
            "jvp_block_forwards": self.jvp_block_forwards,
            "attention_prob_calls": self.attention_prob_calls,
        }


@contextlib.contextmanager
def counting(stack: Any, counter: BlockCounter) -> Iterator[BlockCounter]:
    """Count every `stack.run_block` call (also those made by `stack.run`).

    Installs a counting wrapper as an instance attribute for the duration of the
    block (removed afterwards); nested contexts each count every call.
    """
    had_own = "run_block" in vars(stack)
    original = stack.run_block

    def run_block(l: int, h: Tensor) -> Tensor:
        if counter._mode == "jvp":
            counter.jvp_calls += 1
        else:
            counter.block_calls += 1
            counter.block_forwards += int(h.shape[0]) if h.ndim >= 3 else 1
        return original(l, h)

    stack.run_block = run_block
    try:
        yield counter
    finally:
        if had_own:
            stack.run_block = original
        else:
            del stack.run_block


@contextlib.contextmanager
def jvp_mode(counter: BlockCounter) -> Iterator[None]:
    old = counter._mode
    counter._mode = "jvp"
    try:
        yield
    finally:
        counter._mode = old


# -------------------------------------------------------------------- inputs


def check_ids(stack: Any, ids: Tensor, *, min_len: int = 2) -> Tensor:
    """The metrics' common entry: `stack` a LayerStack, token ids a long [N, T] tensor
    the stack accepts (integers in its vocabulary and context; kept where they are, chunks
    move to the device)."""
    from depthlab.probe.stack import LayerStack

    if not isinstance(stack, LayerStack):
        raise DepthlabError(f"the metrics take a LayerStack, got {type(stack).__name__}: wrap "
                            "the model with depthlab.probe.build_stack(model), or call "
                            "depthlab.probe.diagnose(model, ...)")
    ids = stack.check_ids(ids)
    if ids.shape[0] < 1:
        raise DepthlabError("need at least one sequence")
    if ids.shape[1] < min_len:
        raise DepthlabError(f"sequences need at least {min_len} tokens, got {ids.shape[1]}")
    return ids.long()


def chunk_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    if batch_size < 1:
        raise DepthlabError(f"batch_size must be >= 1, got {batch_size}")
    return [(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


# ------------------------------------------------------------- hidden states


class HiddenStateCache:
    """Hidden states h_0..h_L of sequence chunks, kept while they fit in `max_bytes`.

    Keyed by the chunk's token ids (verified with `torch.equal`), so a cache can be
    shared by several metrics over the same evaluation set: each hidden state is
    computed once. States are stored as computed (model dtype, stack device).
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._store: list[tuple[Tensor, list[Tensor]]] = []

    def get(self, ids: Tensor) -> list[Tensor] | None:
        """States of exactly these sequences: a stored chunk, or its first rows."""
        n = ids.shape[0]
        for stored_ids, states in self._store:
            if stored_ids.shape[1] != ids.shape[1] or stored_ids.shape[0] < n:
                continue
            if torch.equal(stored_ids[:n], ids.to(stored_ids.device)):
                return states if stored_ids.shape[0] == n else [s[:n] for s in states]
        return None

    def put(self, ids: Tensor, states: list[Tensor]) -> bool:
        size = sum(s.numel() * s.element_size() for s in states)
        if self.nbytes + size > self.max_bytes or self.get(ids) is not None:
            return False
        self._store.append((ids.clone(), states))
        self.nbytes += size
        return True

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0


@torch.no_grad()
def hidden_states(stack: Any, ids: Tensor, cache: HiddenStateCache | None = None,
                  *, fresh: bool = False) -> list[Tensor]:
    """[h_0 .. h_L] for one chunk of ids (pre-final-norm), one pass of L blocks.

    With a cache: reuse its entry (0 block forwards) unless `fresh` (a metric whose
    hooks must observe the real forward pass); a computed pass is offered to it.
    """
    ids = ids.to(stack.device)
    if cache is not None and not fresh:
        hit = cache.get(ids)
        if hit is not None:
            return hit
    h = stack.embed(ids)
    states = [h]
    for l in range(stack.n_layers):
        h = stack.run_block(l, h)
        states.append(h)
    if cache is not None:
        cache.put(ids, states)
    return states


def loss_sum(stack: Any, h_L: Tensor, ids: Tensor) -> float:
    """Sum (not mean) of next-token CE over the chunk's b*(T-1) tokens, fp32 -> float."""
    ids = ids.to(stack.device)
    n_tok = ids.shape[0] * (ids.shape[1] - 1)
    return float(stack.loss(h_L, ids).float()) * n_tok


def n_pred_tokens(ids: Tensor) -> int:
    return int(ids.shape[0] * (ids.shape[1] - 1))


def first_output(out: Any) -> Tensor:
    """A module output's update tensor (first element if a tuple/list)."""
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


# ------------------------------------------------------------------ progress


class Progress:
    """Calls `fn(done, total)` as units complete; a no-op without fn."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        if fn is True:  # diagnose's and run_suite's progress is a switch; here a callback
            raise DepthlabError("progress= takes a callback fn(done, total) here; for a "
                                "progress bar use run_suite(..., progress=True) or diagnose")
        self.fn = fn or None
        self.total = max(int(total), 1)
        self.done = 0
        if self.fn is not None:
            self.fn(0, self.total)

    def step(self, n: int = 1) -> None:
        self.done += n
        if self.fn is not None:
            self.fn(min(self.done, self.total), self.total)


# ------------------------------------------------------------ result helpers


def model_info(stack: Any, ids: Tensor) -> dict[str, Any]:
    return {
        "arch": getattr(stack, "arch", "generic"),
        "n_layers": int(stack.n_layers),
        "d_model": int(stack.d_model),
        "model_dtype": str(getattr(stack, "model_dtype", "unknown")).removeprefix("torch."),
        "compute_dtype": str(getattr(stack, "compute_dtype", "unknown")).removeprefix("torch."),
        "n_sequences": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
    }


def cost_dict(counter: BlockCounter, *, reference_full_forwards: float | None = None,
              n_layers: int, n_sequences: int, micro_batch: int | None = None,
              formula: str | None = None, reference_formula: str | None = None,
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counter totals, plus the published scripts' cost (metrics.md section 8) in the same unit."""
    out: dict[str, Any] = counter.to_dict()
    out["full_forward_equivalents"] = counter.block_forwards / max(n_layers * n_sequences, 1)
    if formula is not None:
        out["formula"] = formula
    if reference_full_forwards is not None:
        out["reference_full_forwards"] = reference_full_forwards
        out["reference_micro_batch"] = micro_batch
        # F(b) = L*b block forwards; the micro-batches of one pass cover the N sequences
        passes = reference_full_forwards / math.ceil(n_sequences / (micro_batch or 1))
        out["reference_block_forwards"] = int(round(passes * n_sequences * n_layers))
        if reference_formula is not None:
            out["reference_formula"] = reference_formula
    if extra:
        out.update(extra)
    return out


def jsonify(x: Any) -> Any:
    """Tensors, numpy values, dataclasses -> plain JSON types; non-finite floats -> None."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonify(getattr(x, f.name)) for f in dataclasses.fields(x)
                if not f.name.startswith("_")}
    if isinstance(x, Tensor):
        return jsonify(x.detach().cpu().tolist())
    if isinstance(x, dict):
        return {str(k): jsonify(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonify(v) for v in x]
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if hasattr(x, "item"):
        return jsonify(x.item())
    return x


@dataclass(kw_only=True)
class MetricResult:
    """Common part of every metric result."""

    metric: str
    info: dict[str, Any]
    """Model and data: arch, n_layers, d_model, model_dtype, n_sequences, seq_len."""
    cost: dict[str, Any]
    """Block-forward counts and the published scripts' reference cost."""

    def to_dict(self) -> dict[str, Any]:
        return jsonify(self)


def mean_or_none(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run CPU LAPACK calls (least squares, SVD) on one thread.

    On a busy CPU, multithreaded LAPACK on d x d matrices (d ~ 10^3) can spin-wait for a
    descheduled worker: a 577 x 577 `gelsd` measured 0.06 s on one thread and 4-10 s on
    two threads while other processes kept the two cores busy.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tokens_of(ids: Tensor) -> int:
    return int(ids.shape[0] * ids.shape[1])
