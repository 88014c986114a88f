"""Overhead of training-time layer statistics (train.stats_interval) on the CPU tiny preset.

Two measurements, both on configs/cpu/tiny.yaml (eval and checkpoints moved past the
timed window, log_interval 5 so that every stats step has log-only neighbours):

- paired (within one run with stats on): the extra time of the stats steps (10, 20, ...)
  over the median of the log-only steps (5, 15, ...), divided by `interval` median steps.
  Insensitive to load drift on a shared machine.
- A/B (separate runs): mean step time with stats every 10 steps vs stats off, each run in a
  fresh process, the rounds interleaved; the median over rounds is reported.

    .venv/bin/python bench/stats_overhead.py [--steps 120] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CONFIG = ROOT / "configs/cpu/tiny.yaml"
SKIP = 10  # warm-up steps left out of every average


def worker(args) -> None:
    import torch  # noqa: F401

    from depthlab.config import load_config
    from depthlab.train import Trainer

    common.set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, {
            "name": "bench", "out_dir": tmp, "train.max_steps": args.steps,
            "train.eval_interval": 10 * args.steps, "train.ckpt_interval": 10 * args.steps,
            "train.log_interval": 5, "train.stats_interval": args.interval,
            "train.warmup_steps": min(30, args.steps - 1),  # (timing only: any warm-up)
        })
        trainer = Trainer(cfg, progress=False)
        marks: dict[int, float] = {}
        trainer.callbacks.append(lambda _t, step: marks.__setitem__(step, common.now()))
        trainer.fit()
    steps = sorted(s for s in marks if s > 0)
    times = {s: marks[s] - marks[s - 1] for s in steps if s - 1 in marks}
    window = [s for s in times if SKIP < s < args.steps]
    common.emit_result({
        "interval": args.interval,
        "mean_step_s": statistics.fmean(times[s] for s in window),
        "times": {str(s): times[s] for s in window},
    })


def paired(res: dict, interval: int) -> tuple[float, float, float]:
    """(median plain step s, mean extra s per stats step, overhead fraction)."""
    t = {int(k): v for k, v in res["times"].items()}
    plain = [v for s, v in t.items() if s % 5]
    log_only = [v for s, v in t.items() if s % 5 == 0 and s % interval]
    stats = [v for s, v in t.items() if s % interval == 0]
    extra = statistics.fmean(stats) - statistics.median(log_only)
    step = statistics.median(plain)
    return step, extra, extra / (interval * step)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=120, help="training steps per run")
    p.add_argument("--rounds", type=int, default=3, help="interleaved on/off rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--interval", type=int, default=10, help="stats_interval of the 'on' runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.steps < SKIP + 2 * args.interval:
        p.error(f"--steps must be >= {SKIP + 2 * args.interval}")

    import torch

    from depthlab.config import load_config
    from depthlab.data import prepare

    prepare(load_config(CONFIG).data, progress=False)  # tokenize once, outside the timing
    results: dict[int, list[dict]] = {0: [], args.interval: []}
    for r in range(args.rounds):
        order = [0, args.interval] if r % 2 == 0 else [args.interval, 0]
        for interval in order:
            res = common.run_isolated(
                [__file__, "--worker", "--steps", str(args.steps), "--threads", str(args.threads),
                 "--interval", str(interval)], threads=args.threads)
            results[interval].append(res)
            print(f"  round {r + 1}/{args.rounds} stats_interval={interval:<3d} "
                  f"{1e3 * res['mean_step_s']:7.1f} ms/step", file=sys.stderr, flush=True)

    off = common.median([x["mean_step_s"] for x in results[0]])
    on = common.median([x["mean_step_s"] for x in results[args.interval]])
    pairs = [paired(x, args.interval) for x in results[args.interval]]
    step = common.median([x[0] for x in pairs])
    extra = common.median([x[1] for x in pairs])
    frac = common.median([x[2] for x in pairs])
    print(f"# stats_overhead: {CONFIG.relative_to(ROOT)} threads={args.threads} "
          f"torch={torch.__version__} steps={args.steps} (first {SKIP} excluded) "
          f"rounds={args.rounds}")
    print(common.format_table(
        ["measure", "stats off ms/step", f"stats every {args.interval} ms/step",
         "extra ms per stats step", "overhead"],
        [["paired (within run)", f"{1e3 * step:.1f}", "-", f"{1e3 * extra:.1f}",
          f"{100 * frac:.2f}%"],
         ["A/B (separate runs)", f"{1e3 * off:.1f}", f"{1e3 * on:.1f}", "-",
          f"{100 * (on / off - 1):.2f}%"]]))
    print(f"target: < 3% -> {'met' if frac < 0.03 else 'NOT met'} (paired)")


if __name__ == "__main__":
    main()
