"""The corpus -> tokenizer -> token files pipeline, and the one call training uses.

`prepare` is idempotent: its output directory (by default under the cache, keyed by
corpus and tokenizer fingerprints) is reused when a complete manifest for the same
corpus and tokenizer is already there, so every run after the first starts at once.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from depthlab.config import DataConfig
from depthlab.data.cache import cache_root, check_cache_writable, write_json
from depthlab.data.corpus import BUILTIN_NAMES, Corpus, Split, is_token_dir, load_corpus
from depthlab.data.tokenizer import (
    META_FILE,
    Coverage,
    Tokenizer,
    load_tokenizer,
    load_tokenizer_path,
)
from depthlab.data.tokens import (
    FORMAT_VERSION,
    MANIFEST,
    SPLITS,
    TokenSplits,
    dtype_for_vocab,
    dtype_name,
    manifest_is_complete,
    open_token_dir,
    read_manifest,
    write_tokens,
)
from depthlab.errors import DepthlabError
from depthlab.progress import live_bar_shown

BATCH_CHARS = 1 << 20
"""Documents are encoded in batches of about this many characters."""


def _token_dir_of(cfg: DataConfig) -> Path | None:
    if cfg.corpus == "kjv":
        return None
    path = Path(cfg.corpus).expanduser()
    return path if is_token_dir(path) else None


def expected_vocab(cfg: DataConfig) -> tuple[int | None, str]:
    """The vocabulary a run of `cfg` would get, without reading tokens or training a
    tokenizer: (size or None when unknown, how it was found)."""
    token_dir = _token_dir_of(cfg)
    if token_dir is not None:  # its manifest, else its tokenizer, wins over data.tokenizer
        v = _quiet_manifest(token_dir).get("vocab_size")
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v, f"the token directory's manifest.json ({v:,})"
        if (token_dir / "tokenizer" / META_FILE).is_file():
            size = load_tokenizer_path(token_dir / "tokenizer").vocab_size
            return size, f"the token directory's tokenizer ({size:,})"
        return None, "unknown until the token files are read (no vocab_size in manifest.json)"
    tok = cfg.tokenizer
    if tok == "byte":
        return 257, "the byte tokenizer (257)"
    if tok == "bpe":
        v = cfg.bpe_vocab_size
        return v, f"data.bpe_vocab_size ({v:,}; a small corpus may give fewer)"
    try:
        size = load_tokenizer_path(tok).vocab_size
    except DepthlabError:
        return None, f"unknown: {tok} cannot be read"
    return size, f"{tok} ({size:,})"


def default_out_dir(cfg: DataConfig, corpus: Corpus, tokenizer: Tokenizer) -> Path:
    """`<cache>/tokens/<corpus>-<corpus fp>-<tokenizer>-<tokenizer fp>`."""
    stem = "kjv" if corpus.kind == "kjv" else Path(corpus.name).stem
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:40] or "corpus"
    name = f"{slug}-{corpus.fingerprint[:12]}-{tokenizer.kind}-{tokenizer.fingerprint[:12]}"
    return cache_root(cfg.cache_dir) / "tokens" / name


def prepare(cfg: DataConfig, out_dir: str | Path | None = None, progress: bool = True) -> Path:
    """Tokenize `cfg.corpus` into train.bin/val.bin + manifest.json; returns the directory.

    A corpus that already is a token directory is returned unchanged.
    """
    existing = _token_dir_of(cfg)
    if existing is not None:
        return existing
    if out_dir is not None:  # before any tokenizer training
        _check_foreign(Path(out_dir).expanduser())
    corpus = load_corpus(cfg)
    tokenizer = load_tokenizer(cfg, corpus)
    d = Path(out_dir).expanduser() if out_dir is not None else default_out_dir(
        cfg, corpus, tokenizer
    )
    if out_dir is None and not manifest_is_complete(d):
        check_cache_writable(d)
    if d.exists() and not d.is_dir():
        raise DepthlabError(f"output path {d} exists and is not a directory")
    if (d / MANIFEST).exists():
        if manifest_is_complete(d):
            m = read_manifest(d)
            same = (
                m.get("corpus", {}).get("fingerprint") == corpus.fingerprint
                and m.get("tokenizer", {}).get("fingerprint") == tokenizer.fingerprint
            )
            if same:
                return d
            raise DepthlabError(
                f"{d} already holds tokens of {m.get('corpus', {}).get('name')} with "
                f"{m.get('tokenizer', {}).get('name')}; choose another output dir or delete it"
            )
        if not str(_quiet_manifest(d).get("created_by", "")).startswith("depthlab"):
            raise DepthlabError(
                f"{d} holds a manifest.json not written by depthlab; not overwriting it"
            )
    else:
        _check_foreign(d)
    _write(d, corpus, tokenizer, progress)
    return d


OWN_FILES = {"tokenizer", "train.bin", "val.bin", MANIFEST}


def _check_foreign(d: Path) -> None:
    """Refuse a directory that holds anything but what `prepare` writes (a run, a user's
    own token files): only a new or empty one, or an earlier prepare's, is written into."""
    if not d.is_dir():
        return
    names = {p.name for p in d.iterdir() if not p.name.startswith(".")}
    if names - OWN_FILES:
        raise DepthlabError(f"{d} holds other files ({', '.join(sorted(names - OWN_FILES)[:3])}"
                            "); not writing token files into it (choose a new or empty "
                            "directory)")
    if names and not (d / MANIFEST).exists() and not (d / "tokenizer" / META_FILE).is_file():
        raise DepthlabError(f"{d} holds token files that depthlab did not write (no "
                            "manifest.json); not overwriting them")


