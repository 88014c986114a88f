"""`depthlab sweep`: run a grid/list of configs locally (N at a time) or on SLURM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
    app.command("reproduce")(reproduce)
    app.command("ablate")(ablate)
    app.command("recipe")(recipe)


def sweep(
    sweep_file: Annotated[Path, typer.Argument(metavar="SWEEP.yaml",
                                               help="Sweep file (see configs/sweeps/).")],
    jobs: Annotated[int, typer.Option("--jobs", "-j",
                                      help="Runs trained in parallel (threads = cores / jobs).")] = 1,
    dry_run: Annotated[bool, typer.Option("--dry-run",
                                          help="List the runs and parameter counts only.")] = False,
    out: Annotated[Path | None, typer.Option(help="Sweep output dir (default: the file's out_dir).")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a config key in every run: --set train.max_steps=50")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only this run (repeatable).")] = None,
    diagnose: Annotated[bool | None, typer.Option(
        "--diagnose/--no-diagnose",
        help="Run `depthlab diagnose` on each finished run (default: the file's diagnose).")] = None,
    slurm: Annotated[bool, typer.Option("--slurm", help="Submit SLURM jobs via submitit.")] = False,
    partition: Annotated[str | None, typer.Option(help="SLURM partition.")] = None,
    time_min: Annotated[int, typer.Option(help="SLURM time limit per run, minutes.")] = 240,
    gpus: Annotated[int, typer.Option(help="SLURM GPUs per run.")] = 0,
    cpus: Annotated[int, typer.Option(help="SLURM CPUs per run.")] = 8,
    mem_gb: Annotated[int | None, typer.Option(help="SLURM memory per run, GB.")] = None,
) -> None:
    """Train every run of a sweep: skip complete runs, resume interrupted ones, record failures."""
    from rich.console import Console

    from depthlab.errors import DepthlabError
    from depthlab.experiments.sweep import load_sweep, run_sweep

    console = Console(soft_wrap=True)
    sw = load_sweep(sweep_file, out_dir=out, overrides=set_ or [])
    if dry_run:
        print_plan(console, sw, only)
        return

    def show(run: Any, entry: dict[str, Any]) -> None:
        state = entry.get("status")
        if state == "complete" and entry.get("skipped"):
            console.print(f"  [dim]{run.name}: complete, skipped[/]")
        elif state == "pending":
            verb = "resuming" if entry.get("resumed") else "queued"
            console.print(f"  {run.name}: {verb}")
        elif state == "running":
            console.print(f"  {run.name}: running (pid {entry.get('pid')}, "
                          f"{entry.get('threads')} threads, log {entry.get('log')})")
        elif state == "complete":
            console.print(f"  [green]{run.name}: complete[/] ({entry.get('seconds')} s)")
        elif state == "failed":
            console.print(f"  [red]{run.name}: failed[/] (rc {entry.get('returncode')}): "
                          f"{entry.get('error')}", highlight=False)
        elif state == "submitted":
            console.print(f"  {run.name}: submitted (job {entry.get('job_id')})")

    slurm_kw = None
    if slurm:
        slurm_kw = {"partition": partition, "timeout_min": time_min, "gpus": gpus, "cpus": cpus,
                    "mem_gb": mem_gb}
    console.print(f"sweep [bold]{sw.name}[/] -> {sw.out_dir}")
    outcome = run_sweep(sw, jobs=jobs, slurm=slurm_kw, diagnose=diagnose, only=only,
                        on_status=show)
    counts = outcome.status.get("counts", {})
    console.print("done: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) +
                  f"; status in {sw.out_dir / 'sweep_status.json'}")
    if outcome.failed:
        raise DepthlabError(f"{len(outcome.failed)} of {len(outcome.runs)} runs failed "
                            f"({', '.join(outcome.failed)}); see {sw.out_dir / 'sweep_status.json'}")



def print_plan(console: Any, sw: Any, only: list[str] | None = None, title: str | None = None
               ) -> None:
    """What a sweep (or a study built on one) would train: each run's overrides, parameter
    counts and state (new, partial, complete), and a warning for inputs not found."""
    from rich.table import Table

    from depthlab.experiments.sweep import missing_inputs, param_counts, run_state, select_runs
    from depthlab.text import counted, fmt_params

    runs = select_runs(sw, only)
    title = title or f"sweep {sw.name}"
    table = Table(title=f"{title}: {counted(len(runs), 'run')} -> {sw.out_dir}")
    for col in ("run", "overrides", "params", "active", "state"):
        table.add_column(col, justify="right" if col in ("params", "active") else "left",
                         overflow="fold")
    notes = set()
    states = {run.name: run_state(run) for run in runs}
    for run in runs:
        total, active, note = param_counts(run.cfg)
        if note:
            notes.add(note)
        ov = ", ".join(f"{k}={v}" for k, v in run.overrides.items()) or "-"
        table.add_row(run.name, ov, fmt_params(total), fmt_params(active), states[run.name])
    console.print(table)
    if notes:
        console.print(f"[dim]parameter counts use: {'; '.join(sorted(notes))}[/]")
    missing = missing_inputs(runs, states)
    if missing:
        console.print(f"[yellow]warning:[/] {missing}: those runs would fail", highlight=False)


def _print_study_plan(console: Any, plan: dict[str, Any], title: str) -> None:
    """A dry run of reproduce/ablate: the sweep's table and where the results would go."""
    if plan["sweep"] is None:
        console.print(f"{title}: no runs to train (the chosen claims are computed directly)")
    else:
        print_plan(console, plan["sweep"], title=title)
    for line in plan.get("claims", []):
        console.print(line, highlight=False, markup=False)
    console.print(f"nothing trained; results would go to {plan['out']}", highlight=False)


