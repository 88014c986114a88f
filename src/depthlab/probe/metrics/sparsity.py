"""Sparsity measures (metrics.md section 7): weights and attention.

Weight sparsity of a set of weights w (n entries): the fraction with `|w| < tau`
(default 1e-3) and the scale-free Hoyer measure
`(sqrt(n) - ||w||_1 / ||w||_2) / (sqrt(n) - 1)` (0 = all entries equal in
magnitude, 1 = a single non-zero; an all-zero set counts as 1). Reported per
matrix (each of `stack.weight_matrices(l)`; stacked expert weights are one
matrix), per block (all of a block's matrices pooled), per matrix kind (the
canonical name, pooled over blocks) and overall. Needs no forward pass.

Attention sparsity per layer and head, for each query t: the entropy of its
attention distribution divided by `log(visible keys)`, and the smallest fraction
of visible keys holding `mass` (0.9) of the attention. Visible keys are the
causal prefix (t + 1 keys), limited to the sliding window on sliding-window
layers and to the query's own chunk on chunked-attention layers (Llama 4:
t mod chunk + 1 keys). A query with a single visible key (the first position, and
the first of each chunk on chunked layers) has no defined
normalised entropy (0 / log 1): it is EXCLUDED from the entropy average; its
top-mass fraction is 1 (its one key holds all the mass) and it counts in that
average like every other query. Averages run over the queries of every
sequence of `ids` (diagnose's `attention_sparsity.samples=K` takes fewer to shorten
the run: the maps are computed a piece at a time, so all of them always fit).
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
    mean_or_none,
    model_info,
)

# ------------------------------------------------------------------ weights


def hoyer(w: Tensor) -> float:
    """Hoyer sparsity of all entries of w (fp32 math)."""
    s = _sums(w, 0.0)
    return _hoyer_from(s["n"], s["l1"], s["l2sq"])


def _sums(w: Tensor, tau: float) -> dict[str, float]:
    x = w.detach().float().reshape(-1)
    a = x.abs()
    return {"n": float(x.numel()), "l1": float(a.sum()), "l2sq": float((x * x).sum()),
            "below": float((a < tau).sum())}


def _hoyer_from(n: float, l1: float, l2sq: float) -> float:
    if n <= 1:
        return 0.0
    if l2sq <= 0:
        return 1.0
    return (math.sqrt(n) - l1 / math.sqrt(l2sq)) / (math.sqrt(n) - 1)


def _summary(s: dict[str, float]) -> dict[str, float]:
    return {"fraction_below_tau": s["below"] / s["n"] if s["n"] else 0.0,
            "hoyer": _hoyer_from(s["n"], s["l1"], s["l2sq"]), "numel": int(s["n"])}


def _pool(a: dict[str, float] | None, b: dict[str, float]) -> dict[str, float]:
    if a is None:
        return dict(b)
    return {k: a[k] + b[k] for k in a}


@dataclass(kw_only=True)
class WeightSparsityResult(MetricResult):
    tau: float
    per_block: list[dict[str, float]]
    """Per block l: fraction_below_tau, hoyer, numel over all its matrices pooled."""
    per_matrix: list[dict[str, dict[str, float]]]
    """Per block l: {matrix name: {fraction_below_tau, hoyer, numel}}."""
    per_kind: dict[str, dict[str, Any]]
    """Per matrix name: pooled over blocks, plus per-layer `fraction_below_tau_by_layer`,
    `hoyer_by_layer` (None where a block lacks that matrix)."""
    overall: dict[str, float]
    fraction_below_tau: list[float]
    """Per block (= per_block[l]['fraction_below_tau'])."""
    hoyer: list[float]
    """Per block (= per_block[l]['hoyer'])."""


def compute_weight_sparsity(
    stack, ids: Tensor | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
    progress: ProgressFn | None = None, counter: BlockCounter | None = None,
    cache: HiddenStateCache | None = None, tau: float = 1e-3,
) -> WeightSparsityResult:
    """Weight sparsity per block, per matrix and per matrix kind. Cost: 0 block forwards."""
    del batch_size, cache  # no forward pass
    L = stack.n_layers
    counter = counter if counter is not None else BlockCounter()
    prog = Progress(progress, L)
    per_block, per_matrix = [], []
    kinds: dict[str, dict[str, float]] = {}
    kind_layers: dict[str, list[dict[str, float] | None]] = {}
    overall = None
    for l in range(L):
        block_s = None
        mats = {}
        for name, w in stack.weight_matrices(l).items():
            s = _sums(w, tau)
            mats[name] = _summary(s)
            block_s = _pool(block_s, s)
            kinds[name] = _pool(kinds.get(name), s)
            kind_layers.setdefault(name, [None] * L)[l] = mats[name]
        per_matrix.append(mats)
        if block_s is None:
            block_s = {"n": 0.0, "l1": 0.0, "l2sq": 0.0, "below": 0.0}
        per_block.append(_summary(block_s))
        overall = _pool(overall, block_s)
        prog.step()
    per_kind: dict[str, dict[str, Any]] = {}
    for name, s in kinds.items():
        entry: dict[str, Any] = _summary(s)
        entry["fraction_below_tau_by_layer"] = [
            x["fraction_below_tau"] if x else None for x in kind_layers[name]]
        entry["hoyer_by_layer"] = [x["hoyer"] if x else None for x in kind_layers[name]]
        per_kind[name] = entry
    info = model_info(stack, ids) if ids is not None else {
        "arch": getattr(stack, "arch", "generic"), "n_layers": L, "d_model": stack.d_model,
        "model_dtype": str(stack.model_dtype).removeprefix("torch.")}
    return WeightSparsityResult(
        metric="weight_sparsity", info=info,
        cost=cost_dict(counter, n_layers=L, n_sequences=1, formula="0"),
        tau=tau, per_block=per_block, per_matrix=per_matrix, per_kind=per_kind,
        overall=_summary(overall or {"n": 0.0, "l1": 0.0, "l2sq": 0.0, "below": 0.0}),
        fraction_below_tau=[b["fraction_below_tau"] for b in per_block],
        hoyer=[b["hoyer"] for b in per_block],
    )


# ---------------------------------------------------------------- attention


def _attention_size(stack, l: int, attn_type: str, key: str) -> int | None:
    """config.`key` of the stack's model when block l's attention type is `attn_type`."""
    types = getattr(stack, "_attn_types", None)
    config = getattr(stack, "config", None)
    if types is None or config is None or types[l] != attn_type:
        return None
    size = getattr(config, key, None)
    return int(size) if size else None


def sliding_window(stack, l: int) -> int | None:
    """The sliding window of block l, when the stack's model has one (else None)."""
    return _attention_size(stack, l, "sliding_attention", "sliding_window")


