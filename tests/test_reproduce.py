"""End to end: `depthlab reproduce --scale tiny` and `depthlab ablate` at a few steps (issue 8).

These train real (tiny) runs through the sweep runner, diagnose them and compute verdicts;
only the step count is reduced, so the verdicts themselves mean nothing here.
"""

import json

import pytest
import yaml

from depthlab.cli import main
from depthlab.experiments.reproduce import claims_for, plan_for, points_for
from depthlab.experiments.sweep import load_sweep
from depthlab.experiments.verdict import FAILS, HOLDS, INCONCLUSIVE


def test_plan_pools_shared_runs():
    plan = plan_for("tiny")
    points, where = points_for(plan, claims_for(plan))
    names = [p.name for p in points]
    assert len(names) == len(set(names))
    # the base config (L=8, lambda=0.1, T=64, MHA, dense) is one run per seed, shared by claims
    assert where[(1, 2)] == where[(3, 1)] == where[(4, 1)] == where[(5, 0)] == where[(7, 0)]
    assert where[(1, 2)] == [f"base_s{i}" for i in range(plan.seeds)]
    # the ladder's +T rung is the context claim's T=128 run
    assert where[(7, 1)] == where[(4, 2)]
    assert len(points) == 15 * plan.seeds


def test_reproduce_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "rep"
    main(["reproduce", "--scale", "tiny", "--steps", "3", "--seeds", "1", "--jobs", "2",
          "--eval-tokens", "256", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "report:" in printed
    results = json.loads((out / "reproduce.json").read_text())
    assert [c["id"] for c in results["claims"]] == list(range(1, 9))
    assert len(results["runs"]) == 15
    for claim in results["claims"]:
        assert claim["verdict"] in (HOLDS, FAILS, INCONCLUSIVE)
        for t in claim["tests"]:
            assert t["status"] in (HOLDS, FAILS, INCONCLUSIVE)
    run = results["runs"]["L16_s0"]
    assert run["n_layers"] == 16 and run["val_ppl"] > 1 and run["last_layer_variance"] > 0
    report = (out / "report.md").read_text()
    assert "| # | claim | paper's numbers | our measurement | holds? |" in report
    assert (out / "claim1.png").is_file() and (out / "claim8_theory.png").is_file()
    assert results["wall"]["seconds"] > 0 and results["wall"]["jobs"] == 2
    assert "Wall time of this invocation:" in report
    # how big the re-check was, to weigh it against the paper's ~1B-parameter runs
    assert "Scale: base model L=8, d=64, 4 heads, init paper; byte tokenizer on kjv; T=64, " \
        "batch 16, 1,024 tokens per step" in report and "M active per token)" in report
    # a second call reuses every trained and diagnosed run; a damaged diagnosis cache
    # is measured again (it ended in a JSONDecodeError traceback)
    cache = out / "runs" / "L16_s0" / "study_diagnose.json"  # a run of claim 1's depths
    cache.write_text('{"settings":')
    main(["reproduce", "--scale", "tiny", "--steps", "3", "--seeds", "1", "--claims", "1",
          "--eval-tokens", "256", "--out", str(out)])
    assert "complete, skipped" in capsys.readouterr().out
    assert json.loads(cache.read_text())["results"]["metrics"]


def test_reproduce_paper_scale_writes_commands(tmp_path, capsys):
    main(["reproduce", "--scale", "paper", "--out", str(tmp_path)])
    assert "torchrun" in capsys.readouterr().out
    sweep = yaml.safe_load((tmp_path / "paper_depth.yaml").read_text())
    assert sweep["grid"] == {"model.n_layers": [12, 16, 24, 32]}
    context = yaml.safe_load((tmp_path / "paper_context.yaml").read_text())["list"]
    assert {p["data.seq_len"] * p["train.global_batch_size"] for p in context} == {512 * 1024}
    assert {p["data.seq_len"] * p["train.batch_size"] for p in context} == {8 * 1024}
    for name in ("depth", "weight_decay", "context", "gqa"):  # one global batch for all
        sw = load_sweep(tmp_path / f"paper_{name}.yaml")
        assert {r.cfg.train.global_batch_size * r.cfg.data.seq_len for r in sw.runs()} == \
            {512 * 1024}
    commands = (tmp_path / "commands.sh").read_text()
    assert "--rdzv_endpoint=$HEAD_NODE" in commands and "model.n_layers=32" in commands


def test_ablate_end_to_end(tmp_path, capsys):
    out = tmp_path / "abl"
    main(["ablate", "configs/cpu/dense.yaml", "--out", str(out), "--jobs", "2",
          "--set", "train.max_steps=3", "--set", "train.warmup_steps=1",
          "--set", "model.n_layers=2", "--set", "model.d_model=32"])
    printed = capsys.readouterr().out
    assert "+MoE" in printed
    ladder = json.loads((out / "ladder.json").read_text())
    assert [s["name"] for s in ladder["steps"]] == ["baseline", "+T", "+lambda", "+G", "+MoE"]
    assert (out / "report" / "report.html").is_file()
    assert (out / "report" / "figures" / "ladder.png").is_file()


def test_dry_runs_list_the_runs_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "rep"
    main(["reproduce", "--dry-run", "--seeds", "1", "--claims", "1,8", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "reproduce --scale tiny: 4 runs" in printed and "L16_s0" in printed
    assert "claim 1 (Last-layer variance grows with depth): 4 runs" in printed
    assert "claim 8 (Masked (sparse) sublayers slow the variance growth of a random pre-LN " \
        "stack): a random-stack simulation, no training" in printed
    main(["ablate", "configs/cpu/dense.yaml", "--dry-run", "--out", str(tmp_path / "abl")])
    printed = capsys.readouterr().out
    assert "5 runs" in printed and "ladder4_MoE" in printed and "new" in printed
    assert "nothing trained" in printed
    assert not out.exists() and not (tmp_path / "abl").exists()


@pytest.mark.parametrize("argv,message", [
    (["reproduce", "--scale", "huge"], "unknown scale"),
    (["reproduce", "--scale", "paper", "--dry-run"], "--dry-run would be ignored"),
    (["reproduce", "--claims", "9"], "unknown claim"),
    (["reproduce", "--claims", "x"], "--claims takes numbers"),
    (["ablate", "configs/cpu/moe.yaml"], "already uses MoE"),
    (["ablate", "configs/cpu/tiny.yaml"], "needs an MHA base"),
    (["reproduce", "--steps", "0"], "--steps must be >= 1"),
    (["reproduce", "--scale", "paper", "--seeds", "0"], "--seeds must be >= 1"),
    (["data", "prepare", "--bpe-vocab-size", "500"], "BPE vocabulary size applies to --tokenizer"),
    (["data", "prepare", "--set", "data.bpe_vocab_size=500"], "BPE vocabulary size applies to"),
    (["data", "prepare", "--set", "model.n_layers=5"], "--set model.n_layers: data prepare reads"),
    (["reproduce", "--scale", "paper", "--steps", "5", "--jobs", "4"],
     "--jobs, --steps would be ignored: --scale paper only writes"),
    (["recipe", "-L", "16", "--params", "1B", "--dense", "--experts", "8"],
     "--experts would be ignored with --dense"),
    (["reproduce", "--claims", ","], "--claims takes numbers"),
    (["ablate", "configs/cpu/dense.yaml", "--group-size", "0"], "--group-size must be >= 2"),
    (["ablate", "configs/cpu/dense.yaml", "--top-k", "0"], "--top-k must be between"),
    (["ablate", "configs/cpu/dense.yaml", "--context-factor", "1"], "--context-factor must be"),
])
def test_bad_input_one_line(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_paper_scale_keeps_edited_files_and_out_must_be_a_directory(tmp_path, capsys):
    out = tmp_path / "paper"
    main(["reproduce", "--scale", "paper", "--out", str(out)])
    first = (out / "commands.sh").read_text()
    main(["reproduce", "--scale", "paper", "--out", str(out)])  # same files: rewritten
    assert (out / "commands.sh").read_text() == first
    (out / "commands.sh").write_text(first + "echo my addition\n")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--scale", "paper", "--out", str(out)])
    assert exc.value.code == 2 and "commands.sh differs from what --scale paper writes" in \
        capsys.readouterr().err
    assert "echo my addition" in (out / "commands.sh").read_text()
    main(["reproduce", "--scale", "paper", "--out", str(out), "--overwrite"])
    assert (out / "commands.sh").read_text() == first
    (tmp_path / "a_file").write_text("x")
    for argv in (["reproduce", "--scale", "paper"], ["eval", str(out), "--ppl"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(tmp_path / "a_file")])
        assert exc.value.code == 2
        assert "a_file exists and is not a directory" in capsys.readouterr().err
    # nor is a training run directory: its own files would be mixed with a run's
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    for argv in (["reproduce", "--scale", "paper"], ["ablate", "configs/cpu/dense.yaml"]):
        with pytest.raises(SystemExit) as exc:
            main([*argv, "--out", str(run)])
        assert exc.value.code == 2
        assert "is a training run directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]


def test_a_diverged_run_leaves_its_claim_inconclusive_by_name(tmp_path, monkeypatch):
    """A NaN measurement (a diverged run) stopped the whole reproduce after training with
    "every condition needs at least one finite measurement", naming no run or claim. Here the
    training and diagnosis are replaced by their measurements (the end-to-end test above runs
    them for real)."""
    import math

    from depthlab.experiments import reproduce as R
    from depthlab.experiments.study import Measurement

    diverged: list[str] = []

    def measured(sweep, **kwargs):
        out = {}
        for i, run in enumerate(sweep.runs()):
            ppl = math.nan if i == 0 else 4.0 + 0.01 * i
            diverged.extend([run.name] if i == 0 else [])
            out[run.name] = Measurement(run.name, ppl, math.log(4.0), 1.0 + i, 0.2, 0.1, 0.3,
                                        0.1, run.cfg.model.n_layers)
        return out

    monkeypatch.setattr(R, "run_study", measured)
    res = R.reproduce("tiny", tmp_path / "out", claims=[1, 2, 3, 5], jobs=1)
    [bad] = diverged
    for row in res["claims"]:
        uses = any(bad in cond["runs"] for cond in row["conditions"])
        first = row["tests"][0]
        assert (first["label"] == "measured") is uses, row["id"]
        if uses:  # said by name, for this claim only
            assert row["verdict"] == "inconclusive" and bad in first["detail"]
    assert any(row["tests"][0]["label"] != "measured" for row in res["claims"])
    assert json.loads((tmp_path / "out" / "reproduce.json").read_text())["claims"]
