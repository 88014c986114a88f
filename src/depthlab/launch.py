"""What torchrun (or a launcher like it) told this process, read without importing torch, so
that config validation stays cheap."""

from __future__ import annotations

import os


def env_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 outside it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched() -> bool:
    """Whether this process was started by torchrun (or the like) as one of several."""
    return env_world_size() > 1 and "RANK" in os.environ


def launched_world_size() -> int:
    """The number of processes torchrun started (1 when it did not start this one)."""
    return env_world_size() if launched() else 1
