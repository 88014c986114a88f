"""Output directories: refused before any work when they cannot be created."""

from __future__ import annotations

import os
from pathlib import Path

from depthlab.errors import DepthlabError


def check_creatable_dir(path: Path, what: str = "--out", advice: str | None = None) -> None:
    """One line if `path` (or the nearest existing parent) is a file or cannot be written
    (a read-only file system, no permission), so commands fail at once instead of after
    the work is done. `advice` ends the line (default: give another `what`)."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise DepthlabError(f"{what} {path}: {p} exists and is not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise DepthlabError(f"{what} {path}: {p} is not writable (read-only or not "
                                    f"yours); {advice or f'give another {what}'}")
            return


def check_not_a_run(path: Path, what: str = "--out") -> None:
    """One line if `path` is a training run directory: commands that write many files of
    their own (reproduce, ablate) must not mix them into a run."""
    from depthlab.paths import is_run_dir

    if is_run_dir(path):
        raise DepthlabError(f"{what} {path} is a training run directory; give this command a "
                            "directory of its own")
