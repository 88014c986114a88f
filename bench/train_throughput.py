"""Training throughput of DepthLM vs. the equivalent Hugging Face transformers model.

One training step = forward + loss (+ MoE auxiliary losses), backward, AdamW step,
zero_grad. Both sides use the same AdamW settings and parameter groups: DepthLM gets
`depthlab.train.optim.build_optimizer`; the HF model gets an AdamW with the same
lr/betas/eps, weight decay on its matrices only (not embeddings, not norm gains).

    dense: configs/cpu/dense.yaml shapes   vs  transformers.LlamaForCausalLM (sdpa, fp32)
    moe:   configs/cpu/moe.yaml shapes with shared_expert=false, qk_norm=true
           vs  transformers.Qwen3MoeForCausalLM (per-head qk-norm, no shared expert,
           top-k renormalised, router aux loss coef 0.01, HF's default experts
           implementation)

Every measurement runs in a fresh subprocess (so peak RSS is per measurement; on CUDA
torch.cuda.max_memory_allocated), and the (case, implementation) measurements are
interleaved over --rounds rounds; the table reports the median over rounds of
(tokens per step / median step time). Both workers import the same modules (transformers
included), so the Python heap the garbage collector walks is the same. On a shared CPU a
measurement whose threads got less than 80 % of their cores (other load; OpenMP threads
then stall on each other) is re-run up to --retries times. Usage:

    .venv/bin/python bench/train_throughput.py [--steps 20] [--warmup 3] [--rounds 3]
        [--threads 2] [--device cpu|cuda] [--dtype fp32|bf16] [--cases dense,moe]
        [--retries 2]

--dtype bf16 runs both sides' forward under torch.autocast(bf16) with fp32 weights and
optimizer, as the trainer does on CUDA by default (train.dtype auto); fp32 (the default)
is what the trainer does on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

VOCAB = 257  # byte tokenizer
CONFIGS = {"dense": ROOT / "configs/cpu/dense.yaml", "moe": ROOT / "configs/cpu/moe.yaml"}
# The MoE comparison uses Qwen3-MoE's layout: per-head QK-norm and no shared expert.
MOE_OVERRIDES = {"model.moe.shared_expert": False, "model.qk_norm": True}
IMPLS = ("ours", "hf")


# ----------------------------------------------------------------------------- models


def run_config(case: str):
    from depthlab.config import load_config

    overrides = {"model.vocab_size": VOCAB}
    if case == "moe":
        overrides.update(MOE_OVERRIDES)
    return load_config(CONFIGS[case], overrides)


def hf_config(case: str, cfg):
    """The transformers config with exactly DepthLM's shapes."""
    m = cfg.model
    common_kw = dict(
        vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.kv_heads, head_dim=m.head_dim,
        hidden_act="silu", max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, use_cache=False,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
    )
    if case == "dense":
        from transformers import LlamaConfig

        hc = LlamaConfig(intermediate_size=m.hidden, mlp_bias=False, **common_kw)
    else:
        from transformers import Qwen3MoeConfig

        moe = m.moe
        hc = Qwen3MoeConfig(
            intermediate_size=moe.expert_hidden, moe_intermediate_size=moe.expert_hidden,
            num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
            norm_topk_prob=moe.renormalize, decoder_sparse_step=1, mlp_only_layers=[],
            use_sliding_window=False, sliding_window=None, output_router_logits=True,
            router_aux_loss_coef=0.01, **common_kw,
        )
    hc._attn_implementation = "sdpa"  # experts implementation: left at HF's default
    hc.dtype = "float32"
    return hc


