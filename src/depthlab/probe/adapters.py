"""LayerStack adapters: DepthLM and Hugging Face causal LMs (transformers 5.x).

Each adapter supplies the per-architecture pieces of the stack view:
embedding (Gemma's sqrt(d) scale lives in its embedding module, GPT-2 adds its
learned positions), how to call one block on its own (rotary cos/sin and the
causal mask for the current length, positions 0..T-1), the final norm and head
(Gemma-2's final logit softcap), the residual-branch modules, attention weights,
MoE routers and canonically named weight matrices.

Hugging Face blocks are called exactly as the model's own forward calls them:
`layer(h, attention_mask=mask, position_ids=pos, position_embeddings=(cos, sin))`
with the mask from `transformers.masking_utils` for the block's attention type
(full or sliding window); with SDPA and no padding that mask is None and SDPA's
`is_causal` applies, as in the model's forward.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from depthlab.errors import DepthlabError
from depthlab.probe.stack import LayerStack, MoERouterInfo

# --------------------------------------------------------------------- DepthLM


class DepthLMStack(LayerStack):
    """Stack view of depthlab's own `DepthLM` (blocks already map h -> h)."""

    arch = "depthlm"

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        cfg = model.cfg
        super().__init__(model, len(model.blocks), cfg.d_model, max_seq_len=cfg.max_seq_len,
                         dtype=dtype, device=device)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.model.embed(ids)

    def block_module(self, l: int) -> nn.Module:  # noqa: E741
        return self.model.blocks[self.block_index(l)]

    def _run_block(self, l: int, h: Tensor) -> Tensor:  # noqa: E741
        return self.model.blocks[l](h)

    def final_norm(self, h: Tensor) -> Tensor:
        return self.model.norm_f(h)

    def head(self, h: Tensor) -> Tensor:
        return self.model.head(h)

    def branch_modules(self, l: int) -> dict[str, nn.Module]:  # noqa: E741
        return self.block_module(l).branch_modules()

    def _attn_input(self, block: nn.Module, h: Tensor) -> Tensor:
        if block.post_ln:
            return h
        return block.attn_norm(h) * block.norm_scale

    def attention_probs(self, l: int, h: Tensor) -> Tensor | None:  # noqa: E741
        block = self.block_module(l)
        with torch.no_grad():
            return block.attn.attention_probs(self._attn_input(block, h)).float()

    def moe_router(self, l: int) -> MoERouterInfo | None:  # noqa: E741
        from depthlab.model.moe import MoE

        mlp = self.block_module(l).mlp
        if not isinstance(mlp, MoE):
            return None
        return MoERouterInfo(router=mlp.router, top_k=mlp.top_k, num_experts=mlp.num_experts,
                             renormalize=bool(mlp.renormalize), mlp=mlp)

    def weight_matrices(self, l: int) -> dict[str, Tensor]:  # noqa: E741
        out: dict[str, Tensor] = {}
        for name, p in self.block_module(l).named_parameters():
            if p.ndim < 2:
                continue
            name = name.removesuffix(".weight")
            if name.startswith("mlp.experts."):
                name = "experts." + name.removeprefix("mlp.experts.")
            elif name == "mlp.router":
                name = "router"
            elif name.startswith("mlp.shared_expert."):
                name = "shared_expert." + name.removeprefix("mlp.shared_expert.")
            out[name] = p.detach()
        return out


# ---------------------------------------------------------------- Hugging Face


