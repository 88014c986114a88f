"""LayerStack over depthlab's own DepthLM: every norm placement, GQA, QK-norm, MoE."""

from __future__ import annotations

import copy

import pytest
import torch

from depthlab.config import ModelConfig, MoEConfig
from depthlab.model.transformer import DepthLM
from depthlab.probe import MoERouterInfo, build_stack
from depthlab.probe.adapters import DepthLMStack

V, D, L, T, N = 64, 32, 3, 8, 2

VARIANTS = {
    "pre": dict(norm_placement="pre"),
    "post": dict(norm_placement="post"),
    "mix": dict(norm_placement="mix", mix_ln_fraction=0.5),
    "scaled": dict(norm_placement="scaled"),
    "peri": dict(norm_placement="peri"),
    "qknorm_layernorm_tied": dict(qk_norm=True, norm="layernorm", tie_embeddings=True),
    "moe": dict(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16)),
    "moe_shared_layers": dict(moe=MoEConfig(num_experts=4, top_k=1, expert_hidden=16,
                                            shared_expert=True, renormalize=False, layers=[1])),
}


def _model(variant: str) -> DepthLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=V, n_layers=L, d_model=D, n_heads=4, n_kv_heads=2,
                      max_seq_len=64, init="normal", init_std=0.2, **VARIANTS[variant])
    return DepthLM(cfg).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(1))


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_depthlm_stack_matches_model(variant: str) -> None:
    model = _model(variant)
    stack = build_stack(model)
    assert isinstance(stack, DepthLMStack) and stack.arch == "depthlm"
    assert stack.n_layers == L and stack.d_model == D and stack.max_seq_len == 64
    ids = _ids()
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append(o)) for b in model.blocks]
    with torch.no_grad():
        ref = model(ids, targets=ids)
    for hd in hooks:
        hd.remove()
    hs = stack.hidden_states(ids)
    assert len(hs) == L + 1
    _close(hs[0], model.embed(ids))
    for l in range(L):  # noqa: E741
        _close(hs[l + 1], outs[l])
    _close(stack.logits(hs[-1]), ref.logits)
    assert ref.logits.std() > 0.1

    # skip block 1 == a model with that block deleted
    short = copy.deepcopy(model)
    del short.blocks[1]
    swapped = copy.deepcopy(model)
    swapped.blocks[0], swapped.blocks[2] = swapped.blocks[2], swapped.blocks[0]
    with torch.no_grad():
        _close(stack.logits(stack.run(hs[0], 0, [0, None, 2])), short(ids).logits)
        _close(stack.logits(stack.run(hs[0], 0, [2, 1, 0])), swapped(ids).logits)
        _close(stack.run(hs[1], 1), hs[-1])


@pytest.mark.parametrize("variant", ["pre", "post", "scaled", "peri", "moe"])
def test_depthlm_hooks(variant: str) -> None:
    model = _model(variant)
    stack = build_stack(model)
    h = stack.hidden_states(_ids())[1]
    block = model.blocks[1]

    # forward-mode AD through one block equals reverse-mode-based jvp
    v = torch.randn_like(h)
    f = lambda x: stack.run_block(1, x)  # noqa: E731
    out, tangent = torch.func.jvp(f, (h,), (v,))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        _, ref = torch.autograd.functional.jvp(f, (h,), (v,))
    _close(tangent, ref, atol=1e-4)
    with torch.no_grad():
        _close(out, stack.run_block(1, h))
        batched = torch.func.vmap(lambda t: torch.func.jvp(f, (h,), (t,))[1])(
            torch.stack([v, 2 * v]))
    _close(batched[1], 2 * tangent, atol=1e-4)

    # branch modules: their outputs are the residual updates (pre-LN style placements)
    seen: dict[str, torch.Tensor] = {}
    for k, m in stack.branch_modules(1).items():
        m.register_forward_hook(lambda _m, a, o, k=k: seen.update({k: o, k + "_in": a[0]}))
    with torch.no_grad():
        y = stack.run_block(1, h)
    if variant != "post":
        _close(y, h + seen["attn"] + seen["mlp"], atol=1e-5)

    # attention probabilities reproduce the attention branch: o_proj(P @ V)
    probs = stack.attention_probs(1, h)
    assert probs.shape == (N, 4, T, T) and probs.dtype == torch.float32
    assert probs.triu(1).abs().max() == 0
    attn = block.attn
    x = stack._attn_input(block, h)
    with torch.no_grad():
        _, _, vv = attn._qkv(x)
        vv = vv.repeat_interleave(2, dim=1)
        manual = attn.o_proj((probs @ vv).transpose(1, 2).reshape(N, T, D))
        _close(manual, attn(x), atol=1e-5)

    w = stack.weight_matrices(1)
    assert {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj"} <= set(w)
    assert w["attn.k_proj"].shape == (D // 2, D)
    if variant == "moe":
        assert {"router", "experts.gate_proj", "experts.up_proj", "experts.down_proj"} <= set(w)
        assert w["experts.up_proj"].shape == (4, 16, D)
    else:
        assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= set(w)
        assert stack.moe_router(1) is None


@pytest.mark.parametrize("variant", ["moe", "moe_shared_layers"])
def test_depthlm_moe_router(variant: str) -> None:
    model = _model(variant)
    stack = build_stack(model)
    assert stack.moe_router(0) is None or variant == "moe"
    info = stack.moe_router(1)
    assert isinstance(info, MoERouterInfo)
    moe_cfg = VARIANTS[variant]["moe"]
    assert (info.top_k, info.num_experts, info.renormalize) == (
        moe_cfg.top_k, moe_cfg.num_experts, moe_cfg.renormalize)
    seen: dict[str, torch.Tensor] = {}
    info.router.register_forward_hook(lambda _m, a, o: seen.update(x=a[0], logits=o))
    model.blocks[1].attn.register_forward_hook(lambda _m, a, o: seen.update(a=o))
    h = stack.hidden_states(_ids())[1]
    with torch.no_grad():
        stack.run_block(1, h)
        routed = model.blocks[1].mlp_norm(h + seen["a"]).reshape(-1, D)
        top = (seen["x"] @ info.router.weight.T).softmax(-1).topk(info.top_k, -1).indices
        manual = info.mlp.route(seen["x"]).experts
    _close(seen["x"], routed)
    counts = torch.bincount(top.flatten(), minlength=4)
    assert counts.tolist() == torch.bincount(manual.flatten(), minlength=4).tolist()
    assert counts.sum() == N * T * info.top_k


def test_depthlm_dtype_option() -> None:
    model = _model("pre").to(torch.bfloat16)
    stack = build_stack(model, dtype=torch.float32)
    assert stack.model_dtype == torch.bfloat16 and stack.compute_dtype == torch.float32
    assert stack.hidden_states(_ids())[-1].dtype == torch.float32
    stack2 = build_stack(_model("pre").to(torch.bfloat16)).to_float32()
    assert stack2.compute_dtype == torch.float32 and stack2.model_dtype == torch.bfloat16
