"""LayerStack adapters against the models' own forward passes (tiny random models)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from depthlab.errors import DepthlabError
from depthlab.probe import LayerStack, build_stack
from depthlab.probe.adapters import auto_class
from depthlab.probe.metrics import compute_variance

transformers = pytest.importorskip("transformers")

V, D, L, T, N = 100, 32, 3, 8, 2
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
              max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=1,
              eos_token_id=2, pad_token_id=0)
MIXED = ["sliding_attention", "full_attention", "sliding_attention"]
ROPE_BY_TYPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1e5, "factor": 8.0}}


LLAMA4 = dict(COMMON, intermediate_size=16, intermediate_size_mlp=64, num_key_value_heads=2,
              head_dim=8, num_local_experts=4, num_experts_per_tok=2, moe_layers=[1, 2],
              attention_chunk_size=4, no_rope_layers=[1, 0, 1], use_qk_norm=True,
              attn_temperature_tuning=True, floor_scale=2, attn_scale=0.5)


def _configs() -> dict[str, object]:
    t = transformers
    return {
        "llama": t.LlamaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "mistral": t.MistralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                   sliding_window=4),
        "qwen2": t.Qwen2Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                               use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "qwen3": t.Qwen3Config(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                      head_dim=8, num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16, norm_topk_prob=True),
        "olmo2": t.Olmo2Config(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "olmoe": t.OlmoeConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                               num_experts=4, num_experts_per_tok=2),
        "mixtral": t.MixtralConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                   num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
        "gpt2": t.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64,
                             tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        "gpt_neox": t.GPTNeoXConfig(**COMMON, intermediate_size=64, rotary_pct=0.5,
                                    use_parallel_residual=True),
        "gpt_neox_seq": t.GPTNeoXConfig(**COMMON, intermediate_size=64,
                                        use_parallel_residual=False),
        "gemma": t.GemmaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "gemma2": t.Gemma2Config(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                 sliding_window=4, final_logit_softcapping=3.0,
                                 attn_logit_softcapping=5.0, query_pre_attn_scalar=8),
        # one RoPE per attention type (sliding / full)
        "gemma3_text": t.Gemma3TextConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                          head_dim=8, sliding_window=4, layer_types=MIXED,
                                          final_logit_softcapping=3.0),
        # image-text wrappers run on text: Gemma 3 (4B and up), Mistral Small 3.x
        "mistral3": t.Mistral3Config(
            text_config=t.MistralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                        sliding_window=4).to_dict(),
            vision_config=t.PixtralVisionConfig(hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                image_size=16, patch_size=8,
                                                head_dim=8).to_dict()),
        "gemma3": t.Gemma3Config(
            text_config=t.Gemma3TextConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                           head_dim=8, sliding_window=4, layer_types=MIXED,
                                           final_logit_softcapping=3.0).to_dict(),
            vision_config=t.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               image_size=16, patch_size=8).to_dict(),
            mm_tokens_per_image=4),
        "olmo3": t.Olmo3Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                               sliding_window=4, layer_types=MIXED, rope_parameters=ROPE_BY_TYPE),
        "olmo": t.OlmoConfig(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "phi3": t.Phi3Config(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "smollm3": t.SmolLM3Config(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "stablelm": t.StableLmConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                     partial_rotary_factor=0.5),
        "starcoder2": t.Starcoder2Config(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "cohere": t.CohereConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                 logit_scale=0.5),
        "cohere2": t.Cohere2Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                   logit_scale=0.5, sliding_window=4, layer_types=MIXED),
        "ministral": t.MinistralConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                       head_dim=8, sliding_window=4, layer_types=MIXED),
        "arcee": t.ArceeConfig(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "ernie4_5": t.Ernie4_5Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                     head_dim=8),
        "seed_oss": t.SeedOssConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                    head_dim=8),
        "hunyuan_v1_dense": t.HunYuanDenseV1Config(**COMMON, intermediate_size=64,
                                                   num_key_value_heads=2, head_dim=8),
        "glm": t.GlmConfig(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "helium": t.HeliumConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                 head_dim=8),
        "apertus": t.ApertusConfig(**COMMON, intermediate_size=64, num_key_value_heads=2),
        "nemotron": t.NemotronConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                     head_dim=8, partial_rotary_factor=0.5),
        "vaultgemma": t.VaultGemmaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                         head_dim=8),
        "granite": t.GraniteConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                   embedding_multiplier=3.0, residual_multiplier=0.5,
                                   attention_multiplier=0.2, logits_scaling=2.0),
        "exaone4": t.Exaone4Config(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                   sliding_window=4, layer_types=MIXED),
        "glm4": t.Glm4Config(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "phi": t.PhiConfig(**COMMON, intermediate_size=64, partial_rotary_factor=0.5),
        "qwen2_moe": t.Qwen2MoeConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2,
                                      moe_intermediate_size=16,
                                      shared_expert_intermediate_size=24, norm_topk_prob=False),
        # sigmoid routers: group-limited top-k (2 groups of 2, 1 kept) over scores + bias,
        # a shared expert, layer 0 dense; GLM-4-MoE with QK-norm and partial RoPE,
        # DeepSeek-V3 with multi-head latent attention
        "glm4_moe": t.Glm4MoeConfig(**COMMON, intermediate_size=64, num_key_value_heads=2,
                                    head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                    moe_intermediate_size=16, n_shared_experts=1, n_group=2,
                                    topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                                    routed_scaling_factor=2.5, use_qk_norm=True,
                                    partial_rotary_factor=0.5),
        "deepseek_v3": t.DeepseekV3Config(**COMMON, intermediate_size=64, num_key_value_heads=4,
                                          n_routed_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, n_shared_experts=1,
                                          n_group=2, topk_group=1, first_k_dense_replace=1,
                                          q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
                                          qk_nope_head_dim=4, v_head_dim=8),
        "dots1": t.Dots1Config(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                               n_routed_experts=4, num_experts_per_tok=2,
                               moe_intermediate_size=16, n_shared_experts=1, n_group=2,
                               topk_group=1, first_k_dense_replace=1),
        "glm4_moe_lite": t.Glm4MoeLiteConfig(**COMMON, intermediate_size=64,
                                             num_key_value_heads=4, n_routed_experts=4,
                                             num_experts_per_tok=2, moe_intermediate_size=16,
                                             n_shared_experts=1, n_group=2, topk_group=1,
                                             first_k_dense_replace=1, q_lora_rank=16,
                                             kv_lora_rank=8, qk_rope_head_dim=4,
                                             qk_nope_head_dim=4, v_head_dim=8),
        # softmax router, group-limited (by each group's best expert), not renormalised
        "deepseek_v2": t.DeepseekV2Config(**COMMON, intermediate_size=64, num_key_value_heads=4,
                                          n_routed_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=16, n_shared_experts=1,
                                          n_group=2, topk_group=1,
                                          topk_method="group_limited_greedy",
                                          first_k_dense_replace=1, q_lora_rank=16,
                                          kv_lora_rank=8, qk_rope_head_dim=4,
                                          qk_nope_head_dim=4, v_head_dim=8),
        "hunyuan_v1_moe": t.HunYuanMoEV1Config(**COMMON, intermediate_size=16,
                                               num_key_value_heads=2, head_dim=8, num_experts=4,
                                               moe_topk=2, use_qk_norm=True),
        # the choice adds a balancing bias to the softmax scores
        "ernie4_5_moe": t.Ernie4_5_MoeConfig(**COMMON, intermediate_size=64,
                                             num_key_value_heads=2, head_dim=8,
                                             moe_intermediate_size=16, moe_num_experts=4,
                                             moe_k=2, moe_layer_start_index=0),
        "flex_olmo": t.FlexOlmoConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                      num_experts=4, num_experts_per_tok=2),
        "granitemoe": t.GraniteMoeConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                         num_local_experts=4, num_experts_per_tok=2,
                                         embedding_multiplier=3.0, residual_multiplier=0.5,
                                         attention_multiplier=0.2, logits_scaling=2.0),
        "minimax_m2": t.MiniMaxM2Config(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                        head_dim=8, num_local_experts=4, num_experts_per_tok=2),
        "phimoe": t.PhimoeConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                 num_local_experts=4, num_experts_per_tok=2),
        # biased router (top-k of logits, softmax over the k), attention sinks, clamped
        # SwiGLU with biases, alternating sliding / full attention
        "gpt_oss": t.GptOssConfig(**COMMON, intermediate_size=16, num_key_value_heads=2,
                                  head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                                  sliding_window=4, layer_types=MIXED,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
        # Llama 4: the top-k logits' sigmoid scales each expert's input; a shared expert;
        # chunked attention (chunks of 4) on RoPE layers with L2 QK-norm, and layer 1 a
        # NoPE full-attention layer with temperature tuning; layer 0 dense
        "llama4_text": t.Llama4TextConfig(**LLAMA4),
    }


CONFIGS = _configs()
IMPLS = ("eager", "sdpa")
EAGER_ONLY = ("gemma2", "vaultgemma", "gpt_oss")  # soft-capping / no SDPA path in transformers
CASES = [(n, i) for n in CONFIGS for i in IMPLS if not (n in EAGER_ONLY and i == "sdpa")]
SIGMOID_MOE = ("glm4_moe", "deepseek_v3", "dots1", "glm4_moe_lite", "minimax_m2", "llama4_text")
MOE = ("qwen3_moe", "olmoe", "mixtral", "qwen2_moe", *SIGMOID_MOE, "deepseek_v2",
       "hunyuan_v1_moe", "ernie4_5_moe", "flex_olmo", "granitemoe", "gpt_oss", "phimoe")
FIRST_DENSE = ("glm4_moe", "deepseek_v3", "dots1", "glm4_moe_lite", "deepseek_v2", "llama4_text")
MLA = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite")


def _model(name: str, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = copy.deepcopy(CONFIGS[name])
    model = auto_class(cfg.model_type).from_config(cfg, attn_implementation=impl)
    # random inits are tiny (std 0.02): scale up so that blocks visibly matter
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in n and "wte" not in n and "wpe" not in n:
                p.mul_(10.0)
            elif p.ndim == 1 and "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(seed))


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for base in ("model", "transformer", "gpt_neox"):
        if hasattr(model, base):
            b = getattr(model, base)
            b = getattr(b, "language_model", b)  # a multimodal wrapper's text model
            return b.layers if hasattr(b, "layers") else b.h
    raise AssertionError


def _text_config(model: torch.nn.Module):
    return getattr(model.config, "text_config", model.config)


def _delete_layer(model: torch.nn.Module, s: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    del _layers(m)[s]
    cfg = _text_config(m)
    if getattr(cfg, "model_type", "") == "gpt2":
        cfg.n_layer -= 1
    else:
        cfg.num_hidden_layers -= 1
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i != s]
    return m


def _swap_layers(model: torch.nn.Module, a: int, b: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    layers = _layers(m)
    la, lb = layers[a], layers[b]
    layers[a], layers[b] = lb, la
    cfg = _text_config(m)
    if getattr(cfg, "layer_types", None) is not None:
        lt = list(cfg.layer_types)
        lt[a], lt[b] = lt[b], lt[a]
        cfg.layer_types = lt
    return m


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_hf_stack_matches_model(name: str, impl: str) -> None:
    model = _model(name, impl)
    stack = build_stack(model)
    assert isinstance(stack, LayerStack)
    assert stack.n_layers == L and stack.d_model == D
    ids = _ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, use_cache=False)
    hs = stack.hidden_states(ids)
    assert len(hs) == L + 1
    for l in range(L):  # noqa: E741
        _close(hs[l], out.hidden_states[l])
    logits = stack.logits(hs[-1])
    _close(logits, out.logits)
    assert out.logits.std() > 0.1  # the test model is not degenerate
    # loss = token-mean next-token CE
    flat = out.logits[:, :-1].reshape(-1, V)
    ref = torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1))
    _close(stack.loss(hs[-1], ids), ref)

    # run from the middle with the original plan
    with torch.no_grad():
        _close(stack.run(hs[1], 1), hs[-1])

    # skip block s == a model with that layer deleted
    s = 1
    short = _delete_layer(model, s)
    with torch.no_grad():
        ref = short(ids, use_cache=False).logits
        h = stack.run(stack.embed(ids), 0, [0, None, 2])
    _close(stack.logits(h), ref)

    # swap blocks 0 and 2 == a model whose ModuleList has them swapped
    swapped = _swap_layers(model, 0, 2)
    with torch.no_grad():
        ref = swapped(ids, use_cache=False).logits
        h = stack.run(stack.embed(ids), 0, [2, 1, 0])
    _close(stack.logits(h), ref)


def test_sliding_window_is_applied() -> None:
    """Mistral with window 4 on T=8 differs from full attention: the mask really is used."""
    model = _model("mistral", "sdpa")
    stack = build_stack(model)
    full = copy.deepcopy(model)
    full.config.sliding_window = None
    ids = _ids()
    h = stack.hidden_states(ids)[-1]
    with torch.no_grad():
        assert not torch.allclose(stack.logits(h), full(ids, use_cache=False).logits, atol=1e-4)


# ------------------------------------------------------------------ sublayer hooks


def _jvp_check(stack: LayerStack, l: int, h: torch.Tensor) -> None:  # noqa: E741
    v = torch.randn_like(h)
    f = lambda x: stack.run_block(l, x)  # noqa: E731
    out, tangent = torch.func.jvp(f, (h,), (v,))
    with sdpa_kernel([SDPBackend.MATH]):  # double backward through fused SDPA is unsupported
        _, ref = torch.autograd.functional.jvp(f, (h,), (v,))
    with torch.no_grad():
        _close(out, stack.run_block(l, h))
    _close(tangent, ref, atol=1e-4)
    # metrics batch tangents with vmap(jvp)
    vs = torch.stack([v, 2 * v])
    with torch.no_grad():
        batched = torch.func.vmap(lambda t: torch.func.jvp(f, (h,), (t,))[1])(vs)
    _close(batched[1], 2 * tangent, atol=1e-4)


def _branch_check(stack: LayerStack, l: int, h: torch.Tensor) -> None:  # noqa: E741
    outs: dict[str, torch.Tensor] = {}
    handles = []
    for k, m in stack.branch_modules(l).items():
        def hook(_m, _a, o, k=k):  # noqa: ANN001, ANN202
            # (Llama 4's MoE returns its update flattened to [tokens, d])
            outs[k] = (o[0] if isinstance(o, tuple) else o).reshape(h.shape)
        handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        y = stack.run_block(l, h)
    for hd in handles:
        hd.remove()
    assert set(outs) == {"attn", "mlp"}
    _close(y, h + stack.branch_scale * (outs["attn"] + outs["mlp"]), atol=1e-4)


@pytest.mark.parametrize(("name", "impl"), CASES)
def test_hf_hooks(name: str, impl: str) -> None:
    model = _model(name, impl)
    stack = build_stack(model)
    h = stack.hidden_states(_ids())[1]
    _jvp_check(stack, 1, h)
    _branch_check(stack, 1, h)
    # attention weights: [N, H, T, T], causal rows summing to 1, fp32, config restored
    probs = stack.attention_probs(1, h)
    assert model.config._attn_implementation == impl
    assert probs is not None and probs.dtype == torch.float32
    assert probs.shape == (N, 4, T, T)
    _close(probs.sum(-1), torch.ones(N, 4, T))
    assert probs.triu(1).abs().max() == 0
    if name in ("mistral", "mixtral"):  # sliding window 4: keys older than 3 positions get 0
        assert probs.tril(-4).abs().max() == 0
    # weights: canonical names, Linear convention [out, in]
    w = stack.weight_matrices(1)
    attn = (("attn.q_a_proj", "attn.q_b_proj", "attn.kv_a_proj_with_mqa", "attn.kv_b_proj")
            if name in MLA else ("attn.q_proj", "attn.k_proj", "attn.v_proj"))
    for key in (*attn, "attn.o_proj"):
        assert key in w and w[key].ndim == 2
    assert w["attn.o_proj"].shape[0] == D and w[attn[0]].shape[-1] == D
    if name in MOE:
        assert {"router", "experts.gate_proj", "experts.up_proj", "experts.down_proj"} <= set(w)
        assert w["experts.up_proj"].shape == w["experts.gate_proj"].shape
        assert w["experts.up_proj"].ndim == 3 and w["experts.up_proj"].shape[-1] == D
        assert w["experts.down_proj"].shape[1] == D
    else:
        assert {"mlp.up_proj", "mlp.down_proj"} <= set(w)
        assert stack.moe_router(1) is None
    if name in FIRST_DENSE:  # layer 0 is a dense MLP
        assert stack.moe_router(0) is None and "mlp.up_proj" in stack.weight_matrices(0)
    # norm gains and biases are not weight matrices
    assert not [k for k in w if k.endswith(("norm", "bias"))]


def test_a_model_without_its_lm_head_is_refused() -> None:
    """A bare backbone, or a task model of a supported architecture (its head is no LM
    head: a sequence classifier failed with "'NoneType' object is not callable")."""
    cfg = CONFIGS["llama"]
    for cls in (transformers.LlamaModel, transformers.LlamaForSequenceClassification):
        with pytest.raises(DepthlabError, match=f"{cls.__name__} has no language-model head: "
                                                "pass the"):
            build_stack(cls(cfg))


def test_bidirectional_gemma3_is_refused() -> None:
    """EmbeddingGemma's config is a gemma3_text one with bidirectional attention."""
    cfg = copy.deepcopy(CONFIGS["gemma3_text"])
    cfg.use_bidirectional_attention = True
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(DepthlabError, match="bidirectional.*not a causal LM"):
        build_stack(model)


