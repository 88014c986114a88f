"""`depthlab sweep`: run a grid/list of configs locally (N at a time) or on SLURM."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)


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
    from rich.table import Table

    from depthlab.errors import DepthlabError
    from depthlab.experiments.sweep import load_sweep, param_counts, run_state, run_sweep

    console = Console()
    sw = load_sweep(sweep_file, out_dir=out, overrides=set_ or [])
    if dry_run:
        runs = sw.runs()
        table = Table(title=f"sweep {sw.name}: {len(runs)} runs -> {sw.out_dir}")
        for col in ("run", "overrides", "params", "active", "state"):
            table.add_column(col, justify="right" if col in ("params", "active") else "left",
                             overflow="fold")
        notes = set()
        for run in runs:
            total, active, note = param_counts(run.cfg)
            if note:
                notes.add(note)
            ov = ", ".join(f"{k}={v}" for k, v in run.overrides.items()) or "-"
            table.add_row(run.name, ov, _fmt_params(total), _fmt_params(active), run_state(run))
        console.print(table)
        if notes:
            console.print(f"[dim]parameter counts use: {'; '.join(sorted(notes))}[/]")
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


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.2f}M" if n >= 10_000 else f"{n:,}"
