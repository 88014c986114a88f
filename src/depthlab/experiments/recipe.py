"""`depthlab recipe`: a depth-effective config for L layers near a parameter target.

The rule of thumb (the paper's findings, docs/reproduce.md for our own re-checks):
long context near the measured sweet spot, moderate weight decay, grouped-query attention,
and an MoE with fine-grained experts. Width is then solved so that the TOTAL parameter
count (or, with `active=True`, the parameters active per token) lands within 5 % of the
target (the MLP / expert hidden size absorbs the rest).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from depthlab.config import RunConfig, build_config
from depthlab.errors import DepthlabError
from depthlab.experiments.reproduce import RESULTS_FILE
from depthlab.experiments.verdict import FAILS, HOLDS
from depthlab.text import counted, fmt_params

SWEET_SPOT_T = 4096
TOKENS_PER_STEP = 2**19  # ~0.5M tokens per optimiser step
HEAD_DIM = 64
TOLERANCE = 0.05
MIN_CONTEXT = 64
MIN_STEPS = 100
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str, option: str = "count") -> int:
    """`1.2B` -> 1_200_000_000; `350M`, `20b`, `5e8`, `123456` also work."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kmbtKMBT]?)\s*", str(text))
    if not m:
        raise DepthlabError(f"{option} must be a number like 350M or 1.2B, got {text!r}")
    value = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if value < 1:
        raise DepthlabError(f"{option} must be positive, got {text!r}")
    return int(value)


@dataclass
class Choice:
    knob: str
    value: str
    why: str
    evidence: list[str] = field(default_factory=list)
    caveat: str | None = None
    """Set when the cited re-check did not confirm the paper's claim."""
    cites: bool = True
    """False for choices that are arithmetic, with no claim to cite."""


@dataclass
class Recipe:
    config: dict[str, Any]
    cfg: RunConfig
    params: int
    active_params: int
    target: int
    choices: list[Choice]
    budget_kind: str = "total"
    """Which count the target is: "total" or "active" parameters."""
    overall: Choice | None = None
    """The evidence for the recipe as a whole (the ablation ladder)."""

    def yaml(self) -> str:
        head = (f"# depthlab recipe: {self.cfg.model.n_layers} layers, {fmt_params(self.params)} "
                f"parameters ({fmt_params(self.active_params)} active per token), target "
                f"{fmt_params(self.target)} {self.budget_kind}.\n# Point data.corpus / "
                f"data.tokenizer at your own corpus and tokenizer (vocab {self.cfg.model.vocab_size}).\n")
        return head + yaml.safe_dump(self.config, sort_keys=False)