def attention_chunk(stack, l: int) -> int | None:
    """The chunk size of block l when it attends only within chunks of positions
    (Llama 4's chunked attention), else None."""
    return _attention_size(stack, l, "chunked_attention", "attention_chunk_size")


def visible_keys(T: int, window: int | None, device: torch.device | str = "cpu",
                 chunk: int | None = None) -> Tensor:
    """Number of keys query t may attend to: t + 1 (t mod chunk + 1 within chunks), capped
    at the window."""
    n = torch.arange(1, T + 1, device=device)
    if chunk:
        n = (n - 1) % chunk + 1
    return n.clamp_max(window) if window else n


def layer_visible_keys(stack, l: int, T: int, device: torch.device | str = "cpu") -> Tensor:
    """visible_keys of block l (its sliding window or attention chunk, if any)."""
    return visible_keys(T, sliding_window(stack, l), device, chunk=attention_chunk(stack, l))


def attention_query_stats(P: Tensor, visible: Tensor, mass: float = 0.9) -> tuple[Tensor, Tensor]:
    """Per query of P [..., T, T]: (entropy / log(visible), smallest fraction of visible keys
    holding `mass`). The entropy of a query with one visible key is meaningless (callers drop
    it); its fraction is 1."""
    P = P.float()
    plogp = torch.where(P > 0, P * torch.log(P.clamp_min(1e-45)), torch.zeros_like(P))
    ent = -plogp.sum(-1)
    vis = visible.float()
    ent_norm = ent / torch.log(vis.clamp_min(2.0))
    top = P.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    k = (top < mass).sum(-1) + 1
    frac = torch.minimum(k.float(), vis) / vis
    return ent_norm, frac


ATTENTION_MAP_BYTES = 256 * 2**20
"""Working-set target for attention maps: one `attention_probs` call covers as many
sequences as fit (at least one), and the per-query statistics (which sort each map) run
over heads in chunks whose temporaries fit it; at T=4096 one head's map is 64 MiB, so a
32-head model needs 2 GiB for the one sequence of a call (the maps themselves come from the
model, whole), against 16 GiB plus 5x that in temporaries for a batch of 8 in one piece."""


