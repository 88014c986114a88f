"""DepthLM and its parts."""

from depthlab.model.attention import Attention, Rotary
from depthlab.model.mlp import SwiGLU
from depthlab.model.moe import MoE, Routing
from depthlab.model.norms import RMSNorm, make_norm
from depthlab.model.transformer import Block, DepthLM, LMOutput

__all__ = [
    "Attention", "Block", "DepthLM", "LMOutput", "MoE", "RMSNorm", "Rotary", "Routing",
    "SwiGLU", "make_norm",
]
