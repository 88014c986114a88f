"""Layer-effectiveness metrics against brute-force, independent oracles (tiny random models).

Every oracle recomputes its metric the slow, obvious way from the model itself:
full forward passes from the embeddings of deep-copied models with blocks deleted,
replaced or swapped in the ModuleList, autograd Jacobians of a block on the whole
[N, T, d] input, and explicit loops over tokens. None of them uses the metric code.
"""

# ruff: noqa: E741

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from depthlab.config import ModelConfig, MoEConfig
from depthlab.errors import DepthlabError
from depthlab.model.transformer import DepthLM
from depthlab.probe import build_stack
from depthlab.probe.metrics import (
    BlockCounter,
    compute_angular_distance,
    compute_attention_sparsity,
    compute_block_influence,
    compute_causal,
    compute_jacobian,
    compute_layer_drop,
    compute_layer_similarity,
    compute_moe,
    compute_permutation,
    compute_usefulness,
    compute_variance,
    compute_weight_sparsity,
    hoyer,
)

V, D, L, T, N, BS = 101, 32, 4, 10, 5, 2  # N not a multiple of BS: uneven chunks


def _model(**kw) -> DepthLM:
    torch.manual_seed(0)
    base = dict(vocab_size=V, n_layers=L, d_model=D, n_heads=4, n_kv_heads=2, max_seq_len=64,
                init="normal", init_std=0.15)
    base.update(kw)
    return DepthLM(ModelConfig(**base)).eval()


