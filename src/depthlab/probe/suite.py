"""Run several layer-effectiveness metrics on one LayerStack and one evaluation set.

`run_suite(stack, ids, metrics="all")` returns a JSON-ready dict: model and data
description, and per metric its result (`to_dict()`), wall time and block-forward
counts. Metrics share one bounded `HiddenStateCache`, so the hidden states of the
evaluation set are computed once for all metrics that only read them (variance and
MoE make their own real pass: their hooks must see the forward), and `layer_drop`
reuses the skipped runs of `causal` when both are requested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor

from depthlab.errors import DepthlabError
from depthlab.probe.metrics import (
    compute_angular_distance,
    compute_attention_sparsity,
    compute_block_influence,
    compute_causal,
    compute_jacobian,
    compute_layer_drop,
    compute_layer_similarity,
    compute_moe,
    compute_permutation,
    compute_usefulness,
    compute_variance,
    compute_weight_sparsity,
)
from depthlab.probe.metrics._common import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CACHE_BYTES,
    BlockCounter,
    HiddenStateCache,
    check_ids,
    cost_dict,
    model_info,
)
from depthlab.probe.metrics.layerdrop import layer_drop_from_losses
from depthlab.progress import ThrottledLines, live_bar_shown

METRICS: dict[str, Callable[..., Any]] = {
    "variance": compute_variance,
    "jacobian": compute_jacobian,
    "usefulness": compute_usefulness,
    "causal": compute_causal,
    "permutation": compute_permutation,
    "layer_drop": compute_layer_drop,
    "block_influence": compute_block_influence,
    "angular_distance": compute_angular_distance,
    "layer_similarity": compute_layer_similarity,
    "weight_sparsity": compute_weight_sparsity,
    "attention_sparsity": compute_attention_sparsity,
    "moe": compute_moe,
}
"""Metric name -> compute function (registry order is the execution order)."""


def resolve_metrics(metrics: Sequence[str] | str) -> list[str]:
    if isinstance(metrics, str):
        metrics = list(METRICS) if metrics == "all" else [m.strip() for m in metrics.split(",")]
    names = [m.replace("-", "_") for m in metrics if m]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise DepthlabError(
            f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)} or 'all'")
    if not names:
        raise DepthlabError(f"no metric given; choose from {', '.join(METRICS)} or 'all'")
    return list(dict.fromkeys(names))


def run_suite(
    stack, ids: Tensor, metrics: Sequence[str] | str = "all", batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True, *, options: dict[str, dict[str, Any]] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES, share: bool = True, console: Any = None,
) -> dict[str, Any]:
    """Compute the requested metrics; returns a JSON-ready dict.

    options: per-metric keyword options, e.g. {"jacobian": {"mode": "both"},
    "permutation": {"pairs": "adjacent"}}. share: reuse hidden states across metrics
    (bounded by cache_bytes) and causal's skipped runs for layer_drop.
    """
    from depthlab.probe.diagnose import DIAGNOSE_OPTIONS, check_options

    names = resolve_metrics(metrics)
    options = check_options(options, names, types=False)  # names and ranges, as --opt
    per_diagnose = [f"{m}.{k}" for m, o in options.items() for k in o if k in DIAGNOSE_OPTIONS]
    if per_diagnose:
        raise DepthlabError(f"{', '.join(per_diagnose)} is a diagnose option: run_suite "
                            "measures every sequence it is given (pass ids[:K])")
    ids = check_ids(stack, ids)
    order = [m for m in METRICS if m in names]
    cache = HiddenStateCache(cache_bytes) if share else None
    results: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    total = BlockCounter()
    t_all = time.perf_counter()

    bar = lines = None
    if progress:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = console if console is not None else Console()  # rich's default, as before
        if live_bar_shown(console):
            bar = Progress(TextColumn("{task.description:<22}"), BarColumn(),
                           MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                           transient=False)
            bar.start()
        else:  # a batch log: plain lines
            lines = ThrottledLines(lambda msg: console.print(msg, highlight=False, markup=False,
                                                             soft_wrap=True))
    try:
        tasks = {m: bar.add_task(m, total=None, start=False) for m in order} if bar else {}
        for name in order:
            counter = BlockCounter()
            cb = lines.start(name) if lines is not None else None
            if bar is not None:
                task = tasks[name]
                bar.start_task(task)

                def cb(done: int, tot: int, task=task) -> None:
                    bar.update(task, completed=done, total=tot)

            t0 = time.perf_counter()
            opts = dict(options.get(name, {}))
            causal = objects.get("causal")
            if (name == "layer_drop" and share and causal is not None
                    and causal.skip_loss is not None and not opts):
                res = layer_drop_from_losses(
                    model_info(stack, ids),
                    cost_dict(counter, n_layers=stack.n_layers, n_sequences=ids.shape[0],
                              formula="0 (from causal's skipped runs)"),
                    causal.base_loss, causal.skip_loss, source="causal")
                if cb:
                    cb(1, 1)
            else:
                res = METRICS[name](stack, ids, batch_size=batch_size, progress=cb,
                                    counter=counter, cache=cache, **opts)
            wall = time.perf_counter() - t0
            objects[name] = res
            d = res.to_dict()
            d["wall_s"] = wall
            results[name] = d
            total.add(counter)
            if lines is not None:
                lines.end(name, wall)
            if bar is not None:
                bar.update(tasks[name], description=f"{name} ({wall:.1f}s)")
                bar.stop_task(tasks[name])
    finally:
        if bar is not None:
            bar.stop()

    return {
        "model": model_info(stack, ids),
        "batch_size": batch_size,
        "metrics": {m: results[m] for m in names},
        "wall_s": time.perf_counter() - t_all,
        "cost": total.to_dict(),
        "shared_hidden_states": bool(share),
    }
