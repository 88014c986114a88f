"""Jacobian deviation from identity (metrics.md section 2).

The token-summed Jacobian of block l,

    J_l[i, j] = (1 / (N*T)) * sum_{n,t,t'} d h_{l+1}[n,t,i] / d h_l[n,t',j],

has column j equal to ONE forward-mode product through the block: the tangent
e_j placed at every token of the cached input h_l, the output tangent summed over
tokens. The exact matrix therefore costs d JVPs through one block per sequence,
batched over tangents with `torch.func.vmap(torch.func.jvp)` in chunks of
`tangent_chunk`. The Hutchinson estimator uses k Rademacher probes v (the same v
at every token): `||J - I||_F^2 = E ||(J - I) v||^2`, reported with its standard
error (and the delta-method standard error of `||J - I||_F`).

JVPs run in the model's dtype with PyTorch's math SDPA kernel (the fused kernels
have no forward-mode derivative); all reductions and norms are fp32/fp64.
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from depthlab.errors import DepthlabError
from depthlab.probe.metrics._common import (
    DEFAULT_BATCH_SIZE,
    BlockCounter,
    HiddenStateCache,
    MetricResult,
    Progress,
    ProgressFn,
    check_ids,
    chunk_bounds,
    cost_dict,
    counting,
    hidden_states,
    jvp_mode,
    mean_or_none,
    model_info,
    single_thread,
    tokens_of,
)

MODES = ("exact", "hutchinson", "both")


@dataclass(kw_only=True)
class JacobianResult(MetricResult):
    mode: str
    layers: list[int]
    """Block indices measured (all by default); per-layer lists follow this order."""
    jacobian_norm: list[float] | None = None
    """||J_l - I||_F / d."""
    off_diagonal_norm: list[float] | None = None
    """||offdiag(J_l)||_F / sqrt(d^2 - d)."""
    diagonal_mean: list[float] | None = None
    diagonal_std: list[float] | None = None
    """Unbiased std of diag(J_l)."""
    frobenius_norm: list[float] | None = None
    """||J_l||_F."""
    spectral_norm: list[float] | None = None
    """sigma_max(J_l)."""
    mean: dict[str, float | None] | None = None
    """Mean over the measured layers of each exact per-layer quantity."""
    identity_preservation: float | None = None
    """#{l : diagonal_mean_l > 0.5} / (number of measured layers)."""
    hutchinson: dict[str, Any] | None = None
    """Estimator mode: per-layer `fro` (estimate of ||J-I||_F), `fro_se`, `fro_sq`,
    `fro_sq_se`, `jacobian_norm` (= fro/d), `jacobian_norm_se`, `probes`."""
    matrices: list[list[list[float]]] | None = None
    """The J_l themselves when requested (keep_matrices=True)."""


