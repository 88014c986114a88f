"""`depthlab report`: figures, one self-contained HTML page, tables, and bad input."""

# ruff: noqa: E741  (l is the layer index, as in metrics.md)

from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from depthlab.errors import DepthlabError
from depthlab.report import build_report, collect


class PageParser(HTMLParser):
    """Images (src), tables (id -> body row count), links and scripts of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tables: dict[str, int] = {}
        self.external: list[str] = []
        self.scripts = 0
        self._table: str | None = None
        self._body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self._table = a.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = 0
        if tag == "tbody":
            self._body = True
        if tag == "tr" and self._body and self._table:
            self.tables[self._table] += 1
        for key in ("src", "href"):
            if a.get(key, "").startswith(("http:", "https:", "//")):
                self.external.append(a[key])

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._body = False
        if tag == "table":
            self._table = None


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    return p


# ----------------------------------------------------------------------------- fake runs


def fake_run(root: Path, name: str, *, n_layers: int = 3, wd: float = 0.1, steps: int = 20,
             stats: bool = True, complete: bool = True, diagnose: bool = False,
             interval: int = 5, moe: tuple[int, int, list[int] | None] | None = None) -> Path:
    """A run directory with the trainer's layout (config.yaml, metrics.jsonl, summary.json);
    `moe=(E, k, layers)` makes it an MoE run (layers None: every block) whose stats record
    routing."""
    run = root / name
    run.mkdir(parents=True)
    cfg = {"name": name, "out_dir": str(root),
           "model": {"n_layers": n_layers, "d_model": 32, "n_heads": 4, "vocab_size": 257},
           "data": {"corpus": "kjv", "seq_len": 32},
           "train": {"max_steps": steps, "weight_decay": wd, "stats_interval": interval}}
    if moe:
        cfg["model"]["moe"] = {"num_experts": moe[0], "top_k": moe[1], "layers": moe[2]}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines = []
    for s in range(1, steps + 1):
        if s % 5 == 0:
            lines.append({"step": s, "loss": 5.0 / math.sqrt(s), "lr": 1e-3, "grad_norm": 1.0})
        if s % 10 == 0:
            lines.append({"step": s, "val_loss": 5.2 / math.sqrt(s), "val_ppl": 10.0})
        if stats and s % interval == 0:
            L = n_layers
            lines.append({"step": s, "stats_seconds": 0.01, "stats": {
                "var": [0.01 * (l + 1) * s for l in range(L)],
                "attn_var": [0.001] * L, "mlp_var": [0.002] * L, "embed_var": 0.001,
                "update_ratio": [1.0 / (l + 1) for l in range(L)],
                "grad_norm": [0.1] * L, "param_norm": [5.0] * L,
                "weight_sparsity": [0.03] * L, "weight_hoyer": [0.2] * L,
                "attn_entropy": [0.9] * L, "attn_top90": [0.8] * L, **fake_routing(L, moe)}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if complete:
        (run / "summary.json").write_text(json.dumps({
            "status": "complete", "step": steps, "train_loss": 1.2, "val_loss": 1.3,
            "val_ppl": math.exp(1.3), "tokens": 1000, "seconds": 1.0, "params": 50_000,
            "active_params": 50_000}))
    if diagnose:
        L = n_layers
        (run / "diagnose").mkdir()
        (run / "diagnose" / "results.json").write_text(json.dumps(fake_results(L)))
    return run


def fake_routing(L: int, moe: tuple[int, int, list[int] | None] | None) -> dict:
    """The stats' MoE keys: in block l, expert e gets a share growing with l * e (block 0
    balanced), so the imbalance max_e n_e / mean_e n_e grows with depth; null for dense
    blocks."""
    if not moe:
        return {}
    E, k, layers = moe
    load, imb, ent = [None] * L, [None] * L, [None] * L
    for l in (range(L) if layers is None else layers):
        w = [1.0 + l * e for e in range(E)]
        load[l] = [k * x / sum(w) for x in w]
        imb[l] = max(w) / (sum(w) / E)
        ent[l] = 1.0 - 0.1 * l
    return {"moe_load": load, "moe_imbalance": imb, "router_entropy": ent}


def fake_results(L: int) -> dict:
    causal = [[0.0 if l <= s else 0.1 * (l - s) for l in range(L)] for s in range(L)]
    perm = [[None if a == b else 0.01 * abs(a - b) for b in range(L)] for a in range(L)]
    return {"model": {"arch": "depthlm", "n_layers": L, "d_model": 32}, "metrics": {
        "variance": {"variance": [0.1 * (l + 1) for l in range(L)], "last_layer_variance": 0.1 * L},
        "jacobian": {"jacobian_norm": [0.5 / (l + 1) for l in range(L)],
                     "mean": {"jacobian_norm": 0.3}},
        "usefulness": {"usefulness": 2 / 3, "loss_ratio": [1.5, 1.2, 1.05][:L]},
        "causal": {"matrix": causal, "causal_pairs": 0.15, "causal_rows": 0.2},
        "permutation": {"matrix": perm, "permutation": 0.013, "pair_set": "all"},
    }}


# ----------------------------------------------------------------------------- tests


def test_report_on_a_sweep_writes_figures_html_and_tables(tmp_path):
    sweep = tmp_path / "sweep"
    fake_run(sweep, "L2", n_layers=2, diagnose=True)
    fake_run(sweep, "L3", n_layers=3, diagnose=True)
    fake_run(sweep, "L8", n_layers=8)
    (sweep / "logs").mkdir()  # sweep bookkeeping is not a run
    (sweep / "base.yaml").write_text("model: {n_layers: 2}\n")
    rep = build_report(sweep, tmp_path / "out", title="depth sweep")  # one path, no list
    assert [r.label for r in rep.data.runs] == ["L2", "L3", "L8"]  # sorted by the knob
    assert repr(rep) == (f"Report({str(tmp_path / 'out' / 'report.html')!r}: 3 runs, "
                         f"0 diagnoses, {len(rep.drawn)} figures, {len(rep.tables)} tables)")
    assert rep.data.knob_keys == ["model.n_layers"]
    names = {f.name for f in rep.drawn}
    assert names == {"loss_curves", "last_layer_variance", "variance_profile", "layer_stats",
                     "jacobian", "diagnostic_bars", "layer_scores", "causal_heatmaps",
                     "permutation_heatmaps"}
    for f in rep.drawn:
        assert f.png.is_file() and f.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f.svg.is_file() and b"<svg" in f.svg.read_bytes()[:500]
    assert [f.name for f in rep.skipped] == ["ladder"]  # dense runs: no MoE note either

    page = parse(rep.html)
    assert len(page.images) == len(rep.drawn)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert page.tables == {"table-runs": 3}
    assert not page.external and page.scripts == 0
    text = rep.html.read_text()
    assert "<style>" in text and "Skipped <b>Ablation ladder</b>" in text
    # captions' `code` spans render as code, not as backticks
    assert "<code>depthlab diagnose</code>" in text and "`" not in text.split("</style>")[1]
    md = (tmp_path / "out" / "tables" / "runs.md").read_text()
    assert md.count("\n| L") == 3 and "val PPL" in md and "usefulness" in md
    assert "0.6667" in md  # L2/L3 usefulness from results.json
    import csv

    with (tmp_path / "out" / "tables" / "runs.csv").open() as f:
        table = list(csv.DictReader(f))
    # plain headers, config keys in full, unrounded numbers (pandas reads them as numbers)
    # and empty cells where the page shows "–"
    assert len(table) == 3 and list(table[0])[:2] == ["run", "model.n_layers"]
    assert {"params", "steps", "complete", "val PPL", "usefulness", "usefulness set",
            "active params"} <= set(table[0])  # the same columns in every report
    assert {row["complete"] for row in table} <= {"true", "false"}
    assert not any("↓" in k or "↑" in k for k in table[0])
    by_run = {row["run"]: row for row in table}
    for row in table:
        for key in ("params", "steps", "val loss"):
            float(row[key])  # a plain number, not "0.44M"
        assert row["causal"] == "" or float(row["causal"]) >= 0
    assert {float(r["usefulness"]) for r in by_run.values() if r["usefulness"]} == {2 / 3}


def test_missing_data_is_skipped_with_notes_never_a_crash(tmp_path):
    run = fake_run(tmp_path / "runs", "nostats", stats=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
        f.write(json.dumps({"step": 21, "stats": {"var": [None, float("nan")]}}) + "\n")
    rep = build_report([tmp_path / "runs"], tmp_path / "out")
    skipped = {f.name for f in rep.skipped}
    assert {"jacobian", "diagnostic_bars", "causal_heatmaps", "ladder"} <= skipped
    text = rep.html.read_text()
    assert "unreadable line" in text
    assert text.count('class="note"') >= len(skipped)
    assert parse(rep.html).tables == {"table-runs": 1}


def test_mismatched_steps_warn_on_the_page(tmp_path):
    fake_run(tmp_path / "s", "a", steps=20)
    fake_run(tmp_path / "s", "b", steps=10, complete=False)
    rep = build_report([tmp_path / "s"], tmp_path / "out")
    text = rep.html.read_text()
    assert "runs end at different steps (b 10, a 20)" in text  # sorted by the knob max_steps
    assert "b: incomplete (no summary.json), last logged step 10 of 10" in text
    assert "loss_curves" in {f.name for f in rep.drawn}
    assert "10 (incomplete)" in (tmp_path / "out" / "tables" / "runs.md").read_text()
    (tmp_path / "s" / "b" / "summary.json").write_text("{cut off")
    warnings = collect([tmp_path / "s"]).warnings
    assert "b: incomplete (its summary.json is not readable JSON), last logged step 10 of 10" \
        in warnings


def test_empty_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DepthlabError) as err:
        collect([tmp_path / "empty"])
    assert "no depthlab runs" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DepthlabError, match="no such directory"):
        collect([tmp_path / "nope"])
    with pytest.raises(DepthlabError, match="no directory given"):
        collect([])
    # one path, as str or Path, is one directory (a str was read as its characters)
    with pytest.raises(DepthlabError, match=f"no such directory: {tmp_path / 'nope'}$"):
        collect(str(tmp_path / "nope"))
    with pytest.raises(DepthlabError, match="no depthlab runs"):
        collect(tmp_path / "empty")


def test_cli_report_errors_exit_2(tmp_path, capsys):
    from depthlab.cli import main

    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "no depthlab runs" in err
    fake_run(tmp_path / "runs", "wd0", wd=0.0)
    (tmp_path / "a_file").write_text("x")
    dpi = "--dpi must be between 1 and 1200"
    for args, needle in [(["--out", str(tmp_path / "a_file")], "is not a directory"),
                         (["--out", str(tmp_path / "o"), "--dpi", "0"], dpi),
                         (["--out", str(tmp_path / "o"), "--dpi", "100000"], dpi)]:
        with pytest.raises(SystemExit) as exc:
            main(["report", str(tmp_path / "runs"), *args])
        assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_cli_report_and_ladder_and_standalone_diagnosis(tmp_path, capsys):
    from depthlab.cli import main

    fake_run(tmp_path / "runs", "wd0", wd=0.0)
    fake_run(tmp_path / "runs", "wd0.1", wd=0.1)
    hf = tmp_path / "smollm2"
    hf.mkdir()
    (hf / "results.json").write_text(json.dumps(fake_results(4)))
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump([
        {"name": "baseline", "avg_accuracy": 39.5, "usefulness": 0.56},
        {"name": "+lambda=0.3", "avg_accuracy": 41.4, "usefulness": 0.7},
        {"name": "+MoE", "avg_accuracy": 44.1}]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.json").write_text("{}")  # not the report's: left alone
    main(["report", str(tmp_path / "runs"), str(hf), "--out", str(tmp_path / "out"),
          "--ladder", str(ladder), "--no-svg"])
    assert (tmp_path / "out" / "results.json").read_text() == "{}"
    assert "report:" in capsys.readouterr().out
    out = tmp_path / "out"
    assert (out / "figures" / "ladder.png").is_file()
    assert not list((out / "figures").glob("*.svg"))
    page = parse(out / "report.html")
    assert page.tables == {"table-runs": 2, "table-diagnoses": 1, "table-ladder": 3}
    assert "λ (wd)" in (out / "report.html").read_text()
    ladder.write_text(yaml.safe_dump([{"name": "baseline", "ppl": "high"}]))  # no number
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "o2"),
              "--ladder", str(ladder)])
    assert exc.value.code == 2 and "no step has a numeric score" in capsys.readouterr().err
    (tmp_path / "runs" / "ladder.json").write_text(json.dumps([{"name": "a", "ppl": "high"}]))
    rep = build_report([tmp_path / "runs"], tmp_path / "o3")  # found, not named: a note
    assert "ladder" in [f.name for f in rep.skipped]


def test_colours_are_consistent_across_figures(tmp_path):
    from depthlab.report.figures import palette

    fake_run(tmp_path / "s", "a")
    fake_run(tmp_path / "s", "b", wd=0.3)
    data = collect([tmp_path / "s"])
    colours = palette([r.label for r in data.runs])
    assert len(set(colours.values())) == 2
    rep = build_report([tmp_path / "s"], tmp_path / "out")
    text = rep.html.read_text()
    for c in colours.values():  # the legend swatches use the figures' colours
        assert f"background:{c}" in text
    assert re.search(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', text)


def test_report_on_real_training_runs(tmp_path):
    """Two real tiny runs (trainer + stats) and a real diagnose result for one of them."""
    from depthlab.config import build_config
    from depthlab.data import kjv_chapters, open_splits, sample_sequences
    from depthlab.probe import build_stack
    from depthlab.probe.suite import run_suite
    from depthlab.train import Trainer, load_run_model

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(kjv_chapters()[:30]))
    for L in (2, 3):
        cfg = build_config({
            "name": f"L{L}", "out_dir": str(tmp_path / "sweep"),
            "model": {"n_layers": L, "d_model": 32, "n_heads": 4, "max_seq_len": 32},
            "data": {"corpus": str(corpus), "seq_len": 32, "cache_dir": str(tmp_path / "c")},
            "train": {"max_steps": 6, "batch_size": 4, "warmup_steps": 1, "eval_interval": 3,
                      "eval_batches": 1, "log_interval": 2, "stats_interval": 3,
                      "ckpt_interval": 6, "tensorboard": False}})
        Trainer(cfg, progress=False).fit()
    run = tmp_path / "sweep" / "L3"
    model, cfg, _ = load_run_model(run)
    ids = sample_sequences(open_splits(cfg.data, progress=False).val, 2, 16)
    res = run_suite(build_stack(model), ids, metrics="variance,jacobian,usefulness,causal,"
                    "permutation", progress=False)
    (run / "diagnose").mkdir()
    (run / "diagnose" / "results.json").write_text(json.dumps(res))

    rep = build_report([tmp_path / "sweep"], tmp_path / "out")
    assert [r.label for r in rep.data.runs] == ["L2", "L3"]
    assert {"loss_curves", "last_layer_variance", "variance_profile", "jacobian",
            "diagnostic_bars", "causal_heatmaps", "permutation_heatmaps"} <= \
        {f.name for f in rep.drawn}
    page = parse(rep.html)
    assert page.tables == {"table-runs": 2}
    assert len(page.images) == len(rep.drawn)
    # nothing wrong with the runs; the one caveat is diagnose's on its 32-token usefulness fit
    assert [w.split(": ")[:2] for w in rep.data.warnings] == [["L3", "usefulness"]]


def test_bookkeeping_keys_are_not_knobs(tmp_path):
    """Runs that differ in weight decay and in when they log/checkpoint: only the weight
    decay is a knob (a column of the runs table)."""
    root = tmp_path / "runs"
    fake_run(root, "a", wd=0.1, interval=5)
    fake_run(root, "b", wd=0.3, interval=10)
    cfg_b = root / "b" / "config.yaml"
    raw = yaml.safe_load(cfg_b.read_text())
    raw["train"].update(log_interval=1, ckpt_interval=7, keep_last=5, eval_interval=3)
    cfg_b.write_text(yaml.safe_dump(raw))
    rep = build_report([root], tmp_path / "out")
    assert rep.data.knob_keys == ["train.weight_decay"]


def test_rewriting_a_report_removes_its_stale_files_and_spares_foreign_pages(tmp_path):
    from depthlab.errors import DepthlabError

    fake_run(tmp_path / "runs", "a", diagnose=True)
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "results.json").write_text(json.dumps(fake_results(4)))
    out = tmp_path / "out"
    first = build_report([tmp_path / "runs"], out)
    second = build_report([hf], out)  # a standalone diagnosis: no training-curve figures
    kept = {p.relative_to(out) for p in out.rglob("*") if p.is_file()}
    assert kept == {p.relative_to(out) for p in second.files} | {Path(".report_files.json")}
    assert any(p not in second.files for p in first.files)  # those were removed
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("<html>my own notes</html>")
    with pytest.raises(DepthlabError, match="not written by depthlab report"):
        build_report([hf], mine)
    assert (mine / "report.html").read_text() == "<html>my own notes</html>"
    outside = tmp_path / "outside.txt"  # a tampered list never reaches outside OUT
    outside.write_text("keep")
    (out / ".report_files.json").write_text(json.dumps(["figures/../../outside.txt"]))
    build_report([hf], out)
    assert outside.read_text() == "keep"


def test_scores_over_a_subset_are_labelled_and_drawn_at_their_layers(tmp_path):
    """metrics.md: a permutation score over a pair subset and usefulness on a disjoint split
    must say so; a Jacobian measured on some blocks is drawn at those blocks' indices."""
    from depthlab.report.figures import fig_diagnostic_bars, fig_jacobian
    from depthlab.report.tables import diagnoses_table, runs_table

    res = fake_results(6)
    res["metrics"]["permutation"].update(pair_set="adjacent", permutation=0.0487)
    res["metrics"]["usefulness"]["split"] = "disjoint"
    res["metrics"]["jacobian"].update(jacobian_norm=[0.4, 0.2], layers=[3, 5])
    hf = tmp_path / "model"
    hf.mkdir()
    (hf / "results.json").write_text(json.dumps(res))
    fake_run(tmp_path / "runs", "a", diagnose=True)  # all pairs, fit tokens
    data = collect([tmp_path / "runs", hf])
    row = diagnoses_table(data).rows[0]
    assert "0.0487 (adjacent pairs)" in row and "0.6667 (disjoint split)" in row
    own = runs_table(data).rows[0]
    assert "0.013" in own and not any("pairs" in c or "split" in c for c in own)
    one_vs_rest = dict(res["metrics"]["permutation"], pair_set="one-vs-rest", anchor=2)
    data.diagnoses[0].metrics["permutation"] = one_vs_rest
    assert "0.0487 (pairs with block 2)" in diagnoses_table(data).rows[0]
    # the CSV: the number in its column, what it was measured over in the next
    import csv

    [row] = list(csv.DictReader(diagnoses_table(data).to_csv().splitlines()))
    assert float(row["permutation"]) == 0.0487 and row["permutation set"] == "pairs with block 2"
    assert row["usefulness set"] == "disjoint split" and row["causal set"] == ""

    colors = {d.label: "red" for _, d in data.all_diagnoses} | {"a": "blue"}
    ax = fig_jacobian(data, colors).axes[0]
    # a 3-block run and a 6-block model: the relative depth l / (L-1); the model's two
    # measured blocks at 3/5 and 5/5, its legend naming the subset
    xs = sorted(tuple(float(x) for x in line.get_xdata()) for line in ax.get_lines())
    assert xs == [(0.0, 0.5, 1.0), (0.6, 1.0)]
    assert ax.get_xlabel().startswith("relative depth")
    assert any("2 of 6 layers" in t.get_text() for t in ax.get_legend().get_texts())
    axes = fig_diagnostic_bars(data, colors).axes
    hatched = {a.get_title(): [p.get_hatch() for p in a.patches] for a in axes}
    assert hatched["permutation score"] == [None, "///"]  # the run: all pairs; the model: a subset
    texts = [t.get_text() for a in axes for t in a.texts]
    assert "0.0487*" in texts and "0.667*" in texts and "0.013" in texts
    xlabels = {a.get_title(): a.get_xlabel() for a in axes}
    assert xlabels["permutation score"] == "run\n* pairs with block 2"
    assert xlabels["usefulness"] == "run\n* disjoint split"
    assert xlabels["causal score (causal_pairs)"] == "run"


