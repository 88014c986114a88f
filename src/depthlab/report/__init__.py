"""Report: figures (matplotlib) and one self-contained HTML page over runs, sweeps and
`depthlab diagnose` results. Entry point: `build_report(dirs, out)`.

`Report` and `build_report` load on first use: the CLI imports this package to register
`report`, and every other command (train, data prepare) would otherwise import matplotlib."""

from typing import Any

from depthlab.report.data import ReportData, RunData, collect

__all__ = ["Report", "ReportData", "RunData", "build_report", "collect"]


def __getattr__(name: str) -> Any:
    if name in ("Report", "build_report"):
        from depthlab.report import html

        return getattr(html, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
