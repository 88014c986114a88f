"""Learning-rate schedules as pure functions of the step (so resume needs no state)."""

from __future__ import annotations

import math

from depthlab.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup to `lr`, then cosine (or WSD: stable, then linear decay over the
    last `wsd_decay_fraction` of training) down to `min_lr_ratio * lr`.
    """
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    total = max(1, cfg.max_steps - 1)
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    decay_start = max(cfg.warmup_steps, int(round(cfg.max_steps * (1 - cfg.wsd_decay_fraction))))
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(1, total - decay_start))
    return peak + (floor - peak) * progress
