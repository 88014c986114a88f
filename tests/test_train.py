"""Trainer: exact resume, run-directory safety, non-finite stop, CLI behaviour."""

from __future__ import annotations

import json
import logging
import math
import os
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


def train_until(cfg, step: int) -> None:
    """Train `cfg` and stop it with an exception right after `step` (a killed process)."""
    first = Trainer(cfg, progress=False)

    def stop(trainer, at):
        if at == step:
            raise Interrupt

    first.callbacks.append(stop)
    with pytest.raises(Interrupt):
        first.fit()


def test_resume_reproduces_uninterrupted_run(tmp_path, corpus, capsys):
    full = Trainer(tiny_cfg(tmp_path, corpus, name="full"), progress=False)
    full.fit()
    ref = losses(full.run_dir)
    assert sorted(ref) == list(range(1, 13))

    cfg = tiny_cfg(tmp_path, corpus, name="cut")
    train_until(cfg, 10)  # after the step-8 checkpoint; steps 9-10 must be redone
    assert checkpoint_dirs(cfg.run_dir)[-1].name == "step_0000008"
    capsys.readouterr()
    before = torch.load(checkpoint_dirs(cfg.run_dir)[-1] / "state.pt", weights_only=False)
    second = Trainer(cfg, progress=False)
    second.fit()
    assert "from step_0000008 (step 8/12)" in capsys.readouterr().err  # said without a bar too
    # the summary's wall time counts the first session up to its checkpoint as well
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert 0 < before["seconds"] < summary["seconds"]
    got = losses(cfg.run_dir)
    assert sorted(got) == list(range(1, 13))  # no duplicated or missing steps
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step
    a, _, _ = load_run_model(full.run_dir)
    b, _, _ = load_run_model(cfg.run_dir)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0, msg=n)


def test_users_copies_of_checkpoints_are_not_checkpoints(tmp_path, corpus, capsys):
    """Only checkpoints/step_<digits> is a checkpoint: a copy under another name is never
    pruned by keep_last, never resumed from, and info lists the run without a traceback."""
    import shutil

    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 6, "train.ckpt_interval": 2,
                                        "train.keep_last": 1})
    train_until(cfg, 3)
    root = cfg.run_dir / "checkpoints"
    for copy in ("step_0000002_mine", "best", "step_9999999x"):
        shutil.copytree(root / "step_0000002", root / copy)
    main(["info", str(cfg.run_dir)])
    listed = capsys.readouterr().out
    assert "step_0000002" in listed and "_mine" not in listed and "best" not in listed
    Trainer(cfg, progress=False).fit()
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_0000006"]
    assert sorted(p.name for p in root.iterdir()) == [
        "best", "step_0000002_mine", "step_0000006", "step_9999999x"]


def test_a_folder_that_is_not_a_run_is_never_written_into(tmp_path, corpus):
    """A non-empty directory without config.yaml (a token directory, someone's files) is
    refused before anything is written; an empty one becomes the run."""
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "metrics.jsonl").write_text("mine\n")
    with pytest.raises(DepthlabError, match="is not empty and is not a depthlab run"):
        Trainer(cfg, progress=False)
    assert sorted(p.name for p in cfg.run_dir.iterdir()) == ["metrics.jsonl"]
    assert (cfg.run_dir / "metrics.jsonl").read_text() == "mine\n"
    (cfg.run_dir / "metrics.jsonl").unlink()
    Trainer(cfg, progress=False).fit()
    assert (cfg.run_dir / "config.yaml").is_file()


def test_one_process_trains_a_run_directory_at_a_time(tmp_path, corpus):
    """A second train on a run directory in use is refused at once, before it prepares
    data or builds a model (it used to train along and log every step twice); once the
    first is done the same command resumes."""
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    refusals = []

    def second_process(tr, step):
        if step == 1:
            with pytest.raises(DepthlabError, match="is being trained by another process"):
                Trainer(cfg, progress=False)
            with pytest.raises(DepthlabError, match="is being trained by another process"):
                made_earlier.fit()  # built before the first took the lock: fit refuses
            refusals.append(step)

    first = Trainer(cfg, progress=False)
    made_earlier = Trainer(cfg, progress=False)
    first.callbacks.append(second_process)
    first.fit()
    assert refusals == [1]
    assert sorted(losses(cfg.run_dir)) == [1, 2, 3, 4]  # each step logged once
    assert not (cfg.run_dir / ".train.lock").exists()  # removed when training ends
    assert Trainer(cfg, progress=False).fit().status == "already complete"