def _heads(d: int) -> int | None:
    """Heads for width d: head_dim 64 where possible, an even head count (G = 2 needs it)."""
    n = max(2, 2 * round(d / (2 * HEAD_DIM)))
    while n >= 2:
        if d % n == 0 and (d // n) % 2 == 0:
            return n
        n -= 2
    return None


def _count(L: int, d: int, heads: int, kv: int, vocab: int, mlp: int, experts: int | None,
           top_k: int) -> tuple[int, int]:
    """(total, active) DepthLM parameters, untied head, RMSNorm, no QK-norm: an analytic
    count so the solver can try every width cheaply; `sweep.param_counts` on the built
    model is the source of truth and checks the chosen shape."""
    hd = d // heads
    attn = 2 * d * d + 2 * d * kv * hd
    if experts:
        mlp_total, mlp_active = d * experts + 3 * experts * d * mlp, d * experts + 3 * top_k * d * mlp
    else:
        mlp_total = mlp_active = 3 * d * mlp
    per_layer_norms = 2 * d
    shared = 2 * vocab * d + d
    total = shared + L * (attn + mlp_total + per_layer_norms)
    active = shared + L * (attn + mlp_active + per_layer_norms)
    return total, active


def _solve(L: int, target: int, vocab: int, moe: bool, experts: int, top_k: int,
           active: bool = False) -> tuple[int, int, int, int]:
    """(d, heads, kv heads, mlp/expert hidden) closest to the target total (active: the
    target count of parameters active per token)."""
    which = 1 if active else 0
    n_exp = experts if moe else None
    fits: list[tuple[float, float, tuple[int, int, int, int]]] = []
    for d in range(64, 16385, 16):
        heads = _heads(d)
        if heads is None:
            continue
        kv = heads // 2
        base_hidden = d if moe else 32 * math.ceil(8 * d / 3 / 32)
        t0 = _count(L, d, heads, kv, vocab, 0, n_exp, top_k)[which]
        per_unit = _count(L, d, heads, kv, vocab, 1, n_exp, top_k)[which] - t0
        hidden = round((target - t0) / per_unit / 8) * 8 if target > t0 else 0
        # keep the MLP shape sensible: within a factor 2 of the usual hidden size
        if not base_hidden / 2 <= hidden <= base_hidden * 2:
            continue
        total = t0 + hidden * per_unit  # the count is linear in the hidden size
        err = abs(total - target) / target
        # among shapes within 1 %: head dim 64 first, then the usual MLP ratio
        oddness = abs(math.log2(hidden / base_hidden)) + (0.0 if d // heads == HEAD_DIM else 1.0)
        fits.append((err, oddness, (d, heads, kv, hidden)))
    close = [f for f in fits if f[0] <= 0.01]
    best = (min(close, key=lambda f: f[1]) if close else
            min(fits, key=lambda f: f[0]) if fits else None)
    if best is None or best[0] > TOLERANCE:
        raise DepthlabError(
            f"no {'MoE' if moe else 'dense'} shape with {L} layers fits {fmt_params(target)} "
            f"{'active ' if active else ''}parameters within {TOLERANCE:.0%} (vocab {vocab}); "
            f"change --params or --layers"
            + ("" if not moe else ", or try --dense"))
    return best[2]


_REPO_DOCS = Path(__file__).resolve().parents[3] / "docs"
"""docs/ of a source checkout (the committed re-checks), wherever the CWD is."""


Evidence = list[tuple[dict[str, Any], str]]
"""Reproduce results found, each with its source path, in the order they are consulted."""


def _find_evidence(evidence: str | Path | None) -> Evidence:
    """The given results, else every re-check found: small before tiny, and at each scale
    the user's own runs before the committed ones. Each claim cites all of them that hold
    it, so no re-check hides another."""
    candidates = ([Path(evidence)] if evidence is not None else
                  [root / scale for scale in ("small", "tiny")
                   for root in (Path("runs/reproduce"), Path("docs/reproduce"),
                                _REPO_DOCS / "reproduce")])
    found: Evidence = []
    for c in candidates:
        p = c / RESULTS_FILE if c.is_dir() else c
        if not p.is_file() or any(Path(src).resolve() == p.resolve() for _, src in found):
            continue
        try:
            results = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
            raise DepthlabError(f"cannot read reproduce results {p}") from None
        if not _looks_like_results(results):
            raise DepthlabError(f"{p} is not a `depthlab reproduce` results file (expected "
                                "an object with scale and claims)")
        found.append((results, str(p)))
    if evidence is not None and not found:
        raise DepthlabError(f"no reproduce results at {evidence} (run depthlab reproduce first)")
    return found


def _looks_like_results(results: Any) -> bool:
    """The fields _cite reads, with their types."""
    if not isinstance(results, dict) or not isinstance(results.get("claims"), list):
        return False
    return "scale" in results and all(
        isinstance(c, dict) and {"id", "title", "verdict"} <= c.keys()
        and isinstance(c.get("tests"), list)
        and all(isinstance(t, dict) and {"label", "status", "detail"} <= t.keys()
                for t in c["tests"])
        for c in results["claims"])


def _scale_words(results: dict[str, Any]) -> str:
    """' (12 layers, d=128, 2000 steps, 2 seeds)': how small the re-check's models were, so
    a reader can weigh it against the paper's 1B-parameter runs."""
    model = (results.get("base") or {}).get("model") or {}
    parts = [f"{model['n_layers']} layers" if "n_layers" in model else "",
             f"d={model['d_model']}" if "d_model" in model else "",
             f"{results['steps']} steps" if "steps" in results else "",
             f"{results['seeds']} seeds" if "seeds" in results else ""]
    parts = [p for p in parts if p]
    return f" ({', '.join(parts)})" if parts else ""


def _cite(choice: Choice, found: Evidence, claim_id: int) -> Choice:
    """Attach every re-check of claim `claim_id` found to `choice` (a user's quick look
    beside the committed runs, tiny beside small), with a caveat naming each one that does
    not hold it: citing only the first let a confirming re-check hide a contradicting one."""
    against = []
    for results, source in found:
        for c in results["claims"]:
            if c["id"] != claim_id:
                continue
            tests = "; ".join(f"{t['label']}: {t['status']} ({t['detail']})"
                              for t in c["tests"] if t.get("primary"))
            choice.evidence.append(
                f"reproduce --scale {results['scale']}{_scale_words(results)} claim "
                f"{claim_id} ({c['title']}): {c['verdict']} - {tests} [{source}]")
            if c["verdict"] != HOLDS:
                seen = "contradicts" if c["verdict"] == FAILS else "does not confirm"
                against.append(f"the {results['scale']}-scale re-check in {source} {seen} the "
                               "paper here")
    if against:
        choice.caveat = "; ".join(against) + "; this choice follows the paper's result"
    if choice.evidence or not found:
        return choice
    if found:
        choice.evidence = [f"paper only (claim {claim_id} is in none of "
                           f"{', '.join(src for _, src in found)}; run `depthlab reproduce "
                           f"--claims {claim_id}`)"]
    return choice


def make_recipe(layers: int, params: int, *, context: int | None = None, tokens: int | None = None,
                vocab_size: int = 50304, moe: bool = True, experts: int = 64, top_k: int = 8,
                evidence: str | Path | None = None, active: bool = False) -> Recipe:
    """Build, validate and explain a config (see the module docstring)."""
    if layers < 1:
        raise DepthlabError(f"--layers must be >= 1, got {layers}")
    if vocab_size < 257:
        raise DepthlabError(f"--vocab-size must be >= 257 (the byte tokenizer's), got {vocab_size}")
    if moe and experts < 1:
        raise DepthlabError(f"--experts must be >= 1, got {experts} (or use --dense)")
    if moe and not 1 <= top_k <= experts:
        raise DepthlabError(f"--top-k must be between 1 and --experts ({experts}), got {top_k}")
    T = SWEET_SPOT_T if context is None else context
    if not MIN_CONTEXT <= T <= TOKENS_PER_STEP:
        raise DepthlabError(f"--context must be between {MIN_CONTEXT} and {TOKENS_PER_STEP:,} "
                            f"(the tokens of one optimiser step), got {T}")
    d, heads, kv, hidden = _solve(layers, params, vocab_size, moe, experts, top_k, active)
    wd = 0.1 if layers < 24 else 0.3
    seqs = max(1, TOKENS_PER_STEP // T)
    micro = max(1, min(seqs, 16384 // T))
    while seqs % micro:
        micro -= 1
    steps = math.ceil(tokens / (seqs * T)) if tokens else 100_000
    if steps < MIN_STEPS:
        raise DepthlabError(f"--budget {fmt_params(tokens)} tokens is "
                            f"{counted(steps, 'optimiser step')} of {seqs * T:,} tokens; "
                            "a warmup + cosine schedule needs at least "
                            f"{MIN_STEPS} ({fmt_params(MIN_STEPS * seqs * T)} tokens)")
    model: dict[str, Any] = {"vocab_size": vocab_size, "n_layers": layers, "d_model": d,
                             "n_heads": heads, "n_kv_heads": kv, "max_seq_len": T,
                             "init": "paper"}
    if moe:
        model["moe"] = {"num_experts": experts, "top_k": top_k, "expert_hidden": hidden,
                        "shared_expert": False, "lb_loss_weight": 0.01, "z_loss_weight": 0.001}
    else:
        model["mlp_hidden"] = hidden
    raw = {
        "name": f"recipe_L{layers}",
        "model": model,
        # the tokenizer's vocabulary matches the model's (replace the corpus with your data)
        "data": ({"corpus": "kjv", "tokenizer": "bpe", "bpe_vocab_size": vocab_size,
                  "seq_len": T} if vocab_size >= 260 else
                 {"corpus": "kjv", "tokenizer": "byte", "seq_len": T}),
        "train": {"max_steps": steps, "batch_size": micro, "global_batch_size": seqs,
                  "lr": 4e-4, "beta1": 0.9, "beta2": 0.95, "weight_decay": wd,
                  "min_lr_ratio": 0.1, "warmup_steps": min(2000, max(1, steps // 20)),
                  "grad_clip": 1.0, "eval_interval": 1000, "ckpt_interval": 1000},
    }
    cfg = build_config(raw)
    from depthlab.experiments.sweep import param_counts

    total, n_active, _ = param_counts(cfg)
    assert total is not None and n_active is not None
    matched, kind = (n_active, "active") if active else (total, "total")
    if abs(matched - params) / params > TOLERANCE:  # the analytic count and the model disagree
        raise DepthlabError(f"recipe shape has {matched:,} {kind} parameters, not within "
                            f"{TOLERANCE:.0%} of {params:,}; please report this")
    found = _find_evidence(evidence)
    choices = [
        _cite(Choice("context T", str(T),
                     "long context makes attention sparse (each query spreads over more keys), "
                     "which damps variance growth; the paper's sweet spot is T = 2048-4096"
                     + ("" if context is None else " (you fixed T)")), found, 4),
        _cite(Choice("weight decay lambda", f"{wd:g}",
                     "weight decay sparsifies weights and lowers last-layer variance; lambda = 0.1 "
                     "gave the paper's best PPL at 16 layers, and its 32-layer ladder gained with "
                     "0.3"), found, 3),
        _cite(Choice("GQA group size G", f"{heads // kv} ({heads} query heads, {kv} KV heads)",
                     "sharing keys/values across heads raised usefulness at equal PPL in the "
                     "paper (G = 2 in its 32-layer ladder, G = 16 best at 1.2B)"),
              found, 5),
        _cite(Choice("MoE" if moe else "MLP",
                     f"{experts} experts, top-{top_k}, expert hidden {hidden}" if moe
                     else f"dense SwiGLU, hidden {hidden}",
                     "fine-grained experts make each token's MLP sparse; the paper's MoE beat "
                     "dense by > 2 PPL with usefulness 0.94" if moe else "dense MLP (--dense)",
                     cites=moe), found if moe else [], 6),
        Choice("width d", f"{d} (head dim {d // heads})",
               f"solved so that the {kind} count is {fmt_params(matched)} for a "
               f"{fmt_params(params)} target ({(matched - params) / params:+.1%}); "
               f"{fmt_params(total)} total, {fmt_params(n_active)} active per token",
               cites=False),
        Choice("schedule", f"lr 4e-4 cosine to 0.1x, betas (0.9, 0.95), clip 1.0, {seqs} x {T} "
               f"tokens/step, {steps} steps", "the paper's optimiser settings" +
               (f"; {fmt_params(tokens)} tokens" if tokens else "; set --budget for max_steps"),
               cites=False),
    ]
    overall = _cite(Choice("the recipe as a whole", "baseline -> +T -> +lambda -> +G"
                           + (" -> +MoE" if moe else " (stops before the ladder's +MoE rung)"),
                           "in the paper, each rung of its ablation ladder lowered PPL"), found, 7)
    if any(e.startswith("reproduce") for e in overall.evidence):  # its test: the ladder's ends
        ends = ("the re-check compares the ladder's ends (baseline vs every rung), not each "
                "rung: read the PPL per rung above")
        if not moe:
            ends += "; its end includes +MoE, which this dense recipe leaves out"
        overall.caveat = f"{overall.caveat}; {ends}" if overall.caveat else ends
    return Recipe(raw, cfg, total, n_active, params, choices, budget_kind=kind, overall=overall)


def render(rec: Recipe, explain: bool = False) -> str:
    """A short plain-text explanation (one line per choice; evidence and caveats with
    --explain)."""
    lines = [f"recipe for L={rec.cfg.model.n_layers}: {fmt_params(rec.params)} parameters "
             f"({fmt_params(rec.active_params)} active), target {fmt_params(rec.target)} "
             f"{rec.budget_kind}"]
    shown = rec.choices + ([rec.overall] if explain and rec.overall else [])
    for c in shown:
        lines.append(f"- {c.knob}: {c.value} - {c.why}")
        if not explain or not c.cites:
            continue
        if c.evidence:
            lines += [f"    evidence: {e}" for e in c.evidence]
        else:
            lines.append("    evidence: paper only (no reproduce results found; run "
                         "`depthlab reproduce --scale tiny`)")
        if c.caveat:
            lines.append(f"    caveat: {c.caveat}")
    return "\n".join(lines)