def test_heatmaps_mark_unmeasured_pairs(tmp_path):
    """Pairs a subset left out are drawn grey and the colour bar says so; a full matrix
    is not labelled with gaps it does not have."""
    from depthlab.report.figures import fig_permutation_heatmaps

    res = fake_results(4)
    hf = tmp_path / "model"
    hf.mkdir()
    res["metrics"]["permutation"]["matrix"] = [
        [None if abs(a - b) != 1 else 0.5 for b in range(4)] for a in range(4)]
    res["metrics"]["permutation"]["pair_set"] = "adjacent"
    (hf / "results.json").write_text(json.dumps(res))
    fig = fig_permutation_heatmaps(collect([hf]), {})
    heat, _bar = fig.axes
    assert heat.get_title() == "model (adjacent pairs)"
    title = " ".join(fig.get_suptitle().split())
    assert title.endswith("grey: l1 = l2, no swap; not measured)")
    image = heat.get_images()[0]
    assert image.cmap.get_bad().tolist() == pytest.approx([0.85, 0.85, 0.85, 1.0])
    full = [[0.0 if a == b else 0.5 for b in range(4)] for a in range(4)]
    res["metrics"]["permutation"].update(matrix=full, pair_set="all")
    (hf / "results.json").write_text(json.dumps(res))
    assert "not measured" not in fig_permutation_heatmaps(collect([hf]), {}).get_suptitle()


