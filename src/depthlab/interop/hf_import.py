"""Import a Llama-family Hugging Face checkpoint into a DepthLM with the same logits.

`import_hf(path_or_model)` returns `(DepthLM, ModelConfig)`; `write_run` turns that
into a depthlab run directory (config.yaml, tokenizer/, checkpoints/step_0000000/
model.safetensors, no optimizer state) that `load_run_model` reads. `keep_layers`
selects (and may reorder or repeat) the HF layers that become the DepthLM blocks,
for controlled depth changes.

Accepted: llama, mistral (no sliding window), qwen2 (only with all-zero q/k/v
biases), qwen3, and the architectures `depthlab export` writes (glm4 with full
rotary and no biases, mixtral, qwen2_moe with a zero shared-expert gate, qwen3_moe).
Everything else is refused with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from pydantic import ValidationError

from depthlab.config import DataConfig, ModelConfig, RunConfig
from depthlab.errors import ConfigError, DepthlabError
from depthlab.interop.arch import hf_to_depthlab
from depthlab.paths import (
    CKPT_DIR,
    CONFIG_FILE,
    METRICS_FILE,
    WEIGHTS_FILE,
    checkpoint_dirs,
    holds_other_files,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from depthlab.model import DepthLM

IMPORT_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "glm4", "mixtral", "qwen2_moe", "qwen3_moe")
_WEIGHT_LAYOUT = {"llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "qwen3",
                  "glm4": "glm4", "mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
                  "qwen3_moe": "qwen3_moe"}


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    return getattr(cfg, name, default)


def _refuse(model_type: str, why: str) -> DepthlabError:
    return DepthlabError(f"cannot import {model_type} checkpoint: {why}")


def _rope_theta(hf_cfg: Any, mt: str) -> float:
    params = _get(hf_cfg, "rope_parameters") or {}
    if isinstance(params, dict) and params:
        if "full_attention" in params and isinstance(params["full_attention"], dict):
            params = params["full_attention"]
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise _refuse(mt, f"RoPE scaling type {rope_type!r} is not supported (DepthLM uses "
                              "plain RoPE)")
        if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise _refuse(mt, "partial rotary embeddings are not supported (DepthLM rotates the "
                              "whole head)")
        theta = params.get("rope_theta")
        if theta is not None:
            return float(theta)
    scaling = _get(hf_cfg, "rope_scaling")
    if scaling:
        raise _refuse(mt, f"RoPE scaling {scaling!r} is not supported")
    return float(_get(hf_cfg, "rope_theta", 10000.0))


def _moe_layers(hf_cfg: Any, n_layers: int) -> list[int]:
    step = int(_get(hf_cfg, "decoder_sparse_step", 1) or 1)
    only = set(_get(hf_cfg, "mlp_only_layers", None) or [])
    return [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]


def model_config_from_hf(
    hf_cfg: PretrainedConfig,
    keep_layers: list[int] | None = None,
    max_seq_len: int | None = None,
    shared_expert: bool | None = None,
) -> tuple[ModelConfig, str, list[int]]:
    """(DepthLM config, weight layout, HF layer of each block) or a DepthlabError."""
    mt = str(_get(hf_cfg, "model_type", "?"))
    if mt not in IMPORT_ARCHS:
        raise _refuse(mt, f"model_type {mt!r} is not supported (supported: "
                          f"{', '.join(IMPORT_ARCHS)})")
    act = _get(hf_cfg, "hidden_act", "silu")
    if act != "silu":
        raise _refuse(mt, f"hidden_act={act} (DepthLM's MLP is SwiGLU with SiLU)")
    d, n_heads = int(hf_cfg.hidden_size), int(hf_cfg.num_attention_heads)
    head_dim = _get(hf_cfg, "head_dim") or d // n_heads
    if head_dim * n_heads != d:
        raise _refuse(mt, f"head_dim={head_dim} x {n_heads} heads != hidden_size={d} "
                          "(DepthLM derives head_dim = d_model / n_heads)")
    if _get(hf_cfg, "attention_bias", False) and mt != "qwen2":
        raise _refuse(mt, "attention_bias=true (DepthLM attention has no biases)")
    if _get(hf_cfg, "mlp_bias", False):
        raise _refuse(mt, "mlp_bias=true (DepthLM's MLP has no biases)")
    layer_types = _get(hf_cfg, "layer_types") or []
    window = _get(hf_cfg, "sliding_window")
    uses_window = _get(hf_cfg, "use_sliding_window", True)
    if "sliding_attention" in layer_types or (
        window and uses_window and window < int(hf_cfg.max_position_embeddings)
    ):
        raise _refuse(mt, f"sliding-window attention (window {window}) is not supported")
    n_layers = int(hf_cfg.num_hidden_layers)
    layer_map = list(range(n_layers)) if keep_layers is None else [int(i) for i in keep_layers]
    bad = [i for i in layer_map if not 0 <= i < n_layers]
    if bad or not layer_map:
        raise DepthlabError(f"keep_layers {bad or '[]'} invalid: the checkpoint has layers "
                            f"0..{n_layers - 1}")
    raw: dict[str, Any] = {
        "vocab_size": int(hf_cfg.vocab_size),
        "n_layers": len(layer_map),
        "d_model": d,
        "n_heads": n_heads,
        "n_kv_heads": int(_get(hf_cfg, "num_key_value_heads") or n_heads),
        "mlp_hidden": int(hf_cfg.intermediate_size),
        "norm": "rmsnorm",
        "norm_eps": float(hf_cfg.rms_norm_eps),
        "norm_placement": "peri" if mt == "glm4" else "pre",
        "qk_norm": mt in ("qwen3", "qwen3_moe"),
        "tie_embeddings": bool(_get(hf_cfg, "tie_word_embeddings", False)),
        "rope_theta": _rope_theta(hf_cfg, mt),
        "max_seq_len": int(max_seq_len or hf_cfg.max_position_embeddings),
    }
    if mt in ("mixtral", "qwen2_moe", "qwen3_moe"):
        if mt == "mixtral":
            src_moe = list(range(n_layers))
            moe: dict[str, Any] = {
                "num_experts": int(hf_cfg.num_local_experts),
                "top_k": int(hf_cfg.num_experts_per_tok),
                "expert_hidden": int(hf_cfg.intermediate_size),
                "renormalize": True,
            }
        else:
            src_moe = _moe_layers(hf_cfg, n_layers)
            moe = {
                "num_experts": int(hf_cfg.num_experts),
                "top_k": int(hf_cfg.num_experts_per_tok),
                "expert_hidden": int(hf_cfg.moe_intermediate_size),
                "renormalize": bool(hf_cfg.norm_topk_prob),
            }
        if mt == "qwen2_moe":
            has_shared = True if shared_expert is None else shared_expert
            moe["shared_expert"] = has_shared
            if has_shared:
                moe["shared_expert_hidden"] = int(hf_cfg.shared_expert_intermediate_size)
        new_moe = [new for new, src in enumerate(layer_map) if src in src_moe]
        if not new_moe:
            raw["moe"] = None
        else:
            moe["layers"] = None if len(new_moe) == len(layer_map) else new_moe
            raw["moe"] = moe
    try:
        mcfg = ModelConfig.model_validate(raw)
    except ValidationError as err:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
        raise _refuse(mt, f"no valid DepthLM config ({why})") from None
    return mcfg, _WEIGHT_LAYOUT[mt], layer_map


def _load_hf_model(path_or_model: str | Path | PreTrainedModel) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

    from depthlab.probe.loading import check_hub_id

    if isinstance(path_or_model, PreTrainedModel):
        return path_or_model
    local = Path(path_or_model).expanduser()
    if local.exists():
        path = str(local)
    else:
        check_hub_id(path_or_model)
        path = str(path_or_model)
    try:
        hf_cfg = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise DepthlabError(f"{path_or_model}: not a Hugging Face model directory or id "
                            f"({str(err).splitlines()[0]})") from None
    model_config_from_hf(hf_cfg)  # refuse before loading the weights
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, SafetensorError) as err:
        raise DepthlabError(f"{path_or_model}: cannot load weights ({str(err).splitlines()[0]})") \
            from None


def import_hf(
    path_or_model: str | Path | PreTrainedModel,
    keep_layers: list[int] | None = None,
    max_seq_len: int | None = None,
    verify: bool = True,
) -> tuple[DepthLM, ModelConfig]:
    """Load a Hugging Face causal LM (dir, hub id or model object) into a DepthLM.

    With all layers kept, the DepthLM reproduces the HF logits (checked on random
    tokens when `verify`). Raises DepthlabError for anything without an exact mapping.
    """
    from depthlab.model import DepthLM

    hf = _load_hf_model(path_or_model)
    hf_sd = {k: v.detach().float().cpu() for k, v in hf.state_dict().items()}
    mt = str(hf.config.model_type)
    shared = None
    if mt == "qwen2_moe":
        src = _moe_layers(hf.config, int(hf.config.num_hidden_layers))
        key = "model.layers.{}.mlp.shared_expert.down_proj.weight"
        shared = not all(hf_sd[key.format(i)].abs().max().item() == 0 for i in src)
    mcfg, layout, layer_map = model_config_from_hf(hf.config, keep_layers, max_seq_len, shared)
    try:
        sd = hf_to_depthlab(hf_sd, mcfg, layout, layer_map)
    except ValueError as err:
        raise _refuse(mt, str(err)) from None
    except KeyError as err:
        raise _refuse(mt, f"weight {err} not found (unexpected checkpoint layout)") from None
    if "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["tok_embeddings.weight"]
    model = DepthLM(mcfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise _refuse(mt, f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    if verify and keep_layers is None:
        _check_same_logits(model, hf, mt)
    return model, mcfg


@torch.no_grad()
def _check_same_logits(model: DepthLM, hf: PreTrainedModel, mt: str) -> float:
    cfg = model.cfg
    assert cfg.vocab_size is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, min(16, cfg.max_seq_len)), generator=g)
    was_training = hf.training
    hf.eval()
    ref = hf(input_ids=ids.to(next(hf.parameters()).device)).logits.float().cpu()
    hf.train(was_training)
    out = model(ids).logits.float()
    diff = (ref - out).abs().max().item()
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    if not diff <= tol:
        raise DepthlabError(f"import check failed: DepthLM logits differ from {mt} by {diff:.3g} "
                            f"(tolerance {tol:.1g}); the checkpoint uses a feature depthlab does "
                            "not model")
    return diff


# --------------------------------------------------------------------------- run dirs


def write_run(
    model: DepthLM,
    out_run_dir: str | Path,
    hf_source: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a depthlab run dir holding `model` as checkpoint step 0 (no optimizer)."""
    from depthlab.data.tokenizer import ByteTokenizer
    from depthlab.train.checkpoint import model_state, save_weights

    out = Path(out_run_dir).expanduser()
    byte_vocab = ByteTokenizer.vocab_size
    if hf_source is None and model.cfg.vocab_size != byte_vocab:
        raise DepthlabError(f"write_run: a model with a {model.cfg.vocab_size}-token vocabulary "
                            "needs its tokenizer; pass hf_source=HF_DIR (only byte-level "
                            f"models, vocab {byte_vocab}, are written without one)")
    _check_run_dir(out, overwrite)
    # written beside OUT first and moved in at the end: a failed import changes nothing
    # (with --overwrite, the earlier import stays until the new one is complete)
    tmp = out.parent / f".{out.name}.import-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        data = (_write_tokenizer(hf_source, tmp / "tokenizer", out / "tokenizer")
                if hf_source is not None else {})
        seq_len = min(DataConfig().seq_len, model.cfg.max_seq_len)
        try:
            cfg = RunConfig(name=out.name, out_dir=str(out.parent.resolve()), model=model.cfg,
                            data=DataConfig(seq_len=seq_len, **data))
        except Exception as err:
            raise ConfigError(f"imported config is invalid: {err}") from None
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        ckpt = tmp / CKPT_DIR / "step_0000000"
        ckpt.mkdir(parents=True)
        meta = {"step": "0", "source": str(hf_source) if hf_source is not None else "in-memory"}
        save_weights(model_state(model), ckpt / WEIGHTS_FILE, meta)
        out.mkdir(parents=True, exist_ok=True)
        for name in IMPORT_ENTRIES:  # an earlier import's files: replaced whole
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            if (tmp / name).exists():
                os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


