"""Report: figures (matplotlib) and one self-contained HTML page over runs, sweeps and
`depthlab diagnose` results. Entry point: `build_report(dirs, out)`."""

from depthlab.report.data import ReportData, RunData, collect
from depthlab.report.html import Report, build_report

__all__ = ["Report", "ReportData", "RunData", "build_report", "collect"]
