"""How numbers and text read in what the CLI prints and writes: counts with their noun,
parameter counts, Markdown table cells, HTML text."""

from __future__ import annotations

import html
import math
import re

_SCALES = ((1e12, "T", 1.0), (1e9, "B", 1.0), (1e6, "M", 0.1))
"""(divisor, unit, smallest rounded value shown in that unit)."""


def counted(n: int, noun: str) -> str:
    """'1 run', '3 runs' (nouns with a plain -s plural)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def fmt_params(n: int | float | None, missing: str = "?") -> str:
    """A parameter (or token) count: '1.28M', '400M', '1.2B', '100T' from 0.1M up (two
    decimals, trailing zeros dropped), else exact ('12,345')."""
    if n is None:
        return missing
    for scale, unit, least in _SCALES:
        value = round(n / scale, 2)  # rounded before the unit is chosen: 999,999,999 is 1B
        if value >= least:
            return f"{value:.2f}".rstrip("0").rstrip(".") + unit
    return f"{int(n):,}"


def md_cell(text: object) -> str:
    """Text for a Markdown table cell: a '|' in it (`||J-I||`, `|w| < tau`) would end the
    cell early, so it is escaped."""
    return str(text).replace("|", "\\|")


def html_text(text: object) -> str:
    """Escaped text for an HTML page, with Markdown's `code` spans (as captions and notes
    are written) rendered as <code> instead of showing their backticks."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(str(text)))


def perplexity(loss: float | None) -> float | None:
    """exp(mean token cross-entropy in nats); None for no or a non-finite loss, and capped
    at exp(50) so that an early, huge loss does not overflow."""
    if loss is None or not math.isfinite(loss):
        return None
    return math.exp(min(loss, 50.0))
