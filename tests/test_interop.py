"""Hugging Face export/import: exact logits in stock transformers, refusals, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from depthlab.cli import main
from depthlab.config import build_config
from depthlab.errors import DepthlabError
from depthlab.model import DepthLM
from depthlab.probe import build_stack
from depthlab.train.checkpoint import model_state

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from depthlab.interop.hf_export import byte_level_tokenizer, export_model  # noqa: E402
from depthlab.interop.hf_import import import_hf  # noqa: E402

V = 257
MOE = {"num_experts": 4, "top_k": 2, "expert_hidden": 24}
BASE = {"model.vocab_size": V, "model.n_layers": 2, "model.d_model": 32, "model.n_heads": 4,
        "model.max_seq_len": 64, "data.seq_len": 32, "model.init_std": 0.1}


def make(seed: int = 0, **overrides) -> DepthLM:
    """A random tiny DepthLM with non-trivial norm gains (so every gain matters)."""
    cfg = build_config({}, {**BASE, **overrides}).model
    torch.manual_seed(seed)
    m = DepthLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def write_run(root: Path, name: str = "run", step: int = 20, **overrides) -> tuple[Path, DepthLM]:
    """A run dir by hand: config.yaml + checkpoints/step_N/model.safetensors."""
    cfg = build_config({}, {**BASE, "name": name, "out_dir": str(root), **overrides})
    model = make(**overrides)
    run = root / name
    ckpt = run / "checkpoints" / f"step_{step:07d}"
    ckpt.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    save_file(model_state(model), str(ckpt / "model.safetensors"), metadata={"step": str(step)})
    return run, model


def function_of(cfg) -> dict:
    """The config fields that decide the function a DepthLM computes."""
    keys = ("vocab_size", "n_layers", "d_model", "n_heads", "kv_heads", "norm", "norm_eps",
            "norm_placement", "qk_norm", "tie_embeddings", "rope_theta", "max_seq_len")
    out = {k: getattr(cfg, k) for k in keys}
    moe_layers = [i for i in range(cfg.n_layers) if cfg.is_moe_layer(i)]
    out["moe_layers"] = moe_layers
    if len(moe_layers) < cfg.n_layers:
        out["hidden"] = cfg.hidden
    if cfg.moe is not None:
        m = cfg.moe
        out["moe"] = (m.num_experts, m.top_k, m.expert_hidden, m.renormalize, m.shared_expert,
                      (m.shared_expert_hidden or m.expert_hidden) if m.shared_expert else None)
    return out


EXACT = {
    "dense": ({}, "LlamaForCausalLM"),
    "gqa-tied": ({"model.n_kv_heads": 2, "model.tie_embeddings": True}, "LlamaForCausalLM"),
    "qk-norm": ({"model.qk_norm": True, "model.n_kv_heads": 2}, "Qwen3ForCausalLM"),
    "layernorm-scaling": ({"model.norm_placement": "scaled"}, "LlamaForCausalLM"),
    "mix-ln-all-pre": ({"model.norm_placement": "mix", "model.mix_ln_fraction": 0.0},
                       "LlamaForCausalLM"),
    "peri-ln": ({"model.norm_placement": "peri", "model.n_kv_heads": 2}, "Glm4ForCausalLM"),
    "moe-renorm": ({"model.moe": MOE}, "MixtralForCausalLM"),
    "moe-no-renorm": ({"model.moe": {**MOE, "renormalize": False}}, "Qwen2MoeForCausalLM"),
    "moe-shared": ({"model.moe": {**MOE, "shared_expert": True, "shared_expert_hidden": 40}},
                   "Qwen2MoeForCausalLM"),
    "moe-shared-no-renorm": ({"model.moe": {**MOE, "shared_expert": True, "renormalize": False}},
                             "Qwen2MoeForCausalLM"),
    "moe-some-layers": ({"model.moe": {**MOE, "layers": [1]}}, "Qwen2MoeForCausalLM"),
    "moe-qk-norm": ({"model.moe": {**MOE, "renormalize": False}, "model.qk_norm": True},
                    "Qwen3MoeForCausalLM"),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_export_gives_same_logits_and_loss_in_stock_transformers(tmp_path, name):
    overrides, cls = EXACT[name]
    model = make(**overrides)
    out = tmp_path / "hf"
    result = export_model(model, out, byte_level_tokenizer(64))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf).__name__ == cls == result.hf_class
    # Mix-LN with no post-LN block exports as plain pre-LN, and the export says so
    assert any("gives 0 post-LN blocks: this model is pre-LN in every block" in n
               for n in result.notes) == (name == "mix-ln-all-pre")
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids[:, :-1], ids[:, 1:])
        got = hf(input_ids=ids, labels=ids)
    torch.testing.assert_close(got.logits[:, :-1], ref.logits, atol=1e-5, rtol=0)
    assert abs(got.loss.item() - ref.loss.item()) < 1e-5
    # diagnose reads every export: its LayerStack has the DepthLM's residual stream
    want = build_stack(model).hidden_states(ids)
    for a, b in zip(build_stack(hf).hidden_states(ids), want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if model.cfg.moe is not None:  # routing really differs between tokens
        r = model.moe_layers()[0].route(model.embed(ids).flatten(0, 1))
        assert r.experts.unique().numel() > 1


def test_exported_byte_tokenizer_loads_with_autotokenizer(tmp_path):
    export_model(make(), tmp_path / "hf", byte_level_tokenizer(64))
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "In the beginning God created\nthe heaven — and the earth. ü😀"
    assert tok.encode(text, add_special_tokens=False) == list(text.encode("utf-8"))
    assert tok.eos_token_id == 256 and len(tok) == 257
    assert tok.decode(list(text.encode("utf-8"))) == text


REFUSED = {
    "post-ln": ({"model.norm_placement": "post"}, "post-LN"),
    "mix-ln": ({"model.norm_placement": "mix", "model.mix_ln_fraction": 0.5}, "Mix-LN"),
    "layernorm": ({"model.norm": "layernorm"}, "model.norm=layernorm"),
    "peri-qk-norm": ({"model.norm_placement": "peri", "model.qk_norm": True}, "Peri-LN"),
    "peri-moe": ({"model.norm_placement": "peri", "model.moe": MOE}, "Peri-LN"),
    "moe-qk-shared": ({"model.qk_norm": True, "model.moe": {**MOE, "shared_expert": True}},
                      "QK-norm and a shared expert"),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_variants_without_exact_stock_class_are_refused(tmp_path, name):
    overrides, needle = REFUSED[name]
    with pytest.raises(DepthlabError, match="cannot export") as err:
        export_model(make(**overrides), tmp_path / "hf")
    msg = str(err.value)
    assert needle in msg and "--backend native" in msg and "\n" not in msg
    assert not (tmp_path / "hf").exists()


def test_forced_target_that_cannot_represent_the_model(tmp_path):
    model = make(**{"model.moe": {**MOE, "renormalize": False}})
    with pytest.raises(DepthlabError, match="Mixtral always renormalises.*--arch qwen2_moe"):
        export_model(model, tmp_path / "a", arch="mixtral")
    with pytest.raises(DepthlabError, match="OLMoE applies QK-norm over the full"):
        export_model(model, tmp_path / "b", arch="olmoe")


def test_import_hf_llama_gives_same_logits_and_keep_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=5000.0, initializer_range=0.2,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    model, mcfg = import_hf(hf)
    assert (mcfg.n_layers, mcfg.n_kv_heads, mcfg.mlp_hidden) == (3, 2, 48)
    assert mcfg.rope_theta == 5000.0 and mcfg.norm_eps == 1e-6 and mcfg.norm_placement == "pre"
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(input_ids=ids).logits, atol=1e-5, rtol=0)
    shallow, scfg = import_hf(hf, keep_layers=[0, 2, 2])
    assert scfg.n_layers == 3
    hf_sd = hf.state_dict()
    assert torch.equal(shallow.blocks[1].attn.q_proj.weight,
                       hf_sd["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(shallow.blocks[2].mlp.down_proj.weight, hf_sd["model.layers.2.mlp.down_proj.weight"])


def test_import_refuses_what_depthlm_cannot_compute():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
             "intermediate_size": 48, "max_position_embeddings": 64}
    scaled = LlamaConfig(**small, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                   "rope_theta": 10000.0})
    with pytest.raises(DepthlabError, match="RoPE scaling type 'linear'"):
        import_hf(LlamaForCausalLM(scaled))
    with pytest.raises(DepthlabError, match="attention_bias=true"):
        import_hf(LlamaForCausalLM(LlamaConfig(**small, attention_bias=True)))
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=4))
    with torch.no_grad():
        qwen2.model.layers[0].self_attn.q_proj.bias.fill_(0.1)
    with pytest.raises(DepthlabError, match="non-zero self_attn.q_proj.bias"):
        import_hf(qwen2)
    with pytest.raises(DepthlabError, match="must be divisible by model.n_kv_heads"):
        import_hf(Qwen2ForCausalLM(Qwen2Config(**small, num_key_value_heads=3)))
    with pytest.raises(DepthlabError, match="keep_layers"):
        import_hf(LlamaForCausalLM(LlamaConfig(**small)), keep_layers=[0, 3])


@pytest.mark.parametrize("name", ["dense", "qk-norm", "peri-ln", "moe-renorm", "moe-shared",
                                  "moe-some-layers", "moe-qk-norm"])
def test_export_then_import_gives_back_the_same_weights(tmp_path, name):
    model = make(**EXACT[name][0])
    export_model(model, tmp_path / "hf", byte_level_tokenizer(64))
    back, cfg = import_hf(tmp_path / "hf")
    assert function_of(cfg) == function_of(model.cfg)
    mine, theirs = model.state_dict(), back.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in mine.items():
        assert torch.equal(value, theirs[key]), key


def test_export_to_a_name_near_the_length_limit(tmp_path):
    """The temporary sibling keeps part of the name: a 250-byte name (the limit is 255) used
    to fail with ENAMETOOLONG on the temporary name the user never gave."""
    for name in ("x" * 250, "模" * 83):  # 250 bytes; 249 bytes in 83 characters
        out = tmp_path / name
        export_model(make(**EXACT["dense"][0]), out, byte_level_tokenizer(64))
        assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x" * 250, "模" * 83])


def test_cli_export_and_import_hf_run_dirs(tmp_path, capsys):
    from depthlab.train.trainer import load_run_model

    run, model = write_run(tmp_path, **{"model.n_kv_heads": 2})
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    assert "LlamaForCausalLM" in capsys.readouterr().out
    files = {p.name for p in (tmp_path / "hf").iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    mode = (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "hf" / "config.json").stat().st_mode & 0o777  # not 0600
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # a name transformers 4 knows
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, V, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids).logits, atol=1e-5, rtol=0)

    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imported")])
    back, cfg, ckpt = load_run_model(tmp_path / "imported")
    assert ckpt.name == "step_0000000" and not (ckpt / "optimizer.pt").exists()
    assert cfg.data.tokenizer == "byte" and (tmp_path / "imported" / "tokenizer").is_dir()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, atol=0, rtol=0)

    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "shallow"), "--keep-layers", "1"])
    shallow, scfg, _ = load_run_model(tmp_path / "shallow")
    assert scfg.model.n_layers == 1
    assert torch.equal(shallow.blocks[0].attn.o_proj.weight, model.blocks[1].attn.o_proj.weight)


def test_overwrite_replaces_only_what_export_and_import_wrote(tmp_path, capsys):
    """--overwrite never deletes a run or a user's folder (it used to rmtree any target)."""
    run, _ = write_run(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for target in (run, tmp_path / "mine"):
        before = sorted(p.relative_to(target) for p in target.rglob("*"))
        with pytest.raises(SystemExit):
            main(["export", str(run), "--to", "hf", str(target), "--overwrite"])
        assert "not replacing it" in " ".join(capsys.readouterr().err.split())
        assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    written = sorted(p.name for p in (tmp_path / "hf").iterdir())
    (tmp_path / "hf" / "NOTES.md").write_text("mine")  # a user's files in an export folder
    (tmp_path / "hf" / "sub").mkdir()
    (tmp_path / "hf" / "sub" / "keep.txt").write_text("mine")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"stale")
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf"), "--overwrite"])  # own: ok
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted([*written, "NOTES.md",
                                                                          "sub"])
    assert (tmp_path / "hf" / "sub" / "keep.txt").read_text() == "mine"
    assert (tmp_path / "hf" / "model.safetensors").stat().st_size > 100  # the export replaced
    files = json.loads((tmp_path / "hf" / "depthlab_export.json").read_text())["files"]
    assert "model.safetensors" in files and "NOTES.md" not in files
    # a list naming files outside the folder (crafted, or moved) deletes nothing there
    outside = tmp_path / "mine" / "notes.txt"
    info = json.loads((tmp_path / "hf" / "depthlab_export.json").read_text())
    info["files"] += [str(outside), "../mine/notes.txt"]
    (tmp_path / "hf" / "depthlab_export.json").write_text(json.dumps(info))
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf"), "--overwrite"])
    assert outside.read_text() == "keep me"
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imp")])
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imp"), "--overwrite"])
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a trained run is never replaced by an import
        main(["import-hf", str(tmp_path / "hf"), str(run), "--overwrite"])
    assert "holds a trained run" in " ".join(capsys.readouterr().err.split())
    (tmp_path / "mine" / "checkpoints").mkdir()
    with pytest.raises(SystemExit):  # nor a user's folder, with or without --overwrite
        main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "mine"), "--overwrite"])
    assert "is not a depthlab run" in " ".join(capsys.readouterr().err.split())
    assert (tmp_path / "mine" / "checkpoints").is_dir()


