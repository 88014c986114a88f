"""Output directories: refused before any work when they cannot be created."""

from __future__ import annotations

from pathlib import Path

from depthlab.errors import DepthlabError


def check_creatable_dir(path: Path, what: str = "--out") -> None:
    """One line if `path` (or the nearest existing parent) is a file, so commands fail at
    once instead of with "File exists" after the work is done."""
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise DepthlabError(f"{what} {path}: {p} exists and is not a directory")
            return
