"""lightning-stthree: sparse training with ST-3 (arXiv:2212.01076), and STR to compare, as Lightning callbacks."""

from lightning_stthree.callback import ST3PruningCallback, STRPruningCallback
from lightning_stthree.export import load_sparse_weights, make_permanent, sparse_state_dict
from lightning_stthree.flops import measure_layer_macs, sparse_macs
from lightning_stthree.inference import (
    LayerChoice,
    SparseConv2d,
    SparseInferenceReport,
    SparseLinear,
    SparseMultiheadAttention,
    restore_sparse_inference,
    to_sparse_inference,
)
from lightning_stthree.layers import PRUNABLE_TYPES, find_prunable_layers
from lightning_stthree.parametrization import (
    SoftThresholdParametrization,
    channel_rescale,
    effective_weight,
    register_st3_parametrization,
    remove_st3_parametrization,
)
from lightning_stthree.report import format_report, sparsity_report
from lightning_stthree.schedule import cubic_sparsity, resolve_step
from lightning_stthree.selection import NonFiniteScoresError
from lightning_stthree.sparse_callback import SparseTrainingCallback
from lightning_stthree.str_pruning import STRParametrization, register_str_parametrization, str_effective_weight
from lightning_stthree.threshold import (
    global_threshold,
    layer_score_factor,
    nonfinite_counts,
    num_pruned,
    pruning_scores,
    weighted_global_threshold,
)

__all__ = [
    "PRUNABLE_TYPES",
    "LayerChoice",
    "NonFiniteScoresError",
    "ST3PruningCallback",
    "STRParametrization",
    "STRPruningCallback",
    "SoftThresholdParametrization",
    "SparseConv2d",
    "SparseInferenceReport",
    "SparseLinear",
    "SparseMultiheadAttention",
    "SparseTrainingCallback",
    "channel_rescale",
    "cubic_sparsity",
    "effective_weight",
    "find_prunable_layers",
    "format_report",
    "global_threshold",
    "layer_score_factor",
    "load_sparse_weights",
    "make_permanent",
    "measure_layer_macs",
    "nonfinite_counts",
    "num_pruned",
    "pruning_scores",
    "register_st3_parametrization",
    "register_str_parametrization",
    "remove_st3_parametrization",
    "resolve_step",
    "restore_sparse_inference",
    "sparse_macs",
    "sparse_state_dict",
    "sparsity_report",
    "str_effective_weight",
    "to_sparse_inference",
    "weighted_global_threshold",
]

__version__ = "0.1.0"
