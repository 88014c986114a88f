"""Hand-written autograd Functions for the training path of DepthLM.

Each Function computes exactly the function of the plain PyTorch ops it replaces (the
modules keep those ops as their reference path); it only saves fewer tensors and runs
fewer elementwise passes, allocations and autograd nodes in the backward pass, which is
most of the step time of a small model on a CPU. They are used only when
`fused_autograd_ok` says a backward pass is wanted in eager mode (not under no_grad,
torch.func transforms such as the Jacobian probes' jvp/vmap, forward-mode AD, or
torch.compile, which fuses the plain ops itself).

Under autocast the expert-matmul Function computes in the autocast dtype, as the plain ops would,
and return gradients in each input's own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as _fwad
import torch.nn.functional as F

_silu_backward = torch.ops.aten.silu_backward


def _compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def fused_autograd_ok(*tensors: torch.Tensor) -> bool:
    """Whether a Function below may replace the plain ops for these inputs (eager
    training only: under torch.compile the compiler fuses the plain ops itself)."""
    return (
        torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
        and not torch._C._are_functorch_transforms_active()
        and getattr(_fwad, "_current_level", -1) < 0
        and not _compiling()
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _grad_as(g: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if g is None else g.to(like.dtype)


def _reference_grads(ref, inputs: Sequence[torch.Tensor], needs: Sequence[bool],
                     grad_outputs: Sequence[torch.Tensor | None]) -> tuple:
    """Gradients of ref(*inputs) by autograd, with create_graph=True.

    Used by the backward passes below when the caller wants a differentiable gradient
    (backward(create_graph=True), e.g. torch.autograd.functional.jvp): the hand-written
    backward passes use tensors saved without graph and out= ops, so they are not.
    """
    with torch.enable_grad():
        # fresh aliases: partial derivatives w.r.t. each input, not total ones through
        # other inputs that depend on it (e.g. routing weights computed from x)
        inputs = [t.view_as(t) if n else t for t, n in zip(inputs, needs, strict=True)]
        outs = ref(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    used = [(o, g) for o, g in zip(outs, grad_outputs, strict=False)
            if g is not None and o.requires_grad]
    wrt = [t for t, n in zip(inputs, needs, strict=True) if n]
    grads = iter(torch.autograd.grad([o for o, _ in used], wrt, [g for _, g in used],
                                     create_graph=True, allow_unused=True))
    return tuple(next(grads) if n else None for n in needs)


def _rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


def _rope_interleaved_ref(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    B, T = x.shape[:2]
    xc = torch.view_as_complex(x.reshape(B, T, -1, 2))
    return torch.view_as_real(xc * freqs).view(x.shape)


# ----------------------------------------------------------------------------- RMSNorm


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """rsqrt(mean(x^2, -1) + eps), keepdim; one read pass (vector_norm) instead of two."""
    ss = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return ss.square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class RMSNormFunction(torch.autograd.Function):
    """y = x * rsqrt(mean(x^2, -1) + eps) * weight, in fp32, cast back to x's dtype.

    `weight` broadcasts over x's trailing dims (it may be [n_heads, head_dim] to normalise
    q and k heads with their own gains in one call); the mean is over the last dim.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = _rstd(xf, eps)
        y = xf * rstd
        y.mul_(weight.float())
        ctx.save_for_backward(x, weight, rstd)
        ctx.eps = eps
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            ref = lambda x, w: _rms_norm_ref(x, w, ctx.eps)  # noqa: E731
            return (*_reference_grads(ref, (x, weight), ctx.needs_input_grad[:2], (dy,)), None)
        # With r = rstd, p = dy * x:  dw = sum_rows(r * p),
        # dx = r * w * dy - x * r^3 * mean(p * w, -1)
        xf, wf, dyf = x.float(), weight.float(), dy.float()
        p = dyf * xf
        d = x.shape[-1]
        if weight.ndim == 1:
            p2 = p.reshape(-1, d)
            pw = torch.mv(p2, wf).view(rstd.shape)
            dw = torch.mv(p2.t(), rstd.view(-1)) if ctx.needs_input_grad[1] else None
        else:
            pw = (p * wf).sum(-1, keepdim=True)
            dw = p.mul_(rstd).reshape(-1, weight.numel()).sum(0).view(weight.shape)
        dx = None
        if ctx.needs_input_grad[0]:
            c = pw.mul_(rstd.pow(3)).div_(-d)
            dx = torch.mul(dyf, wf).mul_(rstd).addcmul_(xf, c)
        return _grad_as(dx, x), _grad_as(dw, weight), None


# ----------------------------------------------------------------------------- rotary