def test_fused_qkv_split() -> None:
    """GPT-2 c_attn (Conv1D) and NeoX query_key_value split into per-projection [out, in]."""
    x = torch.randn(5, D)
    gpt2 = build_stack(_model("gpt2", "eager"))
    attn = gpt2.model.transformer.h[0].attn
    w = gpt2.weight_matrices(0)
    with torch.no_grad():
        q, k, v = attn.c_attn(x).split(D, dim=-1)
        _close(q, x @ w["attn.q_proj"].T + attn.c_attn.bias[:D])
        _close(v, x @ w["attn.v_proj"].T + attn.c_attn.bias[2 * D:])
        _close(attn.c_proj(x), x @ w["attn.o_proj"].T + attn.c_proj.bias)
    neox = build_stack(_model("gpt_neox", "eager"))
    qkv_mod = neox.model.gpt_neox.layers[0].attention.query_key_value
    w = neox.weight_matrices(0)
    with torch.no_grad():
        qkv = qkv_mod(x).view(5, 4, 3 * (D // 4))
        q, k, v = qkv.chunk(3, dim=-1)
        bias = qkv_mod.bias.view(4, 3, -1)
        _close(q.reshape(5, D), x @ w["attn.q_proj"].T + bias[:, 0].reshape(-1))
        _close(k.reshape(5, D), x @ w["attn.k_proj"].T + bias[:, 1].reshape(-1))


def test_fused_phi3_and_glm4_splits() -> None:
    """Phi-3 qkv_proj splits into q/k/v (GQA sizes); the Phi-3 and GLM-4 gate_up_proj into
    gate/up, gate first: the split weights recompute the modules' own outputs. Qwen2-MoE's
    shared expert keeps its names; 2-D norm gains are left out."""
    x = torch.randn(5, D)
    phi3 = build_stack(_model("phi3", "eager"))
    qkv = phi3.block_module(0).self_attn.qkv_proj
    w = phi3.weight_matrices(0)
    with torch.no_grad():
        q, k, v = qkv(x).split([D, D // 2, D // 2], dim=-1)
        for got, key in ((q, "attn.q_proj"), (k, "attn.k_proj"), (v, "attn.v_proj")):
            _close(got, x @ w[key].T)
    for name in ("phi3", "glm4"):
        stack = build_stack(_model(name, "eager"))
        w = stack.weight_matrices(0)
        assert "mlp.gate_up_proj" not in w
        with torch.no_grad():
            swiglu = F.silu(x @ w["mlp.gate_proj"].T) * (x @ w["mlp.up_proj"].T)
            _close(swiglu @ w["mlp.down_proj"].T, stack.block_module(0).mlp(x), atol=1e-4)
    shared = build_stack(_model("qwen2_moe", "eager")).weight_matrices(0)
    assert {"shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
            "mlp.shared_expert_gate", "router"} <= set(shared)
    # Cohere's per-head q/k norm gains are 2-D, and still not weight matrices
    cohere = copy.deepcopy(CONFIGS["cohere"])
    cohere.use_qk_norm = True
    w = build_stack(transformers.AutoModelForCausalLM.from_config(cohere)).weight_matrices(0)
    assert "attn.q_proj" in w and not [k for k in w if k.endswith("norm")]


def _oracle_topk(name: str, x: torch.Tensor, info, router_w: torch.Tensor) -> torch.Tensor:
    """Each router's rule written out from its paper/model card, on the routed input x."""
    router, k = info.router, info.top_k
    logits = x @ router_w.T
    if name == "gpt_oss":  # top-k of the biased logits (softmax over those k: same choice)
        return (logits + router.bias).topk(k, dim=-1).indices
    if name == "llama4_text":  # top-k of the logits (their sigmoid scales the expert input)
        return logits.topk(k, dim=-1).indices
    if name == "minimax_m2":  # sigmoid scores + the block's balancing bias, no groups
        return (logits.sigmoid() + info.mlp.e_score_correction_bias).topk(k, dim=-1).indices
    if name in SIGMOID_MOE or name == "deepseek_v2":
        # DeepSeek-V3: sigmoid scores + balancing bias, groups ranked by their best two;
        # DeepSeek-V2: softmax scores, groups ranked by their best one
        if name == "deepseek_v2":
            choice, best = logits.softmax(-1), 1
        else:
            choice, best = logits.sigmoid() + router.e_score_correction_bias, 2
        groups = choice.view(-1, router.num_group, 4 // router.num_group)
        keep = groups.topk(best, dim=-1).values.sum(-1).topk(router.topk_group, dim=-1).indices
        allowed = torch.zeros_like(groups[..., 0]).scatter(1, keep, 1.0).bool()
        masked = groups.masked_fill(~allowed[..., None], float("-inf")).view(-1, 4)
        return masked.topk(k, dim=-1).indices
    if name == "ernie4_5_moe":  # softmax scores + balancing bias
        bias = router.moe_statics.e_score_correction_bias
        return (logits.softmax(-1) + bias).topk(k, dim=-1).indices
    return logits.softmax(-1).topk(k, dim=-1).indices


@pytest.mark.parametrize("name", MOE)
def test_hf_moe_router(name: str) -> None:
    model = _model(name, "eager")
    for lay in _layers(model)[1:]:  # balancing / router biases that change the choice
        gate = getattr(getattr(lay, "mlp", None), "gate", None)
        bias = getattr(gate, "e_score_correction_bias", None)
        if bias is None and hasattr(gate, "moe_statics"):
            bias = gate.moe_statics.e_score_correction_bias
        if name == "gpt_oss":
            bias = lay.mlp.router.bias
        if name == "minimax_m2":
            bias = lay.mlp.e_score_correction_bias
        if bias is not None:
            with torch.no_grad():
                bias.copy_(torch.tensor([0.0, 0.3, -0.2, 0.1]).view_as(bias))
    stack = build_stack(model)
    info = stack.moe_router(1)
    assert info is not None and info.top_k == 2 and info.num_experts == 4
    assert info.renormalize is (name not in ("olmoe", "qwen2_moe", "deepseek_v2", "dots1",
                                             "flex_olmo", "phimoe", "llama4_text"))
    assert info.scoring == ("sigmoid" if name in SIGMOID_MOE else "softmax")
    seen: dict[str, torch.Tensor] = {}
    def router_hook(_m, a, o):  # Llama 4 returns (scores: 0 except the chosen, logits)
        idx = o[0].topk(2, dim=-1).indices if name == "llama4_text" else o[2]
        seen.update(x=a[0].reshape(-1, D), idx=idx)

    info.router.register_forward_hook(router_hook)
    info.mlp.register_forward_pre_hook(lambda _m, a: seen.update(mlp_in=a[0].reshape(-1, D)))
    stack.branch_modules(1)["attn"].register_forward_hook(
        lambda _m, a, o: seen.update(a=o[0] if isinstance(o, tuple) else o))
    h = stack.hidden_states(_ids())[1]
    w = stack.weight_matrices(1)["router"]
    with torch.no_grad():
        stack.run_block(1, h)
        top = _oracle_topk(name, seen["x"].float(), info, w)
        # the routed input is the post-attention normed residual (post-norm: the residual)
        block = stack.block_module(1)
        mid = h + seen["a"] * stack.branch_scale
        routed = mid if name == "flex_olmo" else block.post_attention_layernorm(mid)
    assert top.sort(-1).values.tolist() == seen["idx"].sort(-1).values.tolist()
    counts = torch.bincount(top.flatten(), minlength=4)
    assert counts.sum() == N * T * 2 and (counts > 0).sum() >= 2
    _close(seen["x"], routed.reshape(-1, D))
    _close(seen["mlp_in"], seen["x"])
    assert w.shape == (4, D)


def test_llama4_wrapper_and_expert_weights(tmp_path) -> None:
    """Llama 4 checkpoints are image-text wrappers (model_type llama4): the stack reads
    the text model inside the wrapper object, and the loader loads the text model alone
    (AutoModelForCausalLM). Experts stored [E, in, out], gate then up: the canonical
    [E, out, in] weights recompute an expert."""
    from depthlab.probe.loading import load_model

    torch.manual_seed(0)
    vision = transformers.Llama4VisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        image_size=16, patch_size=8, vision_output_dim=16, projector_input_dim=16,
        projector_output_dim=D)
    cfg = transformers.Llama4Config(text_config=CONFIGS["llama4_text"].to_dict(),
                                    vision_config=vision.to_dict())
    wrapper = transformers.Llama4ForConditionalGeneration(cfg).eval()
    ids = _ids()
    with torch.no_grad():  # (the wrapper's own forward fails in transformers 5.24)
        ref = wrapper.language_model(ids).logits
    stack = build_stack(wrapper)
    assert stack.arch == "llama4" and stack.moe_router(0) is None
    _close(stack.logits(stack.hidden_states(ids)[-1]), ref)
    wrapper.save_pretrained(tmp_path / "l4")
    model, _, info = load_model(tmp_path / "l4")
    assert info["arch"] == "llama4_text"
    loaded = build_stack(model)
    _close(loaded.logits(loaded.hidden_states(ids)[-1]), ref)
    # its vision weights are expected to go unused, but a text weight must be there
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "l4" / "model.safetensors")
    del weights[next(k for k in weights if "layers.1.feed_forward.router" in k)]
    save_file(weights, tmp_path / "l4" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DepthlabError, match="lacks 1 weights of the text model"):
        load_model(tmp_path / "l4")
    experts = stack.block_module(1).feed_forward.experts
    w = stack.weight_matrices(1)
    x = torch.randn(5, D)
    with torch.no_grad():
        ref = experts(x.repeat(4, 1)).view(4, 5, D)[2]  # every token through every expert
        got = (F.silu(x @ w["experts.gate_proj"][2].T) * (x @ w["experts.up_proj"][2].T)
               @ w["experts.down_proj"][2].T)
    _close(got, ref, atol=1e-4)


def test_gpt_oss_expert_weights_recompute_the_experts() -> None:
    """gpt-oss stores experts [E, in, out] with gate and up interleaved: the canonical
    [E, out, in] gate/up/down (biases apart) recompute one expert's clamped SwiGLU."""
    stack = build_stack(_model("gpt_oss", "eager"))
    experts = stack.block_module(1).mlp.experts
    w = stack.weight_matrices(1)
    x = torch.randn(5, D)
    with torch.no_grad():
        gate_up = x @ experts.gate_up_proj[2] + experts.gate_up_proj_bias[2]
        ref = experts._apply_gate(gate_up) @ experts.down_proj[2] + experts.down_proj_bias[2]
        gate = x @ w["experts.gate_proj"][2].T + experts.gate_up_proj_bias[2, ::2]
        up = x @ w["experts.up_proj"][2].T + experts.gate_up_proj_bias[2, 1::2]
        lim = experts.limit
        act = gate.clamp(max=lim) * torch.sigmoid(experts.alpha * gate.clamp(max=lim))
        got = (up.clamp(-lim, lim) + 1) * act @ w["experts.down_proj"][2].T
    _close(got + experts.down_proj_bias[2], ref, atol=1e-4)


# ---------------------------------------------------------------------- dtype


def test_bf16_model_in_fp32() -> None:
    model = _model("llama", "sdpa").to(torch.bfloat16)
    stack = build_stack(model, float32=True)
    assert stack.model_dtype == torch.bfloat16 and stack.compute_dtype == torch.float32
    hs = stack.hidden_states(_ids())
    assert all(h.dtype == torch.float32 for h in hs)
    assert stack.loss(hs[-1], _ids()).dtype == torch.float32


def test_plan_validation_and_callables() -> None:
    stack = build_stack(_model("llama", "sdpa"))
    ids = _ids()
    hs = stack.hidden_states(ids)
    with torch.no_grad():
        # a callable entry replaces the block; the identity callable equals a skip
        a = stack.run(hs[0], 0, [0, lambda x: x, 2])
        b = stack.run(hs[0], 0, [0, None, 2])
        _close(a, b)
        # repeating a block
        c = stack.run(hs[2], 2, [1])
        _close(c, stack.run_block(1, hs[2]))
        _close(stack.run(hs[L], L, []), hs[L])
    with pytest.raises(DepthlabError, match="plan has 2 entries"):
        stack.run(hs[0], 0, [0, 1])
    with pytest.raises(DepthlabError, match="out of range"):
        stack.run(hs[0], 0, [0, 1, 7])
    with pytest.raises(DepthlabError, match="start"):
        stack.run(hs[0], 5)
    with pytest.raises(DepthlabError, match="max_seq_len"):
        stack.hidden_states(torch.zeros(1, 65, dtype=torch.long))
    # a keep/skip mask or a float is not a plan: int() made them blocks 1, 0 and 1 silently
    for bad in ([True, False, True], [0, 1.7, 2], [0, np.bool_(True), 2]):
        with pytest.raises(DepthlabError, match="block index must be an int.*not a mask"):
            stack.run(hs[0], 0, bad)
    _close(stack.run(hs[0], 0, [np.int64(0), torch.tensor(1), 2]), hs[L])  # integer types
    # token ids are checked where every metric gets them (an embedding lookup failed deep in
    # torch, float ids were truncated)
    vocab = stack.vocab_size
    for bad, needle in ((ids + vocab, f"beyond the model's vocabulary \\({vocab}\\)"),
                        (-ids - 1, "must be >= 0"), (ids.float() + 0.7, "must be integers"),
                        (None, "token ids are required")):
        with pytest.raises(DepthlabError, match=needle):
            stack.embed(bad)
    with pytest.raises(DepthlabError, match="beyond the model's vocabulary"):
        compute_variance(stack, ids + vocab)
    # depthlab's own token-file dtypes (torch has no min/max for them) and numpy arrays
    ref = compute_variance(stack, ids).variance
    for same in (ids.numpy().astype(np.uint16), ids.numpy().astype(np.uint32), ids.tolist()):
        assert compute_variance(stack, same).variance == ref
    # a model where a stack belongs, and progress=True where a callback belongs: one line
    with pytest.raises(DepthlabError, match="take a LayerStack, got LlamaForCausalLM: wrap"):
        compute_variance(stack.model, ids)
    with pytest.raises(DepthlabError, match="progress= takes a callback"):
        compute_variance(stack, ids, progress=True)
    assert compute_variance(stack, ids, progress=False).info["n_sequences"] == ids.shape[0]


# ------------------------------------------------------------------ unsupported


def test_unsupported_architecture() -> None:
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=64)
    with pytest.raises(DepthlabError, match="model_type='bert'.*llama.*gpt2"):
        build_stack(transformers.BertModel(cfg))
    with pytest.raises(DepthlabError, match="Linear"):
        build_stack(torch.nn.Linear(2, 2))
    llama = _model("llama", "sdpa")
    with pytest.raises(DepthlabError, match="ForCausalLM"):
        build_stack(llama.model)
    with pytest.raises(DepthlabError, match="loaded by AutoModelForImageTextToText"):
        build_stack(transformers.Mistral3Model(CONFIGS["mistral3"]))