def test_a_file_system_without_locks_trains_with_a_note(tmp_path, corpus, capsys, monkeypatch):
    import errno
    import fcntl

    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    assert Trainer(cfg, progress=False).fit().step == 3
    err = " ".join(capsys.readouterr().err.split())
    assert "cannot lock" in err and "No locks available" in err
    assert "nothing stops a second train on this run directory" in err
    assert not (cfg.run_dir / ".train.lock").exists()  # a lock file that locked nothing
    # resumed (the early busy-check runs on the existing directory): still nothing left
    Trainer(cfg, progress=False).fit()
    assert not (cfg.run_dir / ".train.lock").exists()


def test_a_read_only_run_directory_is_one_line(tmp_path, corpus, monkeypatch):
    """The lock file cannot be created (a read-only directory; simulated, as root may write
    anywhere): one line, raised as a DepthlabError so that every torchrun rank gets it."""
    from depthlab import locks

    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    Trainer(cfg, progress=False).fit()

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(locks, "open", read_only, raising=False)
    with pytest.raises(DepthlabError, match="cannot write in .* training needs a writable"):
        Trainer(cfg, progress=False)


def test_completed_run_is_not_retrained(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    Trainer(cfg, progress=False).fit()
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["step"] == 4
    again = Trainer(cfg, progress=False).fit()
    assert again.status == "already complete"
    # the weights are readable as the umask allows (safetensors alone writes them 0600)
    mask = os.umask(0)
    os.umask(mask)
    weights = checkpoint_dirs(cfg.run_dir)[-1] / "model.safetensors"
    assert weights.stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_0000004"]
    assert len(losses(cfg.run_dir)) == 4
    # a summary.json cut short (killed while writing it) is rewritten, not a traceback
    (cfg.run_dir / "summary.json").write_text('{"status": "comp')
    Trainer(cfg, progress=False).fit()
    rewritten = json.loads((cfg.run_dir / "summary.json").read_text())
    assert rewritten["step"] == 4 and rewritten["status"] == "complete"
    for key in ("train_loss", "val_loss", "tokens"):  # recovered from metrics.jsonl
        assert rewritten[key] == summary[key], key
    assert [p.name for p in checkpoint_dirs(cfg.run_dir)] == ["step_0000004"]
    assert len(losses(cfg.run_dir)) == 4


def test_run_dir_with_different_config_is_refused(tmp_path, corpus):
    Trainer(tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3}), progress=False).fit()
    before = (tmp_path / "runs" / "t" / "config.yaml").read_text()
    other = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3, "model.n_layers": 3})
    with pytest.raises(DepthlabError, match=r"different config \(model.n_layers: 2 -> 3"):
        Trainer(other, progress=False).fit()
    assert (tmp_path / "runs" / "t" / "config.yaml").read_text() == before
    longer = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 6})
    with pytest.raises(DepthlabError, match=r"max_steps: 3 -> 6.*--set train.init_from="):
        Trainer(longer, progress=False).fit()


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


def test_full_disk_stops_with_the_step_and_the_checkpoints_kept(tmp_path, corpus):
    import errno

    cfg = tiny_cfg(tmp_path, corpus, **{"train.ckpt_interval": 2})
    trainer = Trainer(cfg, progress=False)

    def disk_full(tr, step):  # any write in the loop (metrics, TensorBoard, a callback's)
        if step == 5:
            raise OSError(errno.ENOSPC, "No space left on device", str(tr.run_dir / "x"))

    trainer.callbacks.append(disk_full)
    with pytest.raises(DepthlabError, match="training stopped after step 5: No space left on "
                                            ".*checkpoints up to step_0000004 are intact; free "
                                            "space and run the same command again to resume"):
        trainer.fit()


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
    val = json.loads((run / "summary.json").read_text())["val_loss"]
    assert f"val loss {val:.4f} (PPL {math.exp(val):.2f})" in " ".join(capsys.readouterr().out.split())
    main(["info", str(run)])
    out = capsys.readouterr().out
    assert "active per token" in out and "val loss" in out
    # a hand-edited or damaged line is skipped with a note, as report does (info failed)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{garbage", *lines[1:]]) + "\n")
    main(["info", str(run)])
    out = " ".join(capsys.readouterr().out.split())
    assert "1 unreadable line in" in out and "val loss" in out


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