class RotaryFunction(torch.autograd.Function):
    """Half-split RoPE of x [..., T, heads, head_dim]: x * cos + rotate_half(x) * sin.

    cos: [T, 1, head_dim]; sin_half: [T, 1, head_dim / 2] (the two halves of the sin table
    are equal in the half-split layout). out1 = x1 c - x2 s, out2 = x2 c + x1 s.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = x * cos
        out[..., :half].addcmul_(x[..., half:], sin_half, value=-1)
        out[..., half:].addcmul_(x[..., :half], sin_half)
        ctx.save_for_backward(cos, sin_half)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin_half = ctx.saved_tensors
        half = dy.shape[-1] // 2
        dx = dy * cos
        dx[..., :half].addcmul_(dy[..., half:], sin_half)
        dx[..., half:].addcmul_(dy[..., :half], sin_half, value=-1)
        return dx, None, None


def _complex_pairs(t: torch.Tensor) -> torch.Tensor:
    """View [B, T, heads, head_dim] (heads and head_dim mergeable) as complex pairs."""
    return torch.view_as_complex(t.view(*t.shape[:2], -1, 2))


class QKVRopeFunction(torch.autograd.Function):
    """Split qkv [B, T, H + 2 H_kv, head_dim] into q, k, v [B, T, heads, head_dim],
    optionally RMS-norming each q/k head with per-head gains [H + H_kv, head_dim], and apply
    RoPE to q and k.

    q/k features are stored in interleaved pairs (2j, 2j + 1) (Attention permutes its q/k
    weight rows to get this layout), so RoPE is one complex multiply by freqs
    [T, (H + H_kv) * head_dim / 2] per pass. q, k and v come out as separate tensors and the
    backward pass writes all three gradients straight into one qkv-shaped buffer (no
    split/cat copies). fp32/fp64 only (complex views).
    """

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, gains: torch.Tensor | None, freqs: torch.Tensor,
                freqs_conj: torch.Tensor, H: int, Hkv: int, eps: float):
        B, T, _, hd = qkv.shape
        nqk, hq = H + Hkv, H * hd // 2
        x = qkv[:, :, :nqk]
        rstd = None
        if gains is not None:
            rstd = _rstd(x, eps)
            x = x * rstd
            x.mul_(gains)
        xc = _complex_pairs(x)
        q = qkv.new_empty(B, T, H, hd)
        k = qkv.new_empty(B, T, Hkv, hd)
        torch.mul(xc[:, :, :hq], freqs[:, :hq], out=_complex_pairs(q))
        torch.mul(xc[:, :, hq:], freqs[:, hq:], out=_complex_pairs(k))
        v = qkv[:, :, nqk:].clone(memory_format=torch.contiguous_format)
        ctx.dims = (H, Hkv, eps)
        ctx.save_for_backward(qkv, gains, rstd, freqs, freqs_conj)
        return q, k, v

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor):
        qkv, gains, rstd, freqs, freqs_conj = ctx.saved_tensors
        H, Hkv, eps = ctx.dims
        B, T, _, hd = qkv.shape
        nqk, hq = H + Hkv, H * hd // 2
        if torch.is_grad_enabled():  # create_graph=True
            def ref(qkv, gains):
                x = qkv[:, :, :nqk]
                if gains is not None:  # in x's dtype, as the forward (fp32 or fp64)
                    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gains
                q, k = _rope_interleaved_ref(x, freqs).split([H, Hkv], dim=2)
                return q, k, qkv[:, :, nqk:]

            return (*_reference_grads(ref, (qkv, gains), ctx.needs_input_grad[:2],
                                      (dq, dk, dv)), None, None, None, None, None)
        dqkv = torch.empty_like(qkv, memory_format=torch.contiguous_format)
        dgains = None
        dx = dqkv[:, :, :nqk]
        # RoPE backward: multiply by the conjugate rotation
        dz = dx if gains is None else torch.empty_like(dx, memory_format=torch.contiguous_format)
        dzc = _complex_pairs(dz)
        torch.mul(_complex_pairs(dq.contiguous()), freqs_conj[:, :hq], out=dzc[:, :, :hq])
        torch.mul(_complex_pairs(dk.contiguous()), freqs_conj[:, hq:], out=dzc[:, :, hq:])
        if gains is not None:  # RMS-norm backward (see RMSNormFunction), into dqkv
            x = qkv[:, :, :nqk]
            p = dz * x
            pw = (p * gains).sum(-1, keepdim=True)
            dgains = p.mul_(rstd).reshape(-1, gains.numel()).sum(0).view(gains.shape)
            c = pw.mul_(rstd.pow(3)).div_(-hd)
            torch.addcmul(dz.mul_(gains).mul_(rstd), x, c, out=dx)
        dqkv[:, :, nqk:].copy_(dv)
        return dqkv, dgains, None, None, None, None, None


# ----------------------------------------------------------------------------- SwiGLU (experts)


def _silu_mul(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate), silu(gate) * up) for h = [gate | up] along the last dim."""
    gate, up = h.chunk(2, dim=-1)
    s = F.silu(gate)
    return s, s * up


