"""Usefulness: linear replaceability of each block (metrics.md section 3).

For block l: X = h_l, Y = h_{l+1} over all N*T tokens; `[W; b]` minimises
`||[X 1][W; b] - Y||^2`. The normal equations `G = [X 1]^T [X 1]`,
`R = [X 1]^T Y` are accumulated in fp64 over sequence chunks (memory does not
grow with N) and solved in fp64 on the CPU with `torch.linalg.lstsq` (gelsd:
the minimum-norm solution when X is rank-deficient). The block is then replaced
by the position-wise affine map `y = x @ W + b` - NOT `nn.Linear` semantics,
which would compute `x @ W.T + b` - and the model is rerun from the cached h_l.
`loss_ratio_l = L_lin / L_base`; useful iff `loss_ratio_l > threshold` (1.1);
`usefulness = #useful / L`.

Option: `fit_ids` (or `holdout`) fits on one set of sequences and evaluates on a
disjoint set; the result says which (`split`).
"""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

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
    loss_sum,
    model_info,
    n_pred_tokens,
    single_thread,
)


@dataclass(kw_only=True)
class UsefulnessResult(MetricResult):
    base_loss: float
    linear_loss: list[float]
    """Loss with block l replaced by its least-squares affine map."""
    loss_ratio: list[float]
    useful: list[bool]
    n_useful: int
    usefulness: float
    """#useful / L: a multiple of 1/L."""
    threshold: float
    fit_relative_error: list[float]
    """sqrt(sum ||x W + b - y||^2 / sum ||y||^2) over the evaluation tokens."""
    split: str
    """"same" (fit and evaluate on the same sequences) or "disjoint"."""
    fit_sequences: int
    eval_sequences: int
    fit_tokens: int
    underdetermined: bool
    """True when the fit has fewer tokens than d + 1 unknowns per output: the affine map
    then interpolates the fit tokens exactly and (with split="same") loss_ratio is ~1 by
    construction. Use more tokens or a disjoint evaluation set."""


def affine_map(W: Tensor, b: Tensor) -> Callable[[Tensor], Tensor]:
    """The fitted position-wise map y = x @ W + b (fp32 math, output in x's dtype)."""

    def apply(x: Tensor) -> Tensor:
        return (x.float() @ W + b).to(x.dtype)

    return apply


