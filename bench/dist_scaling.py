"""Data-parallel scaling on CPU: tokens/s of 1 process vs 2 processes (gloo) on the tiny preset.

Every measurement is a fresh `depthlab train` of configs/cpu/tiny.yaml (L=8, d=128,
16 x 128 tokens per process and micro-batch; statistics, TensorBoard, evaluation and
checkpoints moved out of the timed window), launched as a user would:

    1p x 1t      python -m depthlab.cli train ...              (OMP_NUM_THREADS=1)
    1p x 2t      python -m depthlab.cli train ...              (OMP_NUM_THREADS=2)
    2p ddp       torchrun --nproc_per_node=2 -m depthlab.cli train ... (1 thread each)
    2p fsdp      the same with --set train.distributed=fsdp

Throughput is the global tokens/s that rank 0 logs (log_interval 1), the median over
steps after --warmup; rounds are interleaved and the median over rounds is reported.
Weak scaling: each process keeps its batch of 16, so 2 processes train 2x the tokens per
step; speedup = tokens/s / tokens/s of 1p x 1t. On the project's 2-core machine the ideal
is at most 2x (one core per process) and less when other work shares the cores: each
measurement waits (up to --max-wait s) for the CPUs to be >= --idle idle, and reports the
"other load" during it (CPU time not spent by the benchmark's processes, in cores).

    .venv/bin/python bench/dist_scaling.py [--steps 30] [--warmup 5] [--rounds 3]
        [--cases 1p1t,1p2t,ddp,fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

CONFIG = ROOT / "configs/cpu/tiny.yaml"
CASES = {  # name: (processes, threads per process, strategy)
    "1p1t": (1, 1, None),
    "1p2t": (1, 2, None),
    "ddp": (2, 1, "ddp"),
    "fsdp": (2, 1, "fsdp"),
}
LABELS = {"1p1t": "1 process x 1 thread", "1p2t": "1 process x 2 threads",
          "ddp": "2 processes DDP (gloo) x 1 thread", "fsdp": "2 processes FSDP2 (gloo) x 1 thread"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat, in seconds."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / hz, sum(fields) / hz


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def wait_for_idle(idle: float, max_wait: float) -> float:
    """Wait until a 2 s sample shows >= `idle` idle CPU (or max_wait passed); the fraction."""
    deadline = time.time() + max_wait
    while True:
        b0, t0 = cpu_times()
        time.sleep(2.0)
        b1, t1 = cpu_times()
        frac = 1 - (b1 - b0) / max(t1 - t0, 1e-9)
        if frac >= idle or time.time() > deadline:
            return frac


def measure(case: str, steps: int, warmup: int, out_dir: Path, tag: str) -> dict:
    procs, threads, strategy = CASES[case]
    total = steps + warmup
    overrides = [
        f"out_dir={out_dir}", f"name={tag}", f"train.max_steps={total}",
        "train.warmup_steps=2", "train.log_interval=1", "train.stats_interval=0",
        "train.tensorboard=false", f"train.eval_interval={total}", f"train.ckpt_interval={total}",
        "train.eval_batches=1",
    ]
    if strategy:
        overrides.append(f"train.distributed={strategy}")
    args = ["-m", "depthlab.cli", "train", str(CONFIG), "--no-progress"]
    for o in overrides:
        args += ["--set", o]
    if procs == 1:
        cmd = [sys.executable, *args]
    else:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, f"--nproc_per_node={procs}", "--master_port", str(free_port()), *args]
    env = common.thread_env(threads)
    busy0, wall0, mine0 = *cpu_times(), children_cpu()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    busy1, wall1, mine1 = *cpu_times(), children_cpu()
    seconds = (wall1 - wall0) / (os.cpu_count() or 1)
    other = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / max(seconds, 1e-9)
    if proc.returncode != 0:
        raise RuntimeError(f"{case} failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (out_dir / tag / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup]
    tokens_per_step = records[0]["tokens"] // records[0]["step"]
    return {"tokens_per_s": common.median(tps), "tokens_per_step": tokens_per_step,
            "ms_per_step": 1000 * tokens_per_step / common.median(tps), "other_load": other}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=5, help="steps left out first")
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats (median taken)")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--idle", type=float, default=0.9, help="idle CPU fraction to wait for")
    p.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for it")
    args = p.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    results: dict[str, list[dict]] = {c: [] for c in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for case in cases:
                wait_for_idle(args.idle, args.max_wait)
                res = measure(case, args.steps, args.warmup, Path(tmp), f"{case}_{r}")
                results[case].append(res)
                print(f"round {r} {case}: {res['tokens_per_s']:,.0f} tok/s "
                      f"(other load {res['other_load']:.2f} cores)", file=sys.stderr)
    base = common.median([x["tokens_per_s"] for x in results.get("1p1t", [])]) if "1p1t" in results \
        else None
    rows = []
    for case in cases:
        tps = common.median([x["tokens_per_s"] for x in results[case]])
        ms = common.median([x["ms_per_step"] for x in results[case]])
        rows.append([LABELS[case], f"{results[case][0]['tokens_per_step']:,}", f"{ms:.0f}",
                     f"{tps:,.0f}", f"{tps / base:.2f}x" if base else "-",
                     f"{min(x['tokens_per_s'] for x in results[case]):,.0f}-"
                     f"{max(x['tokens_per_s'] for x in results[case]):,.0f}",
                     f"{common.median([x['other_load'] for x in results[case]]):.2f}"])
    load = os.getloadavg()
    print(common.format_table(
        ["setup", "tokens/step", "ms/step", "tokens/s", "vs 1p x 1t", "range over rounds",
         "other load (cores)"], rows))
    print(f"\n{args.rounds} rounds x {args.steps} steps (+{args.warmup} warm-up); "
          f"load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
