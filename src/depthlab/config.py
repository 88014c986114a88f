"""Validated run configuration: plain pydantic objects loaded from YAML.

One `RunConfig` holds everything a training run needs (model shape and sparsity
knobs, data, optimiser and schedule). Unknown keys are errors, and every rule is
checked before any work starts; `ConfigError` messages name the field and the rule.
"""

from __future__ import annotations

import copy
import datetime
import math
from pathlib import Path, PurePath
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from depthlab.errors import ConfigError

NormKind = Literal["rmsnorm", "layernorm"]
NormPlacement = Literal["pre", "post", "mix", "scaled", "peri"]
InitScheme = Literal["normal", "scaled", "paper"]


RUNTIME_KEYS = frozenset({
    "out_dir", "train.distributed", "train.device", "train.log_interval", "train.ckpt_interval",
    "train.keep_last", "train.tensorboard", "train.wandb", "train.wandb_project",
})
"""Config keys a run may change between resumes: where and how it runs and logs, not what
it computes (`out_dir` only names the directory the run was found in)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_no_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """YAML reads yes/no/on/off/true/false as booleans, which pydantic would take as
        1 and 0 for a number (max_steps: yes trained one step): refused."""
        items = value if isinstance(value, (list, tuple)) else [value]  # moe.layers: [on]
        if any(isinstance(v, bool) for v in items) and info.field_name is not None:
            kinds = _kinds(cls.model_fields[info.field_name].annotation)
            if bool not in kinds and kinds & {int, float}:
                raise ValueError("a yes/no value (YAML reads yes/no/on/off/true/false so) is not "
                                 "a number: write the number (0 for none)")
        return value


def _kinds(annotation: Any) -> set[Any]:
    """The plain types an annotation admits (int | None -> {int, NoneType})."""
    args = get_args(annotation)
    return {a for arg in args for a in _kinds(arg)} if args else {annotation}


class MoEConfig(_Strict):
    """Mixture-of-experts MLP: softmax router over `num_experts`, top-k routing."""

    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1)
    expert_hidden: int = Field(256, ge=1)
    shared_expert: bool = False
    shared_expert_hidden: int | None = Field(None, ge=1)
    renormalize: bool = True
    """Renormalise the top-k probabilities to sum to one (Mixtral/Qwen-MoE style)."""
    lb_loss_weight: float = Field(0.01, ge=0)
    """Load-balancing loss weight; the same value in every MoE layer (never divided by L)."""
    z_loss_weight: float = Field(0.001, ge=0)
    """Router z-loss weight; the same value in every MoE layer."""
    layers: list[int] | None = None
    """Indices of the MoE layers; None means every layer."""

    @model_validator(mode="after")
    def _check(self) -> MoEConfig:
        if self.top_k > self.num_experts:
            raise ValueError(
                f"moe.top_k ({self.top_k}) must be <= moe.num_experts ({self.num_experts})"
            )
        return self


class ModelConfig(_Strict):
    """DepthLM shape, norm placement, init and sparsity knobs (GQA, MoE)."""

    vocab_size: int | None = Field(None, ge=2)
    """None: taken from the tokenizer when training."""
    n_layers: int = Field(8, ge=1, le=4096)
    d_model: int = Field(128, ge=8)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(None, ge=1)
    """Key/value heads for GQA (group size G = n_heads / n_kv_heads); None = n_heads (MHA)."""
    mlp_hidden: int | None = Field(None, ge=1)
    """SwiGLU hidden size; None = 8/3 * d_model rounded up to a multiple of 32."""
    norm: NormKind = "rmsnorm"
    norm_eps: float = Field(1e-5, gt=0)
    norm_placement: NormPlacement = "pre"
    mix_ln_fraction: float = Field(0.25, ge=0, le=1)
    """Mix-LN: the first `fraction * n_layers` blocks are post-LN, the rest pre-LN."""
    qk_norm: bool = False
    tie_embeddings: bool = False
    rope_theta: float = Field(10000.0, gt=0)
    max_seq_len: int = Field(1024, ge=1)
    init: InitScheme = "scaled"
    """normal: N(0, init_std) everywhere; scaled: output projections / sqrt(2 L)
    (Megatron); paper: N(0, 0.02) everywhere, as the paper's runs."""
    init_std: float = Field(0.02, gt=0)
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model ({self.d_model}) must be divisible by model.n_heads ({self.n_heads})"
            )
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model.d_model / model.n_heads (head dim) must be even for RoPE")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by "
                f"model.n_kv_heads ({self.kv_heads})"
            )
        if self.moe is not None and self.moe.layers is not None:
            bad = [i for i in self.moe.layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(
                    f"model.moe.layers {bad} out of range for n_layers={self.n_layers}"
                )
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def group_size(self) -> int:
        return self.n_heads // self.kv_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    def is_moe_layer(self, layer: int) -> bool:
        if self.moe is None:
            return False
        return self.moe.layers is None or layer in self.moe.layers

    def is_post_ln(self, layer: int) -> bool:
        """Whether block `layer` normalises after the residual add."""
        if self.norm_placement == "post":
            return True
        if self.norm_placement == "mix":
            return layer < math.floor(self.mix_ln_fraction * self.n_layers)
        return False

    def placement_note(self) -> str | None:
        """Mix-LN whose post-LN share rounds to no block (or to every block) is in fact
        pre-LN (post-LN): said at train and export time, since nothing else shows it."""
        if self.norm_placement != "mix":
            return None
        n_post = math.floor(self.mix_ln_fraction * self.n_layers)
        if 0 < n_post < self.n_layers:
            return None
        same = "pre-LN in every block" if n_post == 0 else "post-LN in every block"
        return (f"model.norm_placement=mix with mix_ln_fraction {self.mix_ln_fraction:g} x "
                f"{self.n_layers} layers gives {n_post} post-LN blocks: this model is {same}")


class DataConfig(_Strict):
    """Where tokens come from: a corpus plus a tokenizer, or prepared token files."""

    corpus: str = Field("kjv", min_length=1)
    """'kjv' (built-in), a text file, a folder of text files, a JSONL file, or a
    directory prepared by `depthlab data prepare` (holds manifest.json)."""
    tokenizer: str = "byte"
    """'byte', 'bpe' (trained locally and cached), or a path to a tokenizer.json."""
    bpe_vocab_size: int = Field(4096, ge=260)
    seq_len: int = Field(128, ge=2)
    """Training context length T (the paper's implicit attention-sparsity lever)."""
    val_fraction: float = Field(0.02, gt=0, lt=0.5)
    """Held-out fraction for corpora without a fixed split (kjv has its own)."""
    text_key: str = "text"
    """Field holding the text in JSONL corpora."""
    cache_dir: str | None = None
    """Where prepared tokens and trained tokenizers are cached (default ~/.cache/depthlab)."""


class TrainConfig(_Strict):
    """Optimiser, schedule, batch, logging and checkpoint cadence."""

    max_steps: int = Field(300, ge=1)
    batch_size: int = Field(16, ge=1)
    """Micro-batch size in sequences (per process)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimiser step (per process). Derived from global_batch_size when
    that is set (leave grad_accum at 1 then)."""
    global_batch_size: int | None = Field(None, ge=1)
    """Sequences per optimiser step over all processes. When set, grad_accum =
    global_batch_size / (batch_size x world size), which must be a whole number; when
    None, the global batch is batch_size x grad_accum x world size."""
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Cosine/WSD floor as a fraction of lr (the paper decays to 0.1 x lr)."""
    warmup_steps: int = Field(30, ge=0)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    wsd_decay_fraction: float = Field(0.2, gt=0, le=1)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    """lambda, applied to weight matrices (the paper's weight-sparsity lever)."""
    decay_norms: bool = False
    """Decay the norm parameters too (gains, QK-norm gains, and LayerNorm biases)."""
    decay_biases: bool = False
    """Decay other 1-D parameters (DepthLM's linear layers have no biases, so with the
    built-in model this switch has nothing to act on; norm biases follow decay_norms)."""
    decay_embeddings: bool = False
    """Decay the token embedding (and a tied head, the same tensor)."""
    grad_clip: float = Field(1.0, ge=0)
    """Max global grad norm; 0 disables clipping."""
    eval_interval: int = Field(100, ge=1)
    eval_batches: int = Field(8, ge=1)
    """The validation set: the first eval_batches x batch_size windows of the validation
    split (the same for any number of processes or accumulation steps)."""
    log_interval: int = Field(10, ge=1)
    ckpt_interval: int = Field(100, ge=1)
    keep_last: int = Field(2, ge=1)
    stats_interval: int = Field(0, ge=0)
    """Log per-layer statistics every k steps; 0 disables."""
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'."""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU."""
    compile: bool = False
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "depthlab"
    distributed: Literal["auto", "ddp", "fsdp"] = "auto"
    """Strategy under torchrun: auto = DDP."""
    init_from: str | None = None
    """Start a new run (step 0, fresh optimizer and schedule) from these model weights: a
    run directory (its latest checkpoint, e.g. one written by `depthlab import-hf`), a
    checkpoint directory or a `.safetensors` file. Ignored when the run directory already
    has a checkpoint (the run resumes from it instead)."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.warmup_steps >= self.max_steps and self.max_steps > 1:
            raise ValueError(
                f"train.warmup_steps ({self.warmup_steps}) must be < train.max_steps "
                f"({self.max_steps})"
            )
        if self.global_batch_size is not None:
            if self.grad_accum != 1:
                raise ValueError(
                    f"train.grad_accum ({self.grad_accum}) and train.global_batch_size "
                    f"({self.global_batch_size}) are both set: set one (grad_accum is derived "
                    "from global_batch_size)"
                )
            from depthlab.launch import launched_world_size

            try:  # under torchrun the number of processes is known before any work
                self.accumulation(launched_world_size())
            except ConfigError as err:
                raise ValueError(str(err)) from None
        return self

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(grad_accum, global batch in sequences) for `world_size` processes."""
        if self.global_batch_size is None:
            return self.grad_accum, self.batch_size * self.grad_accum * world_size
        per_micro = self.batch_size * world_size
        if self.global_batch_size % per_micro:
            raise ConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.batch_size ({self.batch_size})"
                + (f" x {world_size} processes = {per_micro}" if world_size > 1 else "")
                + "; choose another global batch or batch_size"
            )
        return self.global_batch_size // per_micro, self.global_batch_size


class RunConfig(_Strict):
    """A complete training run."""

    name: str = "run"
    """The run's directory inside out_dir (relative, no '..')."""
    out_dir: str = "runs"
    """Runs are written to `out_dir/name`."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not PurePath(self.name).parts:  # '' or '.': the run would fill out_dir itself
            raise ValueError(f"name ({self.name!r}) must name a directory inside out_dir")
        if PurePath(self.name).is_absolute() or ".." in PurePath(self.name).parts:
            raise ValueError(f"name ({self.name!r}) must be a path inside out_dir (relative, "
                             "without '..'); put the parent directory in out_dir")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len "
                f"({self.model.max_seq_len})"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    """One line per problem: `field.path: message`."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "string_type":
            msg = _not_text(e["input"]) or msg
        names_field = loc and (f"{loc}." in msg or msg.startswith(loc))
        parts.append(f"{loc}: {msg}" if loc and not names_field else msg)
    return "invalid config: " + "; ".join(parts)


def _not_text(value: Any) -> str | None:
    """What YAML made of a value meant as text, and what to do (quoting keeps the text as
    typed: name: 007 would otherwise be the number 7)."""
    if value is None:
        return "no value given (YAML reads an empty value, ~ and null as none): give one"
    if isinstance(value, bool):
        return "YAML reads yes/no/on/off/true/false as a yes/no value, not text: quote it"
    if isinstance(value, (int, float, datetime.date)):
        kind = "date" if isinstance(value, datetime.date) else "number"
        return f"YAML reads this as the {kind} {value}, not text: quote it"
    return None


def parse_value(text: str) -> Any:
    """Parse an override value with YAML rules (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `key.path=value` overrides to a raw config dict (returns a new dict)."""
    out = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (
        _split_override(o) for o in overrides
    )
    for key, value in items:
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                raise ConfigError(f"override {key}: {p} is not a section")
            node = node[p]
        node[parts[-1]] = value
    return out


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, value = text.split("=", 1)
    if not key.strip() or "" in key.strip().split("."):
        raise ConfigError(f"override '{text}': the key before '=' is empty or malformed "
                          "(e.g. train.max_steps=200)")
    return key.strip(), parse_value(value)


def build_config(raw: dict[str, Any], overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Validate a raw dict (plus overrides) into a RunConfig, or raise ConfigError."""
    raw = apply_overrides(raw or {}, overrides) if overrides else (raw or {})
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # lists, mappings, null: left to SafeLoader
            if key in seen:  # (1, true and 1.0 too: as Python keys one would replace another)
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path, *, allow_empty: bool = False) -> dict[str, Any]:
    """A YAML mapping from a file; anything else (missing, unreadable, empty, not YAML, not a
    mapping) is a one-line ConfigError naming the file."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{p} is a directory; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(err, "problem", None) or err.__class__.__name__
        if isinstance(err, yaml.constructor.ConstructorError):  # e.g. a key given twice
            raise ConfigError(f"{p}: {what}{where}") from None
        raise ConfigError(f"{p}: not valid YAML{where} ({what})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text (bad byte at offset {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{p}: cannot read ({err.strerror or err})") from None
    if data is None:
        if allow_empty:
            return {}
        raise ConfigError(f"{p}: empty file")
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: not a YAML config (its top level must be a mapping of "
                          f"key: value, here it is a {type(data).__name__})")
    return data


def read_run_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a run config file; a sweep spec given instead is pointed at `sweep`."""
    from depthlab.paths import is_sweep_spec

    raw = read_yaml(path)
    if is_sweep_spec(raw):
        raise ConfigError(f"{path} is a sweep spec, not a run config: run it with `depthlab "
                          f"sweep {path}` (`--dry-run` lists its runs and parameter counts)")
    return raw


def load_config(path: str | Path, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """Read a YAML config file and apply `--set` style overrides."""
    return build_config(read_run_yaml(path), overrides)
