"""Probe: the LayerStack view of any causal LM, and the metrics written against it."""

from depthlab.probe.stack import LayerStack, MoERouterInfo


def build_stack(model, **kwargs):  # noqa: ANN001, ANN201
    """Wrap a DepthLM or Hugging Face causal LM as a LayerStack (see `probe.adapters`)."""
    from depthlab.probe.adapters import build_stack as _build

    return _build(model, **kwargs)


__all__ = ["LayerStack", "MoERouterInfo", "build_stack"]
