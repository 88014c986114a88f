"""Which stock transformers architecture computes exactly the same function as a DepthLM.

One table drives both directions (export and import): for every supported
`model_type` a function says why a given `ModelConfig` cannot be represented
(or None when it can), and two pure functions rename/reshape state dicts.

Exact equivalences used (all checked by tests in fp32):

* LayerNorm Scaling (`norm_placement=scaled`, h + f(norm(h) / sqrt(l+1))) is pre-LN
  with the factor folded into the RMSNorm gains (same function up to one fp32 rounding
  of the gain); the exported model is a plain pre-LN model.
* dense, pre-LN, RMSNorm, no QK-norm      -> Llama (`llama`)
* dense, pre-LN, RMSNorm, per-head QK-norm -> Qwen3 (`qwen3`; q/k norm on the head dim before RoPE)
* dense Peri-LN (h + norm_out(f(norm(h)))), no QK-norm -> GLM-4 (`glm4`, sandwich norms, fused
  SwiGLU gate_up_proj, full-width rotary). GLM-4 rotates interleaved pairs (2j, 2j+1) where
  DepthLM rotates (j, j + D/2); the q/k projection rows of every head are permuted to match,
  which leaves q.k (and so attention) unchanged.
* MoE, no QK-norm, renormalised top-k, no shared expert, every layer MoE -> Mixtral
* MoE, QK-norm, no shared expert -> Qwen3-MoE (`norm_topk_prob` = renormalize,
  dense layers through `mlp_only_layers`)
* MoE, no QK-norm (any renormalize / shared expert / subset of layers) -> Qwen2-MoE:
  its shared expert is gated by `sigmoid(w . x)`; with `w = 0` the gate is exactly
  0.5, so the shared down_proj is stored times 2 (both scalings are exact in binary
  floating point). Its q/k/v biases are stored as zeros. Without a DepthLM shared
  expert, the Qwen2-MoE shared expert is a width-1 SwiGLU with zero weights.
"""

from __future__ import annotations

import math

import torch

from depthlab.config import ModelConfig

DENSE_ARCHS = ("llama", "qwen3", "glm4")
MOE_ARCHS = ("mixtral", "qwen3_moe", "qwen2_moe")
EXPORT_ARCHS = DENSE_ARCHS + MOE_ARCHS
"""Export targets, in the order `auto` tries them."""
REFUSED_ARCHS = {
    "olmo2": "OLMo-2 normalises after attention/MLP (a reordered post-norm: h + norm(f(h))) and "
             "applies QK-norm over all heads at once; DepthLM pre-LN cannot be expressed with it",
    "olmoe": "OLMoE applies QK-norm over the full q/k projection (all heads together), not per "
             "head as DepthLM does, so no weight choice makes it equal",
    "mistral": "use llama: Mistral is Llama plus a sliding window; exported DepthLMs use llama",
    "qwen2": "use llama: Qwen2 adds q/k/v biases that DepthLM does not have",
}

CLASS_NAMES = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}

NATIVE_HINT = "evaluate it with `depthlab eval RUN --backend native` instead"


# --------------------------------------------------------------------------- compatibility


def structural_problem(cfg: ModelConfig) -> str | None:
    """Why no stock transformers class can represent `cfg`, or None."""
    if cfg.vocab_size is None:
        return "model.vocab_size is not set"
    if cfg.norm != "rmsnorm":
        return (f"model.norm={cfg.norm}: the Llama-family classes only have RMSNorm (LayerNorm "
                "also subtracts the mean and adds a bias)")
    placement = cfg.norm_placement
    if placement == "mix" and any(cfg.is_post_ln(i) for i in range(cfg.n_layers)):
        return ("model.norm_placement=mix (Mix-LN): its first blocks are post-LN (norm after the "
                "residual add), which no stock decoder class computes")
    if placement == "post":
        return ("model.norm_placement=post: post-LN normalises after the residual add; stock "
                "Llama-family classes are pre-LN")
    return None


