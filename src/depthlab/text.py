"""How numbers read in what the CLI prints: counts with their noun, parameter counts."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """'1 run', '3 runs' (nouns with a plain -s plural)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def fmt_params(n: int | None, missing: str = "?") -> str:
    """A parameter count: '1.28M' from 100,000 up, else exact ('12,345')."""
    if n is None:
        return missing
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"