def test_cli_export_refusal_is_one_line(tmp_path, capsys):
    run, _ = write_run(tmp_path, **{"model.norm_placement": "post"})
    with pytest.raises(SystemExit) as exit_:
        main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    assert exit_.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: cannot export to Hugging Face: model.norm_placement=post" in err
    assert not (tmp_path / "hf").exists()
    with pytest.raises(SystemExit):
        main(["export", str(tmp_path / "missing"), "--to", "hf", str(tmp_path / "hf")])
    assert "no such run" in " ".join(capsys.readouterr().err.split())


def test_bpe_tokenizer_survives_export_and_import(tmp_path):
    from depthlab.data import load_tokenizer_path, train_bpe
    from depthlab.interop.hf_export import export_hf
    from depthlab.interop.hf_import import import_hf_to_run

    texts = ["In the beginning God created the heaven and the earth."] * 20 + [
        "And the earth was without form, and void; and darkness was upon the face of the deep."]
    bpe = train_bpe(texts, 300)
    run, _ = write_run(tmp_path, **{"model.vocab_size": 300})
    bpe.save(run / "tokenizer")
    export_hf(run, tmp_path / "hf")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sample = "And God said, Let there be light: and there was light."
    assert hf_tok.encode(sample, add_special_tokens=False) == bpe.encode(sample)
    assert hf_tok.eos_token_id == bpe.eos_id
    out, _ = import_hf_to_run(tmp_path / "hf", tmp_path / "back")
    back = load_tokenizer_path(out / "tokenizer")
    assert back.encode(sample) == bpe.encode(sample) and back.eos_id == bpe.eos_id


