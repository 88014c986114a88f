"""Metric oracles on a tiny random model of EVERY supported Hugging Face architecture.

The causal score and the permutation score are checked against explicit full reruns of
the model itself (a copy with the block deleted / two ModuleList entries swapped,
hidden states read with forward hooks), the exact Jacobian against
`torch.autograd.functional.jacobian` reduced per metrics.md section 2, and an exactly
affine block replacement against usefulness loss ratio 1. On a few architectures the
Jacobian and attention sparsity also face oracles that share no adapter code: decoder
layers called directly with the arguments the model's own forward gives them, attention
recomputed from q and k over each query's sliding window, chunked attention's own weights.
(test_stack.py checks the LayerStack operations themselves per architecture;
test_metrics.py the DepthLM side.)
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_stack import CONFIGS, MOE, L, T, V, _delete_layer, _ids, _layers, _model, _swap_layers

from depthlab.probe import build_stack
from depthlab.probe.metrics import (
    compute_attention_sparsity,
    compute_causal,
    compute_jacobian,
    compute_permutation,
    compute_variance,
)
from depthlab.probe.metrics.usefulness import compute_usefulness

transformers = pytest.importorskip("transformers")

ARCHS = list(CONFIGS)


def _run_with_states(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    """The model's own forward: [block input of layer 0, output of each layer], and the loss."""
    layers = _layers(model)
    states: list[torch.Tensor] = []

    def pre(_m, args, kwargs):
        states.append(args[0] if args else kwargs["hidden_states"])

    def post(_m, _a, out):
        states.append(out[0] if isinstance(out, (tuple, list)) else out)

    hooks = [layers[0].register_forward_pre_hook(pre, with_kwargs=True)]
    hooks += [lay.register_forward_hook(post) for lay in layers]
    try:
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
    finally:
        for h in hooks:
            h.remove()
    lg = logits[:, :-1].float()
    return states, float(F.cross_entropy(lg.reshape(-1, V), ids[:, 1:].reshape(-1)))


@pytest.mark.parametrize("name", ARCHS)
def test_causal_and_permutation_equal_full_reruns(name: str) -> None:
    model = _model(name, "eager")
    stack = build_stack(model)
    ids = _ids(5)
    base_states, base = _run_with_states(model, ids)
    assert len(base_states) == L + 1

    causal = compute_causal(stack, ids, batch_size=1)
    assert causal.base_loss == pytest.approx(base, rel=1e-5)
    for s in range(L):
        short_states, loss = _run_with_states(_delete_layer(model, s), ids)
        assert causal.skip_loss[s] == pytest.approx(loss, rel=1e-5)
        # skip convention: h'_{s+1} = h'_s, indices never shift
        skipped = short_states[: s + 1] + [short_states[s]] + short_states[s + 1:]
        for l in range(L):
            if l <= s:
                assert causal.matrix[s][l] == 0.0
                continue
            d0 = base_states[l + 1] - base_states[l]
            d1 = skipped[l + 1] - skipped[l]
            ref = float((d1 - d0).norm(dim=-1).mean() / d0.norm(dim=-1).mean())
            assert causal.matrix[s][l] == pytest.approx(ref, rel=1e-4, abs=1e-6)

    perm = compute_permutation(stack, ids, batch_size=1)
    assert len(perm.pairs) == L * (L - 1) // 2
    for (l1, l2), p in zip(perm.pairs, perm.scores, strict=True):
        loss = _run_with_states(_swap_layers(model, l1, l2), ids)[1]
        assert p == pytest.approx(abs(base - loss) / base, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ARCHS)
def test_jacobian_equals_autograd(name: str) -> None:
    model = _model(name, "eager")
    if name not in MOE:  # fp64: the 1e-5 check is not fp32 rounding (HF's grouped expert
        model = model.double()  # matmul has no fp64 kernel: MoE models stay fp32)
    stack = build_stack(model)
    ids = _ids(6)[:, :5]
    layers = [0, L - 1]
    res = compute_jacobian(stack, ids, keep_matrices=True, layers=layers)
    states = stack.hidden_states(ids)
    for idx, l in enumerate(layers):
        full = torch.autograd.functional.jacobian(lambda x, l=l: stack.run_block(l, x), states[l])
        J = full.sum(dim=(0, 1, 3, 4)) / ids.numel()  # sum over n, t, n', t'; 1/(N*T)
        torch.testing.assert_close(torch.tensor(res.matrices[idx], dtype=J.dtype), J,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_usefulness_of_exactly_affine_block_is_one(name: str) -> None:
    """Replace block 1 by an affine map: the fitted map reproduces it, loss ratio 1."""
    model = _model(name, "eager")
    stack = build_stack(model)
    d = stack.d_model
    g = torch.Generator().manual_seed(0)
    A = torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)
    c = 0.1 * torch.randn(d, generator=g)
    original = stack._run_block

    def run_block(l: int, h: torch.Tensor) -> torch.Tensor:
        return h @ A + c if l == 1 else original(l, h)

    stack._run_block = run_block
    ids = torch.randint(0, V, (8, 16), generator=g)  # 128 tokens > d + 1 unknowns
    res = compute_usefulness(stack, ids, batch_size=4)
    assert not res.underdetermined
    assert res.loss_ratio[1] == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "granite"])
