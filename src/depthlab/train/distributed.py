"""Multi-process training plumbing: the process group, DDP / FSDP2 wrapping, collectives.

`depthlab train` runs under `torchrun`: each process reads RANK, WORLD_SIZE and
LOCAL_RANK (plus MASTER_ADDR/MASTER_PORT or the c10d rendezvous) from the
environment, uses `cuda:LOCAL_RANK` with NCCL on GPUs and gloo on CPU, and wraps the
model per `train.distributed` (auto = DDP; fsdp = FSDP2 `fully_shard` per block, then
the root). A plain `python -m depthlab.cli train` (or torchrun with one process) runs
without a process group, and every helper below is then a cheap no-op, so code that
calls them (the trainer, training-time statistics) is the same in both cases.

Helpers for statistics code (all collective calls must be made by EVERY rank, in
the same order; only `is_main()` writes):

    is_distributed(), rank(), world_size(), local_rank(), is_main(), barrier()
    all_reduce_sum(t), all_reduce_mean(t), all_reduce_max(t)   (return new tensors)
    broadcast_object(obj)           rank 0's Python object on every rank
    local_tensor(t), full_tensor(t) DTensor shard / full tensor (identity otherwise)
    global_norms(tensors)           L2 norm of each (possibly FSDP-sharded) tensor
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from depthlab.errors import DepthlabError
from depthlab.launch import launched

T = TypeVar("T")


# --------------------------------------------------------------------------- who am I


def is_distributed() -> bool:
    """Whether a process group is up (collectives below then talk to the other ranks)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0: the only process that writes logs, metrics, summaries and progress."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --------------------------------------------------------------------------- collectives


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective's tensor must live: the current GPU for NCCL, else where it is."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if not is_distributed():
        return tensor.detach().clone()
    out = tensor.detach().to(_comm_device(tensor), copy=True)
    dist.all_reduce(out, op=getattr(dist.ReduceOp, op))
    return out.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is left alone). E.g. MoE load counts."""
    return _reduce(tensor, "SUM")


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a new float tensor). E.g. per-rank losses of equal-sized batches."""
    out = all_reduce_sum(tensor if tensor.is_floating_point() else tensor.double())
    return out / world_size()


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, "MAX")


def broadcast_object(obj: T, src: int = 0) -> T:
    """`src`'s object on every rank (pickled; for small things like paths and messages)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_then_share(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and give its result to every rank; a DepthlabError there is
    raised on every rank with the same one-line message (so no rank is left waiting)."""
    result: Any = None
    error: str | None = None
    if is_main():
        try:
            result = fn()
        except DepthlabError as err:
            error = str(err)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise DepthlabError(error)
    return result


def main_first(fn: Callable[[], T], per_node: bool = True) -> T:
    """Run `fn` on the first (local) rank, then on the others: for work that fills a cache
    (tokenization, tokenizer training) that the other ranks then simply read. A
    DepthlabError on the first rank stops every rank."""
    if not is_distributed():
        return fn()
    first = (local_rank() if per_node else rank()) == 0
    error: DepthlabError | None = None
    result: Any = None
    if first:
        try:
            result = fn()
        except DepthlabError as err:
            error = err
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise DepthlabError("another rank failed first (see its error)")
    return result if first else fn()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (FSDP2 parameters and gradients), else `t` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective: call on every rank), else `t`."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _is_sharded(t: torch.Tensor) -> bool:
    placements = getattr(t, "placements", None)
    return placements is not None and any(not p.is_replicate() for p in placements)


def global_norms(tensors: Sequence[torch.Tensor]) -> list[float]:
    """fp32 L2 norm of each tensor over all of it: sharded (FSDP2 DTensor) parts are summed
    over ranks with one all-reduce; plain and replicated tensors (DDP) are already whole.
    A collective when anything is sharded: call on every rank."""
    if not tensors:
        return []
    sq = torch.stack([local_tensor(t.detach()).float().pow(2).sum() for t in tensors])
    sharded = torch.tensor([_is_sharded(t) for t in tensors], device=sq.device)
    if is_distributed() and bool(sharded.any()):
        summed = all_reduce_sum(torch.where(sharded, sq, torch.zeros_like(sq)))
        sq = torch.where(sharded, summed, sq)
    return sq.sqrt().cpu().tolist()


# --------------------------------------------------------------------------- setup