def arch_problem(cfg: ModelConfig, arch: str) -> str | None:
    """Why `arch` cannot represent `cfg` exactly, or None when it can."""
    if arch in REFUSED_ARCHS:
        return REFUSED_ARCHS[arch]
    if arch not in EXPORT_ARCHS:
        return f"unknown architecture (choose from auto, {', '.join(EXPORT_ARCHS)})"
    problem = structural_problem(cfg)
    if problem:
        return problem
    moe = cfg.moe
    peri = cfg.norm_placement == "peri"
    if peri and arch != "glm4":
        return ("model.norm_placement=peri (Peri-LN) adds output norms after attention and MLP; "
                f"{arch} has none (the only stock class with such sandwich norms and SwiGLU is "
                "glm4, which is dense and has no QK-norm)")
    if arch == "glm4":
        if not peri:
            return ("GLM-4 normalises attention/MLP outputs too (Peri-LN sandwich norms); the model "
                    f"is norm_placement={cfg.norm_placement}, use llama/qwen3")
        if cfg.qk_norm:
            return "GLM-4 has no QK-norm"
    if arch in DENSE_ARCHS:
        if moe is not None:
            return f"{arch} is a dense architecture but the model has MoE layers"
        if arch == "llama" and cfg.qk_norm:
            return "Llama has no QK-norm; use qwen3 (per-head q/k RMSNorm before RoPE)"
        if arch == "qwen3" and not cfg.qk_norm:
            return "Qwen3 always applies QK-norm but the model has model.qk_norm=false; use llama"
        return None
    if moe is None:
        return f"{arch} is a mixture-of-experts architecture but the model is dense"
    if arch == "mixtral":
        if cfg.qk_norm:
            return "Mixtral has no QK-norm; use qwen3_moe"
        if not moe.renormalize:
            return ("Mixtral always renormalises the top-k weights but the model has "
                    "model.moe.renormalize=false; use qwen2_moe")
        if moe.shared_expert:
            return "Mixtral has no shared expert; use qwen2_moe"
        if moe.layers is not None and len(set(moe.layers)) != cfg.n_layers:
            return "Mixtral puts an MoE in every layer but model.moe.layers is a subset; use qwen2_moe"
        return None
    if arch == "qwen3_moe":
        if not cfg.qk_norm:
            return "Qwen3-MoE always applies QK-norm but the model has model.qk_norm=false"
        if moe.shared_expert:
            return ("Qwen3-MoE has no shared expert (and Qwen2-MoE, which has one, has no "
                    "QK-norm)")
        return None
    if arch == "qwen2_moe":
        if cfg.qk_norm:
            return "Qwen2-MoE has no QK-norm; use qwen3_moe"
        return None
    raise AssertionError(arch)


def choose_arch(cfg: ModelConfig, arch: str = "auto") -> str:
    """The export target for `cfg` (`auto`: the first exact one), or raise ValueError(reason)."""
    if arch != "auto":
        problem = arch_problem(cfg, arch)
        if problem:
            raise ValueError(f"cannot export as {arch}: {problem}")
        return arch
    problem = structural_problem(cfg)
    if problem:
        raise ValueError(problem)
    reasons: dict[str, list[str]] = {}  # reason -> the targets it rules out
    for candidate in EXPORT_ARCHS:
        p = arch_problem(cfg, candidate)
        if p is None:
            return candidate
        reasons.setdefault(p, []).append(candidate)
    if cfg.moe is not None and cfg.qk_norm and cfg.moe.shared_expert:
        raise ValueError("an MoE with both QK-norm and a shared expert has no exact stock "
                         "equivalent (Qwen3-MoE has no shared expert, Qwen2-MoE no QK-norm; "
                         "Qwen3-Next/Hunyuan gate or reorder them)")
    raise ValueError("; ".join(f"{', '.join(c)}: {p}" for p, c in reasons.items()))


# --------------------------------------------------------------------------- HF configs


def moe_layer_set(cfg: ModelConfig) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]


def hf_config_kwargs(cfg: ModelConfig, arch: str) -> dict:
    """Keyword arguments for `AutoConfig.for_model(arch, **kwargs)`."""
    kw: dict = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.hidden,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": cfg.init_std,
    }
    if arch == "llama":
        kw.update(attention_bias=False, mlp_bias=False)
    elif arch == "glm4":
        kw["rope_parameters"]["partial_rotary_factor"] = 1.0
        kw.update(attention_bias=False, partial_rotary_factor=1.0)
    elif arch == "qwen3":
        kw.update(attention_bias=False, use_sliding_window=False)
    else:
        moe = cfg.moe
        assert moe is not None
        moe_layers = moe_layer_set(cfg)
        mlp_only = [i for i in range(cfg.n_layers) if i not in moe_layers]
        if arch == "mixtral":
            kw.update(num_local_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                      intermediate_size=moe.expert_hidden, sliding_window=None,
                      router_jitter_noise=0.0, router_aux_loss_coef=moe.lb_loss_weight)
        elif arch == "qwen3_moe":
            kw.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                      moe_intermediate_size=moe.expert_hidden, norm_topk_prob=moe.renormalize,
                      decoder_sparse_step=1, mlp_only_layers=mlp_only, attention_bias=False,
                      use_sliding_window=False, router_aux_loss_coef=moe.lb_loss_weight)
        elif arch == "qwen2_moe":
            shared = (moe.shared_expert_hidden or moe.expert_hidden) if moe.shared_expert else 1
            kw.update(num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                      moe_intermediate_size=moe.expert_hidden, norm_topk_prob=moe.renormalize,
                      shared_expert_intermediate_size=shared, decoder_sparse_step=1,
                      mlp_only_layers=mlp_only, qkv_bias=True, use_sliding_window=False,
                      router_aux_loss_coef=moe.lb_loss_weight)
    return kw


