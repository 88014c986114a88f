"""Token files on disk: raw little-endian uint16/uint32 arrays plus `manifest.json`.

The raw layout (no header) is what OLMo, nanoGPT and Megatron-style pipelines write,
so users can bring their own pre-tokenized data: a directory with `train.bin` and
`val.bin` (dtype from `manifest.json` or the `dtype` argument) or `train.npy` and
`val.npy` (dtype from the .npy header). Files are opened as read-only memmaps, so
a split of any size costs no memory until windows are read.

A minimal user manifest is `{"dtype": "uint16", "vocab_size": 50304}`; manifests
written by `prepare` also record the tokenizer, the corpus, token counts and
sha256 digests. Everything that can be checked cheaply is checked on open (file
present, byte size a multiple of the dtype, token count as recorded, ids below
vocab_size); `verify=True` also compares sha256 digests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from depthlab.data.cache import read_json, tmp_name
from depthlab.errors import DepthlabError

if TYPE_CHECKING:
    from depthlab.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
RAW_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
FULL_CHECK_TOKENS = 1 << 26
"""Up to this many tokens every id is range-checked; above, 64 evenly spaced chunks."""


@dataclass
class TokenSplits:
    """Train and validation token streams (1-D read-only memmaps) and their vocabulary."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    tokenizer: Tokenizer | None
    """None for user-brought token files without a tokenizer."""
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __repr__(self) -> str:
        return (
            f"TokenSplits(train={len(self.train):,} tokens, val={len(self.val):,} tokens, "
            f"vocab_size={self.vocab_size}, path={self.path})"
        )


MAX_INFERRED_VOCAB = 1 << 20
"""Above this, a vocabulary guessed from the largest id is more likely a wrong dtype."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32."""
    return RAW_DTYPES["uint16"] if vocab_size <= 1 << 16 else RAW_DTYPES["uint32"]


