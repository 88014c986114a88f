"""The report page: ONE self-contained HTML file (inline CSS, images as base64 data URIs,
no scripts, no network), plus the figures as PNG/SVG and the tables as markdown/CSV."""

from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from depthlab.errors import DepthlabError
from depthlab.report.data import ReportData, collect
from depthlab.report.figures import FigureOut, make_figures, palette
from depthlab.report.tables import Table, headline, make_tables
from depthlab.text import html_text

REPORT_FILE = "report.html"
FILES_LIST = ".report_files.json"  # what this report wrote (stale files are removed next time)
SIGNATURE = "by depthlab report."  # in every page we write: only such a page is replaced

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1.5rem 4rem; }
h1 { font-size: 1.6rem; margin: 0.2rem 0 0.3rem; }
h2 { font-size: 1.2rem; margin: 2rem 0 0.5rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9rem; }
.runs span { display: inline-block; margin: 0 0.8rem 0.3rem 0; font-size: 0.9rem; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; border-radius: 2px;
          margin-right: 0.3em; vertical-align: -0.05em; }
figure { margin: 1rem 0 1.5rem; background: #fff; border: 1px solid #e3e3e3;
         border-radius: 6px; padding: 0.8rem; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
figcaption { font-size: 0.85rem; color: #444; margin-top: 0.4rem; }
.warn { background: #fff4e5; border-left: 4px solid #f0a030; padding: 0.5rem 0.8rem;
        margin: 0.4rem 0; font-size: 0.9rem; }
.note { background: #eef3f8; border-left: 4px solid #7a9cc6; padding: 0.4rem 0.8rem;
        margin: 0.4rem 0; font-size: 0.9rem; color: #333; }
table { border-collapse: collapse; margin: 0.8rem 0; background: #fff; font-size: 0.88rem; }
caption { text-align: left; font-weight: 600; padding: 0.3rem 0; }
th, td { border: 1px solid #ddd; padding: 0.3rem 0.6rem; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.caption { font-size: 0.85rem; color: #444; }
code { background: #f0f0f0; padding: 0 0.2em; border-radius: 3px; }
"""


@dataclass
class Report:
    """What `build_report` wrote."""

    html: Path
    figures: list[FigureOut]
    tables: list[Table]
    data: ReportData
    files: list[Path] = field(default_factory=list)

    def __repr__(self) -> str:  # a notebook cell shows this: what and where, not the data
        return (f"Report({str(self.html)!r}: {len(self.data.runs)} runs, "
                f"{len(self.data.diagnoses)} diagnoses, {len(self.drawn)} figures, "
                f"{len(self.tables)} tables)")

    @property
    def drawn(self) -> list[FigureOut]:
        return [f for f in self.figures if f.png is not None or f.svg is not None]

    @property
    def skipped(self) -> list[FigureOut]:
        return [f for f in self.figures if f.note is not None]

    def headline(self, limit: int = 8) -> list[str]:
        """The console's summary: one line per run (then per diagnosed model) with the
        numbers of its table row, at most `limit` lines and a `... N more` line."""
        shown = [t for t in self.tables if t.name in ("runs", "diagnoses")]
        where = " and ".join(str(self.html.parent / "tables" / f"{t.name}.md") for t in shown)
        return headline(self.tables, limit, more=f"all in {where}" if where else "")


def _data_uri(path: Path) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(data: ReportData, figures: list[FigureOut], tables: list[Table],
                colors: dict[str, str], title: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>", "<main>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{len(data.runs)} run(s), {len(data.diagnoses)} other diagnosed '
        f"model(s); sources: {e(', '.join(str(s) for s in data.sources))}; generated "
        f"{e(time.strftime('%Y-%m-%d %H:%M'))} {SIGNATURE}</p>",
    ]
    if colors:
        swatches = "".join(
            f'<span><i class="swatch" style="background:{e(c)}"></i>{e(lab)}</span>'
            for lab, c in colors.items())
        parts.append(f'<div class="runs">{swatches}</div>')
    for w in data.warnings:
        parts.append(f'<div class="warn">Warning: {e(w)}</div>')

    parts.append("<h2>Tables</h2>")
    if tables:
        parts += [t.to_html() for t in tables]
    else:
        parts.append('<p class="note">No tables: nothing to tabulate.</p>')

    parts.append("<h2>Figures</h2>")
    for f in figures:
        if f.note is not None:
            parts.append(f'<p class="note" id="skipped-{e(f.name)}">Skipped '
                         f"<b>{e(f.title)}</b>: {html_text(f.note)}.</p>")
            continue
        src = _data_uri(f.png if f.png is not None else f.svg)  # type: ignore[arg-type]
        parts.append(
            f'<figure id="fig-{e(f.name)}"><img src="{src}" alt="{e(f.title)}">'
            f"<figcaption><b>{e(f.title)}.</b> {html_text(f.caption)}</figcaption></figure>")
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts) + "\n"


def build_report(dirs: str | Path | list[str | Path], out: str | Path, *, ladder: str | Path | None = None,
                 title: str | None = None, formats: tuple[str, ...] = ("png", "svg"),
                 dpi: int = 120) -> Report:
    """Collect runs/diagnoses/ladder under `dirs` and write OUT/report.html,
    OUT/figures/*.{png,svg} and OUT/tables/*.{md,csv}."""
    data = collect(dirs, ladder=ladder)
    out = Path(out)
    page = out / REPORT_FILE
    if page.is_file() and SIGNATURE not in page.read_text(encoding="utf-8", errors="replace"):
        raise DepthlabError(f"{page} exists and was not written by depthlab report; not "
                            "replacing it (choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    previous = _listed_files(out)
    labels = [r.label for r in data.runs] + [d.label for d in data.diagnoses
                                             if d.label not in {r.label for r in data.runs}]
    colors = palette(labels)
    if "png" not in formats and "svg" not in formats:
        formats = ("png",)
    figures = make_figures(data, out / "figures", colors, formats=formats, dpi=dpi)
    tables = make_tables(data)
    files: list[Path] = [p for f in figures for p in (f.png, f.svg) if p is not None]
    tdir = out / "tables"
    if tables:
        tdir.mkdir(exist_ok=True)
    for t in tables:
        (tdir / f"{t.name}.md").write_text(t.to_markdown())
        (tdir / f"{t.name}.csv").write_text(t.to_csv())
        files += [tdir / f"{t.name}.md", tdir / f"{t.name}.csv"]
    page.write_text(render_html(data, figures, tables, colors, title or "depthlab report"),
                    encoding="utf-8")
    files.insert(0, page)
    # files an earlier report wrote here that this one did not: stale, remove them
    current = {str(f.relative_to(out)) for f in files}
    for rel in previous - current:
        (out / rel).unlink(missing_ok=True)
    (out / FILES_LIST).write_text(json.dumps(sorted(current), indent=1) + "\n")
    return Report(page, figures, tables, data, files)


def _listed_files(out: Path) -> set[str]:
    """The figure and table files (relative to `out`) an earlier report listed."""
    try:
        listed = json.loads((out / FILES_LIST).read_text())
    except (OSError, ValueError):
        return set()
    return {p for p in listed if isinstance(p, str) and len(Path(p).parts) == 2
            and Path(p).parts[0] in ("figures", "tables") and Path(p).name not in ("..", ".")}