# --------------------------------------------------------------------------- weights

StateDict = dict[str, torch.Tensor]


def _fuse(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """[E, h, d] x2 -> transformers' fused experts.gate_up_proj [E, 2h, d] (gate first)."""
    return torch.cat([gate, up], dim=1).contiguous()


def interleave_perm(head_dim: int) -> torch.Tensor:
    """Row order turning half-split RoPE pairs (j, j+D/2) into interleaved (2j, 2j+1)."""
    half = head_dim // 2
    return torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()


def _permute_heads(w: torch.Tensor, n_heads: int, perm: torch.Tensor) -> torch.Tensor:
    """Permute the output rows of a q/k projection [n_heads * D, d] within every head."""
    d_in = w.shape[-1]
    return w.view(n_heads, -1, d_in)[:, perm].reshape(-1, d_in).contiguous()


def depthlab_to_hf(sd: StateDict, cfg: ModelConfig, arch: str) -> StateDict:
    """Rename/reshape a DepthLM state dict into the in-memory names of `arch`'s HF model."""
    out: StateDict = {}
    out["model.embed_tokens.weight"] = sd["tok_embeddings.weight"]
    scaled = cfg.norm_placement == "scaled"
    out["model.norm.weight"] = sd["norm_f.weight"]
    out["lm_head.weight"] = sd.get("lm_head.weight", sd["tok_embeddings.weight"])
    hd = cfg.head_dim
    for i in range(cfg.n_layers):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        out[h + "input_layernorm.weight"] = sd[b + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = sd[b + "mlp_norm.weight"]
        if scaled:  # LayerNorm Scaling: norm(h) / sqrt(l+1) == RMSNorm with gain w / sqrt(l+1)
            s = 1.0 / math.sqrt(i + 1)
            out[h + "input_layernorm.weight"] = out[h + "input_layernorm.weight"] * s
            out[h + "post_attention_layernorm.weight"] = out[h + "post_attention_layernorm.weight"] * s
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[h + f"self_attn.{p}.weight"] = sd[b + f"attn.{p}.weight"]
        if arch == "glm4":
            perm = interleave_perm(hd)
            for p, n in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
                out[h + f"self_attn.{p}.weight"] = _permute_heads(out[h + f"self_attn.{p}.weight"], n, perm)
            out[h + "post_self_attn_layernorm.weight"] = sd[b + "attn_out_norm.weight"]
            out[h + "post_mlp_layernorm.weight"] = sd[b + "mlp_out_norm.weight"]
            out[h + "mlp.gate_up_proj.weight"] = torch.cat(
                [sd[b + "mlp.gate_proj.weight"], sd[b + "mlp.up_proj.weight"]], dim=0)
            out[h + "mlp.down_proj.weight"] = sd[b + "mlp.down_proj.weight"]
            continue
        if cfg.qk_norm:
            out[h + "self_attn.q_norm.weight"] = sd[b + "attn.q_norm.weight"]
            out[h + "self_attn.k_norm.weight"] = sd[b + "attn.k_norm.weight"]
        if arch == "qwen2_moe":
            ref = sd[b + "attn.q_proj.weight"]
            for p, n in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads), ("v_proj", cfg.kv_heads)):
                out[h + f"self_attn.{p}.bias"] = torch.zeros(n * hd, dtype=ref.dtype)
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                out[h + f"mlp.{p}.weight"] = sd[b + f"mlp.{p}.weight"]
            continue
        out[h + "mlp.gate.weight"] = sd[b + "mlp.router.weight"]
        out[h + "mlp.experts.gate_up_proj"] = _fuse(
            sd[b + "mlp.experts.gate_proj"], sd[b + "mlp.experts.up_proj"]
        )
        out[h + "mlp.experts.down_proj"] = sd[b + "mlp.experts.down_proj"]
        if arch == "qwen2_moe":
            assert cfg.moe is not None
            ref = sd[b + "mlp.router.weight"]
            d = cfg.d_model
            if cfg.moe.shared_expert:
                src, dst = b + "mlp.shared_expert.", h + "mlp.shared_expert."
                out[dst + "gate_proj.weight"] = sd[src + "gate_proj.weight"]
                out[dst + "up_proj.weight"] = sd[src + "up_proj.weight"]
                # sigmoid(0) = 0.5 exactly; x2 is exact in floating point.
                out[dst + "down_proj.weight"] = sd[src + "down_proj.weight"] * 2
            else:
                out[h + "mlp.shared_expert.gate_proj.weight"] = torch.zeros(1, d, dtype=ref.dtype)
                out[h + "mlp.shared_expert.up_proj.weight"] = torch.zeros(1, d, dtype=ref.dtype)
                out[h + "mlp.shared_expert.down_proj.weight"] = torch.zeros(d, 1, dtype=ref.dtype)
            out[h + "mlp.shared_expert_gate.weight"] = torch.zeros(1, d, dtype=ref.dtype)
    return out