def dtype_name(dtype: np.dtype | str) -> str:
    """'uint16' or 'uint32', or a DepthlabError for anything a raw file cannot hold."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise DepthlabError(f"unknown token dtype '{dtype}' (use uint16 or uint32)") from None
    for name, raw in RAW_DTYPES.items():
        if dt.kind == raw.kind and dt.itemsize == raw.itemsize:
            return name
    raise DepthlabError(f"unsupported token dtype '{dtype}' (use uint16 or uint32)")


# --------------------------------------------------------------------------- writing


def write_tokens(path: Path, chunks: Iterable[np.ndarray], dtype: np.dtype | str) -> dict[str, Any]:
    """Stream id chunks into a raw file (atomically); returns {file, n_tokens, bytes, sha256}."""
    dt = RAW_DTYPES[dtype_name(dtype)]
    limit = np.iinfo(dt).max
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    h = hashlib.sha256()
    n = 0
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                arr = np.asarray(chunk)
                if arr.size and (arr.min() < 0 or arr.max() > limit):
                    raise ValueError(f"token id out of range for {dt.name}")
                data = arr.astype(dt, copy=False).tobytes()
                f.write(data)
                h.update(data)
                n += arr.size
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"file": path.name, "n_tokens": n, "bytes": n * dt.itemsize, "sha256": h.hexdigest()}


# --------------------------------------------------------------------------- reading


def read_tokens(
    path: str | Path, dtype: np.dtype | str | None = None, n_tokens: int | None = None
) -> np.ndarray:
    """A 1-D read-only memmap of a raw (.bin) or .npy token file, after size checks."""
    p = Path(path)
    if not p.is_file():
        raise DepthlabError(f"token file not found: {p}")
    if p.suffix == ".npy":
        arr = _read_npy(p)
    else:
        if dtype is None:
            raise DepthlabError(
                f"{p}: raw token file needs a dtype (manifest.json \"dtype\": \"uint16\" or "
                "\"uint32\", or the dtype argument)"
            )
        dt = RAW_DTYPES[dtype_name(dtype)]
        size = p.stat().st_size
        if size % dt.itemsize:
            raise DepthlabError(
                f"{p}: {size} bytes is not a multiple of {dt.itemsize} ({dtype_name(dt)}): "
                "file truncated or wrong dtype"
            )
        arr = np.zeros(0, dt) if size == 0 else np.memmap(p, dtype=dt, mode="r")
    if n_tokens is not None and len(arr) != n_tokens:
        raise DepthlabError(
            f"{p}: holds {len(arr):,} tokens but manifest.json says {n_tokens:,}; "
            "file changed or truncated (re-run prepare)"
        )
    return arr


def _read_npy(p: Path) -> np.ndarray:
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DepthlabError(f"{p}: not a readable .npy file ({str(err).splitlines()[0]})") from None
    if arr.dtype.kind not in "ui":
        raise DepthlabError(f"{p}: .npy dtype {arr.dtype} is not an integer token dtype")
    return arr.reshape(-1)


def check_ids(tokens: np.ndarray, vocab_size: int, where: str | Path) -> None:
    """Raise if any id is outside [0, vocab_size): all ids, or evenly spaced chunks if huge."""
    if len(tokens) == 0:
        return
    if len(tokens) <= FULL_CHECK_TOKENS:
        parts = [tokens]
    else:
        size = 1 << 20
        starts = np.linspace(0, len(tokens) - size, 64).astype(np.int64)
        parts = [tokens[s : s + size] for s in starts]
    lo = min(int(p.min()) for p in parts)
    hi = max(int(p.max()) for p in parts)
    if hi >= vocab_size or lo < 0:
        bad = hi if hi >= vocab_size else lo
        raise DepthlabError(
            f"{where}: token id {bad} outside vocabulary of {vocab_size} "
            "(wrong tokenizer, vocab_size or dtype?)"
        )


def read_manifest(directory: Path) -> dict[str, Any]:
    return read_json(Path(directory) / MANIFEST, "manifest")


def _checked_manifest(directory: Path) -> dict[str, Any]:
    """read_manifest, with the fields open_token_dir reads checked for their types."""
    manifest = read_manifest(directory)
    where = directory / MANIFEST
    vocab = manifest.get("vocab_size")
    if vocab is not None and (not isinstance(vocab, int) or isinstance(vocab, bool) or vocab < 1):
        raise DepthlabError(f"{where}: vocab_size must be a positive integer, got {vocab!r}")
    if "dtype" in manifest and not isinstance(manifest["dtype"], str):
        raise DepthlabError(f"{where}: dtype must be a string such as \"uint16\", "
                            f"got {manifest['dtype']!r}")
    splits = manifest.get("splits", {})
    if not isinstance(splits, dict) or not all(isinstance(v, dict) for v in splits.values()):
        raise DepthlabError(f"{where}: splits must map each split to an object")
    for split, entry in splits.items():
        for key in ("n_tokens", "bytes"):
            v = entry.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise DepthlabError(f"{where}: splits.{split}.{key} must be a non-negative "
                                    f"integer, got {v!r}")
        if "file" in entry and not isinstance(entry["file"], str):
            raise DepthlabError(f"{where}: splits.{split}.file must be a file name")
    return manifest


def _split_file(directory: Path, manifest: dict[str, Any], split: str) -> Path:
    entry = manifest.get("splits", {}).get(split, {})
    if isinstance(entry, dict) and entry.get("file"):
        return directory / entry["file"]
    for suffix in (".bin", ".npy"):
        if (directory / f"{split}{suffix}").is_file():
            return directory / f"{split}{suffix}"
    raise DepthlabError(f"token directory {directory} has no {split}.bin or {split}.npy")


def manifest_is_complete(directory: Path) -> bool:
    """A manifest written by `prepare` whose files exist with the recorded sizes."""
    try:
        manifest = read_manifest(directory)
        if manifest.get("format_version") != FORMAT_VERSION:
            return False
        for split in SPLITS:
            entry = manifest["splits"][split]
            if (directory / entry["file"]).stat().st_size != entry["bytes"]:
                return False
    except (DepthlabError, KeyError, TypeError, OSError):
        return False
    return True


def open_token_dir(
    directory: str | Path,
    tokenizer: Tokenizer | None = None,
    dtype: np.dtype | str | None = None,
    vocab_size: int | None = None,
    verify: bool = False,
) -> TokenSplits:
    """Open a prepared or user-brought token directory (manifest.json optional for .npy)."""
    from depthlab.data.tokenizer import META_FILE, load_tokenizer_path

    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DepthlabError(f"token directory not found: {d}")
    manifest = _checked_manifest(d) if (d / MANIFEST).exists() else {}
    if tokenizer is None and (d / "tokenizer" / META_FILE).is_file():
        tokenizer = load_tokenizer_path(d / "tokenizer")
    dtype = manifest.get("dtype", dtype)
    vocab = manifest.get("vocab_size") or vocab_size
    if tokenizer is not None and vocab is not None and int(vocab) > tokenizer.vocab_size:
        raise DepthlabError(
            f"{d / MANIFEST}: vocab_size {vocab} does not match tokenizer {tokenizer.name} "
            f"({tokenizer.vocab_size} tokens)"
        )
    paths = {split: _split_file(d, manifest, split) for split in SPLITS}  # both exist?
    arrays = {}
    for split, path in paths.items():
        entry = manifest.get("splits", {}).get(split, {})
        expected = entry.get("n_tokens") if isinstance(entry, dict) else None
        arrays[split] = read_tokens(path, dtype, expected)
        if verify and isinstance(entry, dict) and entry.get("sha256"):
            from depthlab.data.cache import sha256_file

            if sha256_file(path) != entry["sha256"]:
                raise DepthlabError(f"{path}: sha256 differs from manifest.json (file changed)")
    return _finish(arrays, vocab, tokenizer, manifest, d)


def open_token_files(
    train: str | Path,
    val: str | Path,
    dtype: np.dtype | str | None = None,
    vocab_size: int | None = None,
    tokenizer: Tokenizer | None = None,
) -> TokenSplits:
    """Open two user token files (.bin needs `dtype`; .npy carries its own)."""
    arrays = {"train": read_tokens(train, dtype), "val": read_tokens(val, dtype)}
    return _finish(arrays, vocab_size, tokenizer, {}, None)


def _finish(
    arrays: dict[str, np.ndarray],
    vocab: int | None,
    tokenizer: Tokenizer | None,
    manifest: dict[str, Any],
    path: Path | None,
) -> TokenSplits:
    """Resolve the vocabulary (manifest, tokenizer, or max id + 1) and range-check ids."""
    if vocab is None and tokenizer is not None:
        vocab = tokenizer.vocab_size
    if vocab is None:  # no manifest, no tokenizer: one pass over the data
        if not any(len(a) for a in arrays.values()):
            raise DepthlabError(f"{path or 'token files'}: the token files are empty")
        vocab = 1 + max(int(a.max()) for a in arrays.values() if len(a))
        if vocab > MAX_INFERRED_VOCAB:
            raise DepthlabError(
                f"{path or 'token files'}: the largest id is {vocab - 1:,}, which would make a "
                f"{vocab:,}-row embedding; if that is right, say so with vocab_size in "
                f"manifest.json, else check the files' dtype")
    vocab = int(vocab)
    for split, arr in arrays.items():
        check_ids(arr, vocab, f"{path or 'token file'} ({split})")
    return TokenSplits(arrays["train"], arrays["val"], vocab, tokenizer, manifest, path)
