"""How numbers read in what the CLI prints: counts with their noun, parameter counts."""

from __future__ import annotations

_SCALES = ((1e12, "T"), (1e9, "B"), (1e5, "M"))


def counted(n: int, noun: str) -> str:
    """'1 run', '3 runs' (nouns with a plain -s plural)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def fmt_params(n: int | float | None, missing: str = "?") -> str:
    """A parameter (or token) count: '1.28M', '400M', '1.2B', '100T' from 100,000 up
    (two decimals, trailing zeros dropped), else exact ('12,345')."""
    if n is None:
        return missing
    for scale, unit in _SCALES:
        if n >= scale:
            value = n / (1e6 if unit == "M" else scale)
            return f"{value:.2f}".rstrip("0").rstrip(".") + unit
    return f"{int(n):,}"
