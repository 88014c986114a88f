"""Small shared helpers for the benchmarks in bench/: timing, memory, isolation, tables."""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

RESULT_TAG = "BENCH_RESULT "


def set_threads(n: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools it uses) to n threads."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


def thread_env(n: int) -> dict[str, str]:
    """Environment for a child process limited to n threads."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(n)
    return env


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def now() -> float:
    return time.perf_counter()


def emit_result(result: dict) -> None:
    """Child side of `run_isolated`: print one tagged JSON line."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_isolated(argv: Sequence[str], threads: int, timeout: float = 600.0) -> dict:
    """Run `python argv...` in a fresh process and return the dict it passed to `emit_result`."""
    proc = subprocess.run(
        [sys.executable, *argv], env=thread_env(threads), capture_output=True, text=True,
        timeout=timeout,
    )
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(
        f"benchmark child {' '.join(argv)} failed (rc={proc.returncode}):\n"
        f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    )


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])
