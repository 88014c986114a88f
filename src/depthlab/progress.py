"""Plain-text progress for output that is not a terminal (nohup, batch-job logs), where a
live rich bar would show nothing until the work ends."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


def clock(seconds: float) -> str:
    """H:MM:SS."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def live_bar_shown(console: Console) -> bool:
    """Whether rich draws a live bar on `console`: a real terminal that is not dumb (rich
    does not redraw on TERM=dumb or unknown, as in Emacs shells and some CI runners, so a
    bar there shows nothing until the work ends), or Jupyter. Elsewhere, including a log
    file that FORCE_COLOR or TTY_COMPATIBLE make rich treat as a terminal, progress goes
    out as lines."""
    isatty = getattr(console.file, "isatty", None)
    real = bool(isatty and isatty())
    return (real and console.is_terminal and not console.is_dumb_terminal) or console.is_jupyter


class ThrottledLines:
    """Progress of named jobs as lines: one when a job starts, at most one every `every`
    seconds while it runs (done/total, elapsed, ETA), and one when it ends."""

    def __init__(self, emit: Callable[[str], None], every: float = 15.0) -> None:
        self._emit, self._every = emit, every

    def start(self, name: str) -> Callable[[int, int], None]:
        """Announce `name`; returns its progress(done, total) callback."""
        t0 = last = time.perf_counter()
        self._emit(f"{name}: running")

        def update(done: int, total: int) -> None:
            nonlocal last
            now = time.perf_counter()
            if now - last < self._every or not 0 < done < total:
                return
            last = now
            elapsed = now - t0
            eta = elapsed / done * (total - done)
            self._emit(f"{name}: {done}/{total}  elapsed {clock(elapsed)}  ETA {clock(eta)}")

        return update

    def end(self, name: str, seconds: float) -> None:
        self._emit(f"{name}: done in {seconds:.1f}s")