def _ids(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> DepthLM:
    return _model()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return _ids()


# ------------------------------------------------------------------ oracles


@torch.no_grad()
def _states(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """h_0..h_L by running the model's own modules (pre-final-norm)."""
    h = model.tok_embeddings(ids)
    out = [h]
    for blk in model.blocks:
        h = blk(h)
        out.append(h)
    return out


@torch.no_grad()
def _full_loss(model: DepthLM, ids: torch.Tensor) -> float:
    """Full forward of the (possibly modified) model from the embeddings."""
    logits = model(ids).logits[:, :-1].float()
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


class Affine(nn.Module):
    """A block that is exactly the affine map x @ W + b (a drop-in for a DepthLM block)."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.W, self.b = W, b
        self.mlp = nn.Identity()  # DepthLM.forward looks for MoE sublayers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.W + self.b


class Skip(nn.Module):
    """Block replaced by the identity (h_{s+1} = h_s)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


def _approx(x, rel=1e-5, abs=1e-6):  # noqa: A002
    return pytest.approx(x, rel=rel, abs=abs)


# ----------------------------------------------------------------- variance


def test_variance_matches_token_loop(model, ids):
    res = compute_variance(build_stack(model), ids, batch_size=BS)
    hs = _states(model, ids)
    for l in range(L):
        per_token = [torch.var(hs[l + 1][n, t], unbiased=True).item()
                     for n in range(N) for t in range(T)]
        assert res.variance[l] == _approx(sum(per_token) / len(per_token))
    assert res.last_layer_variance == res.variance[-1]
    # branch outputs recomputed by hand (pre-LN block: h + attn(norm(h)), then + mlp(norm(.)))
    with torch.no_grad():
        for l, blk in enumerate(model.blocks):
            a = blk.attn(blk.attn_norm(hs[l]))
            m = blk.mlp(blk.mlp_norm(hs[l] + a))
            torch.testing.assert_close(hs[l] + a + m, hs[l + 1])
            assert res.attn_variance[l] == _approx(a.var(-1, unbiased=True).mean().item())
            assert res.mlp_variance[l] == _approx(m.var(-1, unbiased=True).mean().item())
    assert res.cost["block_forwards"] == L * N
    d = res.to_dict()
    assert d["info"]["model_dtype"] == "float32" and len(d["variance"]) == L


# ----------------------------------------------------------------- jacobian


def _jacobian_oracle(model, ids):
    hs = _states(model, ids)
    n, t = ids.shape
    Js = []
    for l, blk in enumerate(model.blocks):
        full = torch.autograd.functional.jacobian(lambda x, blk=blk: blk(x), hs[l])  # [n,t,d,n,t,d]
        Js.append(full.sum(dim=(0, 1, 3, 4)).double() / (n * t))
    return Js


def test_jacobian_exact_matches_autograd(model, ids):
    stack = build_stack(model)
    ids = ids[:3, :6]  # the autograd oracle costs n*t*d backward passes per layer
    n = ids.shape[0]
    res = compute_jacobian(stack, ids, batch_size=BS, keep_matrices=True)
    Js = _jacobian_oracle(model, ids)
    for l, J in enumerate(Js):
        torch.testing.assert_close(torch.tensor(res.matrices[l], dtype=torch.float64), J,
                                   atol=1e-5, rtol=1e-5)
        eye = torch.eye(D, dtype=J.dtype)
        diag = torch.diagonal(J)
        off = J * (1 - eye)
        assert res.jacobian_norm[l] == _approx(torch.linalg.norm(J - eye).item() / D)
        assert res.off_diagonal_norm[l] == _approx(torch.linalg.norm(off).item() / math.sqrt(D * D - D))
        assert res.diagonal_mean[l] == _approx(diag.mean().item())
        assert res.diagonal_std[l] == _approx(diag.std(unbiased=True).item())
        assert res.frobenius_norm[l] == _approx(torch.linalg.norm(J).item())
        assert res.spectral_norm[l] == _approx(torch.linalg.svdvals(J)[0].item())
    assert res.mean["jacobian_norm"] == _approx(sum(res.jacobian_norm) / L)
    assert res.identity_preservation == sum(x > 0.5 for x in res.diagonal_mean) / L
    # the blocks do move the Jacobian away from I (otherwise the test is vacuous)
    assert min(res.jacobian_norm) > 1e-2
    # cost: hidden states once + d JVP products per sequence and layer
    assert res.cost["block_forwards"] == L * n
    assert res.cost["jvp_block_forwards"] == D * L * n
    # the un-vmapped fallback gives the same numbers
    res2 = compute_jacobian(stack, ids, batch_size=n, use_vmap=False, tangent_chunk=7, layers=[2])
    assert res2.jacobian_norm[0] == _approx(res.jacobian_norm[2])
    with pytest.raises(DepthlabError, match="jacobian layers: 2 given more than once"):
        compute_jacobian(stack, ids, layers=[2, 2])  # its Jacobian would be summed twice


def test_jacobian_hutchinson_within_standard_errors(model, ids):
    stack = build_stack(model)
    res = compute_jacobian(stack, ids[:3, :6], batch_size=3, mode="both", probes=2048, seed=3,
                           layers=[1, 3])
    h = res.hutchinson
    for l in range(2):
        exact = res.jacobian_norm[l] * D  # ||J - I||_F
        assert h["fro_se"][l] > 0
        assert abs(h["fro"][l] - exact) < 4 * h["fro_se"][l]
        assert abs(h["fro_sq"][l] - exact**2) < 4 * h["fro_sq_se"][l]
        assert h["jacobian_norm"][l] == _approx(h["fro"][l] / D)


def test_jacobian_of_affine_block_is_its_matrix(ids):
    model = _model()
    g = torch.Generator().manual_seed(11)
    A = torch.eye(D) + 0.05 * torch.randn(D, D, generator=g)
    model.blocks[2] = Affine(A, torch.zeros(D))
    stack = build_stack(model)
    res = compute_jacobian(stack, ids, batch_size=BS, mode="both", probes=512, layers=[2],
                           keep_matrices=True)
    # y = x @ A: dy_i/dx_j = A[j, i], so the token-summed Jacobian is A^T
    torch.testing.assert_close(torch.tensor(res.matrices[0]), A.T, atol=1e-5, rtol=1e-5)
    target = torch.linalg.norm(A - torch.eye(D)).item()
    assert res.jacobian_norm[0] * D == pytest.approx(target, rel=1e-5)
    h = res.hutchinson
    assert abs(h["fro"][0] - target) < 4 * h["fro_se"][0] and h["fro_se"][0] < 0.05 * target


# --------------------------------------------------------------- usefulness


def test_usefulness_exact_affine_block_and_transpose_discrimination(ids):
    model = _model()
    g = torch.Generator().manual_seed(5)
    A = torch.eye(D) + 0.5 * torch.randn(D, D, generator=g) / math.sqrt(D)
    c = 0.3 * torch.randn(D, generator=g)
    assert (A - A.T).abs().max() > 0.1  # non-symmetric: x A and x A^T differ
    model.blocks[1] = Affine(A, c)
    stack = build_stack(model)
    res = compute_usefulness(stack, ids, batch_size=BS)
    assert res.loss_ratio[1] == pytest.approx(1.0, abs=1e-4)
    assert res.fit_relative_error[1] < 1e-4
    assert not res.useful[1]
    # the same test would catch an nn.Linear-style (transposed) installation
    hs = _states(model, ids)
    base = _full_loss(model, ids)
    with torch.no_grad():
        hL = stack.run(hs[1], 1, [lambda x: x @ A.T + c, 2, 3])
        wrong = float(stack.loss(hL, ids))
    assert abs(wrong / base - 1.0) > 1e-2
    assert res.usefulness * L == pytest.approx(round(res.usefulness * L))
    assert res.n_useful == sum(r > 1.1 for r in res.loss_ratio)
    assert res.usefulness == res.n_useful / L
    assert res.split == "same" and res.fit_tokens == N * T and not res.underdetermined


def test_usefulness_matches_independent_lstsq(model, ids):
    stack = build_stack(model)
    res = compute_usefulness(stack, ids, batch_size=BS)
    hs = _states(model, ids)
    base = _full_loss(model, ids)
    assert res.base_loss == _approx(base)
    for l in range(L):
        X = hs[l].reshape(-1, D).double()
        Xa = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], 1)
        sol = torch.linalg.lstsq(Xa, hs[l + 1].reshape(-1, D).double()).solution
        mod = copy.deepcopy(model)
        mod.blocks[l] = Affine(sol[:-1].float(), sol[-1].float())
        assert res.linear_loss[l] == pytest.approx(_full_loss(mod, ids), rel=1e-4)
        assert res.loss_ratio[l] == pytest.approx(_full_loss(mod, ids) / base, rel=1e-4)
    assert res.usefulness == sum(r > 1.1 for r in res.loss_ratio) / L
    assert max(abs(r - 1) for r in res.loss_ratio) > 1e-3  # the random blocks are not linear
    # random models' losses barely react (ratios ~1): the threshold option makes a mixed count
    res1 = compute_usefulness(stack, ids, batch_size=BS, threshold=1.0)
    assert res1.loss_ratio == res.loss_ratio and res1.threshold == 1.0
    assert 0 < res1.n_useful < L and res1.usefulness == sum(r > 1.0 for r in res.loss_ratio) / L
    # cost: hidden states once (cached for the evaluation pass) + L(L-1)/2 per sequence
    assert res.cost["block_forwards"] == L * N + N * L * (L - 1) // 2


