"""`depthlab reproduce`: the paper's claims re-checked in miniature, each with a verdict.

One plan per scale: a base config, the values each claim sweeps, and seeds. The runs of
all claims are pooled (a config shared by two claims is trained once), trained through the
sweep runner, diagnosed (variance, usefulness, causal, permutation), and every claim gets
a verdict from `depthlab.experiments.verdict` (the rule is stated there and in
docs/reproduce.md). Claim 8 is a simulation (`depthlab.experiments.theory`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from depthlab.config import RunConfig, build_config
from depthlab.errors import DepthlabError
from depthlab.experiments import verdict as V
from depthlab.experiments.ablate import RUNGS, LadderSpec, equal_active_moe, ladder_points
from depthlab.experiments.study import (
    DiagnoseSettings,
    Measurement,
    Point,
    make_sweep,
    mean_metrics,
    run_study,
    seed_run_name,
)
from depthlab.experiments.sweep import flatten_overrides, run_name
from depthlab.outdir import check_not_a_run
from depthlab.probe.metrics._common import jsonify
from depthlab.text import counted

SCALES = ("tiny", "small", "paper")
RESULTS_FILE = "reproduce.json"

# Paper numbers (Muhtar et al., 1.2B-parameter scale; see ../shared/design.md).
CLAIM8_TITLE = "Masked (sparse) sublayers slow the variance growth of a random pre-LN stack"
PAPER = {
    1: "pre-LN residual variance grows with depth (the curse of depth)",
    2: "usefulness 1.000 / 0.813 / 0.625 / 0.562 at L = 12 / 16 / 24 / 32",
    3: "lambda = 0.1 best PPL (14.83); usefulness 0.81 at 0.1 vs 0.75 at 0",
    4: "sweet spot T = 2048-4096",
    5: "G = 16 best PPL and +7% usefulness",
    6: "MoE beats dense by > 2 PPL, usefulness 0.94",
    7: "avg accuracy at L=32: 39.5 -> +T 40.0 -> +lambda 41.4 -> +G 42.1 -> +MoE 44.1",
    8: "sparsity damps the variance growth of pre-LN stacks",
}


# ----------------------------------------------------------------------------- plans


@dataclass
class Plan:
    """Everything one scale runs."""

    scale: str
    base: dict[str, Any]
    depths: list[int]
    weight_decays: list[float]
    contexts: list[int]
    sweet_context: int
    tokens_per_step: int
    group_sizes: list[int]
    moe: dict[str, Any]
    seeds: int
    ladder: LadderSpec
    diagnose: DiagnoseSettings = field(default_factory=DiagnoseSettings)
    theory: dict[str, Any] = field(default_factory=dict)


def _base(d_model: int, n_layers: int, seq_len: int, batch: int, steps: int, lr: float,
          max_seq_len: int, warmup: int) -> dict[str, Any]:
    return {
        "name": "reproduce",
        "model": {"n_layers": n_layers, "d_model": d_model, "n_heads": 4,
                  "max_seq_len": max_seq_len, "init": "paper"},
        "data": {"corpus": "kjv", "tokenizer": "byte", "seq_len": seq_len},
        "train": {"max_steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": warmup,
                  "weight_decay": 0.1, "eval_interval": steps, "ckpt_interval": steps,
                  "log_interval": max(1, steps // 10), "stats_interval": 0},
    }


def plan_for(scale: str, seeds: int | None = None, steps: int | None = None) -> Plan:
    """The runs of a scale; `steps` shortens training (tests, quick looks)."""
    if scale == "tiny":
        # 600 steps x 3 seeds: ~15 min on 2 cores. At 300 x 2 (6 min) the L=8 models'
        # usefulness sat at 0 and two seeds gave too rough a spread to resolve most effects.
        s = 600 if steps is None else steps
        plan = Plan(scale, _base(64, 8, 64, 16, s, 3e-3, 256, max(1, s // 10)),
                    depths=[2, 4, 8, 16], weight_decays=[0.0, 0.1, 0.3],
                    contexts=[32, 64, 128, 256], sweet_context=128, tokens_per_step=1024,
                    group_sizes=[1, 2, 4], moe={"num_experts": 8, "top_k": 2}, seeds=3,
                    ladder=LadderSpec(context_factor=2, weight_decay=0.3, group_size=2),
                    diagnose=DiagnoseSettings(eval_tokens=2048, min_samples=8),
                    theory={"max_depth": 32, "d_model": 128, "seeds": 3})
    elif scale == "small":
        s = 2000 if steps is None else steps
        plan = Plan(scale, _base(128, 12, 128, 16, s, 2e-3, 1024, max(1, s // 20)),
                    depths=[4, 8, 12, 16, 24], weight_decays=[0.0, 0.1, 0.3, 0.5],
                    contexts=[64, 128, 256, 512, 1024], sweet_context=512, tokens_per_step=2048,
                    group_sizes=[1, 2, 4], moe={"num_experts": 16, "top_k": 2}, seeds=2,
                    ladder=LadderSpec(context_factor=4, weight_decay=0.3, group_size=2,
                                      num_experts=16),
                    diagnose=DiagnoseSettings(eval_tokens=8192, min_samples=16),
                    theory={"max_depth": 64, "d_model": 256, "seeds": 5})
    else:
        raise DepthlabError(f"unknown scale {scale!r}; choose from {', '.join(SCALES)}")
    if seeds is not None:
        if seeds < 1:
            raise DepthlabError(f"--seeds must be >= 1, got {seeds}")
        plan.seeds = seeds
    return plan


def _dense_hidden(plan: Plan) -> int:
    return build_config(plan.base).model.hidden


def moe_overrides(plan: Plan) -> dict[str, Any]:
    """The claim-6 MoE: the base model's MLPs as top-k MoEs of equal active size."""
    return {"model.moe": equal_active_moe(_dense_hidden(plan), plan.moe["num_experts"],
                                          plan.moe["top_k"])}