IMPORT_ENTRIES = ("tokenizer", CKPT_DIR, CONFIG_FILE)  # config last: marks it complete


def _check_run_dir(out: Path, overwrite: bool) -> None:
    """A new or empty directory, or with overwrite one an earlier import wrote; never a run
    that has trained (its checkpoints and metrics would be mixed with the imported weights)
    and never another non-empty directory."""
    if out.exists() and not out.is_dir():
        raise DepthlabError(f"{out} exists and is not a directory")
    if holds_other_files(out):
        raise DepthlabError(f"{out} is not empty and is not a depthlab run; choose a new "
                            "or empty directory")
    if not (out / CONFIG_FILE).exists():
        return
    ckpts = [p.name for p in checkpoint_dirs(out)]
    if (out / METRICS_FILE).exists() or any(c != "step_0000000" for c in ckpts):
        raise DepthlabError(f"{out} holds a trained run ({', '.join(ckpts[-1:]) or 'metrics'}); "
                            "not overwriting it, choose another directory")
    if not overwrite:
        raise DepthlabError(f"{out} already holds an imported run; choose another directory "
                            "or pass --overwrite")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _write_tokenizer(hf_source: str | Path, tok_dir: Path, final_dir: Path) -> dict[str, Any]:
    """Save the HF tokenizer as RUN/tokenizer (depthlab format); data-config keys to set."""
    from depthlab.data.tokenizer import META_FILE, ByteTokenizer
    from depthlab.interop.hf_export import byte_level_tokenizer

    local = Path(str(hf_source)).expanduser()
    if local.is_dir() and not any((local / f).is_file() for f in TOKENIZER_FILES):
        raise DepthlabError(f"{hf_source} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                            "import-hf needs the model's tokenizer next to its weights")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(hf_source))
    except Exception as err:  # many tokenizer backends, many error types
        raise DepthlabError(f"{hf_source}: cannot load its tokenizer "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})"
                            ) from None
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise DepthlabError(f"{hf_source}: its tokenizer has no tokenizer.json (fast) form")
    tok_dir.mkdir(parents=True, exist_ok=True)
    if backend.to_str() == byte_level_tokenizer().backend_tokenizer.to_str():
        ByteTokenizer().save(tok_dir)
        return {"tokenizer": "byte"}
    backend.save(str(tok_dir / "tokenizer.json"))
    (tok_dir / META_FILE).write_text(json.dumps(
        {"kind": "file", "name": str(hf_source), "eos_id": tok.eos_token_id}, indent=2) + "\n")
    return {"tokenizer": str(final_dir.resolve())}


