"""Longer end-to-end checks (`make test-slow`, a few minutes on 2 CPU cores): the demo
model really learns and every path that reads it agrees; the real SmolLM2 checkpoint goes
through the whole diagnostic suite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from depthlab.cli import main
from depthlab.errors import DepthlabError
from depthlab.probe.results import validate_results

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_demo_model_learns_and_every_reader_agrees(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEPTHLAB_CACHE", str(tmp_path / "cache"))
    main(["train", str(ROOT / "configs/cpu/tiny.yaml"), "--set", f"out_dir={tmp_path}",
          "--no-progress"])
    run = tmp_path / "tiny"
    summary = json.loads((run / "summary.json").read_text())
    # byte-level kjv: uniform is ln 257 = 5.55 nats, unigram about 3; the demo reaches ~1.57
    assert summary["step"] == 300 and summary["val_loss"] < 1.8

    # eval --ppl on the trainer's own validation windows gives the trainer's number
    batch = 16 * 8  # train.batch_size x train.eval_batches of the preset
    capsys.readouterr()
    main(["eval", str(run), "--ppl", "--limit", str(batch)])
    printed = capsys.readouterr().out
    assert f"loss {summary['val_loss']:.4f}" in printed

    # the full diagnostic suite on it, from the CLI
    out = tmp_path / "diag"
    main(["diagnose", str(run), "--metrics", "all", "--samples", "8", "--seq-len", "128",
          "--out", str(out), "--no-progress"])
    res = json.loads((out / "results.json").read_text())
    assert validate_results(res) == []
    L = res["model"]["n_layers"]
    use = res["metrics"]["usefulness"]
    assert use["usefulness"] * L == pytest.approx(round(use["usefulness"] * L))
    causal = res["metrics"]["causal"]["matrix"]
    assert all(causal[s][j] == 0 for s in range(L) for j in range(s + 1))
    base = use["base_loss"]
    assert math.isfinite(base) and base < 2.5  # the trained model, not a random one


def test_smollm2_full_suite_small(tmp_path):
    from depthlab.probe.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except DepthlabError as err:
        pytest.skip(str(err))
    out = tmp_path / "smollm2"
    main(["diagnose", "smollm2", "--metrics", "all", "--samples", "2", "--seq-len", "32",
          "--out", str(out), "--no-progress", "--no-figures",
          "--opt", "jacobian.layers=[0,15,29]", "--opt", "permutation.pairs=adjacent"])
    res = json.loads((out / "results.json").read_text())
    assert validate_results(res) == []
    assert res["model"]["n_layers"] == 30 and res["model"]["kind"] == "gguf"
    assert set(res["metrics"]) >= {"variance", "jacobian", "usefulness", "causal",
                                   "permutation", "layer_drop", "attention_sparsity"}
    assert res["metrics"]["usefulness"]["base_loss"] < 6  # a real LM on English text