@dataclass(frozen=True)
class HFSpec:
    """Where a Hugging Face architecture keeps its pieces."""

    base: str  # attribute (dotted path) of the *ForCausalLM holding the text backbone
    layers: str  # attribute of the backbone holding the ModuleList of blocks
    norm: str  # final norm attribute of the backbone
    attn: str  # attention submodule of a block
    call: str  # "decoder" (Llama-style kwargs), "gpt2", "neox"
    branch: tuple[str, str]  # block submodules whose outputs are the (attn, mlp) branch updates
    rotary: bool = True
    moe: bool = False
    moe_block: str = "mlp"  # block attribute holding the (sparse) MLP
    router: str = "gate"  # attribute of the MoE sublayer holding the router
    router_scoring: str = "softmax"  # how the router turns logits into expert scores
    renormalize: bool = False  # top-k weights renormalised when the router has no flag
    text_config: bool = False  # a multimodal wrapper: the text model's config is config.text_config
    router_logits_at: int = 0  # where the logits are in the router's tuple output
    experts_in_out: bool = False  # expert weights stored [E, in, out] (not Linear's [out, in])
    routed_k: int | None = None  # experts per token the router picks whatever the config says
    final_softcap: bool = True  # logits soft-capped when the config sets final_logit_softcapping
    # config attributes of scalars applied outside those modules (None: no such scalar)
    embed_scale: str | None = None  # h0 = embeddings x scale
    logit_scale: str | None = None  # logits x scale
    logit_divisor: str | None = None  # logits / divisor
    residual_scale: str | None = None  # h + scale x branch output


_LLAMA = HFSpec("model", "layers", "norm", "self_attn", "decoder", ("self_attn", "mlp"))
_COHERE = replace(_LLAMA, logit_scale="logit_scale")
_GRANITE = replace(_LLAMA, embed_scale="embedding_multiplier", logit_divisor="logits_scaling",
                   residual_scale="residual_multiplier")
_POSTNORM = HFSpec("model", "layers", "norm", "self_attn", "decoder",
                   ("post_attention_layernorm", "post_feedforward_layernorm"))
_MOE = HFSpec("model", "layers", "norm", "self_attn", "decoder", ("self_attn", "mlp"), moe=True)
# DeepSeek-V3 style: sigmoid scores, group-limited top-k over scores + a balancing bias
_MOE_SIGMOID = replace(_MOE, router_scoring="sigmoid")

_LLAMA4 = HFSpec("model", "layers", "norm", "self_attn", "decoder", ("self_attn", "feed_forward"),
                 moe=True, moe_block="feed_forward", router="router", router_scoring="sigmoid",
                 router_logits_at=1, experts_in_out=True)

