"""Command-line usage mistakes: one `error:` line (click's message and where to find
help) and exit code 2, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from depthlab.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["diagnose", "runs/x", "--bogus"], "No such option: --bogus"),
    (["train"], "Missing argument"),
    (["trian"], "No such command 'trian'"),
    (["diagnose", "runs/x", "--samples", "abc"], "Invalid value for '--samples'"),
    (["train", "a.yaml", "extra"], "unexpected extra argument"),
    (["recipe", "--layers", "4"], "Missing option '--params'"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert err.endswith("--help')")


def test_no_arguments_prints_help(capsys):
    with pytest.raises(SystemExit):
        main([])
    captured = capsys.readouterr()
    assert "diagnose" in captured.out + captured.err


def _one_line_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, err
    return err


def test_file_system_and_config_file_mistakes_are_one_line(tmp_path, capsys):
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "cpu" / "tiny.yaml")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert "a file is in the way, there or on its path (Not a directory)" in _one_line_error(
        ["train", tiny, "--set", f"out_dir={a_file}"], capsys)
    assert f"cannot create the directory {a_file}: a file is in the way" in _one_line_error(
        ["train", tiny, "--set", f"out_dir={tmp_path}", "--set", "name=a_file"], capsys)
    assert "is a directory; give a file name" in _one_line_error(
        ["recipe", "-L", "8", "--params", "10M", "--out", str(tmp_path)], capsys)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    assert "not UTF-8 text" in _one_line_error(["train", str(binary)], capsys)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert "empty file" in _one_line_error(["train", str(empty)], capsys)
    prose = tmp_path / "corpus.txt"
    prose.write_text("In the beginning God created the heaven and the earth.\n")
    assert "corpus.txt: not a YAML config (its top level must be a mapping" in _one_line_error(
        ["info", str(prose)], capsys)
    assert "is a directory; give a YAML file" in _one_line_error(["train", str(tmp_path)], capsys)
    assert "the key before '=' is empty" in _one_line_error(["train", tiny, "--set", "=5"], capsys)
    assert "the key before '=' is empty" in _one_line_error(
        ["train", tiny, "--set", "train..lr=5"], capsys)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: [x\n")
    assert "config.yaml: not valid YAML" in _one_line_error(["info", str(run)], capsys)
    assert a_file.read_text() == "not a directory"  # refused, untouched


def test_paths_of_the_wrong_kind_get_guidance(tmp_path, capsys, monkeypatch):
    """info/train on a sweep spec, info/report on a checkpoint, report on a run's file."""
    import yaml

    repo = Path(__file__).resolve().parents[1]
    sweep = str(repo / "configs" / "sweeps" / "depth.yaml")
    for cmd in ("info", "train"):
        assert "is a sweep spec, not a run config: run it with `depthlab sweep" in \
            _one_line_error([cmd, sweep], capsys)
    assert "depth.yaml is a sweep spec: report its output directory" in _one_line_error(
        ["report", sweep, "--out", str(tmp_path / "r")], capsys)
    run = tmp_path / "runs" / "a"
    step = run / "checkpoints" / "step_0000020"
    step.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(
        {"name": "a", "out_dir": str(tmp_path / "runs"), "model": {"vocab_size": 257}}))
    (run / "metrics.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    for inside in ("runs/a/checkpoints/step_0000020", "runs/a/checkpoints", "runs/a/metrics.jsonl"):
        assert (f"{inside} is inside run runs/a: give the run directory (depthlab report "
                "runs/a)") in _one_line_error(["report", inside, "--out", "r"], capsys)
    main(["info", "runs/a/checkpoints/step_0000020"])
    out = capsys.readouterr()
    assert "note: runs/a/checkpoints/step_0000020 is inside run runs/a; showing the run" in out.err
    assert "runs/a ──" in out.out and "last metrics" in out.out  # the run itself
    assert "runs/a/checkpoints/step_typo: no such run directory or config file" in \
        _one_line_error(["info", "runs/a/checkpoints/step_typo"], capsys)  # not the run
    assert "is a run config: report reads the run's directory" in _one_line_error(
        ["report", str(repo / "configs" / "cpu" / "tiny.yaml"), "--out", "r"], capsys)
    (tmp_path / "notes.txt").write_text("hello")
    assert "notes.txt is a file: report reads directories" in _one_line_error(
        ["report", "runs", "notes.txt", "--out", "r"], capsys)  # not skipped silently
    # the weights file of a checkpoint: info shows the run, report names it
    (step / "model.safetensors").write_bytes(b"\0" * 64)
    main(["info", "runs/a/checkpoints/step_0000020/model.safetensors"])
    assert "showing the run" in capsys.readouterr().err
    # spelled relative to a directory inside the run: the run is named as the user would
    monkeypatch.chdir(run / "checkpoints")
    assert "step_0000020 is inside run ..: give the run directory (depthlab report ..)" in \
        _one_line_error(["report", "step_0000020", "--out", str(tmp_path / "r")], capsys)
    # a run that crashed before its first checkpoint is still a run
    early = tmp_path / "runs" / "b"
    (early / "tensorboard").mkdir(parents=True)
    (early / "config.yaml").write_text((run / "config.yaml").read_text())
    (early / "data.json").write_text("{}")
    assert "tensorboard is inside run" in _one_line_error(
        ["report", str(early / "tensorboard"), "--out", str(tmp_path / "r")], capsys)
    assert "is a sweep spec, not a run config: run it with `depthlab sweep" in \
        _one_line_error(["ablate", sweep, "--dry-run"], capsys)
    junk = tmp_path / "junk" / "x"
    junk.mkdir(parents=True)
    (junk / "config.yaml").write_bytes(b"\xff\xfe\x00 not text")  # skipped, not a traceback
    assert "no depthlab runs (config.yaml) or diagnose results" in _one_line_error(
        ["report", str(tmp_path / "junk"), "--out", str(tmp_path / "r")], capsys)


def test_recipe_out_never_replaces_a_file_silently(tmp_path, capsys):
    mine = tmp_path / "mine.yaml"
    mine.write_text("# my own config\n")
    assert "exists; choose another file or pass --overwrite" in _one_line_error(
        ["recipe", "-L", "8", "--params", "10M", "--out", str(mine)], capsys)
    assert mine.read_text() == "# my own config\n"
    main(["recipe", "-L", "8", "--params", "10M", "--out", str(mine), "--overwrite"])
    assert "n_layers: 8" in mine.read_text()


def test_only_file_system_refusals_become_one_line(tmp_path, monkeypatch):
    """A missing path or a full disk is said in one line; any other OSError (network, a
    bug) keeps its traceback, and DEPTHLAB_DEBUG=1 keeps it for all."""
    import errno

    from depthlab.cli import _file_system_refusal

    assert _file_system_refusal(FileNotFoundError(errno.ENOENT, "No such file", "x.yaml"))
    assert _file_system_refusal(OSError(errno.ENOSPC, "No space left on device"))
    assert not _file_system_refusal(FileNotFoundError(errno.ENOENT, "No such file"))
    assert not _file_system_refusal(ConnectionError(errno.ECONNREFUSED, "refused", "h"))
    assert not _file_system_refusal(OSError("a library's own OSError"))
    monkeypatch.setenv("DEPTHLAB_DEBUG", "1")
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "cpu" / "tiny.yaml")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(NotADirectoryError):
        main(["train", tiny, "--set", f"out_dir={tmp_path / 'a_file'}"])


