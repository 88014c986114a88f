"""Training: optimiser groups, schedules, checkpoints, loggers and the loop."""

from depthlab.train.trainer import Trainer, TrainSummary, load_run_model, read_run_config, train

__all__ = ["Trainer", "TrainSummary", "load_run_model", "read_run_config", "train"]
