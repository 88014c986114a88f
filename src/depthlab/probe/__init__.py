"""Probe: the LayerStack view of any causal LM, and the metrics written against it.

`diagnose(model, ...)` runs the suite and writes the outputs; `run_suite(stack, ids,
names)` runs metrics on a LayerStack; `compute_*` are the single metrics (with their
result classes, re-exported from `depthlab.probe.metrics`).
"""

from depthlab.probe import metrics
from depthlab.probe.adapters import SUPPORTED_ARCHS, build_stack
from depthlab.probe.diagnose import diagnose
from depthlab.probe.loading import load_model, smollm2_gguf_path
from depthlab.probe.metrics import *  # noqa: F403
from depthlab.probe.stack import LayerStack, MoERouterInfo
from depthlab.probe.suite import run_suite

__all__ = [
    "SUPPORTED_ARCHS",
    "LayerStack",
    "MoERouterInfo",
    "build_stack",
    "diagnose",
    "load_model",
    "run_suite",
    "smollm2_gguf_path",
    *metrics.__all__,
]