def build(case: str, impl: str, device: str, dtype: str = "fp32"):
    """(model, optimizer, step_fn(ids, targets) -> loss, info dict)."""
    import contextlib

    import torch

    cfg = run_config(case)
    tc = cfg.train
    if impl == "ours":
        from depthlab.model import DepthLM
        from depthlab.train.optim import build_optimizer

        model = DepthLM(cfg.model).to(device).train()
        opt = build_optimizer(model, tc)

        def forward(ids, targets):
            out = model(ids, targets)
            return out.loss + out.aux_loss if out.aux_loss is not None else out.loss

        info = {"model": "DepthLM"}
    else:
        import transformers
        from transformers import LlamaForCausalLM, Qwen3MoeForCausalLM

        from depthlab.train.optim import fused_adamw_ok

        transformers.logging.set_verbosity_error()
        cls = LlamaForCausalLM if case == "dense" else Qwen3MoeForCausalLM
        model = cls(hf_config(case, cfg)).to(device=device, dtype=torch.float32).train()
        embeds = {id(mod.weight) for mod in model.modules() if isinstance(mod, torch.nn.Embedding)}
        decay = [p for p in model.parameters() if p.ndim >= 2 and id(p) not in embeds]
        no_decay = [p for p in model.parameters() if p.ndim < 2 or id(p) in embeds]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tc.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
            fused=fused_adamw_ok(decay + no_decay) or None,  # the same AdamW kernel as ours
        )
        moe_kw = {"output_router_logits": True} if case == "moe" else {}

        def forward(ids, targets):
            # labels + shift_labels: the loss covers the same T positions as ours; for MoE
            # HF adds router_aux_loss_coef * load-balancing loss to `loss` itself.
            return model(input_ids=ids, labels=targets, shift_labels=targets, use_cache=False,
                         **moe_kw).loss

        info = {
            "model": cls.__name__,
            "attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)
            if case == "moe" else None,
        }

    def autocast():
        if dtype == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(ids, targets):
        with autocast():
            loss = forward(ids, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    info["params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    info["decay_params"] = sum(p.numel() for p in opt.param_groups[0]["params"])
    return cfg, step, info


# ----------------------------------------------------------------------------- worker


def worker(args) -> None:
    import gc

    import torch

    # Same Python heap on both sides: import the HF model code in every worker (the
    # transformers import roughly doubles the objects the cyclic GC has to walk).
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401

    common.set_threads(args.threads)
    device = args.device
    torch.manual_seed(args.seed)
    cfg, step, info = build(args.case, args.impl, device, args.dtype)
    B, T = cfg.train.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, VOCAB, (B, T + 1), generator=g)
    ids, targets = x[:, :-1].contiguous().to(device), x[:, 1:].contiguous().to(device)

    gc.collect()
    common.sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = common.current_rss_bytes()

    first_loss = None
    for _ in range(args.warmup):
        loss = step(ids, targets)
        first_loss = loss.item() if first_loss is None else first_loss
    common.sync(device)
    times = []
    cpu0, wall0 = common.cpu_seconds(), common.now()
    for _ in range(args.steps):
        t0 = common.now()
        step(ids, targets)
        common.sync(device)
        times.append(common.now() - t0)
    cpu_util = (common.cpu_seconds() - cpu0) / (common.now() - wall0)

    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = common.peak_rss_bytes() - base
    step_s = common.median(times)  # robust to a stray slow step on a shared machine
    common.emit_result({
        **info, "case": args.case, "impl": args.impl, "tokens_per_s": B * T / step_s,
        "tokens_per_s_mean": B * T * len(times) / sum(times),
        "step_ms_median": 1e3 * step_s, "peak_mem_bytes": peak,
        "first_loss": first_loss, "tokens_per_step": B * T, "cpu_util": cpu_util,
    })


# ----------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (median taken)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="bf16: forward under bf16 autocast (the trainer's CUDA default)")
    p.add_argument("--cases", default="dense,moe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retries", type=int, default=2,
                   help="re-run a CPU measurement whose threads got < 80%% of their cores")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")

    if args.worker:
        args.case, args.impl = args.worker
        worker(args)
        return

    import torch
    import transformers

    cases = [c for c in args.cases.split(",") if c]
    jobs = [(c, i) for c in cases for i in IMPLS]
    results: dict[tuple[str, str], list[dict]] = {j: [] for j in jobs}
    t_start = common.now()
    reruns = contended = 0
    for r in range(args.rounds):
        shift = r % len(jobs)
        for case, impl in jobs[shift:] + jobs[:shift]:  # rotate the order every round
            best = None
            for attempt in range(args.retries + 1):
                res = common.run_isolated(
                    [__file__, "--worker", case, impl, "--steps", str(args.steps), "--warmup",
                     str(args.warmup), "--threads", str(args.threads), "--device",
                     args.device, "--dtype", args.dtype, "--seed", str(args.seed)],
                    threads=args.threads,
                )
                print(f"  round {r + 1}/{args.rounds} {case:5s} {impl:4s} "
                      f"{res['tokens_per_s']:9.0f} tok/s  {res['peak_mem_bytes'] / 2**20:7.1f} MiB"
                      f"  cpu {res['cpu_util']:.2f}", file=sys.stderr, flush=True)
                if best is None or res["cpu_util"] > best["cpu_util"]:
                    best = res  # the least disturbed attempt
                # our threads got less than ~80% of their cores: something else is running
                busy = args.device == "cpu" and best["cpu_util"] < 0.8 * args.threads
                if not busy:
                    break
                if attempt < args.retries:
                    reruns += 1
                    time.sleep(5)
            contended += busy
            results[(case, impl)].append(best)

    mem_kind = "peak CUDA alloc" if args.device == "cuda" else "peak RSS increase"
    print(f"# train_throughput: device={args.device} dtype={args.dtype} threads={args.threads} "
          f"torch={torch.__version__} transformers={transformers.__version__}")
    print(f"# steps={args.steps} warmup={args.warmup} rounds={args.rounds} "
          f"(tokens/s = tokens per step / median step time; median over rounds; "
          f"each measurement in a fresh process)")
    rows, ratios = [], []
    summary: dict[tuple[str, str], tuple[float, float]] = {}
    for case, impl in jobs:
        rs = results[(case, impl)]
        tps = [x["tokens_per_s"] for x in rs]
        mem = common.median([x["peak_mem_bytes"] for x in rs]) / 2**20
        summary[(case, impl)] = (common.median(tps), mem)
        name = rs[0]["model"]
        if impl == "hf":
            extra = [f"attn={rs[0]['attn_implementation']}"]
            if rs[0]["experts_implementation"]:
                extra.append(f"experts={rs[0]['experts_implementation']}")
            name += f" ({', '.join(extra)})"
        rows.append([case, name, f"{rs[0]['params']:,}", f"{common.median(tps):,.0f}",
                     f"{min(tps):,.0f}-{max(tps):,.0f}",
                     f"{common.median([x['step_ms_median'] for x in rs]):.1f}", f"{mem:.1f}",
                     f"{rs[0]['first_loss']:.3f}"])
    print(common.format_table(
        ["case", "model", "params", "tokens/s", "range", "ms/step", f"{mem_kind} MiB",
         "loss@1"], rows))
    targets = {"dense": 1.1, "moe": 1.5}
    for case in cases:
        (t_o, m_o), (t_h, m_h) = summary[(case, "ours")], summary[(case, "hf")]
        ratio = t_o / t_h
        ok = "met" if ratio >= targets[case] else "NOT met"
        ratios.append([case, f"{ratio:.2f}x", f"{m_o / m_h:.2f}x",
                       f">= {targets[case]}x ({ok})"
                       if args.device == "cpu" and args.dtype == "fp32" else "-"])
    print()
    print(common.format_table(["case", "tokens/s ours/HF", "memory ours/HF", "CPU target"],
                              ratios))
    print(f"# total wall time {common.now() - t_start:.0f} s; {reruns} measurement(s) re-run "
          f"because the CPU was busy with other work, {contended} kept while still contended")


if __name__ == "__main__":
    main()