HF_SPECS: dict[str, HFSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "olmo": _LLAMA,
    "phi3": _LLAMA,
    "smollm3": _LLAMA,
    "stablelm": _LLAMA,
    "starcoder2": _LLAMA,
    "cohere": _COHERE,
    "cohere2": _COHERE,
    "granite": _GRANITE,
    "ministral": _LLAMA,
    "arcee": _LLAMA,
    "ernie4_5": _LLAMA,
    "seed_oss": _LLAMA,
    "hunyuan_v1_dense": _LLAMA,
    "glm": _LLAMA,
    "helium": _LLAMA,
    "apertus": _LLAMA,
    "nemotron": _LLAMA,
    "vaultgemma": _LLAMA,
    "olmo2": _POSTNORM,
    "olmo3": _POSTNORM,
    "gemma2": _POSTNORM,
    "gemma3_text": _POSTNORM,
    # image-text wrappers, run on text: Gemma 3 from 4B up, Mistral Small 3.x / Magistral
    # (Gemma 3's wrapper head applies no final soft-capping, unlike its text model's)
    "gemma3": replace(_POSTNORM, base="model.language_model", text_config=True,
                      final_softcap=False),
    "mistral3": replace(_LLAMA, base="model.language_model", text_config=True),
    "exaone4": _POSTNORM,
    "glm4": HFSpec("model", "layers", "norm", "self_attn", "decoder",
                   ("post_self_attn_layernorm", "post_mlp_layernorm")),
    "qwen3_moe": _MOE,
    "qwen2_moe": _MOE,
    "olmoe": _MOE,
    "mixtral": replace(_MOE, renormalize=True),
    "glm4_moe": _MOE_SIGMOID,
    "deepseek_v3": _MOE_SIGMOID,
    "dots1": _MOE_SIGMOID,
    "glm4_moe_lite": _MOE_SIGMOID,
    "deepseek_v2": _MOE,  # softmax, optionally group-limited, not renormalised
    "hunyuan_v1_moe": replace(_MOE, renormalize=True),  # router linear at mlp.gate.wg
    # softmax; the choice adds a balancing bias to the scores
    "ernie4_5_moe": replace(_MOE, renormalize=True),
    "flex_olmo": replace(_POSTNORM, moe=True),
    # top-k of the router logits, softmax over those k
    "granitemoe": replace(_GRANITE, branch=("self_attn", "block_sparse_moe"), moe=True,
                          moe_block="block_sparse_moe", router="router", renormalize=True),
    # top-k of the biased router logits, softmax over those k
    "gpt_oss": replace(_MOE, router="router", renormalize=True, experts_in_out=True),
    # top-k of the logits, sigmoid of those scales the expert's INPUT; a shared expert;
    # chunked attention, NoPE layers with temperature tuning
    "llama4_text": _LLAMA4,
    # (the image-text wrapper; AutoModelForCausalLM loads its text model, llama4_text)
    "llama4": replace(_LLAMA4, base="language_model.model", text_config=True),
    # sigmoid scores + the block's balancing bias, no groups
    "minimax_m2": replace(_MOE_SIGMOID, renormalize=True),
    # sparsemixer: in eval the 2 best logits, one after the other (always 2, whatever
    # num_experts_per_tok says)
    "phimoe": replace(_MOE, router="router", routed_k=2),
    "phi": HFSpec("model", "layers", "final_layernorm", "self_attn", "decoder",
                  ("self_attn", "mlp")),
    "gpt2": HFSpec("transformer", "h", "ln_f", "attn", "gpt2", ("attn", "mlp"), rotary=False),
    "gpt_neox": HFSpec("gpt_neox", "layers", "final_layer_norm", "attention", "neox",
                       ("attention", "mlp")),
}
SUPPORTED_ARCHS: tuple[str, ...] = ("depthlm", *HF_SPECS)


def _canonical_hf_name(arch: str, name: str) -> str:
    """Block-relative HF parameter name -> depthlab's canonical weight name."""
    spec = HF_SPECS[arch]
    name = name.removesuffix(".weight")
    for prefix, canonical in (("self_attn.", "attn."), ("attention.", "attn."),
                              (f"{spec.moe_block}.", "mlp.")):
        if name.startswith(prefix):
            name = canonical + name.removeprefix(prefix)
            break
    if spec.moe and name in (f"mlp.{spec.router}", f"mlp.{spec.router}.wg"):
        return "router"
    for prefix in ("experts.", "shared_expert.", "shared_experts.", "shared_mlp."):
        if name.startswith("mlp." + prefix):
            canonical = "experts." if prefix == "experts." else "shared_expert."
            return canonical + name.removeprefix("mlp." + prefix)
    renames = {
        "attn.c_proj": "attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj",
        "attn.dense": "attn.o_proj", "mlp.dense_h_to_4h": "mlp.up_proj",
        "mlp.dense_4h_to_h": "mlp.down_proj", "mlp.fc1": "mlp.up_proj", "mlp.fc2": "mlp.down_proj",
    }
    return renames.get(name, name)


