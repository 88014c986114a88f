"""Sweeps: expansion, names, validation before running, skip/resume, failures, SLURM, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from depthlab.config import parse_value
from depthlab.errors import ConfigError, DepthlabError
from depthlab.experiments.sweep import (
    STATUS_FILE,
    _cli_value,
    load_sweep,
    run_name,
    run_state,
    run_sweep,
    train_command,
)

ROOT = Path(__file__).resolve().parent.parent


def _corpus(tmp: Path) -> Path:
    from depthlab.data import kjv_chapters

    path = tmp / "corpus.txt"
    if not path.is_file():
        path.write_text("\n\n".join(kjv_chapters()[:30]))
    return path


def _base(tmp: Path) -> dict:
    return {
        "model": {"n_layers": 2, "d_model": 32, "n_heads": 4, "max_seq_len": 64},
        "data": {"corpus": str(_corpus(tmp)), "seq_len": 32, "cache_dir": str(tmp / "cache")},
        "train": {"max_steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_interval": 2,
                  "eval_batches": 1, "ckpt_interval": 2, "log_interval": 2,
                  "stats_interval": 2, "tensorboard": False},
    }


def _sweep(tmp: Path, **extra) -> dict:
    return {"name": "t", "base": _base(tmp), "out_dir": str(tmp / "sweep"), **extra}


# ----------------------------------------------------------------------------- expansion


def test_grid_expands_cartesian_with_stable_names(tmp_path):
    sw = load_sweep(_sweep(tmp_path, grid={"model.n_layers": [2, 4],
                                           "train.weight_decay": [0.0, 0.1]}))
    runs = sw.runs()
    assert [r.name for r in runs] == ["L2_wd0", "L2_wd0.1", "L4_wd0", "L4_wd0.1"]
    assert runs[3].cfg.model.n_layers == 4 and runs[3].cfg.train.weight_decay == 0.1
    assert runs[3].run_dir == tmp_path / "sweep" / "L4_wd0.1"
    assert [r.name for r in load_sweep(_sweep(tmp_path, grid={
        "model.n_layers": [2, 4], "train.weight_decay": [0.0, 0.1]})).runs()] == \
        [r.name for r in runs]  # stable


def test_list_points_named_and_combined_with_grid(tmp_path):
    sw = load_sweep(_sweep(tmp_path, list=[
        {"name": "mha", "model.n_kv_heads": 4},
        {"model.n_kv_heads": 1, "model.moe": {"num_experts": 4, "top_k": 2}},
    ], grid={"data.seq_len": [16, 32]}))
    names = [r.name for r in sw.runs()]
    assert names[:2] == ["mha_T16", "mha_T32"]
    assert names[2] == "kv1_E4_k2_T16"  # a section mapping in a list entry is merged key by key
    assert all("/" not in n and " " not in n for n in names)
    assert sw.runs()[2].cfg.model.moe.num_experts == 4
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(DepthlabError, match="a_file exists and is not a directory"):
        load_sweep(_sweep(tmp_path, list=[{"name": "a"}]), out_dir=tmp_path / "a_file")
    with pytest.raises(DepthlabError, match="base .* is a directory; give a config file"):
        load_sweep({"base": str(tmp_path), "list": [{"name": "a"}]})
    for taken in ("logs", "sweep.yaml"):  # the sweep's own files in OUT
        with pytest.raises(DepthlabError, match=f"run name.s. {taken} are the sweep's own files"):
            load_sweep(_sweep(tmp_path, list=[{"name": taken}, {"name": "b"}])).runs()


def test_names_are_filesystem_safe_and_bounded():
    assert run_name({"data.corpus": "/a b/c.txt"}) == "corpus-a-b-c.txt"
    assert run_name({"model.norm_placement": "post", "model.qk_norm": True}) == \
        "norm-post_qk-norm-on"
    assert run_name({"train.lr": 3e-4, "model.moe": None}) == "lr0.0003_moe-off"
    long = run_name({"data.corpus": "x" * 300})
    assert len(long) <= 100


@pytest.mark.parametrize("value", [1e-10, 0.1, 3, True, None, [1, 2], {"a": 1, "b": [0.5]},
                                   "pre", 0.0, "1e-3"])
def test_cli_values_round_trip(value):
    assert parse_value(_cli_value(value)) == value


def test_set_section_mappings_merge_not_replace(tmp_path):
    sw = load_sweep(_sweep(tmp_path, set={"train": {"max_steps": 3}}))
    cfg = sw.runs()[0].cfg
    assert cfg.train.max_steps == 3 and cfg.train.batch_size == 4  # rest of train kept
    assert sw.runs()[0].name == "base"


def test_base_path_relative_to_the_sweep_file(tmp_path):
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "base.yaml").write_text(yaml.safe_dump(_base(tmp_path)))
    (tmp_path / "cfgs" / "s.yaml").write_text(yaml.safe_dump(
        {"base": "base.yaml", "grid": {"model.n_layers": [2, 3]}}))
    sw = load_sweep(tmp_path / "cfgs" / "s.yaml")
    assert sw.name == "s" and sw.out_dir == Path("runs/sweeps/s")
    assert [r.name for r in sw.runs()] == ["L2", "L3"]


@pytest.mark.parametrize("name", ["depth", "weight_decay"])
def test_shipped_sweeps(name):
    sw = load_sweep(ROOT / "configs" / "sweeps" / f"{name}.yaml")
    runs = sw.runs()
    expected = {"depth": ["L2", "L4", "L8"], "weight_decay": ["wd0", "wd0.1", "wd0.3"]}[name]
    assert [r.name for r in runs] == expected
    for r in runs:
        assert r.cfg.train.max_steps == 150 and r.cfg.train.stats_interval == 10
        assert r.cfg.data.corpus == "kjv" and r.cfg.model.d_model == 128


# ----------------------------------------------------------------------------- bad input


def test_unknown_sweep_key_is_an_error_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="model.n_layer.*not a config key"):
        load_sweep(_sweep(tmp_path, grid={"model.n_layer": [2, 4]}))
    with pytest.raises(ConfigError, match="not a config key"):
        load_sweep(_sweep(tmp_path, set={"train.max_stepz": 3}))
    with pytest.raises(ConfigError, match="unknown key"):
        load_sweep(_sweep(tmp_path, gird={"model.n_layers": [2]}))
    with pytest.raises(ConfigError, match="non-empty list"):
        load_sweep(_sweep(tmp_path, grid={"model.n_layers": 4}))
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError, match="empty; give at least `base` and a `grid`"):
        load_sweep(tmp_path / "empty.yaml")  # used to become a one-run sweep
    no_base = {k: v for k, v in _sweep(tmp_path, grid={"model.n_layers": [2]}).items()
               if k != "base"}
    with pytest.raises(ConfigError, match="no `base`"):  # used to train the defaults
        load_sweep(no_base)
    assert not (tmp_path / "sweep").exists()


def test_every_expanded_config_is_validated_before_running(tmp_path):
    sw = load_sweep(_sweep(tmp_path, grid={"model.n_heads": [4, 3, 5]}))
    with pytest.raises(ConfigError) as err:
        run_sweep(sw)
    msg = str(err.value)
    assert "\n" not in msg and "2 of 3 runs are invalid" in msg
    assert "run H3" in msg and "run H5" in msg and "divisible" in msg
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing written


def test_conflicting_run_dir_stops_the_sweep_before_running(tmp_path):
    sw = load_sweep(_sweep(tmp_path, grid={"model.n_layers": [2, 3]}))
    other = sw.runs()[1]
    other.run_dir.mkdir(parents=True)
    (other.run_dir / "config.yaml").write_text(yaml.safe_dump(
        {**other.cfg.to_dict(), "train": {**other.cfg.to_dict()["train"], "lr": 0.5}}))
    assert run_state(other) == "conflict"
    with pytest.raises(DepthlabError, match="L3 already hold"):
        run_sweep(sw)
    assert not (tmp_path / "sweep" / STATUS_FILE).exists()


# ----------------------------------------------------------------------------- running


def _statuses(out: Path) -> dict[str, str]:
    data = json.loads((out / STATUS_FILE).read_text())
    return {k: v["status"] for k, v in data["runs"].items()}


def test_runs_skip_resume_and_failures(tmp_path, monkeypatch):
    from depthlab.experiments import sweep as sweep_mod

    # as on a 2-GPU machine: parallel jobs are spread over the GPUs (they all used cuda:0)
    monkeypatch.setattr(sweep_mod, "visible_gpus", lambda: ["0", "1"])
    (tmp_path / "short.txt").write_text("too short to train on")
    sw = load_sweep(_sweep(tmp_path, list=[
        {"name": "ok2", "model.n_layers": 2},
        {"name": "bad", "data.corpus": str(tmp_path / "short.txt")},
        {"name": "ok3", "model.n_layers": 3},
    ]))
    out = sw.out_dir
    outcome = run_sweep(sw, jobs=2)
    assert _statuses(out) == {"ok2": "complete", "bad": "failed", "ok3": "complete"}
    assert outcome.failed == ["bad"]
    status = json.loads((out / STATUS_FILE).read_text())
    assert status["runs"]["bad"]["returncode"] != 0
    assert "short.txt" in status["runs"]["bad"]["error"]  # the trainer's one-line error
    assert status["runs"]["ok2"]["threads"] >= 1
    for name in ("ok2", "ok3"):
        assert json.loads((out / name / "summary.json").read_text())["step"] == 4
    assert (out / "base.yaml").is_file() and (out / "logs" / "ok2.log").is_file()
    first = {name: (out / "logs" / f"{name}.log").read_text().split(" ", 2)[1]
             for name in ("ok2", "bad")}  # started together, in slots 0 and 1
    assert first == {"ok2": "CUDA_VISIBLE_DEVICES=0", "bad": "CUDA_VISIBLE_DEVICES=1"}

    # interrupt ok3 after step 2: its last checkpoint and summary are gone
    shutil.rmtree(out / "ok3" / "checkpoints" / "step_0000004")
    (out / "ok3" / "summary.json").unlink()
    seen = {}
    outcome = run_sweep(sw, only=["ok2", "ok3"],
                        on_status=lambda run, entry: seen.setdefault(run.name, dict(entry)))
    assert outcome.states == {"ok2": "complete", "ok3": "partial"}
    assert seen["ok2"]["skipped"] is True and seen["ok3"]["resumed"] is True
    # the run left out by --only keeps its record; it is not a failure of this call
    assert _statuses(out) == {"ok2": "complete", "bad": "failed", "ok3": "complete"}
    assert outcome.failed == []
    assert "short.txt" in json.loads((out / STATUS_FILE).read_text())["runs"]["bad"]["error"]
    log = (out / "logs" / "ok3.log").read_text()
    assert "--set name=ok3" in log
    assert "from step_0000002 (step 2/4)" in log and "ok3: step 4/4  loss" in log  # progress
    # --diagnose on a sweep whose runs are already complete: diagnosed, not skipped
    run_sweep(sw, only=["ok2"], diagnose=True)
    assert json.loads((out / STATUS_FILE).read_text())["runs"]["ok2"]["diagnose"] == "complete"
    res = json.loads((out / "ok2" / "diagnose" / "results.json").read_text())
    assert res["data"]["seq_len"] == 32  # the run's own context
    steps = [json.loads(x)["step"] for x in (out / "ok3" / "metrics.jsonl").read_text().splitlines()
             if '"stats"' in x]
    assert steps == [2, 4]  # resumed from step 2, no duplicates


def test_parallel_jobs_share_gpus_round_robin(tmp_path, monkeypatch):
    import torch

    from depthlab.experiments.sweep import job_gpu, visible_gpus

    sw = load_sweep(_sweep(tmp_path, list=[{"name": "a"}, {"name": "b", "train.device": "cuda:1"}]))
    a, b = sw.runs()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_gpus() == ["0", "1", "2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # what this process was given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert visible_gpus() == ["5", "7"]
    assert [job_gpu(a, slot, ["5", "7"]) for slot in range(3)] == ["5", "7", "5"]
    assert job_gpu(b, 0, ["5", "7"]) is None  # names its own device
    assert job_gpu(a, 1, ["0"]) is None  # one GPU: nothing to spread
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert visible_gpus() == []


def test_train_command_carries_overrides(tmp_path):
    sw = load_sweep(_sweep(tmp_path, grid={"train.lr": [1e-10]}))
    cmd = train_command(sw, sw.runs()[0])
    assert cmd[1:4] == ["-m", "depthlab.cli", "train"]
    sets = [cmd[i + 1] for i, c in enumerate(cmd) if c == "--set"]
    assert "train.lr=1.0e-10" in sets and "name=lr1e-10" in sets
    assert f"out_dir={tmp_path / 'sweep'}" in sets


def test_slurm_without_submitit_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    sw = load_sweep(_sweep(tmp_path))
    with pytest.raises(DepthlabError, match="pip install 'depthlab\\[slurm\\]'"):
        run_sweep(sw, slurm={})
    assert not sw.out_dir.exists()  # refused before any status or run dir was written


def test_slurm_submission_through_submitit(tmp_path, monkeypatch):
    submitted = []

    class Job:
        def __init__(self, n):
            self.job_id = f"100{n}"

    class Executor:
        def __init__(self, folder):
            self.folder, self.params = folder, {}

        def update_parameters(self, **kw):
            self.params.update(kw)

        def submit(self, fn):
            submitted.append((fn, dict(self.params)))
            return Job(len(submitted))

    class CommandFunction:
        def __init__(self, command, cwd=None, env=None):
            self.command, self.cwd, self.env = command, cwd, env

    fake = types.SimpleNamespace(AutoExecutor=Executor,
                                 helpers=types.SimpleNamespace(CommandFunction=CommandFunction))
    monkeypatch.setitem(sys.modules, "submitit", fake)
    sw = load_sweep(_sweep(tmp_path, grid={"model.n_layers": [2, 3]}))
    run_sweep(sw, slurm={"partition": "gpu", "gpus": 1, "cpus": 4, "timeout_min": 30})
    assert len(submitted) == 2
    fn, params = submitted[0]
    assert params["slurm_partition"] == "gpu" and params["gpus_per_node"] == 1
    assert "train" in fn.command and fn.env["OMP_NUM_THREADS"] == "4"
    status = json.loads((sw.out_dir / STATUS_FILE).read_text())["runs"]
    assert status["L2"]["status"] == "submitted" and status["L3"]["job_id"] == "1002"
    submitted.clear()  # 8 GPUs per job: torchrun with 8 processes, the CPUs shared out
    run_sweep(sw, slurm={"gpus": 8, "cpus": 16})
    fn, params = submitted[0]
    assert params["gpus_per_node"] == 8 and params["tasks_per_node"] == 1
    assert "torch.distributed.run" in fn.command and "--nproc_per_node=8" in fn.command
    assert fn.env["OMP_NUM_THREADS"] == "2"


def test_multi_gpu_jobs_launch_one_process_per_gpu(tmp_path, monkeypatch):
    """--gpus 8 submits torchrun with 8 processes (it used to start one process per job),
    and the launch line really trains: here 2 CPU processes over gloo."""
    import subprocess

    from depthlab.experiments.sweep import _write_inputs

    sw = load_sweep(_sweep(tmp_path, set={"train.max_steps": 2, "train.warmup_steps": 1}))
    cmd = train_command(sw, sw.runs()[0], nproc=8)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=8"]
    _write_inputs(sw)
    cmd = train_command(sw, sw.runs()[0], nproc=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((sw.runs()[0].run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 2


# ----------------------------------------------------------------------------- CLI


def test_cli_dry_run_lists_runs_and_params(tmp_path, capsys):
    from depthlab.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path, grid={"model.n_layers": [2, 4]})))
    main(["sweep", str(path), "--dry-run"])
    out = capsys.readouterr().out
    assert "L2" in out and "L4" in out and "params" in out and "new" in out
    assert not (tmp_path / "sweep").exists()
    main(["sweep", str(path), "--dry-run", "--only", "L4"])  # --only selects here too
    out = capsys.readouterr().out
    assert "1 run " in out and "L4" in out and "L2" not in out
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--dry-run", "--only", "L3"])
    assert exc.value.code == 2
    assert "no run(s) named L3 (its runs: L2, L4)" in " ".join(capsys.readouterr().err.split())


def test_missing_data_from_here_fails_before_any_run(tmp_path, capsys, monkeypatch):
    """Relative data paths are read from the current directory: from elsewhere, a dry run
    warns and a sweep refuses before writing anything (every run would fail)."""
    from depthlab.cli import main

    (tmp_path / "corpus.txt").write_text("\n\n".join(f"paragraph {i} " * 20 for i in range(60)))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path, set={"data.corpus": "corpus.txt"},
                                          grid={"model.n_layers": [2]})))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    main(["sweep", str(path), "--dry-run"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"warning: data.corpus 'corpus.txt' not found from {elsewhere}" in out
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path)])
    assert exc.value.code == 2
    assert "data.corpus 'corpus.txt' not found" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "sweep").exists()
    monkeypatch.chdir(tmp_path)
    main(["sweep", str(path), "--dry-run"])
    assert "warning" not in capsys.readouterr().out


def test_cli_bad_key_is_one_line_exit_2(tmp_path, capsys):
    from depthlab.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path, grid={"model.n_layerz": [2]})))
    with pytest.raises(SystemExit) as exc:
        main(["sweep", str(path), "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "model.n_layerz" in err.replace("\n", "")


def test_a_killed_run_is_reported_by_its_signal(tmp_path):
    from depthlab.experiments.sweep import _failure

    log = tmp_path / "run.log"
    log.write_text("step 3/10 ...\n$ python -m depthlab.cli train base.yaml --set name=x\n")
    assert _failure(-9, log) == f"killed by SIGKILL (likely out of memory); see {log}"
    assert _failure(-15, log) == f"killed by SIGTERM; see {log}"
    log.write_text("step 3/10 ...\nerror: invalid config: model.n_heads (4) must be divisible\n")
    assert _failure(2, log) == "invalid config: model.n_heads (4) must be divisible"


def test_a_rank_killed_under_torchrun_is_reported_by_its_signal(tmp_path):
    """torchrun exits 1 when a rank dies by a signal; the signal is in its failure report."""
    from depthlab.experiments.sweep import _failure

    log = tmp_path / "run.log"
    with log.open("w") as out:
        rc = subprocess.run(
            [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1",
             "--no-python", sys.executable, "-c",
             "import os; print('step 1', flush=True); os.kill(os.getpid(), 9)"],
            stdout=out, stderr=subprocess.STDOUT, timeout=120).returncode
    assert rc == 1
    assert _failure(rc, log) == f"a rank was killed by SIGKILL (likely out of memory); see {log}"



def test_a_torchrun_failure_is_reported_by_its_root_cause(tmp_path):
    """Under torchrun the CLI's error line is followed by torchrun's report: the sweep
    reports the error line alone; a rank that died by a signal only after the rank at
    the root cause failed (a gloo abort, say) does not hide that error."""
    from depthlab.experiments.sweep import _failure

    log = tmp_path / "run.log"
    with log.open("w") as out:
        rc = subprocess.run(
            [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
             "-m", "depthlab.cli", "train", str(ROOT / "configs" / "cpu" / "tiny.yaml"),
             "--set", "model.n_kv_heads=3", "--set", f"out_dir={tmp_path}"],
            stdout=out, stderr=subprocess.STDOUT, timeout=120).returncode
    assert rc == 1 and "Root Cause (first observed failure):" in log.read_text()
    error = "invalid config: model.n_heads (4) must be divisible by model.n_kv_heads (3)"
    assert _failure(rc, log) == error
    # the same report with the other rank killed by SIGABRT, listed before the root cause
    report = log.read_text().replace(
        "Failures:\n", "Failures:\n[1]:\n  traceback : Signal 6 (SIGABRT) received by PID 9\n", 1)
    log.write_text(report)
    assert _failure(rc, log) == error


def test_two_calls_on_one_sweep_keep_each_others_status(tmp_path):
    """`sweep --only a` and `sweep --only b` running at the same time: each rewrites the
    status file as it is on disk, so neither erases the other's entries (it used to keep
    a copy from its start and write that back)."""
    from depthlab.experiments.sweep import StatusFile

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(_sweep(tmp_path, list=[{"name": n} for n in "abc"])))
    sw = load_sweep(spec)
    runs = {r.name: r for r in sw.runs()}
    names = list(runs)
    first = StatusFile(sw, [runs["a"]], names)
    second = StatusFile(sw, [runs["b"]], names)
    first.update("a", status="running")
    second.update("b", status="running")
    first.update("a", status="complete")
    assert _statuses(sw.out_dir) == {"a": "complete", "b": "running"}
    second.update("b", status="failed", error="boom")
    data = json.loads((sw.out_dir / STATUS_FILE).read_text())
    assert list(data["runs"]) == ["a", "b"] and data["counts"] == {"complete": 1, "failed": 1}
    assert data["runs"]["b"]["error"] == "boom"
    # and from separate processes writing many times at once
    code = (
        "import sys\n"
        "from depthlab.experiments.sweep import StatusFile, load_sweep\n"
        f"sw = load_sweep({str(spec)!r})\n"
        "runs = {r.name: r for r in sw.runs()}\n"
        "status = StatusFile(sw, [runs[sys.argv[1]]], list(runs))\n"
        "for i in range(200):\n"
        "    status.update(sys.argv[1], status='running', step=i)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, n]) for n in names]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    data = json.loads((sw.out_dir / STATUS_FILE).read_text())
    assert {n: e.get("step") for n, e in data["runs"].items()} == {"a": 199, "b": 199, "c": 199}


def test_status_drops_runs_removed_from_the_spec(tmp_path):
    """A run taken out of the sweep's spec leaves sweep_status.json (and its counts)."""
    from depthlab.experiments.sweep import StatusFile

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(_sweep(tmp_path, list=[{"name": n} for n in "abc"])))
    sw = load_sweep(spec)
    runs = {r.name: r for r in sw.runs()}
    status = StatusFile(sw, list(runs.values()), list(runs))
    for name in runs:
        status.update(name, status="failed")
    spec.write_text(yaml.safe_dump(_sweep(tmp_path, list=[{"name": n} for n in "ab"])))
    sw = load_sweep(spec)
    runs = {r.name: r for r in sw.runs()}
    StatusFile(sw, [runs["a"]], list(runs)).update("a", status="complete")
    data = json.loads((sw.out_dir / STATUS_FILE).read_text())
    assert list(data["runs"]) == ["a", "b"]
    assert data["counts"] == {"complete": 1, "failed": 1}


def test_status_written_when_the_file_system_refuses_locks(tmp_path, monkeypatch, capsys):
    """flock raising (Lustre noflock, NFS without lockd) writes the file unlocked, with
    one note, instead of a traceback."""
    import errno
    import fcntl

    from depthlab.experiments.sweep import StatusFile

    def refuse(_fd, op):
        if op == fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump(_sweep(tmp_path, list=[{"name": n} for n in "ab"])))
    sw = load_sweep(spec)
    runs = {r.name: r for r in sw.runs()}
    status = StatusFile(sw, list(runs.values()), list(runs))
    status.update("a", status="complete")
    status.update("b", status="running")
    assert _statuses(sw.out_dir) == {"a": "complete", "b": "running"}
    err = capsys.readouterr().err
    assert err.count("cannot lock") == 1 and "No locks available" in err