def hf_to_depthlab(hf: StateDict, cfg: ModelConfig, arch: str,
                   layer_map: list[int] | None = None) -> StateDict:
    """Inverse of `depthlab_to_hf`; `layer_map[i]` is the HF layer that becomes block i.

    Raises ValueError when a weight has no DepthLM equivalent (non-zero q/k/v biases,
    a learned Qwen2-MoE shared-expert gate).
    """
    layers = layer_map if layer_map is not None else list(range(cfg.n_layers))
    sd: StateDict = {}
    sd["tok_embeddings.weight"] = hf["model.embed_tokens.weight"]
    sd["norm_f.weight"] = hf["model.norm.weight"]
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = hf["lm_head.weight"]
    for i, src in enumerate(layers):
        b, h = f"blocks.{i}.", f"model.layers.{src}."
        sd[b + "attn_norm.weight"] = hf[h + "input_layernorm.weight"]
        sd[b + "mlp_norm.weight"] = hf[h + "post_attention_layernorm.weight"]
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[b + f"attn.{p}.weight"] = hf[h + f"self_attn.{p}.weight"]
            bias = hf.get(h + f"self_attn.{p}.bias")
            if bias is not None and bias.abs().max().item() != 0:
                raise ValueError(f"layer {src} has a non-zero self_attn.{p}.bias; DepthLM attention "
                                 "has no biases")
        if arch == "glm4":
            inv = torch.argsort(interleave_perm(cfg.head_dim))
            for p, n in (("q_proj", cfg.n_heads), ("k_proj", cfg.kv_heads)):
                sd[b + f"attn.{p}.weight"] = _permute_heads(sd[b + f"attn.{p}.weight"], n, inv)
            sd[b + "attn_out_norm.weight"] = hf[h + "post_self_attn_layernorm.weight"]
            sd[b + "mlp_out_norm.weight"] = hf[h + "post_mlp_layernorm.weight"]
            gate_up = hf[h + "mlp.gate_up_proj.weight"]
            half = gate_up.shape[0] // 2
            sd[b + "mlp.gate_proj.weight"] = gate_up[:half].contiguous()
            sd[b + "mlp.up_proj.weight"] = gate_up[half:].contiguous()
            sd[b + "mlp.down_proj.weight"] = hf[h + "mlp.down_proj.weight"]
            continue
        if cfg.qk_norm:
            sd[b + "attn.q_norm.weight"] = hf[h + "self_attn.q_norm.weight"]
            sd[b + "attn.k_norm.weight"] = hf[h + "self_attn.k_norm.weight"]
        if not cfg.is_moe_layer(i):
            for p in ("gate_proj", "up_proj", "down_proj"):
                sd[b + f"mlp.{p}.weight"] = hf[h + f"mlp.{p}.weight"]
            continue
        assert cfg.moe is not None
        sd[b + "mlp.router.weight"] = hf[h + "mlp.gate.weight"]
        gate_up = hf[h + "mlp.experts.gate_up_proj"]
        half = gate_up.shape[1] // 2
        sd[b + "mlp.experts.gate_proj"] = gate_up[:, :half].contiguous()
        sd[b + "mlp.experts.up_proj"] = gate_up[:, half:].contiguous()
        sd[b + "mlp.experts.down_proj"] = hf[h + "mlp.experts.down_proj"]
        if arch == "qwen2_moe":
            gate_w = hf[h + "mlp.shared_expert_gate.weight"]
            if gate_w.abs().max().item() != 0:
                raise ValueError(f"layer {src} has a learned shared-expert gate (sigmoid(w.x)); "
                                 "DepthLM's shared expert is ungated")
            if cfg.moe.shared_expert:
                for p in ("gate_proj", "up_proj"):
                    sd[b + f"mlp.shared_expert.{p}.weight"] = hf[h + f"mlp.shared_expert.{p}.weight"]
                sd[b + "mlp.shared_expert.down_proj.weight"] = (
                    hf[h + "mlp.shared_expert.down_proj.weight"] / 2
                )
    return sd


def qwen2_moe_shared_is_zero(hf: StateDict, layer: int) -> bool:
    key = f"model.layers.{layer}.mlp.shared_expert.down_proj.weight"
    return key in hf and hf[key].abs().max().item() == 0

