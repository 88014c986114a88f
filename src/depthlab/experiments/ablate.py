"""The progressive ablation ladder (the paper's recipe at L=32: baseline -> +T -> +lambda
-> +G -> +MoE), applied to any base config.

Each rung adds one change to the previous rung:

- `+T`: longer context, `data.seq_len` x `context_factor` (capped by model.max_seq_len),
  batch size (and global batch size, when set) divided by the same factor so every rung
  sees the same tokens per optimiser step (refused when they do not divide);
- `+lambda`: weight decay `ladder_weight_decay` (the paper's ladder uses 0.3);
- `+G`: grouped-query attention with group size `group_size` (n_kv_heads = n_heads / G);
- `+MoE`: every MLP becomes a top-k MoE of `num_experts` fine-grained experts whose
  expert hidden size is `hidden / top_k` (rounded), so that the ACTIVE MLP
  parameters per token equal the dense MLP's (an equal-active-size comparison).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from depthlab.config import RunConfig, build_config
from depthlab.errors import DepthlabError
from depthlab.experiments.study import Point, mean_metrics, seed_run_name
from depthlab.outdir import check_not_a_run

RUNGS = ("baseline", "+T", "+lambda", "+G", "+MoE")


@dataclass
class LadderSpec:
    """The size of each rung's change."""

    context_factor: int = 4
    weight_decay: float = 0.3
    group_size: int = 2
    num_experts: int = 8
    top_k: int = 2


def equal_active_expert_hidden(dense_hidden: int, top_k: int) -> int:
    """Expert hidden size whose top_k active experts hold the dense MLP's parameters."""
    return max(1, round(dense_hidden / top_k))


def equal_active_moe(dense_hidden: int, num_experts: int, top_k: int) -> dict[str, Any]:
    """The `model.moe` override of an MoE with the dense MLP's active parameters per token."""
    return {"num_experts": num_experts, "top_k": top_k,
            "expert_hidden": equal_active_expert_hidden(dense_hidden, top_k),
            "shared_expert": False}