def _status_printer(console: Any):
    """One line per run state change (queued / running / complete / failed)."""

    def show(run: Any, entry: dict[str, Any]) -> None:
        state = entry.get("status")
        if state == "complete" and entry.get("skipped"):
            console.print(f"  [dim]{run.name}: complete, skipped[/]")
        elif state == "running":
            console.print(f"  {run.name}: training ({entry.get('threads')} threads)")
        elif state == "complete":
            console.print(f"  [green]{run.name}: trained[/] ({entry.get('seconds')} s)")
        elif state == "failed":
            console.print(f"  [red]{run.name}: failed[/]: {entry.get('error')}", highlight=False)

    return show


def _diagnose_printer(console: Any):
    def show(i: int, n: int, name: str) -> None:
        console.print(f"  diagnosing {i + 1}/{n}: {name}")

    return show


def reproduce(
    scale: Annotated[str, typer.Option(help="tiny (~15 min on 2 CPU cores), small (hours), "
                                       "paper (writes configs and launch commands)")] = "tiny",
    out: Annotated[Path | None, typer.Option(help="Output dir (default runs/reproduce/SCALE).")] = None,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", help="Runs trained in parallel "
                                             "(default 2).")] = None,
    seeds: Annotated[int | None, typer.Option(help="Seeds per condition (default: tiny 3, small 2).")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per run (default: the "
                                              "scale's).")] = None,
    claims: Annotated[str | None, typer.Option(help="Only these claims, e.g. 1,2,8.")] = None,
    eval_tokens: Annotated[int | None, typer.Option(help="Held-out tokens each run is diagnosed "
                                                    "on, at least 2 sequences (default: the "
                                                    "scale's).")] = None,
    overwrite: Annotated[bool, typer.Option(help="--scale paper: replace sweep files and "
                                            "commands.sh that differ from what it writes.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the runs each claim needs, "
                                          "with parameter counts and state; train nothing.")
                       ] = False,
) -> None:
    """Re-check the paper's claims at a scale that fits the hardware; verdicts in a report."""
    import shlex
    import sys

    from rich.console import Console
    from rich.table import Table

    from depthlab.errors import DepthlabError
    from depthlab.experiments.reproduce import RESULTS_FILE, default_out
    from depthlab.experiments.reproduce import reproduce as run
    from depthlab.experiments.reproduce_report import REPORT_FILE
    from depthlab.outdir import check_creatable_dir

    console = Console(soft_wrap=True)
    wanted = None
    if claims is not None:
        try:
            wanted = [int(c) for c in claims.split(",") if c.strip()]
        except ValueError:
            wanted = []
        if not wanted:
            raise DepthlabError(f"--claims takes numbers like 1,2,8, got {claims!r}")
    if seeds is not None and seeds < 1:
        raise DepthlabError(f"--seeds must be >= 1, got {seeds}")
    if scale == "paper":
        given = [flag for flag, value in (("--jobs", jobs), ("--seeds", seeds), ("--steps", steps),
                                          ("--claims", claims), ("--eval-tokens", eval_tokens))
                 if value is not None]
        if dry_run:
            given.append("--dry-run")
        if given:
            raise DepthlabError(f"{', '.join(given)} would be ignored: --scale paper only writes "
                                "the sweep files and launch commands")
    elif overwrite:
        raise DepthlabError("--overwrite applies to --scale paper (the other scales resume "
                            "their runs and rewrite their report)")
    if out is not None:
        check_creatable_dir(out)
    command = "depthlab " + shlex.join(sys.argv[1:])
    results = run(scale, out, jobs=2 if jobs is None else jobs, seeds=seeds, steps=steps,
                  claims=wanted,
                  eval_tokens=eval_tokens,
                  on_status=_status_printer(console), on_diagnose=_diagnose_printer(console),
                  command=command, overwrite=overwrite, dry_run=dry_run)
    out_dir = out or default_out(scale)
    if dry_run:
        _print_study_plan(console, results, f"reproduce --scale {scale}")
        return
    if scale == "paper":
        for c in results["commands"]:
            console.print(c, highlight=False, soft_wrap=True, markup=False)
        console.print(f"sweep files and commands.sh in {out_dir}")
        return
    table = Table(title=f"reproduce --scale {scale}")
    for col in ("#", "claim", "verdict"):
        table.add_column(col, overflow="fold")
    for c in results["claims"]:
        color = {"holds": "green", "does not hold": "red"}.get(c["verdict"], "yellow")
        table.add_row(str(c["id"]), c["title"], f"[{color}]{c['verdict']}[/]")
    console.print(table)
    console.print(f"report: {out_dir / REPORT_FILE}; numbers: {out_dir / RESULTS_FILE}")


