"""Per-layer statistics logged during training (`train.stats_interval` > 0).

Every `stats_interval` steps the callback runs the model in eval mode, without
gradients, on ONE fixed held-out probe batch (the first `probe_sequences`
sequences of the validation batches, so every run and every stats step sees the
same tokens) and logs one record to metrics.jsonl::

    {"step": s, "stats_seconds": 0.04, "stats": {
        "var": [L], "attn_var": [L], "mlp_var": [L], "embed_var": x,
        "update_ratio": [L], "grad_norm": [L], "param_norm": [L],
        "weight_sparsity": [L], "weight_hoyer": [L],
        "attn_entropy": [L], "attn_top90": [L],
        "moe_load": [L x [E] | null], "moe_imbalance": [L | null],
        "router_entropy": [L | null]}}

Each number is computed by the diagnostics' own code on the same LayerStack view
(`depthlab.probe.metrics`: variance profile, weight and attention sparsity, MoE
routing), so a training-time value equals `depthlab diagnose` on that checkpoint
and batch. The residual-update ratio, gradient and parameter norms are simple
norms computed here. Schema and definitions: docs/reporting.md.

Gradient norms are read by a `grad_callbacks` hook at the same steps: after
backward and clipping, before the optimiser step (the gradients the update uses).
The probe pass runs after the optimiser step, on the weights at step s.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from depthlab.train.trainer import Trainer

DEFAULT_PROBE_SEQUENCES = 2
"""Sequences in the probe batch (taken from the fixed validation batches)."""
DEFAULT_ATTN_SEQUENCES = 1
"""Sequences of the probe batch whose attention maps are sampled for the entropy."""
STAT_KEYS = (
    "var", "attn_var", "mlp_var", "embed_var", "update_ratio", "grad_norm", "param_norm",
    "weight_sparsity", "weight_hoyer", "attn_entropy", "attn_top90", "moe_load",
    "moe_imbalance", "router_entropy",
)


def probe_ids(val_batches: list[tuple[Tensor, Tensor]], n: int = DEFAULT_PROBE_SEQUENCES) -> Tensor:
    """The fixed probe batch: the first `n` input sequences of the validation batches."""
    if not val_batches:
        raise ValueError("no validation batches to take the probe batch from")
    xs, have = [], 0
    for x, _ in val_batches:
        xs.append(x)
        have += x.shape[0]
        if have >= n:
            break
    return torch.cat(xs)[:n].long()


def _update_ratio(states: list[Tensor]) -> list[float]:
    """Token mean of ||h_{l+1} - h_l||_2 / ||h_l||_2 (L2 over the hidden dim), l = 0..L-1.
    (Private helper: the probe metrics have no residual-update ratio.)"""
    out = []
    for a, b in zip(states[:-1], states[1:], strict=True):
        a32, b32 = a.float(), b.float()
        num = torch.linalg.vector_norm(b32 - a32, dim=-1)
        den = torch.linalg.vector_norm(a32, dim=-1).clamp_min(1e-12)
        out.append(float((num / den).mean()))
    return out


def _block_norms(blocks: torch.nn.ModuleList, grads: bool) -> list[float | None]:
    """L2 norm over all parameters (or their gradients) of each block, in fp32."""
    out: list[float | None] = []
    per_block = []
    for block in blocks:
        ts = [(p.grad if grads else p).detach() for p in block.parameters()
              if (p.grad is not None if grads else True)]
        per_block.append(ts)
    flat = [t for ts in per_block for t in ts]
    if not flat:
        return [None] * len(blocks)
    norms = torch.stack([torch.linalg.vector_norm(t.float()) for t in flat]).cpu().tolist()
    i = 0
    for ts in per_block:
        if not ts:
            out.append(None)
            continue
        sq = sum(x * x for x in norms[i:i + len(ts)])
        i += len(ts)
        out.append(math.sqrt(sq))
    return out


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def layer_stats(stack, ids: Tensor, *, attn_sequences: int = DEFAULT_ATTN_SEQUENCES,
                tau: float = 1e-3) -> dict[str, Any]:
    """The forward-pass statistics of one probe batch (no gradient or parameter norms).

    One real pass (variance with its branch hooks) fills a hidden-state cache that the
    residual-update ratio and the attention sample (the first `attn_sequences`
    sequences) reuse; MoE routing needs its own hooked pass.
    """
    from depthlab.probe.metrics import (
        HiddenStateCache,
        compute_attention_sparsity,
        compute_moe,
        compute_variance,
        compute_weight_sparsity,
    )

    L = stack.n_layers
    n = ids.shape[0]
    cache = HiddenStateCache(max_bytes=2**62)
    var = compute_variance(stack, ids, batch_size=n, cache=cache, sublayers=True)
    states = cache.get(ids)
    if states is None:  # pragma: no cover (the cache has no size limit here)
        states = stack.hidden_states(ids)
    ws = compute_weight_sparsity(stack, tau=tau)
    out: dict[str, Any] = {
        "var": var.variance,
        "attn_var": var.attn_variance,
        "mlp_var": var.mlp_variance,
        "embed_var": var.embedding_variance,
        "update_ratio": _update_ratio(states),
        "weight_sparsity": ws.fraction_below_tau,
        "weight_hoyer": ws.hoyer,
    }
    if attn_sequences > 0 and ids.shape[1] >= 2:
        k = min(attn_sequences, n)
        sample = ids[:k]
        cache.put(sample, [h[:k] for h in states])  # the sample's states: no second pass
        att = compute_attention_sparsity(stack, sample, batch_size=k, cache=cache)
        out["attn_entropy"] = att.layer_normalized_entropy
        out["attn_top90"] = att.layer_top_mass_fraction
    if any(stack.moe_router(l) is not None for l in range(L)):  # noqa: E741
        moe = compute_moe(stack, ids, batch_size=ids.shape[0], importance=False)
        load: list[Any] = [None] * L
        imb: list[Any] = [None] * L
        ent: list[Any] = [None] * L
        for i, l in enumerate(moe.moe_layers):  # noqa: E741
            load[l] = moe.fraction_routed[i]
            imb[l] = moe.load_imbalance[i]
            ent[l] = moe.router_entropy_normalized[i]
        out.update(moe_load=load, moe_imbalance=imb, router_entropy=ent)
    return {k: _finite(v) for k, v in out.items()}


class LayerStatsCallback:
    """Logs per-layer statistics every `cfg.train.stats_interval` steps (see module doc).

    `LayerStatsCallback(trainer).install()` adds a gradient hook (per-block gradient
    norms, before the optimiser step) and a step hook (probe pass + log record).
    """

    def __init__(self, trainer: Trainer, *, probe_sequences: int = DEFAULT_PROBE_SEQUENCES,
                 attn_sequences: int = DEFAULT_ATTN_SEQUENCES, tau: float = 1e-3) -> None:
        self.trainer = trainer
        self.interval = int(trainer.cfg.train.stats_interval)
        self.probe_sequences = probe_sequences
        self.attn_sequences = attn_sequences
        self.tau = tau
        self._ids: Tensor | None = None
        self._stack = None
        self._grad_norms: dict[int, list[float | None]] = {}

    def install(self) -> LayerStatsCallback:
        """Hook into the trainer in place of any stats callback already there (the trainer
        installs one itself when stats_interval > 0), so no stats step is logged twice."""
        for hooks in (self.trainer.callbacks, self.trainer.grad_callbacks):
            hooks[:] = [h for h in hooks
                        if not isinstance(getattr(h, "__self__", None), LayerStatsCallback)]
        if self.interval > 0:
            import depthlab.probe.adapters  # noqa: F401  (import once now, not at the first stats step)
            import depthlab.probe.metrics  # noqa: F401

            self.trainer.grad_callbacks.append(self.on_grads)
            self.trainer.callbacks.append(self.on_step)
        return self

    # ------------------------------------------------------------------ hooks
    def due(self, step: int) -> bool:
        return self.interval > 0 and step % self.interval == 0 and _is_main_process()

    def on_grads(self, trainer: Trainer, step: int) -> None:
        if self.due(step):
            self._grad_norms = {step: _block_norms(_unwrap(trainer.model).blocks, grads=True)}

    def on_step(self, trainer: Trainer, step: int) -> None:
        if not self.due(step) or trainer.logger is None:
            return
        t0 = time.perf_counter()
        stats = self.compute(step)
        trainer.logger.log({"step": step, "stats": stats,
                            "stats_seconds": time.perf_counter() - t0})

    # ------------------------------------------------------------------ work
    def probe_batch(self) -> Tensor:
        if self._ids is None:
            self._ids = probe_ids(self.trainer.val_batches, self.probe_sequences)
        return self._ids

    def compute(self, step: int) -> dict[str, Any]:
        """All statistics at `step` (model in eval mode for the pass, train mode after)."""
        from depthlab.probe import build_stack

        model = _unwrap(self.trainer.model)
        was_training = model.training
        try:
            if self._stack is None:
                self._stack = build_stack(model)  # sets eval mode
            model.eval()
            with torch.no_grad():
                ids = self.probe_batch().to(self._stack.device)
                stats = layer_stats(self._stack, ids, attn_sequences=self.attn_sequences,
                                    tau=self.tau)
                stats["param_norm"] = _block_norms(model.blocks, grads=False)
        finally:
            model.train(was_training)
        grads = self._grad_norms.pop(step, None)
        stats["grad_norm"] = grads if grads is not None else [None] * len(model.blocks)
        self._grad_norms.clear()
        return {k: stats[k] for k in STAT_KEYS if k in stats}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The DepthLM inside a DDP / torch.compile wrapper."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module):
            return _unwrap(inner)
    return model


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def stats_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stats records of a run's metrics (sorted by step; the last one wins per step)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in records:
        if isinstance(r.get("stats"), dict):
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]
