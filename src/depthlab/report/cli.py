"""`depthlab report DIR... --out OUT`: figures and one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from depthlab.text import counted


def register(app: typer.Typer) -> None:
    app.command("report")(report)


def report(
    dirs: Annotated[list[Path], typer.Argument(
        metavar="DIR...", help="Runs, sweep dirs, diagnose output dirs (found recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("report"),
    ladder: Annotated[Path | None, typer.Option(
        help="Ablation-ladder data (JSON/YAML list of {name, ppl|accuracy, usefulness}).")] = None,
    title: Annotated[str | None, typer.Option(help="Page title.")] = None,
    svg: Annotated[bool, typer.Option("--svg/--no-svg", help="Also write SVG figures.")] = True,
    dpi: Annotated[int, typer.Option(help="PNG resolution.")] = 120,
) -> None:
    """Write OUT/report.html (self-contained), OUT/figures/*.png|svg and OUT/tables/*.md|csv."""
    from rich.console import Console

    from depthlab.errors import DepthlabError
    from depthlab.outdir import check_creatable_dir
    from depthlab.report.html import build_report

    if not 1 <= dpi <= 1200:
        raise DepthlabError(f"--dpi must be between 1 and 1200, got {dpi}")
    check_creatable_dir(out)
    console = Console(soft_wrap=True)
    rep = build_report(dirs, out, ladder=ladder, title=title,
                       formats=("png", "svg") if svg else ("png",), dpi=dpi)
    for line in rep.headline():  # the numbers of the runs table, one line a run
        console.print(line, markup=False, highlight=False)
    console.print(f"report: [bold]{rep.html}[/]  ({counted(len(rep.data.runs), 'run')}, "
                  f"{counted(len(rep.drawn), 'figure')}, {counted(len(rep.tables), 'table')})")
    for f in rep.skipped:
        console.print(f"  [dim]skipped {f.name}: {f.note}[/]")
    for w in rep.data.warnings:
        console.print(f"  [yellow]warning:[/] {w}", highlight=False)
