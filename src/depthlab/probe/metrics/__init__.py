"""Layer-effectiveness metrics, one module per family, each written against a LayerStack.

Every metric is `compute_<name>(stack, ids, *, batch_size, progress, counter, cache,
**options) -> <Result>` with `.to_dict()` (JSON-ready per-layer lists and global
scalars). Definitions: `metrics.md`. Costs are counted in block forwards (one block
on one sequence, see `_common`) and compared with the published scripts' cost.
"""

from depthlab.probe.metrics._common import BlockCounter, HiddenStateCache, MetricResult
from depthlab.probe.metrics.causal import CausalResult, compute_causal
from depthlab.probe.metrics.jacobian import JacobianResult, compute_jacobian
from depthlab.probe.metrics.layerdrop import LayerDropResult, compute_layer_drop
from depthlab.probe.metrics.moe import MoEResult, compute_moe
from depthlab.probe.metrics.permutation import PermutationResult, compute_permutation
from depthlab.probe.metrics.similarity import (
    AngularDistanceResult,
    BlockInfluenceResult,
    LayerSimilarityResult,
    compute_angular_distance,
    compute_block_influence,
    compute_layer_similarity,
)
from depthlab.probe.metrics.sparsity import (
    AttentionSparsityResult,
    WeightSparsityResult,
    compute_attention_sparsity,
    compute_weight_sparsity,
    hoyer,
)
from depthlab.probe.metrics.usefulness import UsefulnessResult, compute_usefulness
from depthlab.probe.metrics.variance import VarianceResult, compute_variance

__all__ = [
    "AngularDistanceResult", "AttentionSparsityResult", "BlockCounter", "BlockInfluenceResult",
    "CausalResult", "HiddenStateCache", "JacobianResult", "LayerDropResult",
    "LayerSimilarityResult", "MetricResult", "MoEResult", "PermutationResult",
    "UsefulnessResult", "VarianceResult", "WeightSparsityResult", "compute_angular_distance",
    "compute_attention_sparsity", "compute_block_influence", "compute_causal",
    "compute_jacobian", "compute_layer_drop", "compute_layer_similarity", "compute_moe",
    "compute_permutation", "compute_usefulness", "compute_variance", "compute_weight_sparsity",
    "hoyer",
]
