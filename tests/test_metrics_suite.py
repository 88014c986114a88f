"""The metric suite (registry, shared hidden states, costs) and the metrics on Hugging Face
models through `build_stack`, against the HF models' own forward passes."""

# ruff: noqa: E741

from __future__ import annotations

import copy
import io
import json
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
    compute_attention_sparsity,
    compute_causal,
    compute_jacobian,
    compute_layer_drop,
    compute_moe,
    compute_permutation,
    compute_usefulness,
    compute_variance,
    compute_weight_sparsity,
)
from depthlab.probe.suite import METRICS, resolve_metrics, run_suite

V, D, L, T, N, BS = 101, 32, 4, 10, 5, 2

NAMES = ["variance", "jacobian", "usefulness", "causal", "permutation", "layer_drop",
         "block_influence", "angular_distance", "layer_similarity", "weight_sparsity",
         "attention_sparsity", "moe"]


def _depthlm(**kw) -> DepthLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layers=L, d_model=D, n_heads=4, n_kv_heads=2, max_seq_len=64,
               init="normal", init_std=0.15)
    cfg.update(kw)
    return DepthLM(ModelConfig(**cfg)).eval()


def _ids(n: int = N, t: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


# -------------------------------------------------------------------- suite


def test_registry_names():
    assert list(METRICS) == NAMES
    assert resolve_metrics("all") == NAMES
    assert resolve_metrics("causal,layer-drop") == ["causal", "layer_drop"]
    with pytest.raises(DepthlabError, match="unknown metric"):
        resolve_metrics(["causal", "nope"])


def test_suite_shares_states_and_matches_standalone_metrics():
    model = _depthlm(moe=MoEConfig(num_experts=4, top_k=2, expert_hidden=16, layers=[1, 3]))
    stack = build_stack(model)
    ids = _ids()
    buf = io.StringIO()
    from rich.console import Console

    out = run_suite(stack, ids, "all", batch_size=BS, progress=True,
                    console=Console(file=buf, force_terminal=False, width=100))
    printed = buf.getvalue()  # not a terminal: one plain line per metric start and end
    for name in NAMES:
        assert f"{name}: running" in printed and f"{name}: done in" in printed
    json.dumps(out)  # JSON-ready
    m = out["metrics"]
    assert list(m) == NAMES
    for name in NAMES:
        assert m[name]["wall_s"] >= 0 and "block_forwards" in m[name]["cost"]
    # variance makes the one real pass that fills the cache; MoE needs its own (router hooks)
    assert m["variance"]["cost"]["block_forwards"] == L * N
    for name in ("block_influence", "angular_distance", "layer_similarity", "attention_sparsity"):
        assert m[name]["cost"]["block_forwards"] == 0
    assert m["causal"]["cost"]["block_forwards"] == N * L * (L - 1) // 2
    assert m["usefulness"]["cost"]["block_forwards"] == N * L * (L - 1) // 2
    assert m["permutation"]["cost"]["block_forwards"] == N * (L - 1) * L * (L + 1) // 3
    assert m["jacobian"]["cost"]["jvp_block_forwards"] == D * L * N
    assert m["layer_drop"]["source"] == "causal" and m["layer_drop"]["cost"]["block_forwards"] == 0
    assert m["moe"]["cost"]["block_forwards"] == L * N + N * ((L - 1) + (L - 3))
    assert out["cost"]["block_forwards"] == sum(v["cost"]["block_forwards"] for v in m.values())

    # the same numbers as each metric run on its own (no cache, no sharing)
    alone = {
        "causal": compute_causal(stack, ids, batch_size=3).to_dict(),
        "permutation": compute_permutation(stack, ids, batch_size=3).to_dict(),
        "usefulness": compute_usefulness(stack, ids, batch_size=3).to_dict(),
        "variance": compute_variance(stack, ids, batch_size=3).to_dict(),
        "layer_drop": compute_layer_drop(stack, ids, batch_size=3).to_dict(),
        "moe": compute_moe(stack, ids, batch_size=3).to_dict(),
    }
    for name, key in [("causal", "matrix"), ("permutation", "scores"), ("usefulness", "loss_ratio"),
                      ("variance", "variance"), ("variance", "mlp_variance"),
                      ("layer_drop", "loss"), ("moe", "importance")]:
        got = torch.tensor(m[name][key], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor(alone[name][key], dtype=torch.float64),
                                   atol=1e-6, rtol=1e-5)
    assert m["moe"]["expert_counts"] == alone["moe"]["expert_counts"]
    assert m["moe"]["moe_layers"] == [1, 3]


def test_suite_options_and_subset():
    stack = build_stack(_depthlm())
    out = run_suite(stack, _ids(), ["permutation", "jacobian"], batch_size=BS, progress=False,
                    options={"permutation": {"pairs": "adjacent"},
                             "jacobian": {"mode": "hutchinson", "probes": 8}})
    assert list(out["metrics"]) == ["permutation", "jacobian"]
    assert out["metrics"]["permutation"]["pair_set"] == "adjacent"
    assert out["metrics"]["jacobian"]["jacobian_norm"] is None
    assert len(out["metrics"]["jacobian"]["hutchinson"]["fro"]) == L
    # options are checked as diagnose's --opt are (a misspelt one was a raw TypeError)
    for options, needle in (({"bogus": {}}, "unknown metric 'bogus'"),
                            ({"permutation": {"pair": "adjacent"}}, "unknown option.*pair"),
                            ({"usefulness": {"threshold": 0.5}}, "threshold=0.5: must be >= 1"),
                            ({"causal": {"samples": 2}}, "causal.samples is a diagnose option")):
        with pytest.raises(DepthlabError, match=needle):
            run_suite(stack, _ids(), ["causal", "permutation", "usefulness"], progress=False,
                      options=options)
    # Python values the metrics take are not held to --opt's YAML types
    import numpy as np

    out = run_suite(stack, _ids(), "jacobian", progress=False,
                    options={"jacobian": {"layers": (np.int64(0), 1), "seed": np.int64(3)}})
    assert out["metrics"]["jacobian"]["layers"] == [0, 1]
    with pytest.raises(DepthlabError, match="block index must be an int, got 1.5"):
        run_suite(stack, _ids(), "jacobian", progress=False, options={"jacobian": {
            "layers": [0, 1.5]}})


def test_costs_against_published_reference():
    stack = build_stack(_depthlm())
    ids = _ids(8)
    n = 8
    c = compute_causal(stack, ids, batch_size=4).cost
    assert c["block_forwards"] == L * n + n * L * (L - 1) // 2
    assert c["reference_full_forwards"] == (L + 2) * math.ceil(n / 4)
    assert c["reference_block_forwards"] == (L + 2) * n * L
    p = compute_permutation(stack, ids, batch_size=4).cost
    assert p["reference_block_forwards"] == (1 + L * (L - 1) // 2) * n * L
    assert p["block_forwards"] < p["reference_block_forwards"]
    u = compute_usefulness(stack, ids, batch_size=4).cost
    assert u["reference_block_forwards"] == (1 + 2 * L) * n * L
    assert u["block_forwards"] < u["reference_block_forwards"]


# ----------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


class HFSkip(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _hf(name: str, impl: str = "sdpa"):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    if name == "llama":
        cfg = transformers.LlamaConfig(**common, intermediate_size=64)
    elif name == "glm4_moe":  # sigmoid router, group-limited top-k, shared expert, layer 0 dense
        cfg = transformers.Glm4MoeConfig(**common, intermediate_size=64, head_dim=8,
                                         n_routed_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=16, n_group=2, topk_group=1,
                                         first_k_dense_replace=1)
    elif name == "gpt_oss":  # biased router, softmax over the top k, attention sinks
        cfg = transformers.GptOssConfig(**common, intermediate_size=16, head_dim=8,
                                        num_local_experts=4, num_experts_per_tok=2,
                                        rope_parameters={"rope_type": "default",
                                                         "rope_theta": 1e4})
    elif name == "llama4_text":  # router returns (scores, logits); layer 0 dense
        cfg = transformers.Llama4TextConfig(**common, intermediate_size=16,
                                            intermediate_size_mlp=64, head_dim=8,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            moe_layers=[1, 2], attention_chunk_size=4)
    elif name == "phimoe":  # sparsemixer routes 2 experts whatever num_experts_per_tok says
        cfg = transformers.PhimoeConfig(**common, intermediate_size=16, num_local_experts=4,
                                        num_experts_per_tok=1)
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=16, num_local_experts=4,
                                         num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim >= 2 and "embed" not in n:
                p.mul_(10.0)
    return model.eval()


@torch.no_grad()
def _hf_run(model, ids):
    """(pre-final-norm states h_0..h_L via hooks on the model's own forward, loss)."""
    layers = model.model.layers
    states = []
    hooks = [layers[0].register_forward_pre_hook(lambda _m, a: states.append(a[0]))]
    hooks += [lay.register_forward_hook(lambda _m, _a, o: states.append(o[0] if isinstance(o, tuple) else o))
              for lay in layers]
    logits = model(ids).logits
    for h in hooks:
        h.remove()
    lg = logits[:, :-1].float()
    return states, float(F.cross_entropy(lg.reshape(-1, lg.shape[-1]), ids[:, 1:].reshape(-1)))


def test_hf_llama_causal_permutation_jacobian_against_model_forward():
    model = _hf("llama")
    stack = build_stack(model)
    Lh = 3
    ids = _ids(3, 8)
    states, base = _hf_run(model, ids)
    assert len(states) == Lh + 1

    causal = compute_causal(stack, ids, batch_size=2)
    assert causal.base_loss == pytest.approx(base, rel=1e-5)
    for s in range(Lh):
        mod = copy.deepcopy(model)
        mod.model.layers[s] = HFSkip()
        st2, loss2 = _hf_run(mod, ids)
        assert causal.skip_loss[s] == pytest.approx(loss2, rel=1e-5)
        for l in range(s + 1, Lh):
            d0, d1 = states[l + 1] - states[l], st2[l + 1] - st2[l]
            ref = ((d1 - d0).norm(dim=-1).mean() / d0.norm(dim=-1).mean()).item()
            assert causal.matrix[s][l] == pytest.approx(ref, rel=1e-4, abs=1e-6)

    perm = compute_permutation(stack, ids, batch_size=2)
    for (l1, l2), p in zip(perm.pairs, perm.scores, strict=True):
        mod = copy.deepcopy(model)
        mod.model.layers[l1], mod.model.layers[l2] = mod.model.layers[l2], mod.model.layers[l1]
        assert p == pytest.approx(abs(base - _hf_run(mod, ids)[1]) / base, rel=1e-4, abs=1e-6)

    small = ids[:2, :5]
    jac = compute_jacobian(stack, small, batch_size=2, keep_matrices=True, layers=[1])
    h1 = stack.hidden_states(small)[1]
    full = torch.autograd.functional.jacobian(lambda x: stack.run_block(1, x), h1)
    J = full.sum(dim=(0, 1, 3, 4)) / small.numel()
    torch.testing.assert_close(torch.tensor(jac.matrices[0]), J, atol=1e-5, rtol=1e-5)

    ws = compute_weight_sparsity(stack)
    assert "attn.q_proj" in ws.per_kind and len(ws.per_block) == Lh


def test_hf_attention_sparsity_against_output_attentions():
    model = _hf("llama", impl="eager")
    ids = _ids(2, 8)
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    res = compute_attention_sparsity(build_stack(model), ids, batch_size=2)
    for l, P in enumerate(att):
        P = P.double()
        ents, fracs = [], []
        for t in range(8):  # entropy: t >= 1 (log 1 = 0 at t = 0); top-mass: every query
            p = P[:, :, t, : t + 1]
            if t:
                ents.append(-(p * p.clamp_min(1e-300).log()).sum(-1) / math.log(t + 1))
            k = (p.sort(dim=-1, descending=True).values.cumsum(-1) < 0.9).sum(-1) + 1
            fracs.append(k.double() / (t + 1))
        assert res.normalized_entropy[l] == pytest.approx(torch.stack(ents).mean((0, 1)).tolist(), rel=1e-5)
        assert res.top_mass_fraction[l] == pytest.approx(torch.stack(fracs).mean((0, 1)).tolist(), rel=1e-5)
    assert res.group_size == 2


@pytest.mark.parametrize("name", ["mixtral", "glm4_moe", "gpt_oss", "phimoe", "llama4_text"])
def test_hf_moe_counts_from_real_forward(name):
    """Counts, router entropy and importance against the model's own forward: the
    routers' index outputs, the entropy of softmax(logits) (of sigmoid(logits) / sum for
    GLM-4-MoE's sigmoid router), and a rerun with the MoE sublayer's output zeroed."""
    model = _hf(name, "eager" if name == "gpt_oss" else "sdpa")
    ids = _ids(3, 8)
    llama4 = name == "llama4_text"
    sigmoid = name in ("glm4_moe", "llama4_text")
    moe_layers = [1, 2] if name in ("glm4_moe", "llama4_text") else [0, 1, 2]
    seen: dict[int, torch.Tensor] = {}
    ent: dict[int, list[torch.Tensor]] = {i: [] for i in moe_layers}
    hooks = []
    for i in moe_layers:
        layer = model.model.layers[i]
        mlp = layer.feed_forward if llama4 else layer.mlp
        def hook(_m, _a, out, i=i):
            # Llama 4: (scores, logits), scores 0 except at the chosen experts
            chosen = out[0].topk(2, dim=-1).indices if llama4 else out[2]
            logits = out[1 if llama4 else 0].float()
            seen[i] = seen.get(i, 0) + torch.bincount(chosen.reshape(-1), minlength=4)
            p = logits.sigmoid() if sigmoid else logits.softmax(-1)
            p = p / p.sum(-1, keepdim=True)
            ent[i].append(-(p * p.log()).sum(-1))
        hooks.append(getattr(mlp, "router" if name in ("gpt_oss", "phimoe", "llama4_text")
                             else "gate").register_forward_hook(hook))
    _, base = _hf_run(model, ids)
    for h in hooks:
        h.remove()
    res = compute_moe(build_stack(model), ids, batch_size=2)
    assert res.moe_layers == moe_layers and res.top_k == [2] * len(moe_layers)
    assert res.router_scoring == ["sigmoid" if sigmoid else "softmax"] * len(moe_layers)
    for j, i in enumerate(moe_layers):
        assert res.expert_counts[j] == seen[i].tolist()
        assert res.router_entropy[j] == pytest.approx(float(torch.cat(ent[i]).mean()), rel=1e-5)
    assert res.base_loss == pytest.approx(base, rel=1e-5)
    mod = copy.deepcopy(model)
    zero = ((lambda h: (torch.zeros_like(h), None)) if name in ("gpt_oss", "llama4_text")
            else (lambda h: torch.zeros_like(h)))
    layer = mod.model.layers[1]
    (layer.feed_forward if llama4 else layer.mlp).forward = zero
    j = moe_layers.index(1)
    assert res.importance[j] == pytest.approx(_hf_run(mod, ids)[1] - base, rel=1e-4, abs=1e-5)


def test_throttled_lines_report_progress_with_eta(monkeypatch):
    from depthlab import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    reporter = progress.ThrottledLines(lines.append, every=10.0)
    update = reporter.start("jacobian")
    now[0] = 105.0
    update(1, 4)  # within 10 s of the start: quiet
    now[0] = 120.0
    update(2, 4)  # 20 s for 2 of 4 units: 20 s to go
    now[0] = 125.0
    update(3, 4)  # within 10 s of the last line: quiet
    now[0] = 140.0
    update(4, 4)  # complete: the end line says it
    reporter.end("jacobian", 40.0)
    assert lines == ["jacobian: running", "jacobian: 2/4  elapsed 0:00:20  ETA 0:00:20",
                     "jacobian: done in 40.0s"]


@pytest.mark.parametrize("term,live", [("xterm-256color", True), ("dumb", False),
                                       ("unknown", False)])
def test_live_bar_only_where_rich_redraws_it(monkeypatch, term, live):
    """On TERM=dumb (Emacs shells, some CI runners) rich draws no live bar until the work
    ends, so progress must go out as lines there, as it does when piped."""
    import io
    import os

    from rich.console import Console

    from depthlab.progress import live_bar_shown

    monkeypatch.setenv("TERM", term)
    leader, follower = os.openpty()  # a real terminal
    with os.fdopen(follower, "w") as tty:
        assert live_bar_shown(Console(file=tty)) is live
    os.close(leader)
    # a log file: no bar, even where FORCE_COLOR / TTY_COMPATIBLE make rich call it a
    # terminal (sweep jobs inherit the environment; their logs want one line per update)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    assert live_bar_shown(Console(file=io.StringIO(), force_terminal=True)) is False


def test_train_progress_is_lines_on_a_dumb_terminal(monkeypatch):
    import os
    import sys

    from depthlab.train import trainer

    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as tty:
        monkeypatch.setattr(sys, "stdout", tty)
        monkeypatch.setenv("TERM", "dumb")
        with trainer._progress_bar(True, total=10, start=0, name="tiny") as bar:
            assert isinstance(bar, trainer._LogLines)
        monkeypatch.setenv("TERM", "xterm")
        with trainer._progress_bar(True, total=10, start=0, name="tiny") as bar:
            assert not isinstance(bar, trainer._LogLines)
        monkeypatch.undo()
    os.close(leader)
