"""How far could faster elementwise kernels take the MoE training step? A headroom bound.

`train_throughput.py` measures DepthLM's MoE step against Qwen3-MoE. This script asks what
the ratio would be if the parts of our step that are neither matmuls nor attention kernels
cost (almost) nothing. It times the same step with components swapped for stand-ins that
keep the tensor shapes and the matmuls but do the least memory work a fused kernel could
do (forward: one copy; backward: pass the gradient through or concatenate it):

    norms    every RMSNorm (two per block and the final norm)
    rope     QK-norm + rotary embedding (QKVRopeFunction: a plain q/k/v split instead)
    swiglu   the experts' silu(gate) * up and its backward (a copy of `up` instead)
    all      the three together

The stand-ins compute the wrong function: the numbers are a bound on what kernel fusion of
these components can buy, not a result, and the script is not used anywhere else. Each
measurement runs in a fresh process; measurements are interleaved over --rounds rounds and
the table shows medians.

    .venv/bin/python bench/moe_headroom.py [--steps 20] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

# variant -> the components it replaces by stand-ins ("hf" runs Qwen3-MoE instead)
STAND_INS: dict[str, set[str]] = {
    "hf": set(), "ours": set(), "norms": {"norms"}, "rope": {"rope"}, "swiglu": {"swiglu"},
    "all": {"norms", "rope", "swiglu"},
}
VARIANTS = tuple(STAND_INS)


def install_stand_ins(free: set[str]) -> None:
    """Swap the named components of DepthLM's training path for minimal-traffic stand-ins."""
    import torch

    import depthlab.model.attention as attention
    import depthlab.model.fused as fused
    import depthlab.model.norms as norms

    class CopyNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps):
            return x.clone()

        @staticmethod
        def backward(ctx, dy):
            return dy, None, None

    class SplitQKV(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, gains, freqs, freqs_conj, H, Hkv, eps):
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
            return q.clone(), k.clone(), v.clone()

        @staticmethod
        def backward(ctx, dq, dk, dv):
            return torch.cat([dq, dk, dv], dim=2), None, None, None, None, None, None

    def copy_up(h):
        gate, up = h.chunk(2, dim=-1)
        return gate, up.contiguous()

    def pass_back(da, h, s):
        return torch.cat([da, da], dim=-1)

    if "norms" in free:
        norms.RMSNormFunction = CopyNorm
    if "rope" in free:
        attention.QKVRopeFunction = SplitQKV
    if "swiglu" in free:
        fused._silu_mul, fused._silu_mul_backward = copy_up, pass_back


def worker(variant: str, steps: int, threads: int) -> None:
    """train_throughput's own measurement, after swapping in the variant's stand-ins."""
    import train_throughput

    install_stand_ins(STAND_INS[variant])
    train_throughput.worker(argparse.Namespace(
        case="moe", impl="hf" if variant == "hf" else "ours", steps=steps, warmup=3,
        threads=threads, device="cpu", seed=0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.threads)
        return
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS):] + VARIANTS[: r % len(VARIANTS)]
        for v in order:
            res = common.run_isolated([__file__, "--worker", v, "--steps", str(args.steps),
                                       "--threads", str(args.threads)], threads=args.threads)
            times[v].append(res["step_ms_median"])
            print(f"  round {r + 1}/{args.rounds} {v:6s} {res['step_ms_median']:7.1f} ms/step",
                  file=sys.stderr, flush=True)
    ms = {v: common.median(t) for v, t in times.items()}
    rows = []
    for v in VARIANTS:
        saved = "-" if v == "hf" else f"{ms['ours'] - ms[v]:.1f}"
        rows.append([v, f"{ms[v]:.1f}", saved, f"{ms['hf'] / ms[v]:.2f}x"])
    print(f"# moe_headroom: threads={args.threads} steps={args.steps} rounds={args.rounds}; "
          "stand-ins compute the wrong function (a bound, not a result)")
    print(common.format_table(["variant", "ms/step", "ms saved vs ours", "tokens/s vs hf"], rows))
    need = ms["hf"] / 1.5
    print(f"# 1.5x needs <= {need:.1f} ms/step: {ms['ours'] - need:.1f} ms less than ours; "
          f"free norms + rope + swiglu save {ms['ours'] - ms['all']:.1f} ms")


if __name__ == "__main__":
    main()
