"""lightning-stthree: sparse training with ST-3 (arXiv:2212.01076) as a PyTorch Lightning callback."""

from lightning_stthree.callback import ST3PruningCallback
from lightning_stthree.layers import PRUNABLE_TYPES, find_prunable_layers
from lightning_stthree.parametrization import SoftThresholdParametrization, channel_rescale, effective_weight
from lightning_stthree.schedule import cubic_sparsity, resolve_step
from lightning_stthree.threshold import global_threshold, layer_score_factor, num_pruned, pruning_scores

__all__ = [
    "PRUNABLE_TYPES",
    "ST3PruningCallback",
    "SoftThresholdParametrization",
    "channel_rescale",
    "cubic_sparsity",
    "effective_weight",
    "find_prunable_layers",
    "global_threshold",
    "layer_score_factor",
    "num_pruned",
    "pruning_scores",
    "resolve_step",
]

__version__ = "0.1.0"