def solve_affine(G: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """Least-squares [W; b] from the fp64 normal equations G [W; b] = R (on the CPU)."""
    with single_thread():
        sol = torch.linalg.lstsq(G.double().cpu(), R.double().cpu(), driver="gelsd").solution
    return sol[:-1], sol[-1]


def compute_usefulness(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    threshold: float = 1.1, fit_ids: Tensor | None = None, holdout: float | None = None,
    cache_bytes: int = 2 * 1024**3,
) -> UsefulnessResult:
    """Linear replaceability of each block.

    fit_ids: fit W, b on these sequences and evaluate on `ids` (must be disjoint sets);
    holdout: alternatively, evaluate on the last `holdout` fraction of `ids` and fit on
    the rest. Default: fit and evaluate on all of `ids`.
    Cost: `L*N_fit` (fit pass) + `L*N_eval` (eval pass; 0 when fit and evaluation share
    the sequences and their states fit in the cache) + `N_eval*L(L-1)/2` block forwards.
    """
    ids = check_ids(stack, ids)
    L, d = stack.n_layers, stack.d_model
    if fit_ids is not None and holdout is not None:
        raise DepthlabError("give fit_ids or holdout, not both")
    if holdout is not None:
        if not 0 < holdout < 1:
            raise DepthlabError(f"holdout must be in (0, 1), got {holdout}")
        n_eval = max(1, int(round(ids.shape[0] * holdout)))
        if n_eval >= ids.shape[0]:
            raise DepthlabError("holdout leaves no sequences to fit on")
        fit_ids, ids = ids[: ids.shape[0] - n_eval], ids[ids.shape[0] - n_eval:]
    split = "same"
    if fit_ids is not None:
        fit_ids = check_ids(stack, fit_ids)
        evaluated = {row.numpy().tobytes() for row in ids.cpu()}
        if any(row.numpy().tobytes() in evaluated for row in fit_ids.cpu()):
            raise DepthlabError("fit_ids and ids share sequences: a held-out evaluation needs "
                                "disjoint sets (leave fit_ids out to fit and evaluate on ids)")
        split = "disjoint"
    else:
        fit_ids = ids
    counter = counter if counter is not None else BlockCounter()
    fit_bounds = chunk_bounds(fit_ids.shape[0], batch_size)
    eval_bounds = chunk_bounds(ids.shape[0], batch_size)
    prog = Progress(progress, len(fit_bounds) + len(eval_bounds) * L)
    dev = stack.device
    local_cache = cache if cache is not None else (
        HiddenStateCache(cache_bytes) if split == "same" else None)

    # ---- fit: accumulate the fp64 normal equations of every layer over chunks
    G = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=dev)
    R = torch.zeros(L, d + 1, d, dtype=torch.float64, device=dev)
    with counting(stack, counter), torch.no_grad():
        for a, b in fit_bounds:
            states = hidden_states(stack, fit_ids[a:b], local_cache)
            for l in range(L):
                X = states[l].reshape(-1, d).double()
                X = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=dev)], dim=1)
                Y = states[l + 1].reshape(-1, d).double()
                G[l] += X.T @ X
                R[l] += X.T @ Y
            prog.step()
        maps = []
        for l in range(L):
            if not (torch.isfinite(G[l]).all() and torch.isfinite(R[l]).all()):
                raise DepthlabError(f"usefulness: the hidden states around block {l} are not "
                                    "finite (NaN or inf weights?); the affine fit is undefined")
            W, bias = solve_affine(G[l], R[l])
            maps.append((W.float().to(dev), bias.float().to(dev)))
        del G, R

        # ---- evaluate: rerun from cached h_l with block l replaced
        base = 0.0
        lin = [0.0] * L
        err_num = [0.0] * L
        err_den = [0.0] * L
        for a, b in eval_bounds:
            chunk = ids[a:b]
            states = hidden_states(stack, chunk, local_cache)
            base += loss_sum(stack, states[L], chunk)
            for l in range(L):
                W, bias = maps[l]
                f = affine_map(W, bias)
                y_hat = f(states[l]).float()
                y = states[l + 1].float()
                err_num[l] += float(((y_hat - y) ** 2).sum())
                err_den[l] += float((y**2).sum())
                h_L = stack.run(states[l], l, [f, *range(l + 1, L)])
                lin[l] += loss_sum(stack, h_L, chunk)
                prog.step()

    n = n_pred_tokens(ids)
    base_loss = base / n
    linear_loss = [x / n for x in lin]
    ratio = [x / base_loss for x in linear_loss]
    useful = [r > threshold for r in ratio]
    N_fit, N_eval = fit_ids.shape[0], ids.shape[0]
    N_all = N_fit if split == "same" else N_fit + N_eval
    micro = 2
    info = model_info(stack, ids)
    cost = cost_dict(
        counter, n_layers=L, n_sequences=N_all, micro_batch=micro,
        reference_full_forwards=math.ceil(N_all / micro) * (1 + 2 * L),
        formula="L*N_fit + L*N_eval (0 with shared cached states) + N_eval*L(L-1)/2",
        reference_formula="ceil(N/2)*(1+2L) full forwards + L least-squares solves",
        extra={"least_squares_solves": L},
    )
    return UsefulnessResult(
        metric="usefulness", info=info, cost=cost, base_loss=base_loss, linear_loss=linear_loss,
        loss_ratio=ratio, useful=useful, n_useful=sum(useful), usefulness=sum(useful) / L,
        threshold=threshold,
        fit_relative_error=[math.sqrt(nu / de) if de > 0 else 0.0
                            for nu, de in zip(err_num, err_den, strict=True)],
        split=split, fit_sequences=N_fit, eval_sequences=N_eval,
        fit_tokens=int(fit_ids.numel()), underdetermined=bool(fit_ids.numel() < d + 1),
    )
