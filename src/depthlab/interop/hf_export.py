"""Export a DepthLM run/checkpoint as a stock Hugging Face transformers checkpoint.

`export_hf(RUN_OR_CKPT, OUT_DIR)` writes `model.safetensors`, `config.json`,
`generation_config.json` and the tokenizer (`tokenizer.json` +
`tokenizer_config.json`), loadable with `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` without custom code. The target class is chosen so
that it computes exactly the DepthLM function (see `depthlab.interop.arch`); the
result is checked by running both models on the same tokens before anything is
written, and variants without an exact stock equivalent are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from depthlab.config import ModelConfig, RunConfig
from depthlab.data.cache import tmp_name, umask_mode
from depthlab.errors import DepthlabError
from depthlab.interop.arch import (
    CLASS_NAMES,
    NATIVE_HINT,
    choose_arch,
    depthlab_to_hf,
    hf_config_kwargs,
)
from depthlab.paths import checkpoint_step, source_run_dir, trained_on_bare_ids

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from depthlab.model import DepthLM

EOS_TOKEN = "<|endoftext|>"
PROVENANCE_FILE = "depthlab_export.json"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ExportResult:
    out_dir: Path
    arch: str
    hf_class: str
    max_abs_diff: float | None
    tokenizer: str
    step: int | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- sources


def is_depthlab_source(path: Path) -> bool:
    """A run dir (config.yaml) or a checkpoint dir inside one."""
    return source_run_dir(path) is not None


def load_source(source: str | Path) -> tuple[DepthLM, RunConfig, Path, Path]:
    """(model, config, run_dir, checkpoint_dir) of a run dir or checkpoint dir."""
    from depthlab.train.trainer import load_run_model

    path = Path(source).expanduser()
    if not path.exists():
        raise DepthlabError(f"{path}: no such run or checkpoint directory")
    if not is_depthlab_source(path):
        raise DepthlabError(
            f"{path} is not a depthlab run (no config.yaml) nor a checkpoint dir "
            "(RUN/checkpoints/step_N with model.safetensors)"
        )
    model, cfg, ckpt = load_run_model(path)
    run_dir = ckpt.parent.parent  # RUN/checkpoints/step_N
    return model.float().eval(), cfg, run_dir, ckpt


# --------------------------------------------------------------------------- tokenizer


def byte_level_tokenizer(model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """The depthlab byte tokenizer as a stock fast tokenizer: id = UTF-8 byte, EOS = 256.

    A `tokenizers` BPE with the 256 ByteLevel symbols as its vocabulary and no merges,
    so every byte is its own token and its id equals the byte value.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS_TOKEN])
    assert tok.token_to_id(EOS_TOKEN) == 256
    kwargs: dict[str, Any] = {"tokenizer_object": tok, "eos_token": EOS_TOKEN}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(**kwargs)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (as used by ByteLevel)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def run_tokenizer(run_dir: Path | None, cfg: RunConfig):  # -> depthlab Tokenizer
    """The depthlab tokenizer a run was trained with (RUN/tokenizer, else data.tokenizer)."""
    from depthlab.data.tokenizer import ByteTokenizer, load_tokenizer_path

    if run_dir is not None and (Path(run_dir) / "tokenizer").is_dir():
        return load_tokenizer_path(Path(run_dir) / "tokenizer")
    if trained_on_bare_ids(run_dir, cfg.data.corpus):
        raise DepthlabError(
            f"{run_dir} was trained on token files that kept no tokenizer ({cfg.data.corpus}): "
            "it has no text tokenizer (eval --ppl scores its own token files)")
    spec = cfg.data.tokenizer
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        raise DepthlabError(
            f"{run_dir}: the run used data.tokenizer=bpe but has no tokenizer/ directory; "
            "cannot rebuild its vocabulary"
        )
    return load_tokenizer_path(spec)


