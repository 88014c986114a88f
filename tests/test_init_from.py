"""`train.init_from`: start a new run at step 0 from weights only (a depthlab run, a
checkpoint, a safetensors file, or a run written by `depthlab import-hf`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import corpus, tiny_cfg  # noqa: F401  (corpus is a fixture)

from depthlab.cli import main
from depthlab.errors import DepthlabError
from depthlab.train import Trainer, load_run_model
from depthlab.train.loggers import read_metrics


def _overrides(tmp_path: Path, corpus: Path, name: str, init_from: Path) -> list[str]:  # noqa: F811
    """CLI --set flags: the tiny training set-up of test_train, on the imported config."""
    sets = {
        "name": name, "out_dir": tmp_path / "runs", "train.init_from": init_from,
        "data.corpus": corpus, "data.cache_dir": tmp_path / "cache", "data.seq_len": 32,
        "data.val_fraction": 0.1, "train.max_steps": 3, "train.warmup_steps": 1,
        "train.batch_size": 4, "train.log_interval": 1, "train.eval_batches": 2,
        "train.tensorboard": False,
    }
    return [arg for k, v in sets.items() for arg in ("--set", f"{k}={v}")]


@pytest.fixture()
def source(tmp_path: Path, corpus: Path) -> Path:  # noqa: F811
    """A trained tiny depthlab run."""
    trainer = Trainer(tiny_cfg(tmp_path, corpus, name="source", **{"train.max_steps": 4}),
                      progress=False)
    trainer.fit()
    return trainer.run_dir


def _first_batch_losses(tmp_path: Path, corpus: Path, model: torch.nn.Module,  # noqa: F811
                        ) -> tuple[float, float]:
    """Losses of `model` and of a freshly initialised model on the first training batch of
    a run with the tiny set-up."""
    probe = Trainer(tiny_cfg(tmp_path, corpus, name="probe"), progress=False)
    x, y = probe.loader.next_batch()
    with torch.no_grad():
        return model(x, y).loss.item(), probe.raw_model(x, y).loss.item()


def test_train_from_import_hf_weights_starts_at_the_source_loss(tmp_path, corpus, source,  # noqa: F811
                                                                 capsys):
    pytest.importorskip("transformers")
    main(["export", str(source), "--to", "hf", str(tmp_path / "hf")])
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")])
    imported = tmp_path / "imported"
    capsys.readouterr()
    # trained in place it is refused (weights only), and nothing is added to it
    before = sorted(p.relative_to(imported) for p in imported.rglob("*"))
    with pytest.raises(SystemExit):
        main(["train", str(imported / "config.yaml"), "--no-progress",
              "--set", f"out_dir={tmp_path}", "--set", "name=imported"])
    assert "holds weights only" in capsys.readouterr().err
    assert sorted(p.relative_to(imported) for p in imported.rglob("*")) == before

    main(["train", str(imported / "config.yaml"), "--no-progress",
          *_overrides(tmp_path, corpus, "ft", imported)])
    run = tmp_path / "runs" / "ft"
    steps = {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}
    assert sorted(steps) == [1, 2, 3]  # a new run: it starts at step 0, not resumed

    model, _, _ = load_run_model(source)
    expected, fresh = _first_batch_losses(tmp_path, corpus, model)
    # the step-1 record is the loss of the first batch before any update
    assert steps[1] == pytest.approx(expected, abs=1e-5)
    assert expected < fresh - 0.1  # the trained weights were used, not a fresh init


def test_init_from_run_checkpoint_or_file_loads_the_same_weights(tmp_path, corpus, source):  # noqa: F811
    ref, _, ckpt = load_run_model(source)
    for target in (source, ckpt, ckpt / "model.safetensors"):
        cfg = tiny_cfg(tmp_path, corpus, name=f"from_{target.name}",
                       **{"train.init_from": str(target)})
        trainer = Trainer(cfg, progress=False)
        assert trainer.init_weights == ckpt / "model.safetensors"
        for (name, p), q in zip(trainer.raw_model.state_dict().items(),
                                ref.state_dict().values(), strict=True):
            assert torch.equal(p, q), name
        assert trainer.step == 0


def test_init_from_is_ignored_once_the_run_has_checkpoints(tmp_path, corpus, source):  # noqa: F811
    """A run started from weights resumes from its own checkpoints, even once those
    weights are gone."""
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes((load_run_model(source)[2] / "model.safetensors").read_bytes())
    cfg = tiny_cfg(tmp_path, corpus, name="ft", **{"train.init_from": str(weights),
                                                    "train.max_steps": 4})
    assert Trainer(cfg, progress=False).fit().step == 4
    weights.unlink()
    again = Trainer(cfg, progress=False)
    assert again.init_weights is None  # resumes its own checkpoint
    assert again.fit().step == 4


def test_init_from_errors_are_one_line(tmp_path, corpus, source, capsys):  # noqa: F811
    with pytest.raises(DepthlabError, match="no model weights there"):
        Trainer(tiny_cfg(tmp_path, corpus, name="a", **{"train.init_from": str(tmp_path)}))
    # a Hugging Face export or checkpoint is imported first; a run is not imported again
    main(["export", str(source), "--to", "hf", str(tmp_path / "hf")])
    with pytest.raises(DepthlabError, match="is a Hugging Face model directory: bring it in "
                                            "first with `depthlab import-hf"):
        Trainer(tiny_cfg(tmp_path, corpus, name="b", **{"train.init_from": str(tmp_path / "hf")}))
    with pytest.raises(SystemExit):
        main(["import-hf", str(source), str(tmp_path / "imported")])
    assert "is a depthlab run already: train from it with --set train.init_from=" in " ".join(
        capsys.readouterr().err.split())
    cfg_path = tmp_path / "runs" / "source" / "config.yaml"
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(cfg_path), "--no-progress", "--set", "model.d_model=64",
              *_overrides(tmp_path, corpus, "wide", source)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "train.init_from" in err and "has shape (32, 32) there but (64, 64)" in err
    assert not (tmp_path / "runs" / "wide" / "checkpoints").exists()