def test_import_hf_missing_local_path_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path.parent)  # `<tmp>/nope`: under an existing folder, not a hub id
    with pytest.raises(SystemExit) as exit_:
        main(["import-hf", f"{tmp_path.name}/nope", str(tmp_path / "out")])
    assert exit_.value.code == 2
    assert "no such run, checkpoint or model directory" in capsys.readouterr().err


def test_import_hf_bad_input_is_one_line_and_leaves_nothing(tmp_path, capsys):
    run, _ = write_run(tmp_path)
    main(["export", str(run), "--to", "hf", str(tmp_path / "hf")])
    bare = tmp_path / "bare"  # weights and config, no tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    capsys.readouterr()
    for argv, needle in [
        ([str(bare), str(tmp_path / "out1")], "has no tokenizer (tokenizer.json"),
        ([str(tmp_path / "hf"), str(tmp_path / "out2"), "--keep-layers", "1-0"],
         "range '1-0' runs backwards"),
        ([str(tmp_path / "hf"), str(tmp_path / "out3"), "--keep-layers", ""],
         "--keep-layers is empty"),
        ([str(tmp_path / "hf"), str(tmp_path / "out4"), "--max-seq-len", "0"],
         "--max-seq-len must be >= 1"),
    ]:
        with pytest.raises(SystemExit) as exc:
            main(["import-hf", *argv])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and needle in " ".join(err.split()) and "\n" not in err, err
    assert not any((tmp_path / f"out{i}").exists() for i in range(1, 5))
    main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "imp")])
    before = {p: p.read_bytes() for p in (tmp_path / "imp").rglob("*") if p.is_file()}
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a failed --overwrite keeps the earlier import whole
        main(["import-hf", str(bare), str(tmp_path / "imp"), "--overwrite"])
    assert {p: p.read_bytes() for p in (tmp_path / "imp").rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no tmp left


def test_write_run_without_a_tokenizer_source_only_for_byte_models(tmp_path):
    from depthlab.interop.hf_import import write_run as write_imported

    with pytest.raises(DepthlabError, match="a model with a 64-token vocabulary needs its "
                                            "tokenizer; pass hf_source=HF_DIR"):
        write_imported(make(**{"model.vocab_size": 64}), tmp_path / "no_tok")
    assert not (tmp_path / "no_tok").exists()
    write_imported(make(**{"model.vocab_size": 257}), tmp_path / "byte")
    assert (tmp_path / "byte" / "config.yaml").is_file()


def test_a_truncated_weights_file_is_one_line(tmp_path):
    """A cut .safetensors (an interrupted copy) ended import-hf and eval in a
    SafetensorError traceback."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from depthlab.probe.loading import load_hf_lm

    cfg = LlamaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(DepthlabError, match="cannot load weights"):
        import_hf(tmp_path / "hf")
    with pytest.raises(DepthlabError, match="cannot read its weights .*damaged or incomplete"):
        load_hf_lm(str(tmp_path / "hf"))