def _attention_sums(stack, l: int, h: Tensor, mass: float,  # noqa: E741
                    counter: BlockCounter) -> tuple[Tensor, Tensor] | None:
    """Per head of block l, the sums over sequences of h and over queries of (normalised
    entropy: queries with >= 2 visible keys, top-mass fraction: all queries); None if the
    model gives no maps."""
    vis = layer_visible_keys(stack, l, h.shape[1], h.device)
    kept = (vis >= 2).nonzero().squeeze(1)  # queries the entropy averages over
    ent = frac = None
    start, per_call, heads_per_chunk = 0, 1, 1  # the first call tells the size of a map
    while start < h.shape[0]:
        P = stack.attention_probs(l, h[start:start + per_call])
        counter.attention_prob_calls += 1
        if P is None:
            return None
        if ent is None:
            ent = torch.zeros(P.shape[1], dtype=torch.float64, device=P.device)
            frac = torch.zeros_like(ent)
            vis, kept = vis.to(P.device), kept.to(P.device)
            per_call = max(1, ATTENTION_MAP_BYTES // (P[0].numel() * P.element_size()))
            # attention_query_stats holds about 5 fp32 copies of its input (log, sort, cumsum)
            heads_per_chunk = max(1, ATTENTION_MAP_BYTES // (5 * 4 * P[:, 0].numel()))
        start += P.shape[0]
        for a in range(0, P.shape[1], heads_per_chunk):
            e, f = attention_query_stats(P[:, a:a + heads_per_chunk], vis, mass)
            ent[a:a + heads_per_chunk] += e.index_select(-1, kept).sum(dim=(0, 2)).double()
            frac[a:a + heads_per_chunk] += f.sum(dim=(0, 2)).double()
        del P
    return ent.cpu(), frac.cpu()


@dataclass(kw_only=True)
class AttentionSparsityResult(MetricResult):
    mass: float
    sample_sequences: int
    queries_per_sequence: int
    """Queries per sequence and head in the entropy average (those with >= 2 visible keys;
    the top-mass average takes all T); fewer on chunked-attention layers."""
    normalized_entropy: list[list[float] | None]
    """[layer][head]: mean over queries of entropy / log(visible keys); 1 uniform, 0 one key."""
    top_mass_fraction: list[list[float] | None]
    """[layer][head]: mean smallest fraction of visible keys holding `mass` of the attention."""
    layer_normalized_entropy: list[float | None]
    layer_top_mass_fraction: list[float | None]
    mean_normalized_entropy: float | None
    mean_top_mass_fraction: float | None
    group_size: int | None
    """KV sharing G = n_heads / n_kv_heads when the model says (None otherwise)."""
    excluded: str = ("queries with a single visible key (position 0, and the first of each "
                     "chunk on chunked-attention layers) are excluded from the entropy average "
                     "(0/log 1); their top-mass fraction, 1, is averaged")


def kv_group_size(stack) -> int | None:
    m = getattr(stack, "model", None)
    cfg = getattr(m, "cfg", None)
    if cfg is not None and hasattr(cfg, "group_size"):
        return int(cfg.group_size)
    hf = getattr(m, "config", None)
    h = getattr(hf, "num_attention_heads", None)
    kv = getattr(hf, "num_key_value_heads", None) or h
    if h and kv:
        return int(h) // int(kv)
    return None


def compute_attention_sparsity(
    stack, ids: Tensor, *, batch_size: int = DEFAULT_BATCH_SIZE, progress: ProgressFn | None = None,
    counter: BlockCounter | None = None, cache: HiddenStateCache | None = None,
    mass: float = 0.9,
) -> AttentionSparsityResult:
    """Attention entropy and top-mass fraction per layer and head, over all sequences of
    `ids`.

    Cost: `L*N` block forwards for the hidden states (0 with a warm cache)
    plus one `attention_probs` call per layer and chunk.
    """
    ids = check_ids(stack, ids)
    if not 0 < mass <= 1:
        raise DepthlabError(f"mass must be in (0, 1], got {mass}")
    N = ids.shape[0]
    L = stack.n_layers
    T = ids.shape[1]
    counter = counter if counter is not None else BlockCounter()
    bounds = chunk_bounds(N, batch_size)
    prog = Progress(progress, len(bounds) * L)
    ent_sum: list[Tensor | None] = [None] * L
    frac_sum: list[Tensor | None] = [None] * L
    unsupported = [False] * L
    with counting(stack, counter), torch.no_grad():
        for a, b in bounds:
            states = hidden_states(stack, ids[a:b], cache)
            for l in range(L):
                if unsupported[l]:
                    prog.step()
                    continue
                sums = _attention_sums(stack, l, states[l], mass, counter)
                if sums is None:
                    unsupported[l] = True
                    prog.step()
                    continue
                e, f = sums
                ent_sum[l] = e if ent_sum[l] is None else ent_sum[l] + e
                frac_sum[l] = f if frac_sum[l] is None else frac_sum[l] + f
                prog.step()
    n_q = N * int((visible_keys(T, None) >= 2).sum())
    ent, frac = [], []
    for l in range(L):
        if ent_sum[l] is None or unsupported[l]:
            ent.append(None)
            frac.append(None)
            continue
        n_keep = N * int((layer_visible_keys(stack, l, T) >= 2).sum())
        ent.append((ent_sum[l] / max(n_keep, 1)).tolist())
        frac.append((frac_sum[l] / (N * T)).tolist())
    layer_ent = [mean_or_none(x) if x is not None else None for x in ent]
    layer_frac = [mean_or_none(x) if x is not None else None for x in frac]
    return AttentionSparsityResult(
        metric="attention_sparsity", info=model_info(stack, ids),
        cost=cost_dict(counter, n_layers=L, n_sequences=N,
                       formula="L*N (0 with a warm cache) + attention_probs calls "
                               "(Hugging Face: each reruns one block eagerly, counted)"),
        mass=mass, sample_sequences=int(N),
        queries_per_sequence=n_q // max(N, 1),
        normalized_entropy=ent, top_mass_fraction=frac,
        layer_normalized_entropy=layer_ent, layer_top_mass_fraction=layer_frac,
        mean_normalized_entropy=mean_or_none(layer_ent),
        mean_top_mass_fraction=mean_or_none(layer_frac), group_size=kv_group_size(stack),
    )