class HFStack(LayerStack):
    """Stack view of a Hugging Face causal LM listed in `HF_SPECS`."""

    def __init__(self, model: nn.Module, *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        config = model.config
        self.arch = config.model_type
        self.spec = HF_SPECS[self.arch]
        if self.spec.text_config:
            config = config.text_config
        self.config = config
        base = model
        for part in self.spec.base.split("."):
            base = getattr(base, part, None)
        if base is None:
            raise DepthlabError(
                f"{type(model).__name__} has no language-model head: pass the model with its"
                f" head (loaded by {auto_class(self.arch).__name__}), not the bare backbone"
            )
        if getattr(config, "use_bidirectional_attention", False):
            raise DepthlabError(
                f"{self.arch} with use_bidirectional_attention=True (an embedding model such "
                "as EmbeddingGemma) is not a causal LM: the LayerStack runs causal attention")
        self.base = base
        self.layers: nn.ModuleList = getattr(base, self.spec.layers)
        scalar = lambda attr: float(getattr(config, attr)) if attr else 1.0
        self._embed_scale = scalar(self.spec.embed_scale)
        self._logit_scale = scalar(self.spec.logit_scale)
        self._logit_divisor = scalar(self.spec.logit_divisor)
        self.branch_scale = scalar(self.spec.residual_scale)
        # Gemma-3 and OLMo-3 keep one RoPE per attention type
        rotary = getattr(base, "rotary_emb", None)
        self._rope_per_type = rotary is not None and (
            "layer_type" in inspect.signature(rotary.forward).parameters)
        lm_head = model.get_output_embeddings()
        if lm_head is None:  # e.g. LlamaForSequenceClassification: its head is no LM head
            raise DepthlabError(
                f"{type(model).__name__} has no language-model head: pass the causal LM "
                f"(loaded by {auto_class(self.arch).__name__}), not a task model")
        self.lm_head: nn.Module = lm_head
        n_pos = getattr(config, "max_position_embeddings", None) or getattr(
            config, "n_positions", None)
        super().__init__(model, len(self.layers), config.hidden_size, max_seq_len=n_pos,
                         dtype=dtype, device=device)
        self._cache: dict[tuple, object] = {}
        # Attention type of each block: per config.layer_types when the model has them
        # (Qwen2/3, Gemma-2), else sliding window for every block when the config sets
        # one (Mistral, Mixtral, Qwen3-MoE), else full causal.
        layer_types = getattr(config, "layer_types", None)
        if layer_types is not None:
            self._attn_types = list(layer_types)[: self.n_layers]
        elif getattr(config, "sliding_window", None) is not None:
            self._attn_types = ["sliding_attention"] * self.n_layers
        else:
            self._attn_types = ["full_attention"] * self.n_layers

    # ---- embedding / head
    def _embed(self, ids: Tensor) -> Tensor:
        if self.arch == "gpt2":
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
            h = self.base.wte(ids)
            return h + self.base.wpe(pos).to(h.dtype)
        h = self.model.get_input_embeddings()(ids)
        return h * self._embed_scale if self._embed_scale != 1.0 else h

    def final_norm(self, h: Tensor) -> Tensor:
        return getattr(self.base, self.spec.norm)(h)

    def head(self, h: Tensor) -> Tensor:
        logits = self.lm_head(h)
        if self._logit_scale != 1.0:
            logits = logits * self._logit_scale
        if self._logit_divisor != 1.0:
            logits = logits / self._logit_divisor
        cap = getattr(self.config, "final_logit_softcapping", None) if self.spec.final_softcap \
            else None
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # ---- blocks
    def block_module(self, l: int) -> nn.Module:  # noqa: E741
        return self.layers[self.block_index(l)]

    def _context(self, l: int, h: Tensor) -> tuple[Tensor | None, Tensor, object]:  # noqa: E741
        """(mask, position_ids, position_embeddings) for block l at h's shape/dtype."""
        N, T = h.shape[0], h.shape[1]
        kind = self._attn_types[l]
        impl = self.config._attn_implementation
        key = (N, T, h.dtype, h.device, impl, kind, torch.is_inference_mode_enabled())
        hit = self._cache.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        from transformers import masking_utils

        dummy = torch.zeros((N, T, 1), dtype=h.dtype, device=h.device)
        pos = torch.arange(T, device=h.device).unsqueeze(0)
        make = {"sliding_attention": masking_utils.create_sliding_window_causal_mask,
                "chunked_attention": masking_utils.create_chunked_causal_mask}.get(
                    kind, masking_utils.create_causal_mask)
        # transformers 5.24 renamed past_key_values to cache (the old name warns)
        no_cache = {"cache" if "cache" in inspect.signature(make).parameters
                    else "past_key_values": None}
        with torch.no_grad():
            mask = make(config=self.config, inputs_embeds=dummy, attention_mask=None,
                        position_ids=pos, **no_cache)
            pe = None
            if self.spec.rotary:
                rot_in = torch.zeros((1, T, self.d_model), dtype=h.dtype, device=h.device)
                extra = {"layer_type": kind} if self._rope_per_type else {}
                pe = self.base.rotary_emb(rot_in, position_ids=pos, **extra)
        if len(self._cache) > 16:
            self._cache.clear()
        self._cache[key] = (mask, pos, pe)
        return mask, pos, pe

    def _run_block(self, l: int, h: Tensor) -> Tensor:  # noqa: E741
        layer = self.layers[l]
        mask, pos, pe = self._context(l, h)
        if self.spec.call == "gpt2":
            out = layer(h, None, mask)
        else:
            out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    # ---- sublayer hooks
    def branch_modules(self, l: int) -> dict[str, nn.Module]:  # noqa: E741
        block = self.block_module(l)
        a, m = self.spec.branch
        return {"attn": getattr(block, a), "mlp": getattr(block, m)}

    @contextlib.contextmanager
    def _forward_ad_context(self) -> Iterator[None]:
        """SDPA math backend, and MoE experts in the eager (per-expert loop)
        implementation: `grouped_mm` has no forward-AD formula."""
        old = getattr(self.config, "_experts_implementation", None)
        switch = old not in (None, "eager")
        with super()._forward_ad_context():
            if switch:
                self.config._experts_implementation = "eager"
            try:
                yield
            finally:
                if switch:
                    self.config._experts_implementation = old

    @contextlib.contextmanager
    def _eager_attention(self) -> Iterator[None]:
        old = self.config._attn_implementation
        self.config._attn_implementation = "eager"
        try:
            yield
        finally:
            self.config._attn_implementation = old

    def attention_probs(self, l: int, h: Tensor) -> Tensor | None:  # noqa: E741
        """Eager attention weights of block l: the block is run with the eager kernel
        and its attention module's returned weights are captured. With attention sinks
        (gpt-oss: a learned per-head logit that takes part in the softmax but is no key)
        the weights over the tokens are renormalised to sum to 1."""
        attn = getattr(self.block_module(l), self.spec.attn)
        captured: list[Tensor] = []

        def hook(_mod: nn.Module, _args: object, out: object) -> None:
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], Tensor):
                captured.append(out[1])

        handle = attn.register_forward_hook(hook)
        try:
            with torch.no_grad(), self._eager_attention():
                self.run_block(l, h)
        finally:
            handle.remove()
        if not captured:
            return None
        probs = captured[0].float()
        if getattr(attn, "sinks", None) is not None:
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def moe_router(self, l: int) -> MoERouterInfo | None:  # noqa: E741
        mlp = getattr(self.block_module(l), self.spec.moe_block)
        gate = getattr(mlp, self.spec.router, None)
        if not self.spec.moe or gate is None or not hasattr(mlp, "experts"):
            return None
        renorm = getattr(gate, "norm_topk_prob", self.spec.renormalize)
        top_k = self.spec.routed_k or int(gate.top_k)
        return MoERouterInfo(router=gate, top_k=top_k, num_experts=int(gate.num_experts),
                             renormalize=bool(renorm), mlp=mlp, scoring=self.spec.router_scoring,
                             logits_at=self.spec.router_logits_at)

    def weight_matrices(self, l: int) -> dict[str, Tensor]:  # noqa: E741
        """Canonical names, Linear convention [out, in]; fused weights split:
        GPT-2 c_attn, NeoX query_key_value and Phi-3 qkv_proj -> attn.q/k/v_proj,
        Phi-3 / GLM-4 mlp.gate_up_proj -> mlp.gate_proj / mlp.up_proj, expert
        gate_up_proj -> experts.gate_proj / experts.up_proj."""
        block = self.block_module(l)
        out: dict[str, Tensor] = {}
        for raw, p in block.named_parameters():
            name = _canonical_hf_name(self.arch, raw)
            # (Cohere's per-head q/k norm gains and gpt-oss's expert biases are 2-D)
            if p.ndim < 2 or name.endswith(("norm", "bias")):
                continue
            w = p.detach()
            if self.arch == "gpt2":
                if type(block.get_submodule(raw.rsplit(".", 1)[0])).__name__ == "Conv1D":
                    w = w.t()
                if name == "attn.c_attn":
                    q, k, v = w.chunk(3, dim=0)
                    out.update({"attn.q_proj": q, "attn.k_proj": k, "attn.v_proj": v})
                    continue
            if self.arch == "gpt_neox" and name == "attn.query_key_value":
                H = self.config.num_attention_heads
                w3 = w.view(H, 3, -1, w.shape[-1])
                for i, n in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"attn.{n}"] = w3[:, i].reshape(-1, w.shape[-1])
                continue
            if name == "attn.qkv_proj":
                heads, kv = self.config.num_attention_heads, self.config.num_key_value_heads
                hd = w.shape[0] // (heads + 2 * kv)
                q, k, v = w.split([heads * hd, kv * hd, kv * hd])
                out.update({"attn.q_proj": q, "attn.k_proj": k, "attn.v_proj": v})
                continue
            if self.spec.experts_in_out and name.startswith("experts."):
                w = w.transpose(-1, -2)
                if self.arch == "gpt_oss" and name == "experts.gate_up_proj":  # interleaved
                    out["experts.gate_proj"], out["experts.up_proj"] = w[:, ::2], w[:, 1::2]
                    continue
            if name in ("experts.gate_up_proj", "mlp.gate_up_proj"):  # gate first, then up
                g, u = w.chunk(2, dim=w.ndim - 2)
                prefix = name.removesuffix("gate_up_proj")
                out[prefix + "gate_proj"] = g
                out[prefix + "up_proj"] = u
                continue
            out[name] = w
        return out