def _context_overrides(plan: Plan, T: int) -> dict[str, Any]:
    return {"data.seq_len": T, "train.batch_size": max(1, plan.tokens_per_step // T)}


@dataclass
class Claim:
    """A claim's conditions (ordered) and how its verdict is computed."""

    id: int
    title: str
    knob: str
    conditions: list[tuple[str, dict[str, Any]]]
    evaluate: Callable[[list[list[Measurement]]], list[tuple[str, V.Verdict, bool]]]
    """measurements per condition -> [(test label, verdict, primary?)]."""


def _vals(groups: list[list[Measurement]], metric: str) -> list[list[float]]:
    return [[getattr(m, metric) for m in g] for g in groups]


def claims_for(plan: Plan) -> list[Claim]:
    """Claims 1-7 as conditions + tests (claim 8 is the simulation)."""
    base_T = plan.base["data"]["seq_len"]
    base_ctx = _context_overrides(plan, base_T)
    depth = [(f"L={L}", {"model.n_layers": L}) for L in plan.depths]
    wd = [(f"lambda={w:g}", {"train.weight_decay": w}) for w in plan.weight_decays]
    ctx = [(f"T={T}", _context_overrides(plan, T)) for T in plan.contexts]
    heads = plan.base["model"]["n_heads"]
    gqa = [(f"G={G}", {"model.n_kv_heads": heads // G}) for G in plan.group_sizes]
    moe = [("dense", {}), ("MoE", moe_overrides(plan))]
    base_cfg = build_config(plan.base)
    ladder = [(RUNGS[i], flatten_overrides(p.overrides))
              for i, p in enumerate(ladder_points(base_cfg, plan.ladder))]
    sweet = plan.contexts.index(plan.sweet_context)

    def c1(g):
        return [("last-layer variance rises with L", V.trend(_vals(g, "last_layer_variance"), 1),
                 True)]

    def c2(g):
        return [
            ("usefulness falls with L", V.trend(_vals(g, "usefulness"), -1), True),
            ("permutation falls with L", V.trend(_vals(g, "permutation"), -1), True),
            ("causal (pairs) falls with L", V.trend(_vals(g, "causal_pairs"), -1), True),
            ("mean linear-replacement loss increase falls with L",
             V.trend(_vals(g, "linear_excess_loss"), -1), False),
        ]

    def c3(g):
        opt, best = V.interior_optimum(_vals(g, "val_ppl"), minimize=True)
        opt.detail = f"best lambda = {plan.weight_decays[best]:g}; " + opt.detail
        return [("last-layer variance falls with lambda",
                 V.trend(_vals(g, "last_layer_variance"), -1), True),
                ("val PPL is best at an interior lambda", opt, True)]

    def c4(g):
        use = _vals(g, "usefulness")
        exc = _vals(g, "linear_excess_loss")
        best = max(range(len(g)), key=lambda i: statistics.fmean(exc[i]))
        u = V.compare(use[0], use[sweet], 1, spread=V.pooled_spread(use))
        e = V.compare(exc[0], exc[sweet], 1, spread=V.pooled_spread(exc))
        e.detail += f"; largest at T={plan.contexts[best]}"
        return [("last-layer variance falls with T",
                 V.trend(_vals(g, "last_layer_variance"), -1), True),
                (f"usefulness higher at T={plan.sweet_context} than T={plan.contexts[0]}", u, True),
                (f"linear-replacement loss increase higher at T={plan.sweet_context}", e, False)]

    def c5(g):
        mha, grouped = g[0], [m for grp in g[1:] for m in grp]
        sd_u = V.pooled_spread(_vals(g, "usefulness"))
        sd_p = V.pooled_spread(_vals(g, "val_ppl"))
        sd_e = V.pooled_spread(_vals(g, "linear_excess_loss"))
        return [
            ("usefulness higher with G > 1",
             V.compare(_vals([mha], "usefulness")[0], _vals([grouped], "usefulness")[0], 1,
                       spread=sd_u), True),
            ("val PPL not worse with G > 1",
             V.not_worse(_vals([mha], "val_ppl")[0], _vals([grouped], "val_ppl")[0], spread=sd_p),
             True),
            ("linear-replacement loss increase higher with G > 1",
             V.compare(_vals([mha], "linear_excess_loss")[0],
                       _vals([grouped], "linear_excess_loss")[0], 1, spread=sd_e), False),
        ]

    def c6(g):
        var, use, exc = (_vals(g, k) for k in ("last_layer_variance", "usefulness",
                                               "linear_excess_loss"))
        ppl = _vals(g, "val_ppl")
        return [("MoE lowers last-layer variance", V.compare(var[0], var[1], -1), True),
                ("MoE raises usefulness", V.compare(use[0], use[1], 1), True),
                ("MoE lowers val PPL", V.compare(ppl[0], ppl[1], -1), False),
                ("MoE raises the linear-replacement loss increase", V.compare(exc[0], exc[1], 1),
                 False)]

    def c7(g):
        ppl, use = _vals(g, "val_ppl"), _vals(g, "usefulness")
        steps = " -> ".join(f"{statistics.fmean(x):.3f}" for x in ppl)
        v = V.compare(ppl[0], ppl[-1], -1, spread=V.pooled_spread(ppl))
        v.detail = f"PPL per rung {steps}; " + v.detail
        return [("full recipe lowers val PPL vs baseline", v, True),
                ("full recipe keeps usefulness", V.not_worse(use[0], use[-1], lower_is_better=False,
                                                             spread=V.pooled_spread(use)), True)]

    return [
        Claim(1, "Last-layer variance grows with depth", "n_layers", depth, c1),
        Claim(2, "Usefulness, permutation and causal scores fall with depth", "n_layers", depth, c2),
        Claim(3, "Weight decay lowers last-layer variance, with a best lambda for PPL",
              "weight_decay", wd, c3),
        Claim(4, "Longer context lowers variance and raises usefulness up to a sweet spot",
              "seq_len (tokens per step fixed)", [(lab, {**ov}) for lab, ov in ctx], c4),
        Claim(5, "GQA (G > 1) raises usefulness at equal PPL", "n_kv_heads", gqa, c5),
        Claim(6, "MoE lowers variance and raises usefulness vs dense of equal active size",
              "moe (top-k experts, equal active MLP params)", moe, c6),
        Claim(7, "Ablation ladder: baseline -> +T -> +lambda -> +G -> +MoE", "ladder",
              [(lab, {**base_ctx, **ov}) if lab == "baseline" else (lab, ov)
               for lab, ov in ladder], c7),
    ]


def _canonical(overrides: dict[str, Any], base: RunConfig) -> dict[str, Any]:
    """Drop overrides equal to the base so identical configs share one run."""
    out = {}
    for key, value in flatten_overrides(overrides).items():
        node: Any = base
        for part in key.split("."):
            node = getattr(node, part, None) if node is not None else None
        if key == "model.n_kv_heads":
            node = base.model.kv_heads  # None means n_heads: the same model
        if node != value:
            out[key] = value
    return dict(sorted(out.items()))


def points_for(plan: Plan, claims: list[Claim]) -> tuple[list[Point], dict[tuple[int, int], list[str]]]:
    """The pooled runs, and for each (claim id, condition index) the names of its seed runs."""
    base = build_config(plan.base)
    by_key: dict[str, Point] = {}
    where: dict[tuple[int, int], list[str]] = {}
    for claim in claims:
        for ci, (_, ov) in enumerate(claim.conditions):
            canon = _canonical(ov, base)
            stem = run_name(canon)
            names = []
            for s in range(plan.seeds):
                name = seed_run_name(stem, s)
                point = by_key.setdefault(name, Point(name, {**canon, "train.seed": s}))
                if point.overrides != {**canon, "train.seed": s}:  # two configs, one name
                    raise AssertionError(f"run name {name} stands for two different configs")
                names.append(name)
            where[(claim.id, ci)] = names
    return list(by_key.values()), where


# ----------------------------------------------------------------------------- running


def paper_commands(out: Path, overwrite: bool = False) -> dict[str, Any]:
    """Paper scale: write the sweep files for every claim and list the launch commands
    (files already there that differ from these are kept unless `overwrite`)."""
    root = Path(__file__).resolve().parents[3] / "configs" / "paper"
    dense = root / "dense_1b.yaml"
    if not dense.is_file():
        raise DepthlabError(f"--scale paper builds on the paper presets in configs/paper of a "
                            f"source checkout, not found at {root}")
    out.mkdir(parents=True, exist_ok=True)
    # the context sweep keeps tokens per step (512 x 1024) and per micro-batch (8 x 1024)
    context = [{"name": f"T{t}", "data.seq_len": t, "train.batch_size": 8192 // t,
                "train.global_batch_size": 524288 // t} for t in (512, 1024, 2048, 4096, 8192)]
    sweeps: dict[str, dict[str, Any]] = {
        "depth": {"grid": {"model.n_layers": [12, 16, 24, 32]}},
        "weight_decay": {"grid": {"train.weight_decay": [0.0, 0.1, 0.3, 0.5]}},
        "context": {"list": context,
                    "set": {"model.max_seq_len": 8192}},
        "gqa": {"grid": {"model.n_kv_heads": [16, 8, 4, 1]}},
    }
    files, commands = {}, []
    texts: dict[Path, str] = {}
    for name, points in sweeps.items():
        spec = {"name": f"paper_{name}", "base": str(dense), "out_dir": f"runs/paper/{name}",
                **points, "diagnose": True}
        path = out / f"paper_{name}.yaml"
        texts[path] = yaml.safe_dump(spec, sort_keys=False)
        files[name] = str(path)
        # one SLURM job per run, each a torchrun of 8 processes (one per GPU)
        commands.append(f"depthlab sweep {path} --slurm --gpus 8 --time-min 4320")
    for cfg in ("moe_400m_2b.yaml", "ablation_l32.yaml"):
        commands.append(f"torchrun --nnodes=$NNODES --nproc_per_node=8 --rdzv_backend=c10d "
                        f"--rdzv_endpoint=$HEAD_NODE:29500 --rdzv_id={Path(cfg).stem} "
                        f"-m depthlab.cli train {root / cfg} --set train.distributed=fsdp")
    commands.append(f"depthlab ablate {dense} --set model.n_layers=32 --out runs/paper/ladder"
                    "   # the ladder at L=32; ablate trains its rungs as local processes")
    texts[out / "commands.sh"] = "#!/bin/sh\n" + "\n".join(commands) + "\n"
    edited = [p for p, text in texts.items() if p.is_file() and p.read_text() != text]
    if edited and not overwrite:  # changed since an earlier call (or someone else's files)
        raise DepthlabError(f"{edited[0]} differs from what --scale paper writes (edited, or "
                            "from another checkout); not replacing it: pass --overwrite, "
                            "choose another --out or move it away")
    for path, text in texts.items():
        path.write_text(text)
    return {"scale": "paper", "sweep_files": files, "commands": commands}


def default_out(scale: str) -> Path:
    """Where a scale's results go unless --out says otherwise."""
    return Path("runs/reproduce") / scale


def reproduce(scale: str = "tiny", out: str | Path | None = None, *, jobs: int = 2,
              seeds: int | None = None, steps: int | None = None, claims: list[int] | None = None,
              eval_tokens: int | None = None,
              on_status: Any = None, on_diagnose: Any = None, command: str | None = None,
              overwrite: bool = False, dry_run: bool = False
              ) -> dict[str, Any]:
    """Run a scale's plan and write OUT/reproduce.json, OUT/report.md and figures.
    `dry_run`: return the sweep the chosen claims need, where results would go and what each
    claim uses (`{"sweep", "out", "claims"}`; sweep None when they need no training) without
    training or writing anything."""
    started = time.perf_counter()
    out = Path(out or default_out(scale))
    check_not_a_run(out)
    if scale == "paper":
        return paper_commands(out, overwrite)
    if steps is not None and steps < 1:
        raise DepthlabError(f"--steps must be >= 1, got {steps}")
    if jobs < 1:
        raise DepthlabError(f"--jobs must be >= 1, got {jobs}")
    plan = plan_for(scale, seeds=seeds, steps=steps)
    if eval_tokens is not None:
        if eval_tokens < 2:
            raise DepthlabError(f"--eval-tokens must be >= 2, got {eval_tokens}")
        plan.diagnose = DiagnoseSettings(eval_tokens=eval_tokens, min_samples=2)
    all_claims = claims_for(plan)
    wanted = set(claims or range(1, 9))
    bad = wanted - set(range(1, 9))
    if bad:
        raise DepthlabError(f"unknown claim number(s) {sorted(bad)}; claims are 1-8")
    chosen = [c for c in all_claims if c.id in wanted]
    points, where = points_for(plan, chosen)
    measurements: dict[str, Measurement] = {}
    if dry_run:
        sweep = make_sweep(f"reproduce_{scale}", plan.base, points, out / "runs") if points else None
        if sweep is not None:
            sweep.runs()  # validates every run's config
        uses = [f"claim {c.id} ({c.title}): " + counted(
            len({n for ci in range(len(c.conditions)) for n in where[(c.id, ci)]}), "run")
            for c in chosen]
        if 8 in wanted:
            uses.append(f"claim 8 ({CLAIM8_TITLE}): a random-stack simulation, no training")
        return {"sweep": sweep, "out": out, "claims": uses}
    if points:
        sweep = make_sweep(f"reproduce_{scale}", plan.base, points, out / "runs")
        measurements = run_study(sweep, jobs=jobs, settings=plan.diagnose, on_status=on_status,
                                 on_diagnose=on_diagnose)
    missing = sorted({n for names in where.values() for n in names} - set(measurements))
    if missing:
        raise DepthlabError(f"reproduce: no measurement for run(s) {', '.join(missing)} "
                            f"(see {out / 'runs'})")
    rows = []
    for claim in chosen:
        groups = [[measurements[n] for n in where[(claim.id, ci)]]
                  for ci in range(len(claim.conditions))]
        diverged = sorted({m.name for g in groups for m in g
                           if not all(math.isfinite(v) for v in mean_metrics([m]).values())})
        if diverged:  # a NaN/inf measurement (a diverged run): this claim only, said by name
            detail = (f"non-finite measurements in {', '.join(diverged)} (a diverged run? "
                      f"see {out / 'runs' / 'logs'})")
            tests = [("measured", V.Verdict(V.INCONCLUSIVE, math.nan, math.nan, detail, 0), True)]
        else:
            tests = claim.evaluate(groups)
        rows.append({
            "id": claim.id, "title": claim.title, "paper": PAPER[claim.id], "knob": claim.knob,
            "conditions": [{"label": lab, "runs": where[(claim.id, ci)],
                            "means": mean_metrics(groups[ci])}
                           for ci, (lab, _) in enumerate(claim.conditions)],
            "tests": [{"label": lab, "primary": primary, **v.to_dict()}
                      for lab, v, primary in tests],
            "verdict": V.combine([v for _, v, primary in tests if primary]),
        })
    theory = None
    if 8 in wanted:
        from depthlab.experiments.theory import simulate, theory_verdict

        res = simulate(**plan.theory)
        status, detail = theory_verdict(res)
        theory = res.to_dict()
        rows.append({"id": 8, "title": CLAIM8_TITLE, "paper": PAPER[8], "knob": "density p",
                     "conditions": [], "tests": [{"label": "slope falls with p; growth law fits",
                                                  "primary": True, "status": status,
                                                  "detail": detail}],
                     "verdict": status})
    results = {
        "schema_version": 1, "scale": scale, "command": command, "seeds": plan.seeds,
        "steps": plan.base["train"]["max_steps"], "base": plan.base,
        "diagnose": {"eval_tokens": plan.diagnose.eval_tokens,
                     "min_samples": plan.diagnose.min_samples,
                     "metrics": list(plan.diagnose.metrics)},
        "rule": RULE, "claims": rows, "theory": theory,
        "runs": {n: m.to_dict() for n, m in measurements.items()},
        "wall": _wall_record(time.perf_counter() - started, jobs),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(jsonify(results), indent=1, allow_nan=False,
                                               default=str))
    from depthlab.experiments.reproduce_report import write_report

    write_report(results, out)
    return results


def _wall_record(seconds: float, jobs: int) -> dict[str, Any]:
    """How long this invocation took and on what, so a report's reader can plan a re-run."""
    import torch

    return {"seconds": round(seconds, 1), "jobs": jobs, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


RULE = (f"effect = difference of condition means (endpoints for trends); resolved when "
        f"|effect| >= max(t x standard error, {V.MIN_REL:.0%} of the larger of the two means), "
        f"with the standard error from the pooled seed-to-seed spread and t the two-sided "
        f"{V.CONFIDENCE:.0%} Student-t quantile at its degrees of freedom "
        f"({V.SINGLE_SEED_REL:.0%} floor alone with one seed); holds / does not hold by the "
        f"direction of a resolved effect, inconclusive otherwise; 'not worse' tests fail only "
        f"beyond max(t x standard error, 2%); a claim holds when all its primary tests hold "
        f"(claim 8: its own simulation test)")
