"""Experiments: sweeps over config knobs (and, alongside, recipe / ablation helpers)."""

from depthlab.experiments.sweep import (
    Sweep,
    SweepOutcome,
    SweepRun,
    load_sweep,
    read_status,
    run_state,
    run_sweep,
)

__all__ = ["Sweep", "SweepOutcome", "SweepRun", "load_sweep", "read_status", "run_state",
           "run_sweep"]