def test_heatmaps_scale_each_panel_and_grey_the_causal_lower_triangle(tmp_path):
    """A model whose scores are 100x another's used to set one colour scale that painted
    the other flat; C[s, l] for s >= l is undefined, not 'no effect'."""
    import math

    from depthlab.report.figures import fig_causal_heatmaps

    dirs = []
    for name, scale in (("big", 3.0), ("small", 0.03)):
        res = fake_results(4)
        res["metrics"]["causal"]["matrix"] = [[scale * (l > s) * (1 + l) for l in range(4)]
                                              for s in range(4)]
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        dirs.append(tmp_path / name)
    fig = fig_causal_heatmaps(collect(dirs), {})
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert sorted(round(im.get_clim()[1], 6) for im in images) == [0.12, 12.0]
    grid = images[0].get_array()
    assert all(grid.mask[s][j] or math.isnan(grid[s][j]) for s in range(4) for j in range(s + 1))
    assert "grey: s >= l, no later block)" in " ".join(fig.get_suptitle().split())


def test_runs_table_shows_the_depth_and_sparsity_knobs_first():
    """Sorted alphabetically, MoE keys came first and hid L and weight decay behind the
    six columns the table has room for."""
    from depthlab.report.tables import shown_knobs

    keys = ["model.moe.expert_hidden", "model.moe.lb_loss_weight", "model.moe.num_experts",
            "model.moe.renormalize", "model.moe.shared_expert", "model.moe.top_k",
            "model.n_kv_heads", "model.n_layers", "model.norm_placement", "train.weight_decay"]
    assert shown_knobs(keys) == ["model.n_layers", "train.weight_decay", "model.n_kv_heads",
                                 "model.norm_placement", "model.moe.num_experts",
                                 "model.moe.top_k"]


