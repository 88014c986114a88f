"""Config validation: every bad value fails early with one line naming field and rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from depthlab.config import apply_overrides, build_config, load_config, read_yaml
from depthlab.errors import ConfigError

ROOT = Path(__file__).parent.parent / "configs"
CONFIGS = sorted([*ROOT.glob("cpu/*.yaml"), *ROOT.glob("paper/*.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_presets_validate(path):
    cfg = load_config(path)
    assert cfg.model.n_layers >= 1


@pytest.mark.parametrize("overrides, field, rule", [
    ({"model.n_heads": 6, "model.n_kv_heads": 4, "model.d_model": 96}, "n_kv_heads", "divisible"),
    ({"model.moe": {"num_experts": 4, "top_k": 5}}, "top_k", "<="),
    ({"train.weight_decay": -0.1}, "train.weight_decay", "greater than or equal to 0"),
    ({"model.n_layerz": 4}, "model.n_layerz", "unknown key"),
    ({"data.seq_len": 4096}, "data.seq_len", "max_seq_len"),
    ({"model.d_model": 100, "model.n_heads": 3}, "d_model", "divisible"),
    ({"train.warmup_steps": 500, "train.max_steps": 100}, "warmup_steps", "max_steps"),
    ({"model.moe": {"layers": [9]}}, "moe.layers", "out of range"),
    ({"train.seed": -1}, "train.seed", "greater than or equal to 0"),
    ({"name": "../elsewhere"}, "name", "must be a path inside out_dir"),
    ({"name": "/abs/run"}, "name", "must be a path inside out_dir"),
    ({"model.n_layers": 10**22}, "model.n_layers", "less than or equal to 4096"),
    ({"name": ""}, "name", "must name a directory inside out_dir"),
    ({"name": "."}, "name", "must name a directory inside out_dir"),
    # YAML's yes/no values are not numbers (max_steps: yes used to train one step) ...
    ({"train.max_steps": True}, "train.max_steps", "a yes/no value (YAML reads yes/no/on/"),
    ({"train.grad_clip": False}, "train.grad_clip", "is not a number: write the number (0 for"),
    ({"model.moe": {"shared_expert_hidden": True}}, "model.moe.shared_expert_hidden",
     "yes/no value"),
    ({"model.moe": {"layers": [True, 1]}}, "model.moe.layers", "yes/no value"),
    # ... nor text, and neither are numbers, dates or nothing
    ({"name": True}, "name", "YAML reads yes/no/on/off/true/false as a yes/no value"),
    ({"out_dir": None}, "out_dir", "no value given (YAML reads an empty value, ~ and null"),
    ({"name": 7}, "name", "YAML reads this as the number 7, not text: quote it"),  # name=007
    ({"name": __import__("datetime").date(2024, 1, 1)}, "name",
     "YAML reads this as the date 2024-01-01, not text: quote it"),
])
def test_bad_values_name_field_and_rule(overrides, field, rule):
    with pytest.raises(ConfigError) as err:
        build_config({}, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    assert field in msg and rule in msg


def test_override_parsing_uses_yaml_types(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layers: 4\n")
    cfg = load_config(p, ["model.n_layers=12", "train.lr=1e-3", "model.qk_norm=true",
                          "model.moe.num_experts=4", "model.moe.top_k=1"])
    assert cfg.model.n_layers == 12 and cfg.train.lr == 1e-3 and cfg.model.qk_norm
    assert cfg.model.moe.num_experts == 4


def test_bools_stay_bools_and_float_text_is_a_number():
    cfg = build_config({}, ["model.qk_norm=yes", "train.lr=1e-3"])
    assert cfg.model.qk_norm is True
    assert cfg.train.lr == 1e-3  # YAML 1.1 reads 1e-3 as text; pydantic makes it a number


def test_override_without_equals_is_an_error():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["model.n_layers"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n\tn_layers: 2\n")  # a tab: where, and what YAML found
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column 1 \(found "
                                          r"character '\\t' that cannot start any token\)"):
        load_config(bad)


def test_derived_quantities():
    m = build_config({}, {"model.n_heads": 8, "model.n_kv_heads": 2, "model.d_model": 64}).model
    assert m.group_size == 4 and m.head_dim == 8 and m.kv_heads == 2
    mix = build_config({}, {"model.norm_placement": "mix", "model.n_layers": 8,
                            "model.mix_ln_fraction": 0.25}).model
    assert [mix.is_post_ln(i) for i in range(8)] == [True, True] + [False] * 6


def test_a_key_given_twice_is_refused(tmp_path):
    """PyYAML keeps the last of two equal keys; a config silently losing one is refused.
    Merge keys (`<<: *base`) may still be overridden."""
    p = tmp_path / "c.yaml"
    p.write_text("name: a\nmodel:\n  n_layers: 2\n  d_model: 64\n  n_layers: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'n_layers' appears twice at line 5, column 3"):
        load_config(p)
    p.write_text("base: &b {n_layers: 2, d_model: 64}\nmodel:\n  <<: *b\n  n_layers: 3\n")
    assert read_yaml(p)["model"] == {"n_layers": 3, "d_model": 64}
    p.write_text("a: 1\n1: x\n1.0: z\n")  # one Python key: a value would be lost
    with pytest.raises(ConfigError, match="key 1.0 appears twice"):
        read_yaml(p)
    p.write_text("? [x, y]\n: 1\n")  # an unhashable key: YAML's own one-line error
    with pytest.raises(ConfigError, match="c.yaml: "):
        read_yaml(p)


def test_nested_run_names_stay_inside_out_dir():
    cfg = build_config({"name": "group/run", "out_dir": "runs"})
    assert cfg.run_dir == Path("runs/group/run")


def test_mix_ln_that_rounds_to_one_placement_is_named():
    def note(L, f):
        return build_config({"model": {"n_layers": L, "norm_placement": "mix",
                                       "mix_ln_fraction": f}}).model.placement_note()

    assert note(4, 0.5) is None and note(8, 0.25) is None
    assert note(3, 0.25).endswith("gives 0 post-LN blocks: this model is pre-LN in every block")
    assert note(4, 1.0).endswith("gives 4 post-LN blocks: this model is post-LN in every block")
    assert build_config({"model": {"n_layers": 3}}).model.placement_note() is None