def _quiet_manifest(d: Path) -> dict[str, Any]:
    try:
        return read_manifest(d)
    except DepthlabError:
        return {}


def _write(d: Path, corpus: Corpus, tokenizer: Tokenizer, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    import depthlab

    dtype = dtype_for_vocab(tokenizer.vocab_size)
    tokenizer.save(d / "tokenizer")
    splits: dict[str, Any] = {}
    # a user's tokenizer.json may lack characters of the corpus (byte and our BPE cannot)
    coverage = Coverage() if tokenizer.kind == "file" else None
    columns = ("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    # a live bar on a terminal (stderr); elsewhere one line per split, since a bar that is
    # not drawn shows nothing and leaves a stray blank line
    stderr = Console(stderr=True)
    live = progress and live_bar_shown(stderr)
    with Progress(*columns, console=stderr, disable=not live, transient=True) as bar:
        for split in SPLITS:
            what = (f"tokenizing {corpus.name if corpus.kind == 'kjv' else Path(corpus.name).name}"
                    f" [{split}]")
            n_docs = corpus.n_split_documents(split)  # type: ignore[arg-type]
            if progress and not live:
                print(f"{what}: {n_docs:,} {corpus.unit}(s)", file=sys.stderr, flush=True)
            task = bar.add_task(what, total=n_docs)
            chunks = _encode(corpus, split, tokenizer, lambda n, t=task: bar.advance(t, n),  # type: ignore[arg-type]
                             coverage)
            splits[split] = write_tokens(d / f"{split}.bin", chunks, dtype)
    separators = {s: corpus.n_split_documents(s) if tokenizer.eos_id is not None else 0  # type: ignore[arg-type]
                  for s in SPLITS}
    empty = [s for s in SPLITS if splits[s]["n_tokens"] <= separators[s]]
    if empty:  # nothing but the end-of-document tokens: every document was empty
        raise DepthlabError(f"corpus {corpus.name}: the {empty[0]} split holds no text "
                            f"({corpus.n_split_documents(empty[0])} {corpus.unit}(s), all empty)")  # type: ignore[arg-type]
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype_name(dtype),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "tokenizer": {
            "name": tokenizer.name,
            "kind": tokenizer.kind,
            "fingerprint": tokenizer.fingerprint,
            "path": "tokenizer",
            **({"coverage": coverage.summary(tokenizer)} if coverage is not None else {}),
        },
        "corpus": {
            "name": corpus.name,
            "kind": corpus.kind,
            "fingerprint": corpus.fingerprint,
            "split_rule": corpus.split_rule,
            "n_documents": {s: corpus.n_split_documents(s) for s in SPLITS},  # type: ignore[arg-type]
        },
        "n_tokens": {s: splits[s]["n_tokens"] for s in SPLITS},
        "splits": splits,
        "created_by": f"depthlab {depthlab.__version__}",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(d / MANIFEST, manifest)  # last: its presence marks the directory complete


def _encode(
    corpus: Corpus, split: Split, tokenizer: Tokenizer, advance: Any,
    coverage: Coverage | None = None,
) -> Iterator[np.ndarray]:
    """Encoded id chunks of one split, in document order."""
    batch: list[str] = []
    chars = 0
    for doc in corpus.documents(split):
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS:
            yield tokenizer.encode_documents(batch, coverage)
            advance(len(batch))
            batch, chars = [], 0
    if batch:
        yield tokenizer.encode_documents(batch, coverage)
        advance(len(batch))


def tokenizer_notes(manifest: dict[str, Any], configured: str | None = None) -> list[str]:
    """What a token directory's manifest says the tokenizer lost: text it could not
    represent, and document boundaries when it has no end-of-text token. `configured`:
    data.tokenizer; a tokenizer.json path there names the tokenizer in the notes (the
    manifest's may be another copy of the same file: token directories are shared by
    content)."""
    tok = manifest.get("tokenizer") or {}
    user = configured if configured not in (None, *BUILTIN_NAMES) else None
    name = user or tok.get("name") or "the tokenizer"
    notes = []
    cov = tok.get("coverage") or {}
    dropped, unknown = int(cov.get("dropped") or 0), int(cov.get("unknown_tokens") or 0)
    characters = int(cov.get("characters") or 0)
    if dropped or unknown:
        parts = []
        if dropped:
            share = dropped / max(characters, 1)
            parts.append(f"dropped {dropped:,} of {characters:,} non-space "
                         f"characters ({share:.2%}), having no token for them (the model never "
                         "sees them)")
        if unknown:
            parts.append(f"encoded {unknown:,} pieces as its unknown token (the model sees only "
                         "that token in their place)")
        examples = " ".join(repr(c) for c in cov.get("examples") or [])
        notes.append(f"{name} {' and '.join(parts)}{f'; e.g. {examples}' if examples else ''}")
    if "eos_id" in manifest and manifest["eos_id"] is None and tok.get("kind") == "file":
        notes.append(f"{name} has no end-of-text token (none named in tokenizer_config.json, "
                     "nor a common one such as </s>): documents are joined with no separator")
    return notes


def open_splits(cfg: DataConfig, progress: bool = True) -> TokenSplits:
    """Train/val token memmaps for `cfg`: a token directory as is, else `prepare` first."""
    token_dir = _token_dir_of(cfg)
    if token_dir is None:
        return open_token_dir(prepare(cfg, progress=progress))
    tokenizer = None
    if cfg.tokenizer not in ("byte", "bpe"):
        tokenizer = load_tokenizer_path(cfg.tokenizer)
    manifest = read_manifest(token_dir) if (token_dir / MANIFEST).exists() else {}
    recorded = manifest.get("tokenizer", {})
    if tokenizer is not None and recorded.get("fingerprint") not in (None, tokenizer.fingerprint):
        raise DepthlabError(
            f"{token_dir} was tokenized with {recorded.get('name')}, not {cfg.tokenizer}"
        )
    if cfg.tokenizer == "bpe" and recorded.get("kind") not in (None, "bpe"):
        own = recorded.get("name") if recorded.get("kind") == "file" else "byte"
        raise DepthlabError(f"{token_dir} was tokenized with {recorded.get('name')}, not bpe: "
                            f"train on it with data.tokenizer={own}, or give bpe the raw corpus")
    return open_token_dir(token_dir, tokenizer=tokenizer)