# ------------------------------------------------------------------- dispatch


def build_stack(model: nn.Module, *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, float32: bool = False) -> LayerStack:
    """Wrap `model` (a DepthLM or a supported Hugging Face causal LM) as a LayerStack.

    dtype/device move the model first; float32=True is dtype=torch.float32 (what
    metrics want); `stack.model_dtype` keeps the dtype the model came in.
    """
    from depthlab.model.transformer import DepthLM

    if float32:
        dtype = torch.float32
    if isinstance(model, LayerStack):
        if dtype is not None or device is not None:
            model.model.to(device=device, dtype=dtype)
            model.device = next(model.model.parameters()).device
        return model
    if isinstance(model, DepthLM):
        return DepthLMStack(model, dtype=dtype, device=device)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise DepthlabError(
            f"cannot build a LayerStack for {type(model).__name__}: not a DepthLM or a "
            f"Hugging Face model (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    check_supported(model_type)
    return HFStack(model, dtype=dtype, device=device)


def auto_class(model_type: str) -> Any:
    """The transformers auto class that loads `model_type` with its LM head: the causal-LM
    one, or the image-text one for wrappers that have no causal-LM class (mistral3)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if is_wrapper(model_type) and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def is_wrapper(model_type: str) -> bool:
    """An image-text checkpoint whose text model the probe and eval run on."""
    spec = HF_SPECS.get(model_type)
    return spec is not None and spec.text_config


def check_supported(model_type: str) -> None:
    """One-line error for a Hugging Face model_type the LayerStack cannot view."""
    if model_type not in HF_SPECS:
        raise DepthlabError(
            f"unsupported architecture model_type={model_type!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHS)}"
        )
