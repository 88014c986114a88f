"""Every hand-written autograd Function in depthlab.model.fused computes exactly the plain
PyTorch reference: same outputs and same gradients (float64, so only rounding differs).

Each Function is checked on its own, then whole DepthLM variants are checked against the
same model with the fused path switched off (the modules' reference ops)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from depthlab.config import build_config
from depthlab.model import DepthLM, attention, fused, moe, norms

TOL = {"atol": 1e-10, "rtol": 1e-9}
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
"""RMSNorm computes in fp32 whatever its input dtype (as its reference does)."""


def _grads(fn, inputs: list[torch.Tensor], seed: int = 0) -> tuple[list, list]:
    """Outputs of fn(*inputs) and the gradients of a random linear function of them."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t.requires_grad]


def _same(fused_fn, ref_fn, inputs: list[torch.Tensor], tol: dict | None = None) -> None:
    out_f, grad_f = _grads(fused_fn, inputs)
    out_r, grad_r = _grads(ref_fn, inputs)
    assert len(out_f) == len(out_r) and len(grad_f) == len(grad_r)
    for a, b in zip(out_f + grad_f, out_r + grad_r, strict=True):
        torch.testing.assert_close(a, b, **(tol or TOL))


def _rand(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("gain_shape", [(16,), (3, 16)])
def test_rms_norm(gain_shape):
    x, w = _rand(2, 5, 3, 16), 1 + 0.1 * _rand(*gain_shape)
    _same(lambda x, w: fused.RMSNormFunction.apply(x, w, 1e-5),
          lambda x, w: fused._rms_norm_ref(x, w, 1e-5), [x, w], FP32_TOL)


def test_rotary_half_split():
    T, hd = 6, 8
    rot = attention.Rotary(hd, 16, 10000.0)
    cos = rot.cos[:T, None].double()
    sin = rot.sin[:T, None].double()

    def ref(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    _same(lambda x: fused.RotaryFunction.apply(x, cos, sin[..., : hd // 2]), ref,
          [_rand(2, T, 3, hd)])


@pytest.mark.parametrize("qk_norm", [False, True])
def test_qkv_rope(qk_norm):
    B, T, H, Hkv, hd = 2, 6, 4, 2, 8
    rot = attention.Rotary(hd, 16, 10000.0)
    freqs, freqs_conj = rot.freqs_cis(T, H + Hkv, torch.float64)
    gains = 1 + 0.1 * _rand(H + Hkv, hd) if qk_norm else None

    def ref(qkv, *g):
        x = qkv[:, :, : H + Hkv]
        if g:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * g[0]
        q, k = fused._rope_interleaved_ref(x, freqs).split([H, Hkv], dim=2)
        return q, k, qkv[:, :, H + Hkv:]

    def fn(qkv, *g):
        return fused.QKVRopeFunction.apply(qkv, g[0] if g else None, freqs, freqs_conj, H,
                                           Hkv, 1e-6)

    _same(fn, ref, [_rand(B, T, H + 2 * Hkv, hd), *([gains] if qk_norm else [])])


@pytest.mark.parametrize("renormalize", [False, True])
def test_top_k_routing(renormalize):
    logits = _rand(10, 6)

    def ref(lg):
        p = lg.softmax(-1)
        top, idx = p.topk(2, dim=-1)
        w = top / top.sum(-1, keepdim=True) if renormalize else top
        return p, w, idx, torch.logsumexp(lg, dim=-1)

    _same(lambda lg: fused.TopKRoutingFunction.apply(lg, 2, renormalize), ref, [logits])


@pytest.mark.parametrize("grouped", [True, False])
def test_experts(grouped, monkeypatch):
    """Sorted grouped-matmul experts == each token through its k experts, mixed."""
    if not grouped:  # the loop-of-matmuls fallback used where torch._grouped_mm is missing
        monkeypatch.setattr(torch, "_grouped_mm", None, raising=False)
    N, k, E, d, h = 11, 2, 4, 8, 6
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
    experts[0] = torch.tensor([3, 1])  # expert 2 may be empty: keep an empty group possible
    flat = experts.flatten()
    order = flat.argsort(stable=True)
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel())
    counts = torch.bincount(flat, minlength=E)
    offs = counts.cumsum(0).to(torch.int32)

    def fn(x, w, g, u, dn):
        return fused.ExpertsFunction.apply(x, w, g, u, dn, order // k, order, inv, offs,
                                           None if grouped else counts.tolist())

    def ref(x, w, g, u, dn):
        out = torch.zeros_like(x)
        for n in range(N):
            for j in range(k):
                e = experts[n, j]
                y = F.linear(F.silu(F.linear(x[n], g[e])) * F.linear(x[n], u[e]), dn[e])
                out[n] = out[n] + w[n, j] * y
        return out

    _same(fn, ref, [_rand(N, d), _rand(N, k).softmax(-1), _rand(E, h, d), _rand(E, h, d),
                    _rand(E, d, h)])


# ------------------------------------------------------------------ whole models


def _reference_path(monkeypatch) -> None:
    """Switch every module to its plain-PyTorch reference ops."""
    for mod in (attention, moe, norms):
        monkeypatch.setattr(mod, "fused_autograd_ok", lambda *t: False)


@pytest.mark.parametrize("variant", [
    {},
    {"model.n_kv_heads": 2, "model.qk_norm": True},
    {"model.moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "shared_expert": True},
     "model.qk_norm": True},
    {"model.moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 24, "renormalize": False}},
])
def test_depthlm_training_path_equals_reference(variant, monkeypatch):
    """Loss, auxiliary loss and every parameter gradient of a training step are those of
    the reference ops."""
    cfg = build_config({}, {"model.vocab_size": 50, "model.n_layers": 2, "model.d_model": 32,
                            "model.n_heads": 4, "model.max_seq_len": 32, "data.seq_len": 16,
                            **variant}).model
    torch.manual_seed(0)
    model = DepthLM(cfg).double().train()
    ids = torch.randint(0, 50, (3, 16))
    targets = torch.randint(0, 50, (3, 16))

    def step() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(ids, targets)
        total = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
        total.backward()
        losses = [out.loss.detach()] + ([out.aux_loss.detach()] if out.aux_loss is not None else [])
        return losses, {n: p.grad.clone() for n, p in model.named_parameters()}

    fused_losses, fused_grads = step()
    _reference_path(monkeypatch)
    ref_losses, ref_grads = step()
    for a, b in zip(fused_losses, ref_losses, strict=True):
        torch.testing.assert_close(a, b, **FP32_TOL)
    assert fused_grads.keys() == ref_grads.keys()
    for name, g in fused_grads.items():
        torch.testing.assert_close(g, ref_grads[name], **FP32_TOL, msg=name)


def test_grouped_mm_out_of_memory_is_raised_not_remembered(monkeypatch):
    """An OOM is about this moment, not the shapes: it used to switch grouped matmul off
    for the shape for the rest of the process (and the per-expert loop then syncs)."""
    from depthlab.model import fused

    a, b = torch.randn(6, 8), torch.randn(2, 8, 4)
    offs = torch.tensor([3, 6], dtype=torch.int32)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(fused, "_GROUPED_MM_FAILED", set())
    monkeypatch.setattr(torch, "_grouped_mm", oom)
    with pytest.raises(torch.OutOfMemoryError):
        fused._try_grouped_mm(a, b, offs)
    assert fused._GROUPED_MM_FAILED == set()

    def unsupported(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported here")

    monkeypatch.setattr(torch, "_grouped_mm", unsupported)
    assert fused._try_grouped_mm(a, b, offs) is None
    assert len(fused._GROUPED_MM_FAILED) == 1  # remembered: not tried again
