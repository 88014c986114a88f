"""Trainer: exact resume, run-directory safety, non-finite stop, CLI behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from depthlab.cli import main
from depthlab.config import build_config
from depthlab.errors import DepthlabError
from depthlab.train import Trainer, load_run_model
from depthlab.train.checkpoint import checkpoint_dirs
from depthlab.train.loggers import read_metrics

TEXT = " ".join(
    f"In the beginning {i} the word was {i * 7 % 13} and the light was {i % 5}." for i in range(3000)
)


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(TEXT[i : i + 2000] for i in range(0, len(TEXT), 2000)))
    return p


def tiny_cfg(tmp_path: Path, corpus: Path, **over):
    raw = {
        "name": "t", "out_dir": str(tmp_path / "runs"),
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "max_seq_len": 64},
        "data": {"corpus": str(corpus), "tokenizer": "byte", "seq_len": 32,
                 "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.1},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 3e-3, "warmup_steps": 2,
                  "log_interval": 1, "eval_interval": 6, "ckpt_interval": 4, "eval_batches": 2,
                  "tensorboard": False},
    }
    return build_config(raw, over)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


class Interrupt(Exception):
    pass


def test_resume_reproduces_uninterrupted_run(tmp_path, corpus):
    full = Trainer(tiny_cfg(tmp_path, corpus, name="full"), progress=False)
    full.fit()
    ref = losses(full.run_dir)
    assert sorted(ref) == list(range(1, 13))

    cfg = tiny_cfg(tmp_path, corpus, name="cut")
    first = Trainer(cfg, progress=False)

    def stop(trainer, step):
        if step == 10:  # after the step-8 checkpoint; steps 9-10 must be redone
            raise Interrupt

    first.callbacks.append(stop)
    with pytest.raises(Interrupt):
        first.fit()
    assert checkpoint_dirs(cfg.run_dir)[-1].name == "step_0000008"
    second = Trainer(cfg, progress=False)
    second.fit()
    got = losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 13))  # no duplicated or missing steps
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step
    a, _, _ = load_run_model(full.run_dir)
    b, _, _ = load_run_model(cfg.run_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_completed_run_is_not_retrained(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    Trainer(cfg, progress=False).fit()
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["step"] == 4
    again = Trainer(cfg, progress=False).fit()
    assert again.status == "already complete"
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_0000004"]
    assert len(losses(cfg.run_dir)) == 4


def test_run_dir_with_different_config_is_refused(tmp_path, corpus):
    Trainer(tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3}), progress=False).fit()
    before = (tmp_path / "runs" / "t" / "config.yaml").read_text()
    other = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3, "model.n_layers": 3})
    with pytest.raises(DepthlabError, match=r"different config \(model.n_layers: 2 -> 3"):
        Trainer(other, progress=False).fit()
    assert (tmp_path / "runs" / "t" / "config.yaml").read_text() == before


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.ckpt_interval": 2})
    trainer = Trainer(cfg, progress=False)

    def poison(tr, step):
        if step == 5:
            with torch.no_grad():
                tr.model.blocks[0].attn.q_proj.weight.fill_(float("nan"))

    trainer.callbacks.append(poison)
    with pytest.raises(DepthlabError, match="non-finite.*step 6.*step_0000004"):
        trainer.fit()
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_0000002", "step_0000004"]
    model, _, ckpt = load_run_model(cfg.run_dir)
    assert ckpt.name == "step_0000004"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_vocab_too_small_is_a_clear_error(tmp_path, corpus):
    with pytest.raises(DepthlabError, match="vocab_size"):
        Trainer(tiny_cfg(tmp_path, corpus, **{"model.vocab_size": 100}), progress=False)


def test_cli_train_and_info(tmp_path, corpus, capsys):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    main(["train", str(path), "--set", "name=cli", "--no-progress"])
    run = tmp_path / "runs" / "cli"
    assert (run / "summary.json").is_file() and (run / "tokenizer").is_dir()
    main(["info", str(run)])
    out = capsys.readouterr().out
    assert "active per token" in out and "val loss" in out


@pytest.mark.parametrize("args, needle", [
    (["--set", "model.n_heads=3"], "model.d_model (32) must be divisible by model.n_heads (3)"),
    (["--set", "train.weight_decay=-1"], "train.weight_decay"),
    (["--set", "model.typo=1"], "model.typo: unknown key"),
])
def test_cli_bad_config_prints_one_line(tmp_path, corpus, capsys, args, needle):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tiny_cfg(tmp_path, corpus).to_dict()))
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), *args])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing written


def test_cli_missing_corpus_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"corpus": str(tmp_path / "missing.txt")},
                                    "out_dir": str(tmp_path / "runs")}))
    with pytest.raises(SystemExit):
        main(["train", str(path)])
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and "Traceback" not in err