@dataclass
class DistContext:
    """How this process trains: strategy (none/ddp/fsdp), its rank and device."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def collective_timeout() -> timedelta:
    """DEPTHLAB_DIST_TIMEOUT minutes (default 60), refused in one line when not a number."""
    raw = os.environ.get("DEPTHLAB_DIST_TIMEOUT", "60")
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes < float("inf"):
        raise DepthlabError(f"DEPTHLAB_DIST_TIMEOUT={raw!r}: a number of minutes > 0")
    return timedelta(minutes=minutes)


def setup(strategy: str, device_name: str, resolve: Callable[[str], torch.device]) -> DistContext:
    """Start (or join) the process group when launched by torchrun with several processes.

    `strategy` is train.distributed (auto/ddp/fsdp); `device_name` is train.device. On CUDA
    each process takes cuda:LOCAL_RANK (whatever index train.device names; modulo the GPUs
    it sees, for launchers that give each process one GPU); the backend is NCCL there and
    gloo on CPU. Collectives wait up to DEPTHLAB_DIST_TIMEOUT minutes (default 60), not
    NCCL's 10: the other ranks wait in one while the first tokenizes a corpus or trains a
    BPE tokenizer. Without several processes, returns a single-process context on
    `resolve(device_name)`.
    """
    if not (launched() or is_distributed()):
        return DistContext(device=resolve(device_name))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    owns = False
    if not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=collective_timeout(), **kwargs)
        owns = True
    resolved = "ddp" if strategy == "auto" else strategy
    return DistContext(
        strategy=resolved, rank=dist.get_rank(), world_size=dist.get_world_size(),
        local_rank=local, device=device, backend=dist.get_backend(), owns_group=owns,
    )


def teardown(ctx: DistContext) -> None:
    """Destroy the process group this process started (after every rank got here)."""
    if ctx.owns_group and is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        ctx.owns_group = False


def abandon() -> None:
    """Leave the process group without waiting for the other ranks (after an error,
    when they may never reach a barrier)."""
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext, bf16: bool) -> nn.Module:
    """DDP, or FSDP2 (each of `model.blocks`, then the root), or the model itself.

    FSDP2 with `bf16` (train.dtype bf16, or auto on CUDA) gathers the blocks' weights in
    bf16 and reduces gradients in fp32, but leaves their inputs and the root (embeddings,
    final norm, head) fp32: under the trainer's autocast the residual stream then stays
    fp32, as with DDP. (A bf16 policy on the root made `h` and every `h + f(h)` bf16,
    rounding away block updates below ~2^-9 of the stream: the ones this toolkit measures.)
    The optimizer must be built on the returned module's parameters (FSDP2 turns them into
    sharded DTensors).
    """
    if ctx.strategy == "none":
        return model
    if ctx.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # buffers (rotary tables) never change: no per-forward broadcast (the keyword was
        # renamed in recent torch)
        no_sync = ("forward_sync_buffers" if "forward_sync_buffers"
                   in inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
        return DDP(model, device_ids=ids, **{no_sync: False})
    if ctx.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        blocks = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                       cast_forward_inputs=False)
                  if bf16 else MixedPrecisionPolicy())
        for block in model.blocks:
            fully_shard(block, mesh=mesh, mp_policy=blocks)
        fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy())
        return model
    raise DepthlabError(f"unknown train.distributed strategy {ctx.strategy!r}")


def unwrap(model: nn.Module) -> nn.Module:
    """The DepthLM inside DDP / torch.compile wrappers (FSDP2 modules are not wrapped)."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model


def set_grad_sync(model: nn.Module, enabled: bool) -> Any:
    """Context for one micro-batch: no gradient all-reduce/reduce-scatter unless `enabled`
    (the last micro-batch of an accumulation). A null context for a plain model."""
    import contextlib

    if enabled:
        return contextlib.nullcontext()
    no_sync = getattr(model, "no_sync", None)  # DDP
    if callable(no_sync):
        return no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        @contextlib.contextmanager
        def _fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _fsdp_no_sync()
    return contextlib.nullcontext()


def total_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """clip_grad_norm_ over all ranks' gradients (DDP: already averaged; FSDP2: DTensors)."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return float(full_tensor(norm).item())


def print_main(message: str) -> None:
    """One line on rank 0's stderr (the launch summary)."""
    if is_main():
        print(message, file=sys.stderr, flush=True)