def test_ctrl_c_during_train_exits_130_and_keeps_checkpoints(tmp_path, corpus):
    """A real SIGINT to `depthlab train`: exit status 130 and one line (typer returns, not
    raises, the code outside standalone mode, which used to make this exit 0)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 100000, "train.ckpt_interval": 2})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C handling as from a terminal (a job started in the background inherits an
    # ignored SIGINT, which the run rightly keeps), then `python -m depthlab.cli`
    as_from_a_terminal = ("import runpy, signal, sys; "
                          "signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "sys.argv[0] = 'depthlab'; "
                          "runpy.run_module('depthlab.cli', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", as_from_a_terminal, "train", str(path),
                             "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not checkpoint_dirs(cfg.run_dir) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert checkpoint_dirs(cfg.run_dir)


def test_resume_after_a_cut_off_metrics_line(tmp_path, corpus, capsys):
    """A process killed mid-write leaves half a JSON line: info and resume drop it."""
    cfg = tiny_cfg(tmp_path, corpus, name="cut")
    train_until(cfg, 6)
    with (cfg.run_dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 2.5')
    assert max(r["step"] for r in read_metrics(cfg.run_dir)) == 5  # stopped before logging 6
    Trainer(cfg, progress=False).fit()
    assert sorted(losses(cfg.run_dir)) == list(range(1, 13))
    lines = (cfg.run_dir / "metrics.jsonl").read_text().splitlines()
    lines.insert(1, "not json")
    (cfg.run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DepthlabError, match="metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(cfg.run_dir)
    for bad in ("[1, 2]", '{"step": "x"}', '{"loss": 1.0}', "\udcff"):  # valid JSON or bad bytes
        lines[1] = bad
        (cfg.run_dir / "metrics.jsonl").write_bytes(
            ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
        with pytest.raises(DepthlabError, match="metrics.jsonl: line 2 is not"):
            read_metrics(cfg.run_dir)
        # `depthlab info RUN` only shows the run: it skips the line and says so (resume,
        # which rewrites the file, refuses it above)
        main(["info", str(cfg.run_dir)])
        assert "1 unreadable line in" in " ".join(capsys.readouterr().out.split())


def test_corrupt_checkpoint_shard_is_one_line(tmp_path, corpus, capsys, caplog):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    Trainer(cfg, progress=False).fit()
    shards = list((checkpoint_dirs(cfg.run_dir)[-1] / "dcp").glob("*.distcp"))
    assert shards
    shards[0].write_bytes(b"")
    (cfg.run_dir / "summary.json").unlink()
    more = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    with pytest.raises(DepthlabError, match="cannot load the model/optimizer state in"):
        Trainer(more, progress=False).fit()
    # a damaged index: the error line alone (DCP logs each failed read with its traceback
    # on the root logger first) and the way out
    (checkpoint_dirs(cfg.run_dir)[-1] / "dcp" / ".metadata").write_text("junk")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(more.to_dict()))
    with caplog.at_level(logging.DEBUG), pytest.raises(SystemExit) as exc:
        main(["train", str(tmp_path / "c.yaml"), "--no-progress"])
    assert exc.value.code == 2
    # (only the root logger's records reach a user's terminal: DCP's own event logger
    # has a NullHandler)
    assert not [r for r in caplog.records
                if r.name == "root" and "distributed/checkpoint" in r.pathname]
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the model/optimizer state") and "\n" not in err
    assert "delete" in err and "to resume from" in err


@pytest.mark.parametrize("over, needle", [
    ({"train.device": "foo"}, "train.device='foo' is not a device"),
    ({"train.device": "meta"}, "train.device=meta holds no data"),
    ({"train.wandb": True}, "train.wandb=true needs the wandb package"),
])
def test_environment_errors_come_before_the_run_dir(tmp_path, corpus, over, needle):
    if "train.wandb" in over and _has("wandb"):
        pytest.skip("wandb is installed here")
    with pytest.raises(DepthlabError, match=needle):
        Trainer(tiny_cfg(tmp_path, corpus, **over), progress=False)
    assert not (tmp_path / "runs").exists()


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_non_finite_gradient_is_named(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.ckpt_interval": 2})
    trainer = Trainer(cfg, progress=False)

    def poison_grad(tr, step):  # from step 3 on: a finite loss, an infinite gradient
        if step == 2:
            next(tr.model.parameters()).register_hook(lambda g: g * float("inf"))

    trainer.callbacks.append(poison_grad)
    with pytest.raises(DepthlabError, match=r"gradient norm became non-finite .*step 3.*--set name"):
        trainer.fit()


def test_cli_progress_lines_off_a_terminal_and_info_errors(tmp_path, corpus, capsys):
    """Not a terminal (capsys): the progress shows as plain log lines, and the final
    message names no tensorboard dir when tensorboard is off."""
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    main(["train", str(path), "--set", "name=lines"])
    out = capsys.readouterr().out
    assert "lines: step 3/3  loss" in out and "ETA" in out and "tensorboard" not in out
    run = tmp_path / "runs" / "lines"
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(run), "--set", "model.n_layers=4"])
    assert exit_.value.code == 2
    assert "--set applies to a config file" in capsys.readouterr().err
    main(["info", str(path), "--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=1000"])
    assert "data.bpe_vocab_size (1,000" in capsys.readouterr().out
    toks = tmp_path / "toks"  # a prepared directory: its own vocabulary, whatever the config
    main(["data", "prepare", "--corpus", str(corpus), "--tokenizer", "bpe", "--bpe-vocab-size",
          "300", "--out", str(toks)])
    vocab = json.loads((toks / "manifest.json").read_text())["vocab_size"]
    capsys.readouterr()
    main(["info", str(path), "--set", f"data.corpus={toks}"])
    assert f"directory's manifest.json ({vocab:,})" in capsys.readouterr().out  # (table-wrapped)


def test_cli_data_prepare_refuses_what_it_would_ignore(tmp_path, corpus, capsys):
    out = tmp_path / "toks"
    main(["data", "prepare", "--corpus", str(corpus), "--out", str(out)])
    assert (out / "manifest.json").is_file()
    for args, needle in [
        (["--corpus", str(out), "--out", str(tmp_path / "copy")], "already holds token files"),
        (["--config", str(tmp_path / "c.yaml"), "--tokenizer", "bpe"], "--config takes the data"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["data", "prepare", *args])
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "copy").exists()


def test_resume_accepts_changes_that_compute_nothing_different(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    Trainer(cfg, progress=False).fit()
    same = tiny_cfg(tmp_path, corpus, **{
        "train.max_steps": 4, "out_dir": str(tmp_path / "runs") + "/", "train.device": "cpu",
        "train.log_interval": 2, "train.keep_last": 5})
    assert Trainer(same, progress=False).fit().status == "already complete"
    with pytest.raises(DepthlabError, match="train.lr"):
        Trainer(tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4, "train.lr": 1e-3}),
                progress=False).fit()


def test_summary_rewritten_from_metrics_when_only_it_is_missing(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4})
    first = Trainer(cfg, progress=False).fit()
    (cfg.run_dir / "summary.json").unlink()
    again = Trainer(cfg, progress=False).fit()
    assert again.train_loss == pytest.approx(first.train_loss)
    assert again.val_loss == pytest.approx(first.val_loss)
    assert json.loads((cfg.run_dir / "summary.json").read_text())["val_loss"] is not None


def test_resume_conflicts_rules():
    from depthlab.train.trainer import resume_conflicts

    base = {"name": "r", "out_dir": "runs", "model": {"vocab_size": 257},
            "train": {"device": "cpu", "dtype": "auto", "lr": 1e-3, "log_interval": 10}}

    def mine(**train):
        return {**base, "out_dir": "./runs/", "model": {"vocab_size": None},
                "train": {**base["train"], **train}}

    assert resume_conflicts(base, mine(log_interval=5)) == []
    assert resume_conflicts(base, mine(lr=2e-3)) == ["train.lr: 0.001 -> 0.002"]
    # cpu -> cuda switches fp32 to bf16 autocast under dtype auto; with fp32 it does not
    assert "changes the precision" in resume_conflicts(base, mine(device="cuda"))[0]
    fixed = {**base, "train": {**base["train"], "dtype": "fp32"}}
    assert resume_conflicts(fixed, {**fixed, "train": {**fixed["train"], "device": "cuda"}}) == []


def test_resume_accepts_another_spelling_of_the_same_corpus(tmp_path, corpus, monkeypatch):
    """data.json keeps what the data is: a resume may spell the corpus any way (relative,
    absolute, ~, another copy, from another directory) as long as it gives the same data;
    other data, e.g. the same spelling read from elsewhere or a file changed in place, is
    refused. Runs made before data.json compare the paths themselves."""
    import shutil

    from depthlab.train.trainer import DATA_FILE

    monkeypatch.chdir(corpus.parent)
    monkeypatch.setenv("HOME", str(corpus.parent.parent))

    def cfg(spelling: str):
        return tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3, "train.warmup_steps": 1,
                                             "data.corpus": spelling})

    first = Trainer(cfg(corpus.name), progress=False).fit()
    copy = corpus.with_name("copy.txt")
    copy.write_text(corpus.read_text())
    shutil.rmtree(tmp_path / "cache")  # the token cache is rebuilt, not part of the run
    for spelling in (str(corpus.resolve()), f"~/{corpus.parent.name}/{corpus.name}", copy.name):
        again = Trainer(cfg(spelling), progress=False).fit()  # resumed at its end
        assert again.step == 3 and again.train_loss == first.train_loss
    elsewhere = corpus.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / corpus.name).write_text(corpus.read_text()[::-1])
    monkeypatch.chdir(elsewhere)
    assert Trainer(cfg(f"../{corpus.name}"), progress=False).fit().step == 3
    with pytest.raises(DepthlabError, match=r"was trained on other data than the config gives "
                                            r"now \(corpus "):
        Trainer(cfg(corpus.name), progress=False).fit()  # names elsewhere/corpus.txt here
    monkeypatch.chdir(corpus.parent)
    text = corpus.read_text()  # the same file with other text (as many tokens)
    corpus.write_text(text[1:] + text[0])
    with pytest.raises(DepthlabError, match=r"trained on other data"):
        Trainer(cfg(corpus.name), progress=False).fit()
    corpus.write_text(text)
    # a damaged data.json is refused (read as "no record" it switched the check off)
    run_dir = first.run_dir
    kept = (run_dir / DATA_FILE).read_text()
    (run_dir / DATA_FILE).write_text("{")
    with pytest.raises(DepthlabError, match=r"data.json is damaged .* delete it to resume"):
        Trainer(cfg(corpus.name), progress=False)
    (run_dir / DATA_FILE).write_text(kept)
    # a run from before data.json: the paths must name the same file (and it gets one)
    (run_dir / DATA_FILE).unlink()
    with pytest.raises(DepthlabError, match=r"different config \(data.corpus"):
        Trainer(cfg(copy.name), progress=False).fit()
    assert Trainer(cfg(str(corpus.resolve())), progress=False).fit().step == 3
    assert (run_dir / DATA_FILE).is_file()
    # built-in names are no paths, even beside a file of that name
    from depthlab.train.trainer import resume_conflicts

    (corpus.parent / "kjv").mkdir()
    (corpus.parent / "byte").write_text("{}")
    base = {"model": {}, "data": {"corpus": "kjv", "tokenizer": "byte"}}
    assert resume_conflicts(base, {"model": {}, "data": {"corpus": "./kjv", "tokenizer": "./byte"}}) \
        == ["data.corpus: 'kjv' -> './kjv'", "data.tokenizer: 'byte' -> './byte'"]


def test_corrupt_training_state_names_the_file_and_the_way_out(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4, "train.ckpt_interval": 2})
    Trainer(cfg, progress=False).fit()
    last = checkpoint_dirs(cfg.run_dir)[-1]
    (last / "state.pt").write_text("garbage\n")
    longer = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 4, "train.ckpt_interval": 2})
    (cfg.run_dir / "summary.json").unlink()  # as if stopped after the last checkpoint
    with pytest.raises(DepthlabError, match=f"cannot read {last / 'state.pt'} .*; if it is "
                                            f"damaged, delete {last} to resume from step_0000002"):
        Trainer(longer, progress=False).fit()


def test_ctrl_c_during_a_checkpoint_waits_for_it(tmp_path):
    """SIGINT or SIGTERM inside the deferred block (as during a checkpoint write) does not
    interrupt it; it is raised once the block is done, and the usual handler is back."""
    import os
    import signal

    from depthlab.interrupts import interrupts_deferred

    done = []
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                done.append("the rest of the checkpoint")
        assert done == ["the rest of the checkpoint"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        # an ignored SIGINT (nohup, a background job) stays ignored
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        # someone else's handler gets the signal, after the block
        calls = []
        signal.signal(signal.SIGINT, lambda signum, frame: calls.append((signum, done[:])))
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("written")
        assert calls == [(signal.SIGINT, ["the rest of the checkpoint", "written"])]
    finally:
        signal.signal(signal.SIGINT, previous)
    with interrupts_deferred():  # no signal: nothing raised
        pass
    # SIGTERM (which the CLI turns into an interruption) is held the same way
    from depthlab.cli import Terminated, _raise_terminated

    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        with pytest.raises(Terminated):
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("terminated after")
        assert done[-1] == "terminated after"
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial(tmp_path, corpus,
                                                                           monkeypatch):
    """safetensors' SafetensorError for a full disk was a traceback, and the partial
    .tmp_step directory stayed on the full disk."""
    import errno

    from depthlab.train import checkpoint

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_weights", full_disk)
    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 3})
    with pytest.raises(DepthlabError, match=r"cannot write checkpoint file .*model.safetensors: "
                                            r".*No space left on device") as err:
        Trainer(cfg, progress=False).fit()
    assert "object at 0x" not in str(err.value)  # the free-space note is text
    assert not list((cfg.run_dir / "checkpoints").glob(".tmp*"))


def test_a_run_directory_removed_while_training_stops_it(tmp_path, corpus):
    """It trained on and exited 0, writing checkpoints into a new half-empty directory
    while its metrics went to deleted files."""
    import shutil

    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 6, "train.ckpt_interval": 3})
    trainer = Trainer(cfg, progress=False)
    trainer.callbacks.append(lambda tr, step: shutil.rmtree(cfg.run_dir) if step == 1 else None)
    with pytest.raises(DepthlabError, match=r"was removed while training .* stopped at step 3"):
        trainer.fit()
    assert not (cfg.run_dir / "checkpoints").exists()


def test_compile_with_moe_says_what_runs():
    from depthlab.config import build_config
    from depthlab.train.trainer import _compile_moe_note

    moe = {"num_experts": 4, "top_k": 2, "expert_hidden": 16}
    assert "per-expert loop" in _compile_moe_note(build_config(
        {}, {"train.compile": True, "model.moe": moe}))
    assert _compile_moe_note(build_config({}, {"train.compile": True})) is None
    assert _compile_moe_note(build_config({}, {"model.moe": moe})) is None


def test_train_from_python_takes_a_config_a_yaml_path_or_a_dict(tmp_path, corpus):
    """train({...}) and train("cfg.yaml") failed with "'dict' object has no attribute
    'train'"; the three spellings are the same run."""
    import yaml

    from depthlab.errors import DepthlabError
    from depthlab.train import train

    cfg = tiny_cfg(tmp_path, corpus, **{"train.max_steps": 2, "train.warmup_steps": 1,
                                        "train.eval_interval": 2, "train.ckpt_interval": 2})
    first = train(cfg, progress=False)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert train(str(path), progress=False).val_loss == first.val_loss  # complete: resumed
    assert train(cfg.to_dict(), progress=False).val_loss == first.val_loss
    with pytest.raises(DepthlabError, match="train\\(\\) takes a RunConfig, a YAML path or a "
                                            "config dict, got list"):
        train([cfg], progress=False)