def ablate(
    config: Annotated[Path, typer.Argument(metavar="CONFIG.yaml", help="Dense base config.")],
    out: Annotated[Path | None, typer.Option(help="Output dir (default runs/ablate/NAME).")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs trained in parallel.")] = 1,
    seeds: Annotated[int, typer.Option(help="Seeds per rung.")] = 1,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a base config key: --set train.max_steps=200")] = None,
    context_factor: Annotated[int, typer.Option(help="+T: multiply seq_len by this.")] = 4,
    weight_decay: Annotated[float, typer.Option(help="+lambda: the weight decay.")] = 0.3,
    group_size: Annotated[int, typer.Option(help="+G: GQA group size.")] = 2,
    experts: Annotated[int, typer.Option(help="+MoE: number of experts.")] = 8,
    top_k: Annotated[int, typer.Option(help="+MoE: experts per token.")] = 2,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the rungs' runs with "
                                          "parameter counts and state; train nothing.")] = False,
) -> None:
    """The ablation ladder baseline -> +T -> +lambda -> +G -> +MoE on your base config."""
    from rich.console import Console

    from depthlab.experiments.ablate import LadderSpec
    from depthlab.experiments.ablate import ablate as run

    console = Console(soft_wrap=True)
    spec = LadderSpec(context_factor=context_factor, weight_decay=weight_decay,
                      group_size=group_size, num_experts=experts, top_k=top_k)
    res = run(config, out, spec=spec, jobs=jobs, seeds=seeds, overrides=set_ or [],
              on_status=_status_printer(console), on_diagnose=_diagnose_printer(console),
              on_note=lambda msg: console.print(f"note: {msg}", highlight=False),
              dry_run=dry_run)
    if dry_run:
        _print_study_plan(console, res, f"ablate {config}")
        return
    for row in res["rows"]:
        console.print(f"  {row['name']:>9s}  val PPL {row['val_ppl']:.3f}  usefulness "
                      f"{row['usefulness']:.3f}  last-layer var {row['last_layer_variance']:.3g}")
    console.print(f"ladder: {res['ladder_file']}; chart and report: {res['report']}")