def test_markdown_tables_escape_pipes_in_cells():
    """'||J-I||' or '|w| < tau' in a cell used to split it into extra columns."""
    import re

    from depthlab.probe.results import summary_markdown
    from depthlab.report.tables import Table

    def columns(line: str) -> int:
        return len(re.findall(r"(?<!\\)\|", line))

    md = Table("t", "t", ["model", "mean ||J-I||/d"], [["m", "fraction |w| < 0.001"]]).to_markdown()
    rows = [line for line in md.splitlines() if line.startswith("|")]
    assert len(rows) == 3 and {columns(r) for r in rows} == {3}
    results = {"model_name": "m", "model": {"arch": "a", "n_layers": 2, "d_model": 8, "params": 1},
               "data": {"n_samples": 2, "seq_len": 4}, "skipped": {"moe": "no |MoE| layer"},
               "metrics": {"weight_sparsity": {"fraction_below_tau": 0.5, "tau": 1e-3,
                                               "hoyer": 0.1, "per_block": []}}}
    rows = [line for line in summary_markdown(results).splitlines() if line.startswith("|")]
    assert len(rows) >= 3 and {columns(r) for r in rows} == {6}


def test_runs_table_shows_active_parameters_when_a_run_is_moe(tmp_path):
    """MoE and dense runs are compared at equal active parameters: the table shows them
    next to the total when any run routes, and says it does not estimate seed noise."""
    import csv

    from depthlab.report.tables import runs_table

    fake_run(tmp_path / "runs", "dense")
    moe = fake_run(tmp_path / "runs", "moe")
    summary = json.loads((moe / "summary.json").read_text())
    summary.update(params=4_008_320, active_params=1_649_024)
    (moe / "summary.json").write_text(json.dumps(summary))
    table = runs_table(collect([tmp_path / "runs"]))
    assert "active params" in table.headers and "seed-to-seed noise" in table.note
    rows = {r["run"]: r for r in csv.DictReader(table.to_csv().splitlines())}
    assert rows["moe"]["active params"] == "1649024" and rows["moe"]["params"] == "4008320"
    assert rows["dense"]["active params"] == rows["dense"]["params"]
    summary.update(active_params=4_008_320)
    (moe / "summary.json").write_text(json.dumps(summary))
    assert "active params" not in runs_table(collect([tmp_path / "runs"])).headers


