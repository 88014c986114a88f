"""Data layer: corpora and their fixed split, tokenizers, token files, loaders."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
import torch

from depthlab.config import DataConfig
from depthlab.data import (
    ByteTokenizer,
    TrainLoader,
    corpus_text,
    eval_batches,
    load_corpus,
    load_tokenizer,
    open_splits,
    open_token_files,
    prepare,
    read_tokens,
    sample_sequences,
    write_tokens,
)
from depthlab.data.tokens import dtype_for_vocab
from depthlab.errors import DepthlabError


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLAB_CACHE", str(tmp_path / "cache"))


def _text_corpus(tmp_path, n_paragraphs=120):
    """A small multi-paragraph text file with repeated words (so BPE has merges)."""
    words = ["alpha", "beta", "gamma", "delta", "depth", "layer", "sparse", "the", "and"]
    rng = np.random.default_rng(0)
    paras = [" ".join(rng.choice(words, size=30)) + f" ünïcode {i}." for i in range(n_paragraphs)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(paras), encoding="utf-8")
    return path


def _cfg(tmp_path, **kw):
    return DataConfig(cache_dir=str(tmp_path / "cache"), **kw)


# --------------------------------------------------------------------------- corpora


def test_kjv_split_fixed_disjoint_and_small():
    train, val = corpus_text(DataConfig())
    assert (len(train), len(val)) == (1166, 23)  # 1189 chapters, every 50th is validation
    assert val[0].startswith("And Joseph fell upon his father's face")  # Genesis 50
    assert train[0].startswith("In the beginning God created")
    assert not set(train) & set(val)
    frac = sum(map(len, val)) / sum(map(len, train + val))
    assert 0.015 < frac < 0.025
    # fixed: same on a second read, and independent of val_fraction
    assert corpus_text(DataConfig(val_fraction=0.3)) == (train, val)


def test_text_and_jsonl_corpora_split_every_kth(tmp_path):
    path = _text_corpus(tmp_path, n_paragraphs=100)
    train, val = corpus_text(_cfg(tmp_path, corpus=str(path), val_fraction=0.1))
    assert (len(train), len(val)) == (90, 10)
    assert val[0].endswith("ünïcode 9.")  # paragraph index 9 = every 10th
    rows = [{"body": f"doc {i}"} for i in range(20)]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in rows))
    train, val = corpus_text(_cfg(tmp_path, corpus=str(jl), text_key="body", val_fraction=0.25))
    assert val == ["doc 3", "doc 7", "doc 11", "doc 15", "doc 19"]
    with pytest.raises(DepthlabError, match="no field 'text'"):
        corpus_text(_cfg(tmp_path, corpus=str(jl), val_fraction=0.25))


def test_folder_corpus_sorted_recursive(tmp_path):
    root = tmp_path / "docs"
    for i in range(10):
        sub = root / ("b" if i % 2 else "a")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:02d}.md").write_text(f"file {i}")
    (root / "skip.bin").write_bytes(b"\x00\x01")
    corpus = load_corpus(_cfg(tmp_path, corpus=str(root), val_fraction=0.2))
    assert corpus.kind == "folder" and corpus.n_documents == 10
    assert corpus.texts("val") == ["file 8", "file 9"]  # a/00..a/08 then b/01..b/09


def test_bad_corpus_paths(tmp_path):
    with pytest.raises(DepthlabError, match="no such file"):
        corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "nope.txt")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DepthlabError, match="no .txt or .md"):
        corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "empty")))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("one line only")
    with pytest.raises(DepthlabError, match=r"1 paragraphs or lines: at least 2 are needed "
                       r"\(one to train on, one to validate on\); add text$"):
        corpus_text(_cfg(tmp_path, corpus=str(tiny)))
    for lines, hint in ((2, "0.4"), (3, "0.2858"), (7, "0.1334")):
        tiny.write_text("".join(f"line {i}\n" for i in range(lines)))
        with pytest.raises(DepthlabError, match=rf"at least 50 .* \(set data.val_fraction={hint} "
                           "or more, or add text"):
            corpus_text(_cfg(tmp_path, corpus=str(tiny)))
        assert corpus_text(_cfg(tmp_path, corpus=str(tiny), val_fraction=float(hint)))  # works
        smaller = float(hint) - 1e-4  # and is the smallest (to 4 places) that does
        with pytest.raises(DepthlabError, match="at least"):
            corpus_text(_cfg(tmp_path, corpus=str(tiny), val_fraction=smaller))
    # a device is read more than once (hashed, counted, encoded): refused, never read
    with pytest.raises(DepthlabError, match="/dev/zero is not a regular file"):
        corpus_text(_cfg(tmp_path, corpus="/dev/zero"))


# --------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_roundtrips_unicode():
    tok = ByteTokenizer()
    text = "héllo wörld — 日本語 🙂\n"
    ids = tok.encode(text)
    assert max(ids) < 256 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    docs = tok.encode_documents(["ab", "ç"])
    assert docs.tolist() == [97, 98, 256, 0xC3, 0xA7, 256]
    assert (tok.vocab_size, tok.eos_id) == (257, 256)


def test_bpe_trains_on_train_split_and_is_cached(tmp_path):
    path = _text_corpus(tmp_path)
    cfg = _cfg(tmp_path, corpus=str(path), tokenizer="bpe", bpe_vocab_size=300)
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg)
    first = time.perf_counter() - t0
    assert tok.kind == "bpe" and 257 < tok.vocab_size <= 300 and tok.eos_id == 0
    text = "the sparse layer ünïcode 🙂"
    assert tok.decode(tok.encode(text)) == text
    cached = list((tmp_path / "cache" / "tokenizers").glob("bpe-*-300/tokenizer.json"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    t0 = time.perf_counter()
    again = load_tokenizer(cfg)
    assert again.fingerprint == tok.fingerprint
    assert cached[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert time.perf_counter() - t0 < max(first, 0.5)


def test_tokenizer_json_path_and_bad_path(tmp_path):
    tok = load_tokenizer(_cfg(tmp_path, corpus=str(_text_corpus(tmp_path)), tokenizer="bpe",
                              bpe_vocab_size=280))
    saved = tok.save(tmp_path / "tok")
    again = load_tokenizer(_cfg(tmp_path, tokenizer=str(saved / "tokenizer.json")))
    assert again.eos_id == tok.eos_id and again.encode("alpha beta") == tok.encode("alpha beta")
    with pytest.raises(DepthlabError, match="tokenizer"):
        load_tokenizer(_cfg(tmp_path, tokenizer=str(tmp_path / "missing.json")))
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(DepthlabError, match="not a valid tokenizer.json"):
        load_tokenizer(_cfg(tmp_path, tokenizer=str(bad)))


def _lossy_tokenizer(tmp_path, *, unk: bool):
    """A user tokenizer.json that cannot represent every character of _text_corpus: a
    word-level vocabulary of a few words (with or without an unknown token), no EOS."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["alpha", "beta", "gamma", "delta", "the", "and", "."])}
    if unk:
        vocab["[UNK]"] = len(vocab)
        tok = HFTok(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    else:  # a BPE over the same pieces, no unk token: other text is silently skipped
        tok = HFTok(models.BPE(vocab={**vocab, **{c: len(vocab) + i for i, c in
                                                 enumerate("abdeghlmnpt")}}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / ("unk" if unk else "nounk") / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_prepare_notes_what_a_user_tokenizer_cannot_represent(tmp_path, capsys):
    from depthlab.cli import main
    from depthlab.data.prepare import tokenizer_notes

    corpus = _text_corpus(tmp_path)
    text = corpus.read_text(encoding="utf-8")
    # BPE without unk: 'ü', 'ï', the digits, 'r', 'y', 's', 'o', ... have no token
    out = prepare(_cfg(tmp_path, corpus=str(corpus), tokenizer=str(_lossy_tokenizer(
        tmp_path, unk=False))), progress=False)
    cov = json.loads((out / "manifest.json").read_text())["tokenizer"]["coverage"]
    missing = set("abdeghlmnpt.")
    assert cov["characters"] == sum(not c.isspace() for c in text)
    assert cov["dropped"] == sum(not c.isspace() and c not in missing for c in text)
    assert cov["unknown_tokens"] == 0 and "ü" in cov["examples"]
    notes = tokenizer_notes(json.loads((out / "manifest.json").read_text()))
    assert len(notes) == 2
    assert re.search(rf"dropped {cov['dropped']:,} of {cov['characters']:,} non-space", notes[0])
    assert "never sees" in notes[0] and "no end-of-text token" in notes[1]
    # word level with [UNK]: every word outside the vocabulary is one unknown token
    unk = _lossy_tokenizer(tmp_path, unk=True)
    assert main(["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(unk),
                 "--out", str(tmp_path / "unk_tokens")]) in (0, None)
    err = capsys.readouterr().err
    words = re.findall(r"\w+|[^\w\s]+", text)
    known = {"alpha", "beta", "gamma", "delta", "the", "and", "."}
    assert f"encoded {sum(w not in known for w in words):,} pieces as its unknown token" in err
    assert "dropped" not in err.split("unknown token")[0]
    # a copy of that tokenizer elsewhere shares the cached tokens; the note names the copy
    copy = tmp_path / "copy" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_text(unk.read_text())
    for tok in (unk, copy):
        main(["data", "prepare", "--corpus", str(corpus), "--tokenizer", str(tok),
              "--set", f"data.cache_dir={tmp_path / 'shared'}"])
    assert len(list((tmp_path / "shared" / "tokens").iterdir())) == 1
    assert f"note: {copy} encoded" in capsys.readouterr().err
    # lossless tokenizers say nothing: byte, our BPE, a user tokenizer.json that is a BPE
    lossless = load_tokenizer(_cfg(tmp_path, corpus=str(corpus), tokenizer="bpe",
                                   bpe_vocab_size=280)).save(tmp_path / "bpe")
    for tok in ("byte", str(lossless / "tokenizer.json")):
        m = json.loads((prepare(_cfg(tmp_path, corpus=str(corpus), tokenizer=tok),
                                progress=False) / "manifest.json").read_text())
        assert tokenizer_notes(m) == []
        assert m["tokenizer"].get("coverage", {"dropped": 0})["dropped"] == 0


def test_unknown_token_of_each_tokenizer_model():
    """Unigram keeps unk_id, BPE / WordPiece / WordLevel an unk_token (or none)."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    from depthlab.data.tokenizer import Coverage, HFTokenizer

    unigram = HFTokenizer(HFTok(models.Unigram([("a", -1.0), ("<unk>", 0.0), ("b", -2.0)],
                                               unk_id=1)), "u", "file", None)
    wordpiece = HFTokenizer(HFTok(models.WordPiece({"x": 0, "[UNK]": 1}, unk_token="[UNK]")),
                            "w", "file", None)
    bpe = HFTokenizer(HFTok(models.BPE({"a": 0}, merges=[])), "b", "file", None)
    assert (unigram.unk_id, wordpiece.unk_id, bpe.unk_id) == (1, 1, None)
    cov = Coverage()
    unigram.encode_documents(["abzab", "ab"], cov)
    bpe_cov = Coverage()
    bpe.encode_documents(["abzab"], bpe_cov)
    assert cov.summary(unigram) == {"characters": 7, "dropped": 0, "unknown_tokens": 1,
                                    "examples": []}
    assert bpe_cov.summary(bpe) == {"characters": 5, "dropped": 3, "unknown_tokens": 0,
                                    "examples": ["b", "z"]}
    # a Metaspace prefix '▁' spells nothing: 'é' is still dropped; a normalizer that strips
    # accents on purpose drops nothing ('é' becomes 'e', which has a token)
    from tokenizers import decoders, normalizers, pre_tokenizers

    vocab = {"▁": 0, "a": 1, "c": 2, "f": 3, "e": 4, "▁c": 5}
    meta = HFTok(models.BPE(vocab, merges=[("▁", "c")]))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.decoder = decoders.Metaspace()
    meta_tok = HFTokenizer(meta, "m", "file", None)
    cov = Coverage()
    meta_tok.encode_documents(["café éé"], cov)
    assert cov.summary(meta_tok)["dropped"] == 3
    meta.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents()])
    stripped = HFTokenizer(meta, "s", "file", None)
    cov = Coverage()
    stripped.encode_documents(["café éé"], cov)
    assert cov.summary(stripped)["dropped"] == 0


# --------------------------------------------------------------------------- token files


def test_prepare_writes_manifest_and_reopens_identically(tmp_path):
    cfg = _cfg(tmp_path, corpus=str(_text_corpus(tmp_path)), val_fraction=0.1)
    out = prepare(cfg, progress=False)
    assert out.parent == tmp_path / "cache" / "tokens"
    m = json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and m["format_version"] == 1
    assert m["n_tokens"]["train"] == (out / "train.bin").stat().st_size // 2
    assert m["corpus"]["n_documents"] == {"train": 108, "val": 12}
    splits = open_splits(cfg)
    train_docs, val_docs = corpus_text(cfg)
    assert splits.tokenizer.decode(splits.val).count("ünïcode") == len(val_docs)
    assert int((splits.train == 256).sum()) == len(train_docs)  # one EOS per document
    mtime = (out / "train.bin").stat().st_mtime_ns
    assert prepare(cfg, progress=False) == out
    assert (out / "train.bin").stat().st_mtime_ns == mtime  # skipped: manifest valid
    again = open_splits(_cfg(tmp_path, corpus=str(out)))  # the prepared dir itself
    assert np.array_equal(again.train, splits.train) and np.array_equal(again.val, splits.val)
    assert again.tokenizer is not None and again.tokenizer.name == "byte"
    # bpe names a tokenizer to train, which byte-level tokens never came from
    with pytest.raises(DepthlabError, match="tokenized with byte, not bpe: train on it with "
                                            "data.tokenizer=byte"):
        open_splits(_cfg(tmp_path, corpus=str(out), tokenizer="bpe"))


def test_a_read_only_cache_is_refused_before_the_work_with_the_way_out(tmp_path, monkeypatch):
    """A read-only home (cluster nodes) gave only "Read-only file system: ~/.cache", after
    BPE training; a cache that is already prepared is still read."""
    import os

    from depthlab import outdir

    cfg = _cfg(tmp_path, corpus=str(_text_corpus(tmp_path)), val_fraction=0.1)
    out = prepare(cfg, progress=False)  # prepared while writable
    real_access = os.access
    monkeypatch.setattr(outdir.os, "access", lambda p, mode: (
        not str(p).startswith(str(tmp_path / "cache")) and real_access(p, mode)))
    assert prepare(cfg, progress=False) == out  # read, not written: fine
    advice = r"is not writable .*; set DEPTHLAB_CACHE \(or data.cache_dir\) to a writable"
    with pytest.raises(DepthlabError, match="cache directory .*/tokens/.*" + advice):
        prepare(_cfg(tmp_path, corpus=str(_text_corpus(tmp_path)), val_fraction=0.2),
                progress=False)
    with pytest.raises(DepthlabError, match="cache directory .*/tokenizers/bpe-.*" + advice):
        prepare(_cfg(tmp_path, corpus=cfg.corpus, tokenizer="bpe", bpe_vocab_size=300),
                progress=False)


def test_prepare_bpe_and_refuses_foreign_out_dir(tmp_path):
    corpus = str(_text_corpus(tmp_path))
    cfg = _cfg(tmp_path, corpus=corpus, tokenizer="bpe", bpe_vocab_size=300)
    out = prepare(cfg, out_dir=tmp_path / "toks", progress=False)
    splits = open_splits(_cfg(tmp_path, corpus=str(out)))
    assert splits.vocab_size == splits.tokenizer.vocab_size and splits.tokenizer.kind == "bpe"
    with pytest.raises(DepthlabError, match="already holds tokens"):
        prepare(_cfg(tmp_path, corpus=corpus), out_dir=out, progress=False)
    mine = tmp_path / "mine"  # a user's own token file, no manifest yet: never overwritten
    mine.mkdir()
    (mine / "train.bin").write_bytes(b"\x01\x00" * 8)
    with pytest.raises(DepthlabError, match="holds token files that depthlab did not write"):
        prepare(_cfg(tmp_path, corpus=corpus), out_dir=mine, progress=False)
    assert (mine / "train.bin").read_bytes() == b"\x01\x00" * 8
    run = tmp_path / "run"  # a run directory (it has a tokenizer/ too): never written into
    (run / "tokenizer").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    with pytest.raises(DepthlabError, match="holds other files \\(config.yaml\\)"):
        prepare(_cfg(tmp_path, corpus=corpus), out_dir=run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "tokenizer"]
    from depthlab.train.trainer import _token_dir_tokenizer_note

    note = _token_dir_tokenizer_note("byte", splits)  # byte is the default: say what is used
    assert note == (f"{out} holds tokens of the bpe-300 tokenizer; the run uses it "
                    "(data.tokenizer=byte applies only to raw text)")
    assert _token_dir_tokenizer_note("bpe", splits) is None
    (out / "manifest.json").unlink()  # an interrupted prepare (tokenizer/ written) is redone
    assert prepare(cfg, out_dir=out, progress=False) == out and (out / "manifest.json").is_file()


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    assert dtype_for_vocab(65536).itemsize == 2 and dtype_for_vocab(70000).itemsize == 4
    d = tmp_path / "big"
    ids = np.array([0, 65535, 65536, 69999] * 50, dtype=np.int64)
    info = write_tokens(d / "train.bin", [ids], dtype_for_vocab(70000))
    write_tokens(d / "val.bin", [ids[:40]], dtype_for_vocab(70000))
    assert info["bytes"] == 4 * len(ids)
    (d / "manifest.json").write_text(json.dumps({"dtype": "uint32", "vocab_size": 70000}))
    splits = open_splits(_cfg(tmp_path, corpus=str(d)))
    assert splits.train.dtype == np.uint32 and splits.vocab_size == 70000
    assert splits.train.tolist() == ids.tolist() and splits.tokenizer is None
    from depthlab.train.trainer import _token_dir_tokenizer_note

    # user token files have no tokenizer: naming bpe changes nothing, and the run says so
    assert "holds token ids without a tokenizer" in _token_dir_tokenizer_note("bpe", splits)
    assert _token_dir_tokenizer_note("byte", splits) is None


def test_user_raw_bin_and_npy(tmp_path):
    rng = np.random.default_rng(1)
    train, val = rng.integers(0, 1000, 5000), rng.integers(0, 1000, 700)
    raw = tmp_path / "raw"
    raw.mkdir()
    train.astype("<u2").tofile(raw / "train.bin")  # as OLMo writes it: no header
    val.astype("<u2").tofile(raw / "val.bin")
    (raw / "manifest.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1024}))
    s = open_splits(_cfg(tmp_path, corpus=str(raw)))
    assert s.vocab_size == 1024 and np.array_equal(s.train, train)
    s = open_token_files(raw / "train.bin", raw / "val.bin", dtype="uint16")
    assert s.vocab_size == int(max(train.max(), val.max())) + 1  # inferred
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "train.npy", train.astype(np.uint32))
    np.save(npy / "val.npy", val.astype(np.uint32))
    s = open_splits(_cfg(tmp_path, corpus=str(npy)))
    assert isinstance(s.train, np.memmap) and np.array_equal(s.val, val)


def test_corrupt_and_missing_token_files(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "train.bin").write_bytes(b"\x01\x00" * 100 + b"\x07")  # odd size
    (d / "manifest.json").write_text(json.dumps({"dtype": "uint16"}))
    with pytest.raises(DepthlabError, match=r"201 bytes is not a multiple of 2 \(uint16\)"):
        read_tokens(d / "train.bin", "uint16")
    with pytest.raises(DepthlabError, match="no val.bin or val.npy"):
        open_splits(_cfg(tmp_path, corpus=str(d)))
    empty = tmp_path / "empty_npy"  # no ids at all: said so, not "vocab_size must be >= 2"
    empty.mkdir()
    np.save(empty / "train.npy", np.zeros(0, dtype=np.uint16))
    np.save(empty / "val.npy", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DepthlabError, match="empty_npy: the token files are empty"):
        open_splits(_cfg(tmp_path, corpus=str(empty)))
    with pytest.raises(DepthlabError, match="token file not found"):
        read_tokens(d / "nothing.bin", "uint16")
    (d / "train.bin").write_bytes(b"\x01\x00" * 100)
    (d / "val.bin").write_bytes(b"\x01\x00" * 10)
    with pytest.raises(DepthlabError, match="needs a dtype"):
        read_tokens(d / "val.bin")
    (d / "manifest.json").write_text(json.dumps({"dtype": "uint16", "vocab_size": 1}))
    with pytest.raises(DepthlabError, match="token id 1 outside vocabulary of 1"):
        open_splits(_cfg(tmp_path, corpus=str(d)))
    manifest = {"dtype": "uint16", "splits": {"train": {"file": "train.bin", "n_tokens": 99}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DepthlabError, match="manifest.json says 99"):
        open_splits(_cfg(tmp_path, corpus=str(d)))
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(DepthlabError, match="not valid JSON"):
        open_splits(_cfg(tmp_path, corpus=str(d)))
    for bad, needle in [({"vocab_size": "abc"}, "vocab_size must be a positive integer"),
                        ({"vocab_size": [1]}, "vocab_size must be a positive integer"),
                        ({"dtype": 16}, "dtype must be a string"),
                        ({"splits": [1]}, "splits must map each split to an object")]:
        (d / "manifest.json").write_text(json.dumps({"dtype": "uint16", **bad}))
        with pytest.raises(DepthlabError, match=needle):
            open_splits(_cfg(tmp_path, corpus=str(d)))


# --------------------------------------------------------------------------- loaders


TOKENS = np.arange(10_000, dtype=np.uint32)  # distinct values: a window is its first token / T


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_loader_windows_and_determinism():
    a, b = TrainLoader(TOKENS, 16, 4, seed=3), TrainLoader(TOKENS, 16, 4, seed=3)
    x, y = a.next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, 0] + 16)
    assert (x[:, 0] % 16 == 0).all()  # windows start at multiples of T
    bx, _ = b.next_batch()
    assert torch.equal(x, bx)
    other = TrainLoader(TOKENS, 16, 4, seed=4).next_batch()[0]
    assert not torch.equal(x, other)


def test_loader_ranks_partition_an_epoch():
    loaders = [TrainLoader(TOKENS, 16, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    n = loaders[0].batches_per_epoch
    assert n == (len(TOKENS) - 1) // 16 // 8
    seen = [int(s) // 16 for ld in loaders for x, _ in _take(ld, n) for s in x[:, 0]]
    assert len(seen) == len(set(seen)) == n * 8
    assert loaders[0].epoch == 1 and loaders[0].cursor == 0
    # the next epoch is a different order
    assert not np.array_equal(loaders[0].epoch_windows(0), loaders[0].epoch_windows(1))


def test_loader_resume_is_exact():
    ref = TrainLoader(TOKENS, 32, 8, seed=7)  # 39 batches per epoch
    expected = _take(ref, 45)
    run = TrainLoader(TOKENS, 32, 8, seed=7)
    _take(run, 37)
    state = json.loads(json.dumps(run.state_dict()))  # survives serialisation
    resumed = TrainLoader(TOKENS, 32, 8, seed=7)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(_take(resumed, 8), expected[37:], strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    with pytest.raises(DepthlabError, match="seq_len was 32"):
        TrainLoader(TOKENS, 16, 8, seed=7).load_state_dict(state)


def test_eval_batches_fixed():
    first = eval_batches(TOKENS, 64, 4, 3)
    again = eval_batches(TOKENS, 64, 4, 3)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert first[0][0][:, 0].tolist() == [0, 64, 128, 192]  # the first windows, in order
    with pytest.raises(DepthlabError, match="validation split has 10,000 tokens"):
        eval_batches(TOKENS, 1024, 4, 3)


def test_seq_len_too_large_names_it():
    with pytest.raises(DepthlabError, match=r"train split has 10,000 tokens.*seq_len=4096"):
        TrainLoader(TOKENS, 4096, 4, seed=0)
    with pytest.raises(DepthlabError, match=r"N=20 sequences of T=1000 tokens from 10,000"):
        sample_sequences(TOKENS, 20, 1000, seed=0)


def test_sample_sequences_fixed_seed():
    a = sample_sequences(TOKENS, 8, 100, seed=1)
    assert a.shape == (8, 100) and a.dtype == torch.long
    assert torch.equal(a, sample_sequences(TOKENS, 8, 100, seed=1))
    assert not torch.equal(a, sample_sequences(TOKENS, 8, 100, seed=2))
    starts = a[:, 0].tolist()
    assert len(set(starts)) == 8 and all(s % 100 == 0 for s in starts)


def test_jsonl_and_folder_mistakes_are_named(tmp_path):
    """Each JSONL problem says what is wrong with which line; hidden files in a folder are
    not training text; a text folder with some other manifest.json is still text."""
    good = [json.dumps({"text": f"record {i}"}) for i in range(60)]
    cases = [
        ('{"text": 123}', "field 'text' is 123, not a string"),
        ('{"text": null}', "field 'text' is null, not a string"),
        ('"just a string"', "a str, not a JSON object"),
        ('{"body": "x"}', "no field 'text' (set data.text_key)"),
        (json.dumps({"text": "broken \ud800 half"}), "unpaired surrogate"),
    ]
    for bad, needle in cases:
        path = tmp_path / "c.jsonl"
        path.write_text("\n".join([*good[:10], bad, *good[10:]]) + "\n")
        with pytest.raises(DepthlabError, match=f"c.jsonl:11: .*{re.escape(needle)}"):
            corpus_text(_cfg(tmp_path, corpus=str(path)))
    (tmp_path / "a.json").write_text(json.dumps([{"text": f"r{i}"} for i in range(60)]))
    with pytest.raises(DepthlabError, match="a JSON array; give JSONL instead"):
        corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "a.json")))
    (tmp_path / "a.json").write_text(json.dumps([{"text": f"r{i}"} for i in range(60)],
                                                indent=1))  # the same, over many lines
    with pytest.raises(DepthlabError, match="a JSON array; give JSONL instead"):
        corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "a.json")))
    (tmp_path / "rows.jsonl").write_text("\n".join(f'["r{i}"]' for i in range(60)))
    with pytest.raises(DepthlabError, match=r"rows.jsonl:1: a list, not a JSON object"):
        corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "rows.jsonl")))  # records, not a file
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(good).encode())
    train, val = corpus_text(_cfg(tmp_path, corpus=str(tmp_path / "bom.jsonl")))
    assert train[0] == "record 0" and len(train) + len(val) == 60

    folder = tmp_path / "texts"
    (folder / ".git").mkdir(parents=True)
    for i in range(60):
        (folder / f"{i:02d}.txt").write_text(f"file {i}")
    (folder / ".git" / "HEAD.txt").write_text("ref: refs/heads/main")
    (folder / ".hidden.txt").write_text("secret")
    (folder / "manifest.json").write_text('{"description": "my dataset"}')
    train, val = corpus_text(_cfg(tmp_path, corpus=str(folder)))
    assert len(train) + len(val) == 60 and not any("refs" in t or "secret" in t for t in train)


def test_ids_far_beyond_any_vocabulary_need_a_manifest(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    np.save(d / "train.npy", np.array([1, 2, 99_000_000] * 100, dtype=np.int64))
    np.save(d / "val.npy", np.array([1, 2, 3] * 100, dtype=np.int64))
    with pytest.raises(DepthlabError, match="largest id is 99,000,000.*vocab_size in manifest"):
        open_splits(_cfg(tmp_path, corpus=str(d)))
    (d / "manifest.json").write_text(json.dumps({"vocab_size": 5, "splits": {
        "train": {"n_tokens": "abc"}}}))
    with pytest.raises(DepthlabError, match="splits.train.n_tokens must be a non-negative"):
        open_splits(_cfg(tmp_path, corpus=str(d)))


def test_a_split_of_empty_documents_is_refused(tmp_path):
    """Only end-of-document tokens would be written: say so instead of failing later with
    'too few tokens for eval_batches'."""
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(60):
        (folder / f"{i:02d}.txt").write_text("" if i == 49 else f"file {i}")  # val: every 50th
    with pytest.raises(DepthlabError, match=r"the val split holds no text \(1 file\(s\), all empty"):
        prepare(_cfg(tmp_path, corpus=str(folder)), out_dir=tmp_path / "out", progress=False)