def _silu_mul_backward(da: torch.Tensor, h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. h = [gate | up] of a = silu(gate) * up (s = silu(gate)), as one
    [.., 2 * hidden] tensor; da is overwritten."""
    gate, up = h.chunk(2, dim=-1)
    dh = torch.empty_like(h)
    dgate, dup = dh.chunk(2, dim=-1)
    torch.mul(da, s, out=dup)
    _silu_backward.grad_input(da.mul_(up), gate, grad_input=dgate)
    return dh


# ----------------------------------------------------------------------------- MoE routing


class TopKRoutingFunction(torch.autograd.Function):
    """lse = logsumexp(logits); probs = exp(logits - lse) (= softmax); weights, experts =
    top-k of probs (weights renormalised to sum to 1 when `renormalize`). One node instead
    of the softmax/topk/sum/div (and the z-loss's logsumexp) autograd nodes; `lse` is
    returned for the router z-loss."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int, renormalize: bool):
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = (logits - lse).exp_()
        top, experts = probs.topk(k, dim=-1)
        total = top.sum(dim=-1, keepdim=True) if renormalize else None
        weights = top / total if renormalize else top
        ctx.mark_non_differentiable(experts)
        ctx.save_for_backward(probs, weights, experts, total, logits)
        return probs, weights, experts, lse.squeeze(-1)

    @staticmethod
    def backward(ctx, dprobs: torch.Tensor | None, dweights: torch.Tensor | None, _,
                 dlse: torch.Tensor | None):
        probs, weights, experts, total, logits = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            def ref(logits):
                p = torch.softmax(logits, dim=-1)
                top = p.gather(-1, experts)
                w = top / top.sum(-1, keepdim=True) if total is not None else top
                return p, w, torch.logsumexp(logits, dim=-1)

            (dl,) = _reference_grads(ref, (logits,), (True,), (dprobs, dweights, dlse))
            return dl, None, None
        g = torch.zeros_like(probs) if dprobs is None else dprobs.clone()
        if dweights is not None:
            if total is not None:  # w = t / sum(t): dt = (dw - sum(dw * w)) / sum(t)
                dweights = (dweights - (dweights * weights).sum(-1, keepdim=True)) / total
            g.scatter_add_(-1, experts, dweights)
        # softmax backward, plus d lse / d logits = probs
        shift = (g * probs).sum(-1, keepdim=True)
        if dlse is not None:
            shift = shift - dlse.unsqueeze(-1)
        return probs * (g - shift), None, None


# ----------------------------------------------------------------------------- MoE experts


_GROUPED_MM_FAILED: set[tuple] = set()


def _try_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """torch._grouped_mm(a, b, offs) where it runs (torch >= 2.9 on CPU, SM80+ on CUDA,
    supported dtype, 16-byte strides); None otherwise (remembered per call signature)."""
    key = (a.device.type, a.dtype, tuple(a.shape[1:]), tuple(b.shape), a.stride(), b.stride())
    if key in _GROUPED_MM_FAILED:
        return None
    try:
        return torch._grouped_mm(a, b, offs=offs)
    except torch.OutOfMemoryError:  # a RuntimeError, but about this moment, not the shapes
        raise
    except (AttributeError, RuntimeError, NotImplementedError):
        _GROUPED_MM_FAILED.add(key)
        return None


def _group_sizes(offs: torch.Tensor) -> list[int]:
    return torch.diff(offs, prepend=offs.new_zeros(1)).tolist()


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                counts: Sequence[int] | None) -> torch.Tensor:
    """Rows of a [M, K] grouped by expert (ends at `offs`) times b [E, K, N] -> [M, N]:
    one grouped matmul kernel where available, else a loop of matmuls over the groups."""
    if counts is None:
        out = _try_grouped_mm(a, b, offs)
        if out is not None:
            return out
        counts = _group_sizes(offs)
    out = a.new_empty(a.shape[0], b.shape[-1])
    start = 0
    for e, n in enumerate(counts):
        torch.mm(a[start:start + n], b[e], out=out[start:start + n])
        start += n
    return out


def _grouped_wgrad(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                   counts: Sequence[int] | None) -> torch.Tensor:
    """Per group e: a_e^T @ b_e for a [M, P], b [M, Q] grouped by rows -> [E, P, Q]
    (zeros for empty groups)."""
    if counts is None:
        out = _try_grouped_mm(a.t(), b, offs)
        if out is not None:
            return out
        counts = _group_sizes(offs)
    out = a.new_empty(len(counts), a.shape[1], b.shape[1])
    start = 0
    for e, n in enumerate(counts):
        torch.mm(a[start:start + n].t(), b[start:start + n], out=out[e])
        start += n
    return out


def grouped_mm_available() -> bool:
    return hasattr(torch, "_grouped_mm")


class ExpertsFunction(torch.autograd.Function):
    """Top-k mixture of SwiGLU experts for a flat batch x [N, d]:
    out[n] = sum_j weights[n, j] * expert_{experts[n, j]}(x[n]).

    `order` sorts the N*k (token, slot) pairs by expert (`token_of = order // k` are their
    tokens), `inv` is its inverse permutation and `offs` the cumulative expert counts.
    Experts are SwiGLUs with stacked weights gate/up [E, hidden, d], down [E, d, hidden].
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weights: torch.Tensor, w_gate: torch.Tensor,
                w_up: torch.Tensor, w_down: torch.Tensor, token_of: torch.Tensor,
                order: torch.Tensor, inv: torch.Tensor, offs: torch.Tensor,
                counts: list[int] | None) -> torch.Tensor:
        dt = _compute_dtype(x)
        N, k = weights.shape
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dt).index_select(0, token_of)
            w_gu = torch.cat([w_gate, w_up], dim=1).to(dt)
            wd = w_down.to(dt)
            h = _grouped_mm(xs, w_gu.transpose(1, 2), offs, counts)
            s, a = _silu_mul(h)
            ys = _grouped_mm(a, wd.transpose(1, 2), offs, counts)
            y_tok = ys.index_select(0, inv).view(N, k, -1)
            w = weights.to(dt)
            out = torch.mul(y_tok[:, 0], w[:, :1])
            for j in range(1, k):
                out.addcmul_(y_tok[:, j], w[:, j : j + 1])
        ctx.counts = counts
        ctx.save_for_backward(x, weights, w_gate, w_up, w_down, xs, w_gu, wd, h, s, a, y_tok,
                              token_of, order, inv, offs)
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        (x, weights, w_gate, w_up, w_down, xs, w_gu, wd, h, s, a, y_tok, token_of, order, inv,
         offs) = ctx.saved_tensors
        counts = ctx.counts
        if torch.is_grad_enabled():  # create_graph=True
            def ref(x, weights, w_gate, w_up, w_down):
                n_e = _group_sizes(offs)
                ys, start = [], 0
                for e, n in enumerate(n_e):
                    xe = x.index_select(0, token_of[start:start + n])
                    ye = F.silu(xe @ w_gate[e].t()) * (xe @ w_up[e].t())
                    ys.append(ye @ w_down[e].t())
                    start += n
                y_tok = torch.cat(ys).index_select(0, inv).view(*weights.shape, -1)
                return (y_tok * weights.unsqueeze(-1).to(y_tok.dtype)).sum(1)

            return (*_reference_grads(ref, (x, weights, w_gate, w_up, w_down),
                                      ctx.needs_input_grad[:5], (dout,)),
                    None, None, None, None, None)
        need_x, need_w, need_g, need_u, need_d = ctx.needs_input_grad[:5]
        N, k = weights.shape
        dout = dout.to(h.dtype)
        w_sorted = weights.to(h.dtype).flatten().index_select(0, order)
        dweights = (y_tok * dout.unsqueeze(1)).sum(-1) if need_w else None
        dys = dout.index_select(0, token_of).mul_(w_sorted.unsqueeze(1))
        dx = dwg = dwu = dwd = None
        if need_d:
            dwd = _grouped_wgrad(dys, a, offs, counts)
        dh = _silu_mul_backward(_grouped_mm(dys, wd, offs, counts), h, s)
        if need_g or need_u:
            dw_gu = _grouped_wgrad(dh, xs, offs, counts)
            dwg, dwu = dw_gu.chunk(2, dim=1)
        if need_x:
            dxs = _grouped_mm(dh, w_gu, offs, counts)
            # every token has exactly k rows: gather them back and sum (no scatter-add)
            dx = dxs.index_select(0, inv).view(N, k, -1).sum(1)
        return (_grad_as(dx, x), _grad_as(dweights, weights), _grad_as(dwg, w_gate),
                _grad_as(dwu, w_up), _grad_as(dwd, w_down), None, None, None, None, None)
