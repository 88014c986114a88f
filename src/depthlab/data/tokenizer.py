"""Tokenizers: raw bytes, a locally trained byte-level BPE, or any `tokenizer.json`.

All three share one small interface (`Tokenizer`) so token files, the trainer and
the report never care which one made the ids. BPE is trained on the training split
only (validation text never leaks into the vocabulary) and cached under
`<cache>/tokenizers/` keyed by (corpus fingerprint, vocab size), so a second call
loads it instead of retraining.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from depthlab.config import DataConfig
from depthlab.data.cache import cache_root, check_cache_writable, read_json, tmp_name, write_json
from depthlab.data.corpus import Corpus, is_token_dir, load_corpus
from depthlab.errors import DepthlabError

META_FILE = "depthlab_tokenizer.json"
"""Written beside tokenizer.json by `Tokenizer.save`: kind, name, eos id."""
EOS_TOKEN = "<|endoftext|>"
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclass
class Coverage:
    """What a tokenizer could not represent in the text it encoded.

    A tokenizer without an unknown token (a BPE without byte fallback, say) silently
    drops characters that no token spells; one with an unknown token maps them to it.
    Token offsets cannot count the drops (tokenizers shifts them after a dropped
    character), so each distinct character is encoded on its own once at the end (see
    `HFTokenizer.drops`) and counted as dropped wherever it occurs.
    """

    chars: Counter[str] = field(default_factory=Counter)
    unknown_tokens: int = 0

    MAX_EXAMPLES = 5

    def add(self, text: str, ids: list[int], unk_id: int | None) -> None:
        self.chars.update(text)
        if unk_id is not None:
            self.unknown_tokens += ids.count(unk_id)

    def summary(self, tokenizer: HFTokenizer) -> dict[str, object]:
        """{characters, dropped, unknown_tokens, examples}: non-space characters seen,
        those dropped, tokens that are the unknown token, the most frequent dropped ones."""
        text_chars = {c: n for c, n in self.chars.items() if not c.isspace()}
        lost = sorted(((n, c) for c, n in text_chars.items() if tokenizer.drops(c)),
                      reverse=True)
        return {"characters": sum(text_chars.values()), "dropped": sum(n for n, _ in lost),
                "unknown_tokens": self.unknown_tokens,
                "examples": [c for _, c in lost[: self.MAX_EXAMPLES]]}


class Tokenizer(ABC):
    """Text <-> ids. `eos_id` separates documents in token files (None: nothing)."""

    name: str
    kind: str
    vocab_size: int
    eos_id: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]: ...

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str: ...

    @abstractmethod
    def save(self, directory: str | Path) -> Path:
        """Write everything needed to reload with `load_tokenizer_path(directory)`."""

    @property
    @abstractmethod
    def fingerprint(self) -> str:
        """Changes whenever the id mapping changes: keys cached token files."""

    def encode_documents(self, texts: Sequence[str], coverage: Coverage | None = None) -> np.ndarray:
        """Concatenated ids of `texts`, each followed by EOS (when there is one). Tokenizers
        that can lose text add what they saw to `coverage` (HFTokenizer)."""
        out: list[int] = []
        for text in texts:
            out += self.encode(text)
            if self.eos_id is not None:
                out.append(self.eos_id)
        return np.asarray(out, dtype=np.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOS = 256: no training, works on any text."""

    name = "byte"
    kind = "byte"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_documents(self, texts: Sequence[str], coverage: Coverage | None = None) -> np.ndarray:
        """Bytes represent every text: nothing is ever added to `coverage`."""
        sep = b"" if self.eos_id is None else b"\x00"
        parts: list[np.ndarray] = []
        for text in texts:
            parts.append(np.frombuffer(text.encode("utf-8") + sep, dtype=np.uint8))
        if not parts:
            return np.zeros(0, dtype=np.int64)
        ids = np.concatenate(parts).astype(np.int64)
        # Put EOS where each document ends (the placeholder byte above).
        ends = np.cumsum([len(p) for p in parts]) - 1
        ids[ends] = self.eos_id
        return ids

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        write_json(d / META_FILE, {"kind": "byte", "name": self.name, "eos_id": self.eos_id})
        return d

    @property
    def fingerprint(self) -> str:
        return "byte-v1"


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` (trained BPE or a user's tokenizer.json)."""

    def __init__(self, tok: object, name: str, kind: str, eos_id: int | None) -> None:
        self.tok = tok
        self.name = name
        self.kind = kind
        self.eos_id = eos_id
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))  # type: ignore[attr-defined]

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids])  # type: ignore[attr-defined]

    @functools.cached_property
    def unk_id(self) -> int | None:
        """Id of the model's unknown token (None: it has none, unknown text is dropped).
        Read from the serialised model: Unigram keeps an `unk_id`, the others an
        `unk_token`, and the Python objects do not expose both."""
        model = json.loads(self.tok.to_str()).get("model") or {}  # type: ignore[attr-defined]
        if isinstance(model.get("unk_id"), int):
            return model["unk_id"]
        unk = model.get("unk_token")
        return self.tok.token_to_id(unk) if isinstance(unk, str) else None  # type: ignore[attr-defined]

    def drops(self, char: str) -> bool:
        """Whether encoding `char` loses it: no token (nor the unknown token) spells what
        the normalizer keeps of it. Checked on the decoded text and on the token strings,
        so that prefixes such as Metaspace's '▁' do not count as spelling it."""
        ids = self.encode(char)
        if self.unk_id is not None and self.unk_id in ids:
            return False  # counted as an unknown token
        normalizer = self.tok.normalizer  # type: ignore[attr-defined]
        kept = normalizer.normalize_str(char) if normalizer is not None else char
        kept = "".join(c for c in kept if not c.isspace())
        if not kept:
            return False  # the normalizer removes it on purpose (e.g. StripAccents)
        shown = self.decode(ids) + "".join(
            self.tok.id_to_token(i) or "" for i in ids)  # type: ignore[attr-defined]
        return not all(c in shown for c in kept)

    def encode_documents(self, texts: Sequence[str], coverage: Coverage | None = None) -> np.ndarray:
        encs = self.tok.encode_batch(list(texts), add_special_tokens=False)  # type: ignore[attr-defined]
        unk_id = self.unk_id if coverage is not None else None
        out: list[int] = []
        for text, enc in zip(texts, encs, strict=True):
            if coverage is not None:
                coverage.add(text, enc.ids, unk_id)
            out += enc.ids
            if self.eos_id is not None:
                out.append(self.eos_id)
        return np.asarray(out, dtype=np.int64)

    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = tmp_name(d / "tokenizer.json")
        self.tok.save(str(tmp))  # type: ignore[attr-defined]
        tmp.replace(d / "tokenizer.json")
        write_json(d / META_FILE, {"kind": self.kind, "name": self.name, "eos_id": self.eos_id})
        return d

    @property
    def fingerprint(self) -> str:
        text = self.tok.to_str()  # type: ignore[attr-defined]
        return hashlib.sha256(f"{text}\x1f{self.eos_id}".encode()).hexdigest()


# --------------------------------------------------------------------------- loading


def load_tokenizer(cfg: DataConfig, corpus: Corpus | None = None) -> Tokenizer:
    """The tokenizer named by `cfg.tokenizer`: 'byte', 'bpe', or a tokenizer.json path.

    When `cfg.corpus` is a prepared token directory that saved its tokenizer, that
    tokenizer is returned for 'byte'/'bpe' (the ids in the files must match it).
    """
    spec = cfg.tokenizer
    if spec not in ("byte", "bpe"):
        return load_tokenizer_path(spec)
    if corpus is None and cfg.corpus != "kjv":
        token_dir = Path(cfg.corpus).expanduser()
        if is_token_dir(token_dir):
            saved = token_dir / "tokenizer"
            if (saved / META_FILE).is_file():
                return load_tokenizer_path(saved)
            if spec == "bpe":
                raise DepthlabError(
                    f"{token_dir} holds tokens, not text: cannot train a bpe tokenizer on it "
                    "(set data.tokenizer to its tokenizer.json)"
                )
    if spec == "byte":
        return ByteTokenizer()
    return bpe_tokenizer(corpus or load_corpus(cfg), cfg.bpe_vocab_size, cfg.cache_dir)


def load_tokenizer_path(path: str | Path) -> Tokenizer:
    """A tokenizer.json file, or a directory holding one (or a saved byte tokenizer)."""
    p = Path(path).expanduser()
    if p.is_dir():
        meta = read_json(p / META_FILE, "tokenizer metadata") if (p / META_FILE).is_file() else {}
        if meta.get("kind") == "byte":
            return ByteTokenizer()
        file = p / "tokenizer.json"
        if not file.is_file():
            raise DepthlabError(f"tokenizer directory {p} holds no tokenizer.json")
        tok = _read_hf(file)
        eos = meta["eos_id"] if "eos_id" in meta else _find_eos(tok, file)
        return HFTokenizer(tok, meta.get("name", str(p.resolve())), meta.get("kind", "file"), eos)
    if not p.is_file():
        raise DepthlabError(
            f"tokenizer '{path}': not 'byte', 'bpe', or an existing tokenizer.json path"
        )
    tok = _read_hf(p)
    return HFTokenizer(tok, str(p.resolve()), "file", _find_eos(tok, p))


def _read_hf(file: Path) -> object:
    from tokenizers import Tokenizer as HFTok

    try:
        return HFTok.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on bad files
        first = str(err).splitlines()[0] if str(err) else err.__class__.__name__
        raise DepthlabError(f"{file}: not a valid tokenizer.json ({first})") from None


def _find_eos(tok: object, file: Path) -> int | None:
    """EOS from a neighbouring tokenizer_config.json, else common special tokens."""
    names: list[str] = []
    config = file.with_name("tokenizer_config.json")
    if config.is_file():
        try:
            eos = json.loads(config.read_text()).get("eos_token")
        except (json.JSONDecodeError, AttributeError):
            eos = None
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str):
            names.append(eos)
    for name in [*names, *EOS_CANDIDATES]:
        idx = tok.token_to_id(name)  # type: ignore[attr-defined]
        if idx is not None:
            return int(idx)
    return None


# --------------------------------------------------------------------------- bpe


def bpe_cache_dir(corpus: Corpus, vocab_size: int, cache_dir: str | None) -> Path:
    return cache_root(cache_dir) / "tokenizers" / f"bpe-{corpus.fingerprint[:16]}-{vocab_size}"


def bpe_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: str | None = None) -> Tokenizer:
    """Byte-level BPE of `vocab_size` trained on the corpus' train split, cached."""
    d = bpe_cache_dir(corpus, vocab_size, cache_dir)
    if (d / META_FILE).is_file() and (d / "tokenizer.json").is_file():
        return load_tokenizer_path(d)
    check_cache_writable(d)
    n_docs = corpus.n_split_documents("train")
    print(f"training a {vocab_size:,}-token BPE tokenizer on {corpus.name} ({n_docs:,} "
          f"documents; once, then cached in {d})", file=sys.stderr, flush=True)
    tok = train_bpe(corpus.documents("train"), vocab_size, n_docs,
                    progress=sys.stderr.isatty())
    tok.name = f"bpe-{vocab_size}"
    tok.kind = "bpe"
    tok.save(d)
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int, length: int | None = None,
              progress: bool = False) -> HFTokenizer:
    """Train a GPT-2-style byte-level BPE with `<|endoftext|>` as id 0.

    Every byte is in the initial alphabet, so any text encodes without unknowns; a
    small corpus may stop short of `vocab_size` when no pair is left to merge.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,  # the tokenizers library's own bar (terminals only)
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    return HFTokenizer(tok, f"bpe-{vocab_size}", "bpe", tok.token_to_id(EOS_TOKEN))
