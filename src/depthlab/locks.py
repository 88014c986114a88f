"""Advisory locks between depthlab processes (POSIX flock; where the OS or the file system
has none, nothing is locked and callers are told so)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO


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


class FileLock:
    """A lock held across a long piece of work (a training run), taken without waiting.
    It is a regular file opened for appending (network file systems such as NFS emulate
    flock with a write lock, which a directory cannot take), and it is removed on release,
    so a finished or refused command leaves nothing behind."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.unsupported: str | None = None
        """Why nothing is held after `acquire` (no file locks here), else None."""
        self._handle: IO[str] | None = None

    def acquire(self) -> None:
        """Hold the lock; Busy at once when another process holds it; OSError when the lock
        file cannot be created (a read-only directory)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            created = not self.path.exists()
            handle = open(self.path, "a")  # noqa: SIM115 (held until release)
            try:
                self.unsupported = _flock(handle.fileno(), wait=False)
            except Busy:
                handle.close()
                raise
            if self.unsupported is not None:
                handle.close()
                if created:  # a lock file that locks nothing is not left behind
                    with contextlib.suppress(OSError):
                        self.path.unlink()
                return
            if self._still_named(handle):
                self._handle = handle
                return
            handle.close()  # its holder removed it between our open and lock: again
        raise Busy

    def _still_named(self, handle: IO[str]) -> bool:
        """Whether the locked file is still the one at `path` (not removed by a holder)."""
        try:
            return os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while still held: a waiting opener then sees it gone
            self._handle.close()  # closing the file releases the lock
            self._handle = None
