"""What a path a user typed is part of, for guidance when a command gets the wrong one."""

from __future__ import annotations

from pathlib import Path

RUN_CONFIG = "config.yaml"


def enclosing_run(path: Path, depth: int = 3) -> Path | None:
    """The training run directory that `path` lies inside (its checkpoints/ folder, one
    checkpoint, or a file in either), or None. `path` itself being a run does not count."""
    for parent in list(Path(path).absolute().parents)[:depth]:
        if (parent / RUN_CONFIG).is_file() and (parent / "checkpoints").is_dir():
            return _as_typed(path, parent)
    return None


def _as_typed(path: Path, parent: Path) -> Path:
    """`parent` spelled relative to the user's path when it was relative."""
    if path.is_absolute():
        return parent
    up = len(Path(path).absolute().relative_to(parent).parts)
    rel = Path(path)
    for _ in range(up):
        rel = rel.parent
    return rel if str(rel) != "" else Path(".")


def is_sweep_spec(raw: dict) -> bool:
    """A sweep spec names a `base` config and has no `model` of its own."""
    return "base" in raw and "model" not in raw
