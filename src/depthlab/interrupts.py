"""Holding interrupts over writes that must not be cut in half."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


@contextlib.contextmanager
def interrupts_deferred(doing: str | None = None) -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) or a SIGTERM until the block is done, then deliver it.

    For writes that must finish as a set: an interrupt that unwinds the main thread
    mid-checkpoint closes files that DCP's writer still uses, and the process then aborts
    in C++; one mid-way through a diagnosis' outputs leaves new CSVs beside an old
    results.json. Signals that are ignored (nohup) or left to the OS are not touched.
    With `doing` ("writing the outputs"), the first held signal says what it waits for
    (the block may take seconds: figures)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items() if callable(handler)}
    held: list[tuple[int, FrameType | None]] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        if doing and not held:  # os.write: a handler may run inside a print to stderr
            os.write(2, f"interrupted: finishing {doing} first\n".encode())
        held.append((signum, frame))

    for sig in previous:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:  # now the handler that was in place (Python's raises KeyboardInterrupt)
        signum, frame = held[0]
        previous[signum](signum, frame)