def import_hf_to_run(
    hf_dir: str | Path,
    out_run_dir: str | Path,
    keep_layers: list[int] | None = None,
    max_seq_len: int | None = None,
    overwrite: bool = False,
) -> tuple[Path, ModelConfig]:
    """`depthlab import-hf`: HF dir -> depthlab run dir (step 0)."""
    src = Path(str(hf_dir)).expanduser()
    if (src / CONFIG_FILE).is_file() and not (src / "config.json").is_file():
        raise DepthlabError(f"{src} is a depthlab run already: train from it with --set "
                            f"train.init_from={src}, or export it with `depthlab export`")
    model, mcfg = import_hf(hf_dir, keep_layers=keep_layers, max_seq_len=max_seq_len)
    return write_run(model, out_run_dir, hf_source=hf_dir, overwrite=overwrite), mcfg


def parse_layers(text: str | None) -> list[int] | None:
    """'0,1,2', '0-5', '0-3,8,10-11' -> list of ints (None when not given)."""
    if text is None:
        return None
    if not text.strip(" ,"):
        raise DepthlabError("--keep-layers is empty (give e.g. 0-5,8, or leave it out for all)")
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise DepthlabError(f"--keep-layers: range {part!r} runs backwards "
                                        f"(use {hi}-{lo}, or list the layers in order)")
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise DepthlabError(f"--keep-layers: cannot parse {part!r} (use e.g. 0-5,8)") from None
    return out


__all__ = ["import_hf", "import_hf_to_run", "model_config_from_hf", "parse_layers", "write_run"]
