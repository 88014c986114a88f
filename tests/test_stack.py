"""LayerStack adapters against the models' own forward passes (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch

from depthlab.errors import DepthlabError
from depthlab.probe import LayerStack, build_stack

transformers = pytest.importorskip("transformers")

V, D, L, T, N = 100, 32, 3, 8, 2
COMMON = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
              max_position_embeddings=64, tie_word_embeddings=False)


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
                                   num_local_experts=4, num_experts_per_tok=2),
        "gpt2": t.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=64,
                             tie_word_embeddings=False),
        "gpt_neox": t.GPTNeoXConfig(**COMMON, intermediate_size=64, rotary_pct=0.5,
                                    use_parallel_residual=True),
        "gpt_neox_seq": t.GPTNeoXConfig(**COMMON, intermediate_size=64,
                                        use_parallel_residual=False),
        "gemma": t.GemmaConfig(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8),
        "gemma2": t.Gemma2Config(**COMMON, intermediate_size=64, num_key_value_heads=2, head_dim=8,
                                 sliding_window=4, final_logit_softcapping=3.0,
                                 attn_logit_softcapping=5.0, query_pre_attn_scalar=8),
    }


CONFIGS = _configs()
IMPLS = ("eager", "sdpa")


def _model(name: str, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = copy.deepcopy(CONFIGS[name])
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
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
            return b.layers if hasattr(b, "layers") else b.h
    raise AssertionError


def _delete_layer(model: torch.nn.Module, s: int) -> torch.nn.Module:
    m = copy.deepcopy(model)
    del _layers(m)[s]
    cfg = m.config
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
    if getattr(m.config, "layer_types", None) is not None:
        lt = list(m.config.layer_types)
        lt[a], lt[b] = lt[b], lt[a]
        m.config.layer_types = lt
    return m


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(CONFIGS))
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
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
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