def test_diagnose_caveats_reach_the_report_page(tmp_path):
    """A usefulness fit on too few tokens per unknown was flagged by diagnose but shown
    in the report as a plain number."""
    res = fake_results(3)
    res["metrics"]["usefulness"].update(split="same", fit_tokens=100, underdetermined=False)
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "results.json").write_text(json.dumps(res))
    data = collect([tmp_path / "m"])
    assert any("under 10 per unknown" in w for w in data.warnings)
    res["metrics"]["usefulness"]["fit_tokens"] = 400  # > 10 x (32 + 1)
    (tmp_path / "m" / "results.json").write_text(json.dumps(res))
    assert not any("usefulness" in w for w in collect([tmp_path / "m"]).warnings)


def test_moe_routing_figure_and_table_appear_only_with_moe_runs(tmp_path):
    """Per MoE block: load imbalance and router entropy / log E of every MoE run (dense runs
    are left out), and the expert-load map of the most imbalanced one, dense blocks grey."""
    import csv

    import numpy as np

    from depthlab.report.figures import fig_moe_routing

    root = tmp_path / "runs"
    fake_run(root, "dense", n_layers=4)
    fake_run(root, "moe_all", n_layers=4, moe=(4, 2, None), wd=0.2)
    fake_run(root, "moe_odd", n_layers=4, moe=(4, 1, [1, 3]), wd=0.3)
    rep = build_report([root], tmp_path / "out")
    fo = next(f for f in rep.figures if f.name == "moe_routing")
    assert fo.note is None and fo.png.is_file()
    assert parse(rep.html).tables == {"table-runs": 3, "table-moe": 2}
    assert 'id="fig-moe_routing"' in rep.html.read_text()

    data = collect([root])
    fig = fig_moe_routing(data, {"dense": "k", "moe_all": "red", "moe_odd": "blue"})
    ax_imb, ax_ent, ax_map = fig.axes[:3]
    runs = {line.get_label().split(" ")[0]: line for line in ax_imb.get_lines()
            if line.get_color() in ("red", "blue")}
    assert set(runs) == {"moe_all", "moe_odd"}  # the dense run has no routing to draw
    assert list(runs["moe_odd"].get_xdata()) == [1, 3]  # its MoE blocks, at their indices
    w = [1.0 + 3 * e for e in range(4)]
    assert runs["moe_odd"].get_ydata()[1] == pytest.approx(max(w) / (sum(w) / 4))
    assert ax_imb.get_xlabel() == "block l"  # same depth: the block index
    assert "E=4, k=1, stats, step 20" in runs["moe_odd"].get_label()
    ent = {line.get_color(): list(line.get_ydata()) for line in ax_ent.get_lines()}
    assert ent["red"] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    # the expert-load map: moe_odd (1 expert of 4 per token, blocks 1 and 3) is the more
    # imbalanced; its dense blocks 0 and 2 are grey (no value), an expert's balanced share 1
    assert ax_map.get_title().startswith("expert load: moe_odd")
    grid = np.ma.filled(ax_map.get_images()[0].get_array().astype(float), np.nan)
    assert np.isnan(grid[0]).all() and np.isnan(grid[2]).all()
    assert grid[3].mean() == pytest.approx(1.0) and grid[3][0] < grid[3][3]
    assert "grey: dense block" in ax_map.get_xlabel()

    with (tmp_path / "out" / "tables" / "moe.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"moe_all", "moe_odd"}
    assert rows["moe_odd"]["moe blocks"] == "[1, 3]" and rows["moe_odd"]["top_k"] == "1"
    assert rows["moe_odd"]["max load imbalance block"] == "3"
    assert float(rows["moe_all"]["min router entropy"]) == pytest.approx(0.7)

    # a diagnosed MoE model (no run): drawn dashed, from results.json's moe metric
    res = fake_results(6)
    res["metrics"]["moe"] = {"moe_layers": [2, 5], "num_experts": [8, 8], "top_k": [2, 2],
                             "fraction_routed": [[0.25] * 8, [1.0, 1.0] + [0.0] * 6],
                             "load_imbalance": [1.0, 4.0],
                             "router_entropy_normalized": [0.9, 0.2]}
    (tmp_path / "olmoe").mkdir()
    (tmp_path / "olmoe" / "results.json").write_text(json.dumps(res))
    data = collect([root, tmp_path / "olmoe"])
    fig = fig_moe_routing(data, {"moe_all": "red", "moe_odd": "blue", "olmoe": "green"})
    ax_imb, _, ax_map = fig.axes[:3]
    [line] = [x for x in ax_imb.get_lines() if x.get_color() == "green"]
    assert line.get_linestyle() == "--" and "E=8, k=2, diagnose" in line.get_label()
    assert list(line.get_xdata()) == [0.4, 1.0]  # 4 and 6 blocks: relative depth
    assert ax_imb.get_xlabel().startswith("relative depth")
    assert ax_map.get_title().startswith("expert load: olmoe")  # mean imbalance 2.5

    # MoE runs without routing statistics: skipped with a note; no MoE run: not mentioned
    for name, kwargs in (("dense_only", {}), ("moe_no_stats", {"moe": (4, 2, None),
                                                               "stats": False})):
        fake_run(tmp_path / name, "r", **kwargs)
        rep = build_report([tmp_path / name], tmp_path / f"out_{name}")
        noted = name == "moe_no_stats"
        assert ("moe_routing" in {f.name for f in rep.skipped}) is noted
        assert ('id="skipped-moe_routing"' in rep.html.read_text()) is noted
        assert "moe_routing" not in {f.name for f in rep.figures if f.png}
        assert "table-moe" not in parse(rep.html).tables


def test_cli_report_prints_a_headline_per_run_then_where_the_report_is(tmp_path, capsys):
    """One line per run with the numbers of its runs-table row (val loss and PPL, the
    diagnose scores, last-layer variance), at most 8, then `... N more` and the page."""
    from depthlab.cli import main
    from depthlab.report.tables import runs_table

    root = tmp_path / "runs"
    fake_run(root, "wd0", wd=0.0, diagnose=True)
    fake_run(root, "wd0.1", wd=0.1, complete=False)
    main(["report", str(root), "--out", str(tmp_path / "out"), "--no-svg"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["wd0", "step", "20", "val", "loss", "1.3", "(PPL", "3.669)",
                                "usefulness", "0.6667", "causal", "0.15", "permutation",
                                "0.013", "last-layer", "var", "0.6"]
    table = runs_table(collect([root]))
    row = dict(zip(table.headers, table.rows[1], strict=True))  # wd0.1: its table row
    assert lines[1] == (f"  wd0.1  step {row['steps']}  val loss {row['val loss']} "
                        f"(PPL {row['val PPL ↓']})  last-layer var {row['last-layer var']}")
    assert "(incomplete)" in lines[1] and "usefulness" not in lines[1]  # not diagnosed
    assert lines[2].startswith("report: ") and "report.html" in lines[2]

    many = tmp_path / "many"
    for i in range(11):
        fake_run(many, f"r{i:02d}", wd=i / 10)
    main(["report", str(many), "--out", str(tmp_path / "out2"), "--no-svg"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:8]] == [f"r{i:02d}" for i in range(8)]
    assert lines[8] == f"  ... 3 more (all in {tmp_path / 'out2' / 'tables' / 'runs.md'})"
    assert lines[9].startswith("report: ")
