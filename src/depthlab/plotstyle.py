"""Plot conventions shared by diagnose's figures and the report, so the same quantity looks
the same in both (torch-free: the report does not import torch)."""

from __future__ import annotations

from typing import Any

UNMEASURED = "0.85"
"""Light grey for heatmap cells with no value (NaN or masked): not measured, or blank by
definition; never the colour of a real value."""


def heatmap_cmap() -> Any:
    """The layer-pair heatmap colour map: viridis, with cells that hold no value in grey."""
    import matplotlib

    return matplotlib.colormaps["viridis"].with_extremes(bad=UNMEASURED)