def test_branch_variance_is_that_of_the_residual_update(name: str) -> None:
    """metrics.md section 1: attn_var_l / mlp_var_l are the variances of what each branch
    adds to the residual stream; Granite scales both by residual_multiplier (0.5 here).
    Oracle: the stream between the branches is the input of post_attention_layernorm."""
    model = _model(name, "eager")
    stack = build_stack(model)
    ids = _ids(7)
    res = compute_variance(stack, ids)
    mids: list[torch.Tensor] = []
    hooks = [lay.post_attention_layernorm.register_forward_pre_hook(
        lambda _m, a: mids.append(a[0])) for lay in _layers(model)]
    try:
        states = stack.hidden_states(ids)
    finally:
        for h in hooks:
            h.remove()
    for l in range(L):
        attn = mids[l] - states[l]
        mlp = states[l + 1] - mids[l]
        assert res.attn_variance[l] == pytest.approx(float(attn.var(-1).mean()), rel=1e-4)
        assert res.mlp_variance[l] == pytest.approx(float(mlp.var(-1).mean()), rel=1e-4)


def _captured_layer_calls(model: torch.nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """Each decoder layer's input hidden states and keyword arguments (mask, position ids,
    RoPE cos/sin) exactly as the model's own forward passes them."""
    calls: list[tuple[torch.Tensor, dict]] = []

    def pre(_m, args, kwargs):
        kw = dict(kwargs)
        h = args[0] if args else kw.pop("hidden_states")
        calls.append((h.detach().clone(), kw))

    hooks = [lay.register_forward_pre_hook(pre, with_kwargs=True) for lay in _layers(model)]
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return calls


def _jacobian_stats_oracle(J: torch.Tensor) -> dict[str, float]:
    """metrics.md section 2, written out entry by entry (no depthlab code)."""
    d = J.shape[0]
    eye = torch.eye(d, dtype=J.dtype)
    off = J * (1 - eye)
    diag = torch.diagonal(J)
    mu = diag.sum() / d
    return {
        "jacobian_norm": float(((J - eye) ** 2).sum().sqrt()) / d,
        "off_diagonal_norm": float((off ** 2).sum().sqrt()) / (d * d - d) ** 0.5,
        "diagonal_mean": float(mu),
        "diagonal_std": float((((diag - mu) ** 2).sum() / (d - 1)).sqrt()),
        "frobenius_norm": float((J ** 2).sum().sqrt()),
        "spectral_norm": float(torch.linalg.eigvalsh(J.T @ J).max().sqrt()),  # sigma_max
    }


@pytest.mark.parametrize(("name", "impl"), [("llama", "sdpa"), ("qwen2", "eager")])
def test_jacobian_against_the_decoder_layers_own_call(name: str, impl: str) -> None:
    """The Jacobian metric end to end against an oracle that shares no depthlab code (no
    adapter, no LayerStack): h_l and the layer's arguments (causal / sliding-window mask,
    RoPE cos/sin) are captured from the model's own forward, the layer module is called
    directly with them under `torch.autograd.functional.jacobian`, and the statistics are
    formed as metrics.md section 2 defines them. qwen2: layer 0 full attention, layers 1-2
    a sliding window of 4 < T (cross-position terms inside the window only)."""
    model = _model(name, impl).double()
    ids = _ids(3)[:, :6]
    n_tok = ids.numel()
    res = compute_jacobian(build_stack(model), ids, batch_size=1, keep_matrices=True)
    layers = _layers(model)
    ref = {k: [] for k in res.mean}
    for l, (h, kw) in enumerate(_captured_layer_calls(model, ids)):
        def f(x, layer=layers[l], kw=kw):  # token-summed output: d rows, not N*T*d
            out = layer(x, **kw)
            return (out[0] if isinstance(out, tuple) else out).sum(dim=(0, 1))

        full = torch.autograd.functional.jacobian(f, h, vectorize=True)  # [d, N, T, d]
        J = full.sum(dim=(1, 2)) / n_tok  # then the sum over n', t' (input positions)
        torch.testing.assert_close(torch.tensor(res.matrices[l], dtype=J.dtype), J,
                                   atol=1e-5, rtol=1e-5)
        for k, v in _jacobian_stats_oracle(J).items():
            assert getattr(res, k)[l] == pytest.approx(v, rel=1e-5, abs=1e-6), (l, k)
            ref[k].append(v)
    for k, vs in ref.items():
        assert res.mean[k] == pytest.approx(sum(vs) / L, rel=1e-5, abs=1e-6), k
    assert res.identity_preservation == sum(x > 0.5 for x in ref["diagonal_mean"]) / L


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_from_qk(layer: torch.nn.Module, h: torch.Tensor, kw: dict,
                       window: int | None) -> torch.Tensor:
    """Attention weights [N, heads, T, T] of a Llama-style layer recomputed from its own
    q_proj / k_proj on the captured input, with RoPE, and the softmax for query t taken over
    keys max(0, t - window + 1) .. t by an explicit loop (zeros elsewhere)."""
    attn = layer.self_attn
    N, T, _ = h.shape
    hd = attn.head_dim
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(N, T, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(N, T, -1, hd).transpose(1, 2)
    cos, sin = (c.unsqueeze(1) for c in kw["position_embeddings"])
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # each kv head serves its group
    P = torch.zeros(N, q.shape[1], T, T, dtype=h.dtype)
    for t in range(T):
        first = 0 if window is None else max(0, t - window + 1)
        scores = (q[:, :, t:t + 1] @ k[:, :, first:t + 1].transpose(-1, -2))[:, :, 0] / hd**0.5
        P[:, :, t, first:t + 1] = scores.softmax(-1)
    return P


def _sparsity_oracle(P: torch.Tensor, visible: list[int], mass: float = 0.9):
    """Per head: mean over queries with >= 2 visible keys of entropy / log(visible), and
    mean over all queries of (smallest number of keys holding `mass`) / visible; each query
    looks only at its `visible[t]` keys ending at t."""
    N, H, T, _ = P.shape
    ent, frac, n_ent = torch.zeros(H), torch.zeros(H), 0
    for n in range(N):
        for t in range(T):
            v = visible[t]
            n_ent += v >= 2
            for hh in range(H):
                p = P[n, hh, t, t + 1 - v:t + 1]
                if v >= 2:
                    ent[hh] += float(-(p * p.log()).sum()) / math.log(v)
                top = sorted(p.tolist(), reverse=True)
                m, acc = 0, 0.0
                while acc < mass and m < v:
                    acc += top[m]
                    m += 1
                frac[hh] += m / v
    return (ent / n_ent).tolist(), (frac / (N * T)).tolist()


@pytest.mark.parametrize(("name", "windows"), [("mistral", [4, 4, 4]), ("qwen2", [None, 4, 4])])
def test_attention_sparsity_on_sliding_window_layers(name: str, windows: list) -> None:
    """metrics.md section 7 on sliding-window layers (window 4 < T = 8): entropy over
    log(min(t+1, 4)) and the top-90% fraction of min(t+1, 4) keys, not of the t+1 causal
    keys. Oracle: attention recomputed from q and k with explicit loops over each query's
    window; it reproduces the model's own eager attention weights (the window convention
    is the model's), then the statistics by loops. Mistral: every layer slides; Qwen2
    (max_window_layers=1): layer 0 full causal, layers 1-2 slide."""
    model = _model(name, "sdpa").double()  # the metric switches to eager weights itself
    ids = _ids(2)
    res = compute_attention_sparsity(build_stack(model), ids, batch_size=1)
    eager = _model(name, "eager").double()
    with torch.no_grad():
        own = eager(ids, output_attentions=True, use_cache=False).attentions
        calls = _captured_layer_calls(eager, ids)
        for l, ((h, kw), w) in enumerate(zip(calls, windows, strict=True)):
            P = _attention_from_qk(_layers(eager)[l], h, kw, w)
            torch.testing.assert_close(P, own[l], atol=1e-6, rtol=1e-5)  # (its softmax is fp32)
            visible = [min(t + 1, w or T) for t in range(T)]
            ent, frac = _sparsity_oracle(P, visible)
            assert res.normalized_entropy[l] == pytest.approx(ent, rel=1e-5), l
            assert res.top_mass_fraction[l] == pytest.approx(frac, rel=1e-5), l


def test_attention_sparsity_on_chunked_attention_layers() -> None:
    """Llama 4's chunked attention (chunks of 4 positions, T = 8) on layers 0 and 2: query t
    sees keys 4*(t//4) .. t, so t mod 4 + 1 of them; the first query of each chunk has one
    key and is left out of the entropy average like position 0. Oracle: the model's own
    eager attention weights (checked to vanish outside each query's chunk), statistics by
    explicit loops over the keys of the chunk. (Layer 1 is full causal attention.)"""
    model = _model("llama4_text", "eager")
    ids = _ids(2)
    res = compute_attention_sparsity(build_stack(model), ids, batch_size=1)
    with torch.no_grad():
        own = model(ids, output_attentions=True, use_cache=False).attentions
    for l, chunk in enumerate([4, None, 4]):
        P = own[l].double()
        visible = [t % chunk + 1 if chunk else t + 1 for t in range(T)]
        for t, v in enumerate(visible):  # the weights live on exactly the visible keys
            assert bool((P[:, :, t, t + 1 - v:t + 1] > 0).all())
            assert float(P[:, :, t, : t + 1 - v].abs().sum() + P[:, :, t, t + 1:].abs().sum()) == 0
        ent, frac = _sparsity_oracle(P, visible)
        assert res.normalized_entropy[l] == pytest.approx(ent, rel=1e-5), l
        assert res.top_mass_fraction[l] == pytest.approx(frac, rel=1e-5), l
