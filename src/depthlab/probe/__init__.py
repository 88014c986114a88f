"""Probe: the LayerStack view of any causal LM, and the metrics written against it.

`diagnose(model, ...)` runs the suite and writes the outputs; `run_suite(stack, ids,
names)` runs metrics on a LayerStack; `compute_*` are the single metrics.
"""

from depthlab.probe.adapters import SUPPORTED_ARCHS, build_stack
from depthlab.probe.diagnose import diagnose
from depthlab.probe.loading import load_model, smollm2_gguf_path
from depthlab.probe.metrics import (
    compute_angular_distance,
    compute_attention_sparsity,
    compute_block_influence,
    compute_causal,
    compute_jacobian,
    compute_layer_drop,
    compute_layer_similarity,
    compute_moe,
    compute_permutation,
    compute_usefulness,
    compute_variance,
    compute_weight_sparsity,
)
from depthlab.probe.stack import LayerStack, MoERouterInfo
from depthlab.probe.suite import run_suite

__all__ = [
    "SUPPORTED_ARCHS",
    "LayerStack",
    "MoERouterInfo",
    "build_stack",
    "compute_angular_distance",
    "compute_attention_sparsity",
    "compute_block_influence",
    "compute_causal",
    "compute_jacobian",
    "compute_layer_drop",
    "compute_layer_similarity",
    "compute_moe",
    "compute_permutation",
    "compute_usefulness",
    "compute_variance",
    "compute_weight_sparsity",
    "diagnose",
    "load_model",
    "run_suite",
    "smollm2_gguf_path",
]