def to_hf_tokenizer(tok: Any, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """Wrap a depthlab tokenizer as a transformers fast tokenizer with the same ids."""
    from transformers import PreTrainedTokenizerFast

    if getattr(tok, "kind", None) == "byte":
        return byte_level_tokenizer(model_max_length)
    inner = getattr(tok, "tok", None)
    if inner is None:
        raise DepthlabError(f"cannot convert tokenizer {tok!r} to a transformers tokenizer")
    inner = type(inner).from_str(inner.to_str())  # a private copy
    kwargs: dict[str, Any] = {"tokenizer_object": inner}
    if tok.eos_id is not None:
        kwargs["eos_token"] = inner.id_to_token(tok.eos_id)
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(**kwargs)


# --------------------------------------------------------------------------- model


@contextlib.contextmanager
def _no_init():
    """Skip transformers' random init when we overwrite every weight anyway."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        yield
        return
    with no_init_weights():
        yield


def to_hf_model(
    model: DepthLM,
    arch: str = "auto",
    eos_token_id: int | None = None,
    bos_token_id: int | None = None,
) -> tuple[PreTrainedModel, str]:
    """An in-memory stock transformers model computing the same function as `model`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg: ModelConfig = model.cfg
    arch = _choose_or_raise(cfg, arch)
    hf_cfg = AutoConfig.for_model(
        arch, **hf_config_kwargs(cfg, arch),
        eos_token_id=eos_token_id, bos_token_id=bos_token_id, pad_token_id=None,
    )
    with _no_init():
        hf = AutoModelForCausalLM.from_config(hf_cfg)
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    hf_sd = depthlab_to_hf(sd, cfg, arch)
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    if cfg.tie_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"depthlab -> {arch} weight mapping is incomplete: missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}"
        )
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf = hf.float().eval()
    return hf, arch


@torch.no_grad()
def max_logit_difference(model: DepthLM, hf: PreTrainedModel, n_tokens: int = 32,
                         seed: int = 0) -> tuple[float, float]:
    """(max |logits_depthlab - logits_hf|, max |logits_depthlab|) on random tokens."""
    cfg = model.cfg
    assert cfg.vocab_size is not None
    g = torch.Generator().manual_seed(seed)
    T = min(n_tokens, cfg.max_seq_len)
    ids = torch.randint(0, cfg.vocab_size, (2, T), generator=g)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ref = model(ids.to(device)).logits.float().cpu()
    model.train(was_training)
    hf_device = next(hf.parameters()).device
    out = hf(input_ids=ids.to(hf_device)).logits.float().cpu()
    return (ref - out).abs().max().item(), ref.abs().max().item()


def check_equivalent(model: DepthLM, hf: PreTrainedModel, arch: str) -> float:
    """Raise unless the stock model reproduces the DepthLM logits (fp32)."""
    diff, scale = max_logit_difference(model, hf)
    tol = 1e-4 * max(1.0, scale)
    if not diff <= tol:
        raise DepthlabError(
            f"export check failed: {arch} logits differ from DepthLM by {diff:.3g} "
            f"(tolerance {tol:.1g}); nothing was written (this is a depthlab bug, please report)"
        )
    return diff


