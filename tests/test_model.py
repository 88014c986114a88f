"""DepthLM: shapes, causality, GQA, MoE routing, norm placements, init, overfitting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from depthlab.config import build_config
from depthlab.model import DepthLM, MoE
from depthlab.model.norms import RMSNorm

V = 97


def make(**overrides) -> DepthLM:
    base = {"model.vocab_size": V, "model.n_layers": 3, "model.d_model": 32, "model.n_heads": 4,
            "model.max_seq_len": 64, "data.seq_len": 32}
    base.update(overrides)
    torch.manual_seed(0)
    return DepthLM(build_config({}, base).model).eval()


MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 24}


def test_shapes_and_parameter_count():
    m = make()
    ids = torch.randint(0, V, (2, 10))
    assert m(ids).logits.shape == (2, 10, V)
    d, h, L = 32, m.cfg.hidden, 3
    per_block = 4 * d * d + 3 * d * h + 2 * d  # q,k,v,o + SwiGLU + two RMSNorm gains
    expected = V * d * 2 + L * per_block + d  # embedding + untied head + final norm
    assert m.num_params() == expected
    assert m.cfg.hidden == 96  # 8/3 * 32 rounded up to a multiple of 32


def test_gqa_parameter_count_and_tied_embeddings():
    m = make(**{"model.n_kv_heads": 1, "model.tie_embeddings": True})
    d, hd = 32, 8
    attn = 2 * d * d + 2 * d * hd  # q, o full; k, v one head
    expected = V * d + 3 * (attn + 3 * d * m.cfg.hidden + 2 * d) + d
    assert m.num_params() == expected
    assert m.lm_head.weight is m.tok_embeddings.weight


def test_moe_active_parameter_count():
    m = make(**{"model.moe": {**MOE, "shared_expert": True}})
    per_expert = 3 * 32 * 24
    assert m.num_params() - m.num_params(active=True) == 3 * (4 - 2) * per_expert


@pytest.mark.parametrize("variant", [
    {}, {"model.n_kv_heads": 2}, {"model.moe": MOE}, {"model.norm_placement": "post"},
    {"model.norm_placement": "peri"}, {"model.qk_norm": True},
])
def test_causality(variant):
    """Changing a future token never changes an earlier logit."""
    m = make(**variant)
    ids = torch.randint(0, V, (2, 12))
    changed = ids.clone()
    changed[:, 7] = (changed[:, 7] + 1) % V
    a, b = m(ids).logits, m(changed).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def reference_mha(attn, x: torch.Tensor) -> torch.Tensor:
    """Plain multi-head attention written out by hand (explicit K/V per head)."""
    B, T, d = x.shape
    H, hd = attn.n_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.t()).view(B, T, H, hd).transpose(1, 2)
    k = (x @ attn.k_proj.weight.t()).view(B, T, -1, hd).transpose(1, 2)
    v = (x @ attn.v_proj.weight.t()).view(B, T, -1, hd).transpose(1, 2)
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    pos = torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
    ang = torch.outer(pos, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(t):
        t1, t2 = t[..., : hd // 2], t[..., hd // 2 :]
        return t * cos + torch.cat([-t2, t1], -1) * sin

    q, k = rope(q), rope(k)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ v
    return y.transpose(1, 2).reshape(B, T, d) @ attn.o_proj.weight.t()


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_attention_matches_plain_implementation(kv):
    """G=1 equals plain MHA; G>1 equals MHA with explicitly repeated K/V heads."""
    m = make(**{"model.n_kv_heads": kv})
    attn = m.blocks[0].attn
    assert attn.k_proj.weight.shape[0] == kv * attn.head_dim  # no repeated K/V stored
    x = torch.randn(2, 9, 32)
    torch.testing.assert_close(attn(x), reference_mha(attn, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("on_cuda,dtype,native", [(False, torch.float32, True),
                                                   (True, torch.bfloat16, True),
                                                   (True, torch.float32, False)])
def test_gqa_repeats_kv_only_where_sdpa_would_fall_back_to_math(monkeypatch, on_cuda, dtype,
                                                                 native):
    """fp32 GQA on CUDA: only flash takes enable_gqa and it needs fp16/bf16, so K/V are
    repeated to keep the memory-efficient kernel. (Run here on CPU tensors that report
    is_cuda; the numbers must not change either way.)"""
    import torch.nn.functional as F

    from depthlab.model import attention

    attn = make(**{"model.n_kv_heads": 2}).blocks[0].attn.to(dtype)
    x = torch.randn(2, 9, 32, dtype=dtype)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.shape[1], kw["enable_gqa"]))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: on_cuda))
    y = attn(x)
    monkeypatch.undo()
    assert calls == ([(2, True)] if native else [(4, False)])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), reference_mha(attn.float(), x.float()), atol=tol,
                               rtol=tol)


def test_moe_routes_exactly_top_k_and_matches_dense_loop():
    m = make(**{"model.moe": {**MOE, "renormalize": False}})
    moe = m.blocks[1].mlp
    assert isinstance(moe, MoE)
    x = torch.randn(3, 7, 32)
    flat = x.reshape(-1, 32)
    r = moe.route(flat)
    assert r.experts.shape == (21, 2)
    assert all(len(set(row.tolist())) == 2 for row in r.experts)
    # Reference: every expert on every token, masked to the top-k.
    probs = (flat @ moe.router.weight.t()).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    ref = torch.zeros_like(flat)
    for e in range(4):
        y = moe.experts.forward_expert(e, flat)
        w = (top_p * (top_i == e)).sum(-1, keepdim=True)
        ref += w * y
    torch.testing.assert_close(moe(x).reshape(-1, 32), ref, atol=1e-5, rtol=1e-5)


def test_moe_renormalize_weights_sum_to_one():
    moe = make(**{"model.moe": MOE}).blocks[0].mlp
    r = moe.route(torch.randn(10, 32))
    torch.testing.assert_close(r.weights.sum(-1), torch.ones(10))


def test_moe_aux_loss_weights_identical_in_every_layer():
    """The model's aux loss is sum_l (w_lb * lb_l + w_z * z_l) with the SAME weights."""
    m = make(**{"model.n_layers": 4, "model.moe": {**MOE, "lb_loss_weight": 0.02,
                                                   "z_loss_weight": 0.003}})
    layers = m.moe_layers()
    assert len(layers) == 4
    assert {(lay.lb_loss_weight, lay.z_loss_weight) for lay in layers} == {(0.02, 0.003)}
    inputs = []
    hooks = [lay.register_forward_hook(lambda mod, args, out: inputs.append(args[0]))
             for lay in layers]
    m.train()
    ids = torch.randint(0, V, (2, 8))
    out = m(ids, ids)
    for h in hooks:
        h.remove()
    expected = torch.zeros(())
    for lay, x in zip(layers, inputs, strict=True):
        r = lay.route(x.reshape(-1, 32))
        f = torch.stack([(r.experts == e).sum() for e in range(4)]).float() / (r.experts.numel())
        lb = 4 * (f * r.probs.mean(0)).sum()
        z = torch.logsumexp(r.logits, -1).pow(2).mean()
        expected = expected + 0.02 * lb + 0.003 * z  # not divided by the number of layers
    torch.testing.assert_close(out.aux_loss, expected)


