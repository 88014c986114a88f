"""Training-time layer statistics: same numbers as the diagnostics, eval mode, grads at the
right step, and exactly one record per stats step across an interruption and resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from depthlab.config import build_config
from depthlab.train import Trainer
from depthlab.train.loggers import read_metrics
from depthlab.train.stats import STAT_KEYS, LayerStatsCallback, probe_ids, stats_records


def _corpus(tmp: Path) -> Path:
    from depthlab.data import kjv_chapters

    path = tmp / "corpus.txt"
    if not path.is_file():
        path.write_text("\n\n".join(kjv_chapters()[:40]))
    return path


def _cfg(tmp: Path, **over):
    raw = {
        "name": "run", "out_dir": str(tmp / "runs"),
        "model": {"n_layers": 3, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"corpus": str(_corpus(tmp)), "seq_len": 32, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_interval": 100,
                  "eval_batches": 2, "ckpt_interval": 100, "log_interval": 2,
                  "stats_interval": 3, "tensorboard": False},
    }
    return build_config(raw, over)


def _close(a, b, rel=1e-5, abs_=1e-7):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            assert x is None and y is None
        else:
            assert x == pytest.approx(y, rel=rel, abs=abs_)


def test_stats_match_probe_metrics_on_the_same_batch(tmp_path):
    from depthlab.probe import build_stack
    from depthlab.probe.metrics import (
        compute_attention_sparsity,
        compute_variance,
        compute_weight_sparsity,
    )

    trainer = Trainer(_cfg(tmp_path), progress=False)
    seen = []  # (training flag, grad enabled) of every block-0 call
    trainer.model.blocks[0].register_forward_hook(
        lambda m, a, o: seen.append((m.training, torch.is_grad_enabled())))
    trainer.fit()
    assert trainer.model.training  # back in train mode after the probe pass
    assert (False, False) in seen and (True, True) in seen  # probe: eval + no_grad

    recs = stats_records(read_metrics(trainer.run_dir))
    assert [r["step"] for r in recs] == [3, 6]
    st = recs[-1]["stats"]
    assert set(st) == set(STAT_KEYS) - {"moe_load", "moe_imbalance", "router_entropy"}
    assert all(len(st[k]) == 3 for k in st if isinstance(st[k], list))
    assert recs[-1]["stats_seconds"] > 0

    # the final weights are the step-6 weights: recompute with the probe metrics
    ids = probe_ids(trainer.val_batches)
    assert ids.shape == (2, 32)
    assert torch.equal(ids, trainer.val_batches[0][0][:2])  # the first validation sequences
    stack = build_stack(trainer.model)
    var = compute_variance(stack, ids)
    _close(st["var"], var.variance)
    _close(st["attn_var"], var.attn_variance)
    _close(st["mlp_var"], var.mlp_variance)
    assert st["embed_var"] == pytest.approx(var.embedding_variance, rel=1e-5)
    ws = compute_weight_sparsity(stack)
    _close(st["weight_sparsity"], ws.fraction_below_tau)
    _close(st["weight_hoyer"], ws.hoyer)
    att = compute_attention_sparsity(stack, ids[:1])
    _close(st["attn_entropy"], att.layer_normalized_entropy)
    _close(st["attn_top90"], att.layer_top_mass_fraction)
    hs = stack.hidden_states(ids)
    ratio = [float(((b - a).norm(dim=-1) / a.norm(dim=-1)).mean()) for a, b in zip(hs, hs[1:], strict=False)]
    _close(st["update_ratio"], ratio)
    pnorm = [math.sqrt(sum(float(p.detach().norm()) ** 2 for p in b.parameters()))
             for b in trainer.model.blocks]
    _close(st["param_norm"], pnorm)


def test_grad_norms_are_read_at_the_stats_steps(tmp_path):
    trainer = Trainer(_cfg(tmp_path), progress=False)
    mine: dict[int, list[float]] = {}

    def record(tr, step):  # runs after the stats hook: same live gradients
        mine[step] = [math.sqrt(sum(float(p.grad.norm()) ** 2 for p in b.parameters()))
                      for b in tr.model.blocks]

    trainer.grad_callbacks.append(record)
    trainer.fit()
    recs = {r["step"]: r["stats"] for r in stats_records(read_metrics(trainer.run_dir))}
    assert set(recs) == {3, 6}
    for step in (3, 6):
        _close(recs[step]["grad_norm"], mine[step])
    assert mine[3] != mine[6]


def test_moe_routing_stats_match_compute_moe(tmp_path):
    from depthlab.probe import build_stack
    from depthlab.probe.metrics import compute_moe

    cfg = _cfg(tmp_path, **{"model.moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16,
                                           "layers": [1, 2]},
                            "train.max_steps": 3})
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    st = stats_records(read_metrics(trainer.run_dir))[-1]["stats"]
    assert st["moe_load"][0] is None and st["moe_imbalance"][0] is None  # dense layer 0
    moe = compute_moe(build_stack(trainer.model), probe_ids(trainer.val_batches),
                      importance=False)
    assert moe.moe_layers == [1, 2]
    for i, l in enumerate(moe.moe_layers):  # noqa: E741
        _close(st["moe_load"][l], moe.fraction_routed[i])
        assert sum(st["moe_load"][l]) == pytest.approx(2.0)  # fractions sum to top_k
        assert st["moe_imbalance"][l] == pytest.approx(moe.load_imbalance[i])
        assert st["router_entropy"][l] == pytest.approx(moe.router_entropy_normalized[i])


def test_stats_off_installs_nothing(tmp_path):
    trainer = Trainer(_cfg(tmp_path, **{"train.stats_interval": 0, "train.max_steps": 2}),
                      progress=False)
    assert trainer.grad_callbacks == [] and trainer.callbacks == []
    trainer.fit()
    assert stats_records(read_metrics(trainer.run_dir)) == []


def test_stats_records_survive_an_interruption_and_resume(tmp_path):
    cfg = _cfg(tmp_path, **{"train.max_steps": 20, "train.ckpt_interval": 10,
                             "train.stats_interval": 10, "train.log_interval": 5,
                             "train.warmup_steps": 2})
    Trainer(cfg, progress=False).fit()
    run = cfg.run_dir
    first = {r["step"]: r["stats"] for r in stats_records(read_metrics(run))}
    assert sorted(first) == [10, 20]

    # interrupted after logging step 20 but before its checkpoint / summary were written
    shutil.rmtree(run / "checkpoints" / "step_0000020")
    (run / "summary.json").unlink()
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    assert json.loads((run / "summary.json").read_text())["step"] == 20

    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    stats_steps = [r["step"] for r in lines if "stats" in r]
    assert stats_steps == [10, 20]  # exactly once each, in order
    again = {r["step"]: r["stats"] for r in stats_records(lines)}
    for key in ("var", "grad_norm", "param_norm", "weight_sparsity"):  # a deterministic resume
        _close(again[20][key], first[20][key], rel=1e-4)


def test_probe_batch_spans_validation_batches():
    xs = [(torch.arange(i * 6, i * 6 + 6).view(2, 3), torch.zeros(2, 3)) for i in range(3)]
    ids = probe_ids(xs, 5)
    assert ids.shape == (5, 3)
    assert ids[0, 0] == 0 and ids[4, 0] == 12
    with pytest.raises(ValueError):
        probe_ids([], 4)


def test_callback_constructor_options(tmp_path):
    trainer = Trainer(_cfg(tmp_path, **{"train.stats_interval": 0, "train.max_steps": 2}),
                      progress=False)
    cb = LayerStatsCallback(trainer, probe_sequences=2, attn_sequences=0)
    assert cb.interval == 0
    cb.interval = 1
    st = cb.compute(0)
    assert "attn_entropy" not in st and len(st["var"]) == 3
    assert st["grad_norm"] == [None, None, None]  # no gradient hook ran at this step


def test_a_custom_callback_replaces_the_trainers_own(tmp_path):
    """The trainer installs a stats callback itself; installing a customised one replaces
    it, so every stats step is still logged exactly once."""
    trainer = Trainer(_cfg(tmp_path, **{"train.stats_interval": 2, "train.max_steps": 4}),
                      progress=False)
    LayerStatsCallback(trainer, probe_sequences=1, attn_sequences=0).install()
    trainer.fit()
    steps = [r["step"] for r in read_metrics(trainer.run_dir) if "stats" in r]
    assert steps == [2, 4]
