"""Hugging Face interop and downstream evaluation.

- `export_hf(run_or_ckpt, out_dir)`: a stock transformers checkpoint computing the same
  function (Llama / Qwen3 / GLM-4 / Mixtral / Qwen3-MoE / Qwen2-MoE), or a refusal.
- `import_hf(path_or_model)`: a Llama-family HF model as `(DepthLM, ModelConfig)`.
- `run_lm_eval(model, tasks)`: lm-evaluation-harness on runs or HF models, hub or local data.
- `run_perplexity(model, data)`: held-out perplexity.

Heavy dependencies (transformers, lm_eval) load on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "export_hf": "depthlab.interop.hf_export",
    "export_model": "depthlab.interop.hf_export",
    "to_hf_model": "depthlab.interop.hf_export",
    "byte_level_tokenizer": "depthlab.interop.hf_export",
    "import_hf": "depthlab.interop.hf_import",
    "import_hf_to_run": "depthlab.interop.hf_import",
    "write_run": "depthlab.interop.hf_import",
    "run_lm_eval": "depthlab.interop.evaluate",
    "run_perplexity": "depthlab.interop.evaluate",
    "choose_arch": "depthlab.interop.arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'depthlab.interop' has no attribute {name!r}")