def ladder_points(base: RunConfig, spec: LadderSpec | None = None, prefix: str = "ladder"
                  ) -> list[Point]:
    """The five cumulative rungs as study points (names `PREFIX0_baseline` ...)."""
    spec = spec or LadderSpec()
    _check_spec(spec)
    m, d, t = base.model, base.data, base.train
    if m.moe is not None:
        raise DepthlabError("ablate: the base config already uses MoE; give a dense base config "
                            "(the ladder adds MoE as its last rung)")
    T = min(d.seq_len * spec.context_factor, m.max_seq_len)
    if T <= d.seq_len:
        raise DepthlabError(f"ablate: cannot lengthen the context: data.seq_len={d.seq_len} is "
                            f"already model.max_seq_len; raise model.max_seq_len")
    batch_changes = _equal_tokens_batches(t.batch_size, t.global_batch_size, d.seq_len, T)
    if m.kv_heads != m.n_heads:
        raise DepthlabError(
            f"ablate: the +G rung needs an MHA base (model.n_kv_heads == model.n_heads = "
            f"{m.n_heads}), the base has n_kv_heads={m.kv_heads}; add --set "
            f"model.n_kv_heads={m.n_heads}")
    if m.n_heads % spec.group_size:
        raise DepthlabError(f"ablate: the +G rung needs n_heads ({m.n_heads}) divisible by "
                            f"--group-size {spec.group_size}")
    steps: list[dict[str, Any]] = [
        {},
        {"data.seq_len": T, **batch_changes},
        {"train.weight_decay": spec.weight_decay},
        {"model.n_kv_heads": m.n_heads // spec.group_size},
        {"model.moe": equal_active_moe(m.hidden, spec.num_experts, spec.top_k)},
    ]
    points, acc = [], {}
    for i, (rung, change) in enumerate(zip(RUNGS, steps, strict=True)):
        acc = {**acc, **change}
        points.append(Point(f"{prefix}{i}_{rung.lstrip('+')}", dict(acc)))
    return points


def context_cap_note(base: RunConfig, points: list[Point], spec: LadderSpec | None = None
                     ) -> str | None:
    """What the user should hear when the +T rung lengthens the context less than asked."""
    factor = (spec or LadderSpec()).context_factor
    T, longer = base.data.seq_len, points[1].overrides["data.seq_len"]
    if longer >= T * factor:
        return None
    return (f"+T: seq_len {T} -> {longer} (x{longer / T:g}, not x{factor}: capped by "
            f"model.max_seq_len={base.model.max_seq_len})")


def _check_spec(spec: LadderSpec) -> None:
    rules = [
        (spec.context_factor >= 2, f"--context-factor must be >= 2, got {spec.context_factor}"),
        (spec.weight_decay >= 0, f"--weight-decay must be >= 0, got {spec.weight_decay}"),
        (spec.group_size >= 2, f"--group-size must be >= 2, got {spec.group_size}"),
        (spec.num_experts >= 2, f"--experts must be >= 2, got {spec.num_experts}"),
        (1 <= spec.top_k <= spec.num_experts,
         f"--top-k must be between 1 and --experts ({spec.num_experts}), got {spec.top_k}"),
    ]
    for ok, message in rules:
        if not ok:
            raise DepthlabError(f"ablate: {message}")


def _equal_tokens_batches(batch: int, global_batch: int | None, seq_len: int, T: int
                          ) -> dict[str, int]:
    """The +T rung's batch overrides that keep tokens per optimiser step equal."""
    changes = {}
    for key, value in (("train.batch_size", batch), ("train.global_batch_size", global_batch)):
        if value is None:
            continue
        if (value * seq_len) % T:
            raise DepthlabError(
                f"ablate: the +T rung (seq_len {seq_len} -> {T}) cannot keep tokens per step "
                f"equal: {key}={value} x {seq_len} is not a multiple of {T}; choose a "
                f"{key} divisible by {T // math.gcd(seq_len, T)}")
        changes[key] = value * seq_len // T
    return changes


def rung_label(point_name: str) -> str:
    """`ladder3_G` -> `+G`; `ladder0_baseline` -> `baseline`."""
    tail = point_name.split("_", 1)[-1]
    return tail if tail == "baseline" else f"+{tail}"


def ladder_rows(points: list[Point], measurements: dict[str, Any], seeds: int = 1
                ) -> list[dict[str, Any]]:
    """Rows for ladder.json: rung, val_ppl and usefulness (means over seed runs)."""
    rows = []
    for p in points:
        names = _seed_names(p.name, seeds)
        missing = [n for n in names if n not in measurements]
        if missing:
            raise DepthlabError(f"ablate: no measurement for run(s) {', '.join(missing)}")
        means = mean_metrics([measurements[n] for n in names])
        rows.append({
            "name": rung_label(p.name),
            "run": p.name,
            **{k: means[k] for k in ("val_ppl", "usefulness", "linear_excess_loss",
                                     "last_layer_variance")},
            "seeds": len(names),
            "overrides": p.overrides,
        })
    return rows


def _seed_names(name: str, seeds: int) -> list[str]:
    return [name] if seeds <= 1 else [seed_run_name(name, s) for s in range(seeds)]


def with_seeds(points: list[Point], seeds: int, base_seed: int = 0) -> list[Point]:
    """Each point once per seed (`NAME_s0`, `NAME_s1`, ...); unchanged for seeds=1."""
    if seeds <= 1:
        return points
    return [Point(seed_run_name(p.name, s), {**p.overrides, "train.seed": base_seed + s})
            for p in points for s in range(seeds)]


def ablate(config: str | Path, out: str | Path | None = None, *, spec: LadderSpec | None = None,
           jobs: int = 1, seeds: int = 1, overrides: list[str] | dict[str, Any] = (),
           on_status: Any = None, on_diagnose: Any = None,
           on_note: Callable[[str], None] | None = None, dry_run: bool = False
           ) -> dict[str, Any]:
    """Train and diagnose the five rungs of `config`; write OUT/ladder.json and a report with
    the ladder chart (bars: validation PPL, markers: usefulness). `dry_run`: return the
    sweep (`{"sweep", "out"}`) without training or writing anything."""
    import json

    from depthlab.config import apply_overrides, read_run_yaml
    from depthlab.experiments.study import make_sweep, run_study
    from depthlab.report.html import build_report

    if seeds < 1:
        raise DepthlabError(f"--seeds must be >= 1, got {seeds}")
    base_raw = apply_overrides(read_run_yaml(config), overrides)
    base = build_config(base_raw)
    out = Path(out or Path("runs/ablate") / base.name)
    check_not_a_run(out)
    points = ladder_points(base, spec)
    note = context_cap_note(base, points, spec)
    if note and on_note is not None:
        on_note(note)
    runs = with_seeds(points, seeds, base_seed=base.train.seed)
    sweep = make_sweep(f"ablate_{base.name}", base_raw, runs, out / "runs")
    if dry_run:
        sweep.runs()  # validates every rung's config
        return {"sweep": sweep, "out": out}
    measurements = run_study(sweep, jobs=jobs, on_status=on_status, on_diagnose=on_diagnose)
    rows = ladder_rows(points, measurements, seeds)
    ladder_file = out / "ladder.json"
    ladder_file.write_text(json.dumps({"base": str(config), "spec": spec.__dict__ if spec else
                                       LadderSpec().__dict__, "steps": rows}, indent=1))
    build_report([out / "runs"], out / "report", ladder=ladder_file,
                 title=f"ablation ladder: {base.name}")
    return {"rows": rows, "ladder_file": ladder_file, "report": out / "report" / "report.html",
            "measurements": {n: m.to_dict() for n, m in measurements.items()}}