def _auto_tangent_chunk(stack, b: int, T: int, budget: int | None) -> int:
    """Tangents per vmap call so that their activations fit in `budget` bytes (None: half
    the free memory of a CUDA device, 512 MiB on the CPU, where smaller chunks stay in cache:
    measured 23 ms per tangent and sequence at 32 tangents vs 29 ms at 128 on SmolLM2).
    Per tangent a block holds about 24 d-wide activations per token plus 3 attention maps
    per head; the maps are costed in fp32, which the math SDPA kernel the probes force
    keeps them in for bf16/fp16 models too."""
    if budget is None:
        budget = 512 * 1024**2
        if stack.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(stack.device)
            budget = free // 2
    d = stack.d_model
    heads = max(1, d // 64)
    item = torch.empty((), dtype=stack.compute_dtype).element_size()
    per_tangent = b * T * (item * 24 * d + 4 * 3 * heads * T)
    return int(max(1, min(d, budget // max(per_tangent, 1))))


def _jvp_token_sums(stack, l: int, h: Tensor, tangents: Tensor, chunk: int,
                    use_vmap: bool) -> tuple[Tensor, int]:
    """For each tangent v (rows of `tangents` [k, d]): sum over tokens of J_block(h) (v at
    every token), [k, d] fp32; and the tangent chunk that fit (halved from `chunk` while
    out of memory), for the next call."""
    from torch.func import jvp, vmap
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def f(x: Tensor) -> Tensor:
        return stack.run_block(l, x)

    def one(v: Tensor) -> Tensor:
        t = v.to(h.dtype).expand(h.shape)
        return jvp(f, (h,), (t,))[1].float().sum(dim=tuple(range(h.ndim - 1)))

    out = []
    a = 0
    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        while a < tangents.shape[0]:
            vs = tangents[a:a + chunk]
            try:
                out.append(vmap(one)(vs) if use_vmap else torch.stack([one(v) for v in vs]))
            except torch.OutOfMemoryError:
                if chunk == 1 or not use_vmap:
                    raise
                chunk //= 2  # the chunk size is an estimate: retry these tangents in halves
                continue
            a += vs.shape[0]
    return torch.cat(out), chunk


def _vmap_works(stack, h: Tensor) -> bool:
    try:
        _jvp_token_sums(stack, 0, h[:1, : min(h.shape[1], 2)],
                        torch.eye(stack.d_model, device=h.device)[:2], 2, True)
        return True
    except Exception:  # noqa: BLE001  (any vmap limitation of the block: fall back to a loop)
        return False


def jacobian_stats(J: Tensor) -> dict[str, float]:
    """The per-layer quantities of metrics.md section 2 from one d x d matrix J."""
    J = J.double()
    d = J.shape[0]
    eye = torch.eye(d, dtype=J.dtype, device=J.device)
    diag = torch.diagonal(J)
    off = J - torch.diag(diag)
    return {
        "jacobian_norm": float(torch.linalg.matrix_norm(J - eye)) / d,
        "off_diagonal_norm": float(torch.linalg.matrix_norm(off)) / math.sqrt(d * d - d),
        "diagonal_mean": float(diag.mean()),
        "diagonal_std": float(diag.std(unbiased=True)),
        "frobenius_norm": float(torch.linalg.matrix_norm(J)),
        "spectral_norm": _spectral_norm(J),
    }


def _spectral_norm(J: Tensor) -> float:
    with single_thread():
        return float(torch.linalg.matrix_norm(J, ord=2))


EXACT_KEYS = ("jacobian_norm", "off_diagonal_norm", "diagonal_mean", "diagonal_std",
              "frobenius_norm", "spectral_norm")


def compute_jacobian(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    mode: str = "exact", probes: int = 64, seed: int = 0, layers: list[int] | None = None,
    tangent_chunk: int | None = None, memory_budget: int | None = None,
    keep_matrices: bool = False, use_vmap: bool | None = None,
) -> JacobianResult:
    """Per-layer token-summed Jacobian J_l vs the identity.

    mode: "exact" (d JVPs per layer), "hutchinson" (`probes` Rademacher JVPs per
    layer: estimate of ||J_l - I||_F with standard error) or "both". seed: the probes'.
    layers: measure only these blocks. tangent_chunk: tangents per vmap call (default:
    from memory_budget bytes). keep_matrices: return the J_l. use_vmap: None = detect
    (falls back to one JVP per tangent when the block cannot be vmapped).
    Cost: `L*N` block forwards (hidden states, 0 with a warm cache) plus
    `d*L*N` (exact) and/or `probes*L*N` JVP block forwards.
    """
    if mode not in MODES:
        raise DepthlabError(f"jacobian mode must be one of {MODES}, got {mode!r}")
    if mode != "exact" and probes < 2:
        raise DepthlabError("the Hutchinson estimator needs probes >= 2 (for a standard error)")
    ids = check_ids(stack, ids, min_len=1)
    L, d = stack.n_layers, stack.d_model
    layers = list(range(L)) if layers is None else [stack.block_index(x) for x in layers]
    repeated = sorted({x for x in layers if layers.count(x) > 1})
    if repeated:
        raise DepthlabError(f"jacobian layers: {', '.join(map(str, repeated))} given more than "
                            "once; list each layer once")
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(bounds) * len(layers))
    exact = mode in ("exact", "both")
    hutch = mode in ("hutchinson", "both")
    dev = stack.device

    J_sum = {l: torch.zeros(d, d, dtype=torch.float32, device=dev) for l in layers} if exact else {}
    probe_vecs: dict[int, Tensor] = {}
    JV_sum: dict[int, Tensor] = {}
    if hutch:
        gen = torch.Generator().manual_seed(seed)
        for l in layers:
            v = torch.randint(0, 2, (probes, d), generator=gen).float() * 2 - 1
            probe_vecs[l] = v.to(dev)
            JV_sum[l] = torch.zeros(probes, d, dtype=torch.float32, device=dev)
    eye = torch.eye(d, device=dev)

    fit = None  # the tangent chunk left after running out of memory: kept from then on
    with counting(stack, counter):
        for a, b in bounds:
            chunk = ids[a:b]
            states = hidden_states(stack, chunk, cache)
            T = chunk.shape[1]
            planned = tc = min(tangent_chunk or _auto_tangent_chunk(stack, b - a, T, memory_budget),
                               fit or d)
            if use_vmap is None:
                with jvp_mode(counter):
                    use_vmap = _vmap_works(stack, states[0])
            with jvp_mode(counter):
                for l in layers:
                    h = states[l]
                    if exact:
                        # row j of the result = column j of the token-summed Jacobian
                        sums, tc = _jvp_token_sums(stack, l, h, eye, tc, use_vmap)
                        J_sum[l] += sums.T
                        counter.jvp_block_forwards += d * (b - a)
                    if hutch:
                        sums, tc = _jvp_token_sums(stack, l, h, probe_vecs[l], tc, use_vmap)
                        JV_sum[l] += sums
                        counter.jvp_block_forwards += probes * (b - a)
                    prog.step()
            if tc < planned:
                fit = tc

    n_tok = tokens_of(ids)
    res: dict[str, Any] = {}
    matrices = None
    if exact:
        per = {k: [] for k in EXACT_KEYS}
        mats = []
        for l in layers:
            J = J_sum[l] / n_tok
            mats.append(J)
            for k, v in jacobian_stats(J).items():
                per[k].append(v)
        res.update(per)
        res["mean"] = {k: mean_or_none(per[k]) for k in EXACT_KEYS}
        res["identity_preservation"] = (
            sum(1 for x in per["diagonal_mean"] if x > 0.5) / len(layers) if layers else None
        )
        if keep_matrices:
            matrices = [m.cpu().tolist() for m in mats]
    if hutch:
        h_out: dict[str, Any] = {"probes": probes, "seed": seed, "fro": [], "fro_se": [],
                                 "fro_sq": [], "fro_sq_se": [], "jacobian_norm": [],
                                 "jacobian_norm_se": []}
        for l in layers:
            r = (JV_sum[l] / n_tok - probe_vecs[l]).double()
            s = (r * r).sum(dim=1)  # ||(J - I) v_i||^2, unbiased for ||J - I||_F^2
            est = float(s.mean())
            se = float(s.std(unbiased=True)) / math.sqrt(probes)
            fro = math.sqrt(max(est, 0.0))
            fro_se = se / (2 * fro) if fro > 0 else 0.0
            h_out["fro_sq"].append(est)
            h_out["fro_sq_se"].append(se)
            h_out["fro"].append(fro)
            h_out["fro_se"].append(fro_se)
            h_out["jacobian_norm"].append(fro / d)
            h_out["jacobian_norm_se"].append(fro_se / d)
        h_out["mean_jacobian_norm"] = mean_or_none(h_out["jacobian_norm"])
        res["hutchinson"] = h_out

    N = ids.shape[0]
    micro = 2
    ref = L * math.ceil(N / micro)
    cost = cost_dict(
        counter, n_layers=L, n_sequences=N, reference_full_forwards=ref, micro_batch=micro,
        formula="L*N block forwards + (d if exact) + (probes if hutchinson) JVP block forwards "
                "per sequence and measured layer",
        reference_formula="L*ceil(N/2) full forwards with gradients + d backward passes per "
                          "(layer, micro-batch)",
        extra={"reference_backward_passes": d * ref, "tangent_chunk": tc if bounds else None,
               "vmap": bool(use_vmap)},
    )
    return JacobianResult(metric="jacobian", info=model_info(stack, ids), cost=cost, mode=mode,
                          layers=layers, matrices=matrices, **res)
