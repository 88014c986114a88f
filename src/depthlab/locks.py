"""Advisory locks between depthlab processes (POSIX flock; where the OS or the file system
has none, nothing is locked and callers are told so)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


class Busy(Exception):
    """Another process holds the lock."""


def _flock(fd: int, wait: bool) -> str | None:
    """Lock `fd` exclusively: None when held, else why locking is unsupported here. Busy
    when `wait` is False and another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return "no file locks on this OS"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        raise Busy from None
    except OSError as exc:  # e.g. Lustre mounted noflock, NFS without lockd
        return exc.strerror or str(exc)
    return None


@contextlib.contextmanager
def exclusive(lock_path: Path,
              on_unsupported: Callable[[str], None] | None = None) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on the file `lock_path` for the with-block;
    where locks are unsupported, `on_unsupported(why)` and no lock."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        why = _flock(handle.fileno(), wait=True)
        if why is not None and on_unsupported is not None:
            on_unsupported(why)
        yield  # closing the file releases the lock


def hold_dir(path: Path) -> int | None:
    """Create directory `path` if needed and lock it until `release`; Busy at once when
    another process holds it. None (nothing held) where locks are unsupported."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories
        return None
    try:
        if _flock(fd, wait=False) is None:
            return fd
    except Busy:
        os.close(fd)
        raise
    os.close(fd)
    return None


def release(fd: int | None) -> None:
    """Give up a lock from `hold_dir`."""
    if fd is not None:
        os.close(fd)