def recipe(
    layers: Annotated[int, typer.Option("--layers", "-L", help="Number of blocks.")],
    params: Annotated[str, typer.Option(help="Parameter target, e.g. 1.2B, 350M: total "
                                        "parameters (per token with --active).")],
    context: Annotated[int | None, typer.Option(help="Context length T (default: the sweet "
                                                "spot, 4096).")] = None,
    budget: Annotated[str | None, typer.Option(help="Training token budget, e.g. 20B (sets "
                                               "max_steps).")] = None,
    vocab_size: Annotated[int, typer.Option(help="Tokenizer vocabulary size.")] = 50304,
    dense: Annotated[bool, typer.Option("--dense", help="No MoE (dense MLPs).")] = False,
    experts: Annotated[int | None, typer.Option(help="MoE experts per layer (default 64).")] = None,
    top_k: Annotated[int | None, typer.Option(help="MoE experts per token (default 8).")] = None,
    active: Annotated[bool, typer.Option("--active", help="--params counts the parameters "
                                         "active per token (MoE), not the total.")] = False,
    explain: Annotated[bool, typer.Option("--explain", help="Cite the measured evidence "
                                          "(reproduce results when present).")] = False,
    evidence: Annotated[Path | None, typer.Option(help="A reproduce output dir or "
                                                  "reproduce.json (default: the largest-scale "
                                                  "re-check in runs/reproduce/ or docs/reproduce/"
                                                  ").")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the config YAML here.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
) -> None:
    """A depth-effective config for L layers near a parameter target, with reasons."""
    from rich.console import Console

    from depthlab.errors import DepthlabError
    from depthlab.experiments.recipe import make_recipe, parse_count, render

    if out is not None and out.is_file() and not overwrite:
        raise DepthlabError(f"--out {out} exists; choose another file or pass --overwrite")
    if out is not None and out.is_dir():
        raise DepthlabError(f"--out {out} is a directory; give a file name for the config")
    moe_only = [flag for flag, on in (("--experts", experts is not None),
                                      ("--top-k", top_k is not None), ("--active", active)) if on]
    if dense and moe_only:
        raise DepthlabError(f"{', '.join(moe_only)} would be ignored with --dense (a dense "
                            "model has no experts; its total and active counts are equal)")
    console = Console(soft_wrap=True)
    rec = make_recipe(layers, parse_count(params, "--params"), context=context,
                      tokens=parse_count(budget, "--budget") if budget else None,
                      vocab_size=vocab_size, moe=not dense,
                      experts=64 if experts is None else experts,
                      top_k=8 if top_k is None else top_k, evidence=evidence, active=active)
    text = rec.yaml()
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    # plain text (paths and YAML lists hold brackets rich would read as markup)
    console.print(render(rec, explain=explain), highlight=False, soft_wrap=True, markup=False)
    if out is not None:
        console.print(f"config written to {out}; train it with: depthlab train {out}",
                      markup=False)
    else:
        console.print(text, highlight=False, soft_wrap=True, markup=False)
