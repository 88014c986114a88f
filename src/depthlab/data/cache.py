"""Where derived data lives (trained tokenizers, token files) and how it is written.

Every file is written under a temporary name and renamed into place, and a token
directory's `manifest.json` is written last: several processes (torchrun ranks, two
sweeps) may prepare the same data at once and none of them ever sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from depthlab.errors import DepthlabError

ENV_CACHE = "DEPTHLAB_CACHE"


def cache_root(cache_dir: str | None = None) -> Path:
    """`cache_dir`, else `$DEPTHLAB_CACHE`, else `~/.cache/depthlab`."""
    raw = cache_dir or os.environ.get(ENV_CACHE) or "~/.cache/depthlab"
    root = Path(raw).expanduser()
    if root.exists() and not root.is_dir():
        raise DepthlabError(f"cache dir {root} exists and is not a directory")
    return root


def check_cache_writable(path: Path) -> None:
    """Refuse, before the work, a cache entry that cannot be written (a read-only home on a
    cluster node), saying how to move the cache."""
    from depthlab.outdir import check_creatable_dir

    check_creatable_dir(path, "cache directory", advice=f"set {ENV_CACHE} (or data.cache_dir) "
                        "to a writable directory")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash, read in chunks so large files never sit in memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tmp_name(path: Path) -> Path:
    """A sibling name private to this process. It keeps at most 200 bytes of the name, so
    a name near the file system's 255-byte limit still has room for the suffix."""
    stem = path.name.encode()[:200].decode(errors="ignore")
    return path.with_name(f".{stem}.tmp-{os.getpid()}")


def umask_mode(path: Path) -> None:
    """Give `path` the mode a plainly created file gets (0o666 less the umask): safetensors
    writes its files 0600, which other users of a shared file system cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """Read a JSON object, or raise a one-line DepthlabError naming the file."""
    if not path.is_file():
        raise DepthlabError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DepthlabError(f"{path}: not valid JSON ({err.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise DepthlabError(f"{path}: expected a JSON object at the top level")
    return data
