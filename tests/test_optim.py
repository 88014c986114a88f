"""Parameter groups follow the weight-decay switches; schedules hit their anchors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from depthlab.config import build_config
from depthlab.model import DepthLM
from depthlab.train.optim import build_optimizer, param_groups
from depthlab.train.schedule import lr_at


def _model(**over):
    cfg = build_config({}, {"model.vocab_size": 50, "model.n_layers": 2, "model.d_model": 16,
                            "model.n_heads": 2, "model.max_seq_len": 32, "data.seq_len": 16,
                            **over})
    return DepthLM(cfg.model), cfg


def _names(groups):
    return set(groups[0]["names"]), set(groups[1]["names"])


@pytest.mark.parametrize("norms, embeddings", [(False, False), (True, False), (False, True),
                                               (True, True)])
def test_groups_follow_switches(norms, embeddings):
    model, cfg = _model(**{"train.decay_norms": norms, "train.decay_embeddings": embeddings,
                           "model.moe": {"num_experts": 2, "top_k": 1, "expert_hidden": 8}})
    decay, no_decay = _names(param_groups(model, cfg.train))
    assert not decay & no_decay
    assert decay | no_decay == {n for n, _ in model.named_parameters()}
    norm_names = {n for n in decay | no_decay if "norm" in n}
    assert norm_names and (norm_names <= decay if norms else norm_names <= no_decay)
    assert ("tok_embeddings.weight" in decay) == embeddings
    for matrix in ("blocks.0.attn.q_proj.weight", "lm_head.weight",
                   "blocks.1.mlp.router.weight"):
        assert any(n.startswith(matrix.rsplit(".", 1)[0]) for n in decay), matrix
    assert any("experts" in n for n in decay)


def test_tied_embedding_counted_once_and_follows_embedding_switch():
    model, cfg = _model(**{"model.tie_embeddings": True})
    decay, no_decay = _names(param_groups(model, cfg.train))
    assert "tok_embeddings.weight" in no_decay and "lm_head.weight" not in decay
    opt = build_optimizer(model, cfg.train)
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == model.num_params()
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.train.weight_decay, 0.0]


def test_fused_adamw_on_cpu_matches_the_reference_loop():
    torch.manual_seed(0)
    model, cfg = _model()
    ref = copy.deepcopy(model)
    opt = build_optimizer(model, cfg.train)
    assert opt.defaults["fused"] is True  # plain CPU parameters get the fused kernel
    ref_groups = [{"params": [dict(ref.named_parameters())[n] for n in g["names"]],
                   "weight_decay": g["weight_decay"]} for g in param_groups(model, cfg.train)]
    ref_opt = torch.optim.AdamW(ref_groups, lr=cfg.train.lr, betas=(cfg.train.beta1,
                                cfg.train.beta2), eps=cfg.train.eps, foreach=False)
    ids = torch.randint(0, 50, (2, 16))
    for _ in range(3):
        for m, o in ((model, opt), (ref, ref_opt)):
            m(ids, ids).loss.backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


def test_cosine_schedule_anchors():
    cfg = build_config({}, {"train.lr": 1.0, "train.min_lr_ratio": 0.1, "train.warmup_steps": 10,
                            "train.max_steps": 110}).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(109, cfg) == pytest.approx(0.1)
    mid = lr_at(10 + 99 // 2, cfg)
    assert mid == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 49 / 99)))


def test_wsd_schedule_is_flat_then_decays_to_floor():
    cfg = build_config({}, {"train.lr": 2.0, "train.schedule": "wsd", "train.warmup_steps": 0,
                            "train.max_steps": 100, "train.wsd_decay_fraction": 0.2,
                            "train.min_lr_ratio": 0.0}).train
    assert [lr_at(s, cfg) for s in (0, 50, 79, 80)] == [2.0] * 4
    assert lr_at(99, cfg) == pytest.approx(0.0)
    assert lr_at(90, cfg) < lr_at(85, cfg) < 2.0