def export_model(
    model: DepthLM,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase | None = None,
    arch: str = "auto",
    dtype: str = "float32",
    verify: bool = True,
    overwrite: bool = False,
    provenance: dict[str, Any] | None = None,
    notes: list[str] | None = None,
) -> ExportResult:
    """Write `model` (+ tokenizer) as a stock transformers checkpoint in `out_dir`.

    `notes` are the caller's remarks on the export; they go to the provenance file with
    the model's own."""
    if dtype not in DTYPES:
        raise DepthlabError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    out = Path(out_dir).expanduser()
    _check_out_dir(out, overwrite)
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    bos = tokenizer.bos_token_id if tokenizer is not None else None
    hf, arch = to_hf_model(model, arch, eos_token_id=eos, bos_token_id=bos)
    diff = check_equivalent(model, hf, arch) if verify else None
    notes = list(notes or [])
    if note := model.cfg.placement_note():
        notes.append(note)
    if model.cfg.norm_placement == "scaled":
        notes.append("LayerNorm Scaling folded into the RMSNorm gains (1/sqrt(l+1))")
    if arch == "qwen2_moe":
        notes.append("Qwen2-MoE: shared-expert gate = 0 (sigmoid 0.5), shared down_proj x2, "
                     "q/k/v biases = 0" + ("" if model.cfg.moe and model.cfg.moe.shared_expert
                                           else ", zero width-1 shared expert"))
    hf = hf.to(DTYPES[dtype])
    tmp = tmp_name(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        hf.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            if (tmp / "tokenizer_config.json").is_file():
                _portable_tokenizer_class(tmp / "tokenizer_config.json")
        for weights in tmp.glob("*.safetensors"):
            umask_mode(weights)
        files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
        info = {"arch": arch, "hf_class": CLASS_NAMES[arch], "dtype": dtype,
                "max_abs_logit_diff": diff, "notes": notes,
                "depthlab_model": model.cfg.model_dump(mode="json"), **(provenance or {}),
                "files": files}
        (tmp / PROVENANCE_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _replace_export(tmp, out, [*files, PROVENANCE_FILE])
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    tok_name = type(tokenizer).__name__ if tokenizer is not None else "none"
    tok_name = FAST_TOKENIZER if tok_name == "TokenizersBackend" else tok_name
    return ExportResult(out, arch, CLASS_NAMES[arch], diff, tok_name, notes=notes)


FAST_TOKENIZER = "PreTrainedTokenizerFast"


def _portable_tokenizer_class(config_file: Path) -> None:
    """Name the tokenizer class `PreTrainedTokenizerFast`, which every transformers version
    resolves (transformers 5 writes its own new name, TokenizersBackend, which 4.x lacks;
    in 5.x the old name is an alias of it)."""
    config = json.loads(config_file.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = FAST_TOKENIZER
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _replace_export(tmp: Path, out: Path, files: list[str]) -> None:
    """Move a finished export from `tmp` to `out`. An earlier export there loses the files
    it listed (all of it, if it predates the list); anything else a user put there stays."""
    if not out.exists():
        os.replace(tmp, out)
        return
    try:
        earlier = json.loads((out / PROVENANCE_FILE).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        earlier = None
    if not isinstance(earlier, list):
        shutil.rmtree(out)
        os.replace(tmp, out)
        return
    (out / PROVENANCE_FILE).unlink(missing_ok=True)  # first: a half-replaced dir is no export
    root = out.resolve()
    for name in earlier:  # only files inside `out`, whatever the list says
        path = (out / name).resolve() if isinstance(name, str) else None
        if path is not None and path.is_relative_to(root) and path.is_file():
            path.unlink()
    for name in files:  # the provenance file last: it marks the export complete
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / name, out / name)


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """An empty or new directory, or (with overwrite) an earlier depthlab export: the only
    kind of directory the export replaces as a whole."""
    if out.exists() and not out.is_dir():
        raise DepthlabError(f"{out} exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / PROVENANCE_FILE).is_file():
        what = "an HF checkpoint not written by depthlab export" if (
            out / "config.json").is_file() else "not an export"
        raise DepthlabError(f"{out} exists, is not empty and is {what}; not replacing it, "
                            "choose another output directory")
    if not overwrite:
        raise DepthlabError(f"{out} already holds an export; pass --overwrite to replace it")


def export_hf(
    source: str | Path,
    out_dir: str | Path,
    arch: str = "auto",
    dtype: str = "float32",
    verify: bool = True,
    overwrite: bool = False,
) -> ExportResult:
    """Export a depthlab run dir (latest checkpoint) or checkpoint dir to `out_dir`."""
    model, cfg, run_dir, ckpt = load_source(source)
    choose = _choose_or_raise(model.cfg, arch)  # refuse before touching the tokenizer
    bare = trained_on_bare_ids(run_dir, cfg.data.corpus)
    tok = None if bare else to_hf_tokenizer(run_tokenizer(run_dir, cfg), cfg.model.max_seq_len)
    step = checkpoint_step(ckpt)
    notes = ["no tokenizer exported: the run was trained on token files that kept none; "
             "add the tokenizer that made them"] if bare else []
    result = export_model(
        model, out_dir, tok, choose, dtype, verify, overwrite,
        provenance={"source_run": str(run_dir.resolve()), "checkpoint": str(ckpt.resolve()),
                    "step": step},
        notes=notes,
    )
    result.step = step
    return result


def _choose_or_raise(cfg: ModelConfig, arch: str) -> str:
    try:
        return choose_arch(cfg, arch)
    except ValueError as err:
        hint = NATIVE_HINT
        if arch != "auto":
            with contextlib.suppress(ValueError):
                hint = f"--arch {choose_arch(cfg)} represents it exactly"
        raise DepthlabError(f"cannot export to Hugging Face: {err}; {hint}") from None