def test_usefulness_disjoint_fit_and_eval(model):
    stack = build_stack(model)
    all_ids = _ids(6, seed=7)
    res = compute_usefulness(stack, all_ids, batch_size=BS, holdout=0.5)
    assert res.split == "disjoint" and res.fit_sequences == 3 and res.eval_sequences == 3
    fit, ev = all_ids[:3], all_ids[3:]
    hs_fit, base = _states(model, fit), _full_loss(model, ev)
    l = 2
    Xa = torch.cat([hs_fit[l].reshape(-1, D).double(), torch.ones(3 * T, 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(Xa, hs_fit[l + 1].reshape(-1, D).double()).solution
    mod = copy.deepcopy(model)
    mod.blocks[l] = Affine(sol[:-1].float(), sol[-1].float())
    assert res.loss_ratio[l] == pytest.approx(_full_loss(mod, ev) / base, rel=1e-4)
    res2 = compute_usefulness(stack, ev, batch_size=BS, fit_ids=fit)
    assert res2.loss_ratio == pytest.approx(res.loss_ratio, rel=1e-6)
    # NaN weights (diagnose refuses them; a direct call ended in an MKL error)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.blocks[1].attn.o_proj.weight.fill_(float("nan"))
    with pytest.raises(DepthlabError, match="hidden states around block 1 are not finite"):
        compute_usefulness(build_stack(broken), ev, batch_size=BS)
    # "disjoint" is checked, not taken on trust (identical sets reported split "disjoint")
    with pytest.raises(DepthlabError, match="fit_ids and ids share sequences"):
        compute_usefulness(stack, ev, batch_size=BS, fit_ids=torch.cat([fit, ev[1:2]]))


# ------------------------------------------------------------------- causal


def test_causal_matches_full_skipped_models(model, ids):
    res = compute_causal(build_stack(model), ids, batch_size=BS)
    hs = _states(model, ids)
    base_d = [hs[l + 1] - hs[l] for l in range(L)]
    C = torch.zeros(L, L, dtype=torch.float64)
    for s in range(L):
        mod = copy.deepcopy(model)
        mod.blocks[s] = Skip()
        hs2 = _states(mod, ids)
        assert res.skip_loss[s] == _approx(_full_loss(mod, ids))
        for l in range(s + 1, L):
            d2 = hs2[l + 1] - hs2[l]
            num = (d2 - base_d[l]).norm(dim=-1).mean()
            den = base_d[l].norm(dim=-1).mean()
            C[s, l] = num / den if den > 1e-8 else 0.0
    torch.testing.assert_close(torch.tensor(res.matrix, dtype=torch.float64), C, atol=1e-5, rtol=1e-5)
    pairs = [C[s, l].item() for s in range(L) for l in range(s + 1, L)]
    rows = [C[s, s + 1:].mean().item() for s in range(L - 1)]
    assert res.causal_pairs == _approx(sum(pairs) / len(pairs))
    assert res.causal_rows == _approx(sum(rows) / len(rows))
    assert res.causal_pairs != pytest.approx(res.causal_rows, rel=1e-3)  # they differ: both matter
    assert C.max() > 1e-2
    assert res.cost["block_forwards"] == L * N + N * L * (L - 1) // 2


# -------------------------------------------------------------- permutation


@pytest.mark.parametrize("placement", ["pre", "scaled"])
def test_permutation_matches_swapped_modulelists(ids, placement):
    model = _model(norm_placement=placement)
    res = compute_permutation(build_stack(model), ids, batch_size=BS)
    base = _full_loss(model, ids)
    assert res.pair_set == "all" and len(res.pairs) == L * (L - 1) // 2
    for (l1, l2), p in zip(res.pairs, res.scores, strict=True):
        mod = copy.deepcopy(model)
        mod.blocks[l1], mod.blocks[l2] = mod.blocks[l2], mod.blocks[l1]
        assert p == _approx(abs(base - _full_loss(mod, ids)) / base, rel=1e-5, abs=1e-6)
        assert res.matrix[l1][l2] == res.matrix[l2][l1] == p
    assert res.permutation == _approx(sum(res.scores) / len(res.scores))
    assert res.cost["block_forwards"] == L * N + N * (L - 1) * L * (L + 1) // 3


def test_permutation_subsets(model, ids):
    stack = build_stack(model)
    full = compute_permutation(stack, ids, batch_size=BS)
    adj = compute_permutation(stack, ids, batch_size=BS, pairs="adjacent")
    assert adj.pair_set == "adjacent" and adj.pairs == [[l, l + 1] for l in range(L - 1)]
    assert adj.scores == _approx([full.matrix[l][l + 1] for l in range(L - 1)])
    ovr = compute_permutation(stack, ids, batch_size=BS, pairs="one-vs-rest", anchor=2)
    assert ovr.pair_set == "one-vs-rest" and ovr.anchor == 2
    assert ovr.pairs == [[0, 2], [1, 2], [2, 3]]
    assert ovr.permutation == _approx(full.per_layer[2])
    assert ovr.to_dict()["pair_set"] == "one-vs-rest"


# --------------------------------------------------------- layer drop & co


def test_layer_drop_matches_deleted_blocks(model, ids):
    res = compute_layer_drop(build_stack(model), ids, batch_size=BS)
    assert res.base_loss == _approx(_full_loss(model, ids))
    for l in range(L):
        mod = copy.deepcopy(model)
        del mod.blocks[l]
        assert res.loss[l] == _approx(_full_loss(mod, ids))
    assert res.cost["block_forwards"] == L * N + N * L * (L - 1) // 2


def test_block_influence_angular_similarity_loops(model, ids):
    stack = build_stack(model)
    hs = [h.double() for h in _states(model, ids)]
    bi = compute_block_influence(stack, ids, batch_size=BS)
    ang = compute_angular_distance(stack, ids, batch_size=BS)
    sim = compute_layer_similarity(stack, ids, batch_size=BS)
    for l in range(L):
        cos = [F.cosine_similarity(hs[l][n, t], hs[l + 1][n, t], dim=0).item()
               for n in range(N) for t in range(T)]
        assert bi.block_influence[l] == _approx(1 - sum(cos) / len(cos), abs=1e-6)
    for i in range(L + 1):
        for j in range(L + 1):
            cos = F.cosine_similarity(hs[i], hs[j], dim=-1).clamp(-1, 1)
            assert ang.matrix[i][j] == _approx((torch.arccos(cos) / math.pi).mean().item(),
                                               abs=2e-6)
            mi, mj = hs[i].mean(dim=(0, 1)), hs[j].mean(dim=(0, 1))
            assert sim.matrix[i][j] == _approx(F.cosine_similarity(mi, mj, dim=0).item())
    for n in range(1, L + 1):
        assert ang.by_n[n - 1] == [ang.matrix[l][l + n] for l in range(L + 1 - n)]
    assert ang.adjacent == ang.by_n[0] and len(ang.by_n[-1]) == 1
    assert bi.cost["block_forwards"] == L * N


# ----------------------------------------------------------------- sparsity


def test_hoyer_known_vectors():
    assert hoyer(torch.tensor([0.0, 0.0, 5.0, 0.0])) == pytest.approx(1.0)
    assert hoyer(torch.full((9,), -2.0)) == pytest.approx(0.0, abs=1e-7)
    # n=4, l1=7, l2=5: (2 - 7/5) / (2 - 1)
    assert hoyer(torch.tensor([3.0, -4.0, 0.0, 0.0])) == pytest.approx(0.6)


def test_weight_sparsity_fraction_and_pooling():
    model = _model()
    with torch.no_grad():
        w = model.blocks[0].attn.q_proj.weight
        w[:, : D // 2] = 5e-4  # half the entries below tau = 1e-3
    stack = build_stack(model)
    res = compute_weight_sparsity(stack, tau=1e-3)
    q = res.per_matrix[0]["attn.q_proj"]
    assert q["fraction_below_tau"] == pytest.approx(0.5, abs=1 / w.numel())
    assert q["hoyer"] == pytest.approx(hoyer(w))
    allw = torch.cat([m.reshape(-1) for m in stack.weight_matrices(0).values()])
    assert res.per_block[0]["hoyer"] == pytest.approx(hoyer(allw), rel=1e-5)
    assert res.per_block[0]["fraction_below_tau"] == pytest.approx((allw.abs() < 1e-3).float().mean().item())
    kind = torch.cat([stack.weight_matrices(l)["mlp.down_proj"].reshape(-1) for l in range(L)])
    assert res.per_kind["mlp.down_proj"]["hoyer"] == pytest.approx(hoyer(kind), rel=1e-5)
    assert res.cost["block_forwards"] == 0
    assert res.to_dict()["tau"] == 1e-3


def _attention_maps(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each block's attention map, from the q and k the model hands to SDPA in a plain
    forward: softmax(q k^T / sqrt(head_dim)) under the causal mask, each kv head shared by
    its group of query heads (independent of the metric's own attention_probs)."""
    captured = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        captured.append((q.detach().double(), k.detach().double()))
        return real(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad():
            model(ids)
    finally:
        F.scaled_dot_product_attention = real
    maps = []
    for q, k in captured:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        t = q.shape[2]
        scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
        maps.append(scores.softmax(-1))
    assert len(maps) == len(model.blocks)  # one SDPA call per block, or the spy missed them
    return maps


def _attention_oracle(P: torch.Tensor, mass: float = 0.9):
    """Per head: mean normalised entropy over queries t >= 1 (position 0 has log 1 = 0 in
    the denominator) and mean top-mass fraction over all queries (position 0: 1)."""
    Nn, H, Tt, _ = P.shape
    ent = torch.zeros(H, dtype=torch.float64)
    frac = torch.zeros(H, dtype=torch.float64)
    for n in range(Nn):
        for h in range(H):
            for t in range(Tt):
                p = P[n, h, t, : t + 1].double()
                srt = p.sort(descending=True).values.cumsum(0)
                k = int((srt < mass).sum()) + 1
                frac[h] += min(k, t + 1) / (t + 1)
                if t >= 1:
                    e = -(p[p > 0] * p[p > 0].log()).sum()
                    ent[h] += e / math.log(t + 1)
    return ent / (Nn * (Tt - 1)), frac / (Nn * Tt)


def test_attention_sparsity_loops_and_uniform_attention(model, ids):
    stack = build_stack(model)
    res = compute_attention_sparsity(stack, ids[:3], batch_size=BS)
    assert res.sample_sequences == 3 and res.queries_per_sequence == T - 1
    for l, P in enumerate(_attention_maps(model, ids[:3])):
        e, f = _attention_oracle(P)
        assert res.normalized_entropy[l] == _approx(e.tolist())
        assert res.top_mass_fraction[l] == _approx(f.tolist())
    assert compute_attention_sparsity(stack, ids, batch_size=BS).sample_sequences == len(ids)
    # q = 0 -> uniform attention over the visible keys: entropy 1, top-90% = ceil(0.9 n)/n
    uni = _model()
    with torch.no_grad():
        for blk in uni.blocks:
            blk.attn.q_proj.weight.zero_()
    r = compute_attention_sparsity(build_stack(uni), ids, batch_size=BS)
    expect = sum(math.ceil(0.9 * (t + 1) - 1e-9) / (t + 1) for t in range(T)) / T
    for l in range(L):
        assert r.normalized_entropy[l] == _approx([1.0] * 4)
        assert r.top_mass_fraction[l] == _approx([expect] * 4, rel=1e-5, abs=1e-5)
    assert r.group_size == 2


def test_attention_sparsity_in_memory_bounded_pieces(model, ids, monkeypatch):
    """A 1-byte budget forces one sequence per attention_probs call and one head per
    statistics chunk; the result must still equal the brute-force oracle."""
    from depthlab.probe.metrics import sparsity

    stack = build_stack(model)
    monkeypatch.setattr(sparsity, "ATTENTION_MAP_BYTES", 1)
    pieces = compute_attention_sparsity(stack, ids[:3], batch_size=BS)
    assert pieces.cost["attention_prob_calls"] == 3 * L  # one call per sequence and layer
    for l, P in enumerate(_attention_maps(model, ids[:3])):
        e, f = _attention_oracle(P)
        assert pieces.normalized_entropy[l] == _approx(e.tolist())
        assert pieces.top_mass_fraction[l] == _approx(f.tolist())


# ---------------------------------------------------------------------- MoE


def test_moe_counts_and_importance_match_manual_router_pass(ids):
    model = _model(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16), n_kv_heads=4)
    res = compute_moe(build_stack(model), ids, batch_size=BS)
    assert res.moe_layers == list(range(L))
    hs = _states(model, ids)
    base = _full_loss(model, ids)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            x = hs[i] + blk.attn(blk.attn_norm(hs[i]))
            r = blk.mlp.route(blk.mlp_norm(x).reshape(-1, D))
            counts = torch.bincount(r.experts.reshape(-1), minlength=4)
            assert res.expert_counts[i] == counts.tolist()
            assert sum(res.fraction_routed[i]) == pytest.approx(2.0)
            assert res.load_imbalance[i] == pytest.approx(counts.max().item() / counts.float().mean().item())
            ent = -(r.probs * r.probs.log()).sum(-1).mean().item()
            assert res.router_entropy[i] == pytest.approx(ent, rel=1e-5)
            assert res.router_entropy_normalized[i] == pytest.approx(ent / math.log(4), rel=1e-5)
            assert res.activation_sparsity[i] == 0.5
            mod = copy.deepcopy(model)
            mod.blocks[i].mlp = Zero()
            assert res.importance[i] == pytest.approx(_full_loss(mod, ids) - base, rel=1e-4, abs=1e-5)
    assert res.cost["block_forwards"] == L * N + N * sum(L - l for l in range(L))
    dense = compute_moe(build_stack(_model()), ids, batch_size=BS)
    assert dense.moe_layers == [] and dense.cost["block_forwards"] == L * N


# -------------------------------------------------------------- dtype & misc


def test_bf16_model_metrics_are_fp32(ids):
    model = _model().to(torch.bfloat16)
    stack = build_stack(model)
    counter = BlockCounter()
    res = compute_causal(stack, ids, batch_size=BS, counter=counter)
    assert res.info["model_dtype"] == "bfloat16"
    assert all(isinstance(x, float) for row in res.matrix for x in row)
    jac = compute_jacobian(stack, ids, batch_size=N, layers=[0])
    assert math.isfinite(jac.jacobian_norm[0])
    assert counter.block_forwards == res.cost["block_forwards"]


BF16_EPS = 2.0**-7
"""bf16 machine epsilon (8 significand bits): one rounding moves a value by at most half of
this, relative."""


def _dtype_metrics(model: nn.Module, ids: torch.Tensor) -> dict[str, list[float]]:
    """Jacobian, variance, usefulness and attention entropy, one sequence per chunk (so
    that every partial sum goes through the metric's accumulators)."""
    stack = build_stack(model)
    jac = compute_jacobian(stack, ids, batch_size=1)
    var = compute_variance(stack, ids, batch_size=1)
    use = compute_usefulness(stack, ids, batch_size=1)
    att = compute_attention_sparsity(stack, ids, batch_size=1)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    assert jac.info["model_dtype"] == jac.info["compute_dtype"] == dtype
    return {
        "jacobian": [*jac.jacobian_norm, *jac.off_diagonal_norm, *jac.diagonal_mean,
                     *jac.diagonal_std, *jac.frobenius_norm, *jac.spectral_norm],
        "variance": [*var.variance, *var.attn_variance, *var.mlp_variance],
        "usefulness": [use.base_loss, *use.linear_loss, *use.loss_ratio],
        "attention_entropy": [x for row in att.normalized_entropy for x in row],
    }


def _max_rel(a: list[float], b: list[float]) -> float:
    assert all(isinstance(x, float) and math.isfinite(x) for x in a + b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def test_bf16_metrics_track_fp32_within_bf16_rounding():
    """A model run in bf16 against the same weights in fp32 (both hold the same
    bf16-representable weights, so every difference comes from bf16 arithmetic):

    - the blocks really run in bf16 (forward pre-hooks see bf16 inputs) and the metrics
      differ from fp32 by more than fp32 rounding could (1e-5);
    - they stay within one bf16 epsilon of fp32 (relative): each block rounds its outputs
      by at most half an epsilon, and the token averages partly cancel those roundings;
    - accumulation is fp32 or wider: the same bf16 metrics over the sequences in reverse
      order (each sequence's block outputs bitwise the same, only the order of the partial
      sums changes) agree to fp32 rounding; an accumulator kept in bf16 rounds every partial
      sum to 8 bits and would not."""
    ids = _ids(8)
    m16 = _model().to(torch.bfloat16)
    m32 = copy.deepcopy(m16).float()
    seen: set[torch.dtype] = set()
    for blk in m16.blocks:
        blk.register_forward_pre_hook(lambda _m, a: seen.add(a[0].dtype))
    bf16, fp32 = _dtype_metrics(m16, ids), _dtype_metrics(m32, ids)
    assert seen == {torch.bfloat16}
    reverse = _dtype_metrics(m16, ids.flip(0))
    for family, vals in bf16.items():
        rel = _max_rel(vals, fp32[family])
        assert 1e-5 < rel < BF16_EPS, (family, rel)
        assert _max_rel(reverse[family], vals) < 1e-5, family


def test_jacobian_halves_its_tangent_chunk_when_out_of_memory(model, monkeypatch):
    """The automatic chunk is an estimate: a vmap over too many tangents that runs out of
    memory is retried in halves (it used to fail the whole metric)."""
    import torch.func

    from depthlab.probe.metrics import jacobian

    stack = build_stack(model)
    h = torch.randn(1, 5, stack.d_model, generator=torch.Generator().manual_seed(0))
    tangents = torch.eye(stack.d_model)[:8]
    expected, fit = jacobian._jvp_token_sums(stack, 0, h, tangents, 8, True)
    assert fit == 8
    real_vmap, sizes = torch.func.vmap, []

    def vmap_with_little_memory(fn):
        def run(vs):
            sizes.append(vs.shape[0])
            if vs.shape[0] > 2:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return real_vmap(fn)(vs)
        return run

    monkeypatch.setattr(torch.func, "vmap", vmap_with_little_memory)
    got, fit = jacobian._jvp_token_sums(stack, 0, h, tangents, 8, True)
    assert sizes == [8, 4, 2, 2, 2, 2] and fit == 2  # the next call starts at 2
    torch.testing.assert_close(got, expected)