def test_python_dash_m_runs_the_cli(tmp_path: Path) -> None:
    """`python -m depthlab` is the same CLI, including its one-line errors."""
    import subprocess
    import sys

    ok = subprocess.run([sys.executable, "-m", "depthlab", "--help"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "train" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "depthlab", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"error: {tmp_path / 'nope'}: no such run directory or config file"
    # registering every command loads no plotting: a read-only home made matplotlib warn
    # on `data prepare`, and each start paid for its import
    probe = ("import sys; from depthlab.cli import _register_optional_commands as r; r(); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=120)
    assert loaded.returncode == 0 and loaded.stdout.strip() == "[]", loaded.stderr


def test_ctrl_c_says_what_is_kept_and_whether_to_rerun(tmp_path, capsys, monkeypatch):
    """Ctrl-C exits 130 with one line; only commands that keep finished work and resume
    say so (diagnose's was wrong: its finished metrics are not written)."""
    import depthlab.train as train_pkg
    import depthlab.train.trainer as trainer_mod

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_pkg, "train", interrupt)
    monkeypatch.setattr(trainer_mod, "read_run_config", interrupt)
    tiny = str(Path(__file__).resolve().parents[1] / "configs" / "cpu" / "tiny.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["train", tiny])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == (
        "interrupted; finished work is kept; run the same command again to go on from it")
    with pytest.raises(SystemExit) as exc:
        main(["info", str(tmp_path)])
    assert exc.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted"  # nothing to keep or resume


def test_sigterm_is_handled_like_ctrl_c(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM runs the Ctrl-C clean-up path and exits 143 with one line (it
    killed train mid-write, leaving temporary checkpoints and a 'running' sweep status)."""
    import signal

    import depthlab.train.trainer as trainer_mod

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the main thread
        raise AssertionError("SIGTERM did not interrupt")

    monkeypatch.setattr(trainer_mod, "read_run_config", terminated)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exc:
            main(["info", str(tmp_path)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exc.value.code == 143
    assert capsys.readouterr().err.strip() == "terminated (SIGTERM)"


def test_an_output_directory_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch):
    """diagnose and eval computed everything, then failed on a read-only file system
    (simulated: root may write anywhere that is not mounted read-only)."""
    from depthlab.errors import DepthlabError
    from depthlab.outdir import check_creatable_dir

    check_creatable_dir(tmp_path / "new" / "dir")  # writable: nothing said
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(DepthlabError, match=r"--out .*new/dir: .* is not writable .*give another"):
        check_creatable_dir(tmp_path / "new" / "dir")