def test_moe_load_balancing_loss_formula():
    moe = make(**{"model.moe": MOE}).blocks[0].mlp
    r = moe.route(torch.randn(50, 32))
    lb, z = moe.aux_losses(r)
    f = torch.stack([(r.experts == e).sum() for e in range(4)]).float() / (50 * 2)
    torch.testing.assert_close(lb, 4 * (f * r.probs.mean(0)).sum())
    torch.testing.assert_close(z, torch.logsumexp(r.logits, -1).pow(2).mean())


def test_moe_layer_selection():
    m = make(**{"model.moe": {**MOE, "layers": [1]}})
    assert [type(b.mlp).__name__ for b in m.blocks] == ["SwiGLU", "MoE", "SwiGLU"]


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _ref_block(block, h, placement, layer):
    """Hand-written reference for each norm placement."""
    attn, mlp = block.attn, block.mlp
    n1, n2 = block.attn_norm.weight, block.mlp_norm.weight
    if placement == "post":
        h = _rms(h + attn(h), n1)
        return _rms(h + mlp(h), n2)
    s = 1 / math.sqrt(layer + 1) if placement == "scaled" else 1.0
    a = attn(_rms(h, n1) * s)
    if placement == "peri":
        a = _rms(a, block.attn_out_norm.weight)
    h = h + a
    f = mlp(_rms(h, n2) * s)
    if placement == "peri":
        f = _rms(f, block.mlp_out_norm.weight)
    return h + f


@pytest.mark.parametrize("placement", ["pre", "post", "scaled", "peri", "mix"])
def test_norm_placement_matches_reference(placement):
    m = make(**{"model.norm_placement": placement, "model.n_layers": 4,
                "model.mix_ln_fraction": 0.5})
    for block in m.blocks:  # non-trivial gains so a missing norm would show
        for mod in block.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.data.uniform_(0.5, 1.5)
    h = torch.randn(2, 6, 32)
    for layer, block in enumerate(m.blocks):
        ref_kind = placement
        if placement == "mix":
            ref_kind = "post" if layer < 2 else "pre"
        torch.testing.assert_close(block(h), _ref_block(block, h, ref_kind, layer),
                                   atol=1e-5, rtol=1e-5)


def test_layernorm_option():
    m = make(**{"model.norm": "layernorm"})
    assert isinstance(m.blocks[0].attn_norm, torch.nn.LayerNorm)


@pytest.mark.parametrize("scheme", ["normal", "scaled", "paper"])
def test_init_schemes(scheme):
    m = make(**{"model.init": scheme, "model.init_std": 0.05, "model.n_layers": 8,
                "model.d_model": 64})
    q = m.blocks[0].attn.q_proj.weight.std().item()
    o = m.blocks[0].attn.o_proj.weight.std().item()
    base = 0.02 if scheme == "paper" else 0.05
    assert q == pytest.approx(base, rel=0.1)
    expected_o = base / math.sqrt(16) if scheme == "scaled" else base
    assert o == pytest.approx(expected_o, rel=0.1)


@pytest.mark.parametrize("variant", [{}, {"model.moe": MOE}])
def test_tiny_model_overfits_one_batch(variant):
    m = make(**variant).train()
    torch.manual_seed(1)
    ids = torch.randint(0, V, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(150):
        out = m(ids[:, :-1], ids[:, 1:])
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert out.loss.item() < 0.1


def test_loss_is_token_mean_cross_entropy():
    m = make()
    ids = torch.randint(0, V, (2, 9))
    out = m(ids[:, :-1], ids[:, 1:])
    ref = F.cross_entropy(out.logits.reshape(-1, V), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ref)
