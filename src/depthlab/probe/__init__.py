"""Probe: the LayerStack view of any causal LM, and the metrics written against it."""

from depthlab.probe.adapters import SUPPORTED_ARCHS, build_stack
from depthlab.probe.loading import load_model, smollm2_gguf_path
from depthlab.probe.stack import LayerStack, MoERouterInfo

__all__ = [
    "SUPPORTED_ARCHS",
    "LayerStack",
    "MoERouterInfo",
    "build_stack",
    "load_model",
    "smollm2_gguf_path",
]
