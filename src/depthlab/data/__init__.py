"""Data layer: corpus -> tokenizer -> token memmaps -> batches.

- `corpus`: built-in `kjv` and user text/JSONL/folders, with a fixed document split.
- `tokenizer`: byte, locally trained byte-level BPE, or any tokenizer.json.
- `tokens`: raw uint16/uint32 token files + manifest.json (also user-brought files).
- `prepare`: the cached tokenization pipeline and `open_splits`, the call training uses.
- `loader`: deterministic, resumable, rank-sharded training batches; fixed eval sets.
"""

from depthlab.data.corpus import Corpus, corpus_text, kjv_chapters, load_corpus
from depthlab.data.loader import TrainLoader, eval_batches, sample_sequences
from depthlab.data.prepare import open_splits, prepare
from depthlab.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    load_tokenizer_path,
    train_bpe,
)
from depthlab.data.tokens import (
    TokenSplits,
    open_token_dir,
    open_token_files,
    read_tokens,
    write_tokens,
)

__all__ = [
    "ByteTokenizer",
    "Corpus",
    "HFTokenizer",
    "TokenSplits",
    "Tokenizer",
    "TrainLoader",
    "corpus_text",
    "eval_batches",
    "kjv_chapters",
    "load_corpus",
    "load_tokenizer",
    "load_tokenizer_path",
    "open_splits",
    "open_token_dir",
    "open_token_files",
    "prepare",
    "read_tokens",
    "sample_sequences",
    "train_bpe",
    "write_tokens",
]
