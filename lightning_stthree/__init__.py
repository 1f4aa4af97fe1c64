"""lightning-stthree: sparse training with ST-3 (arXiv:2212.01076), and STR to compare, as Lightning callbacks.

The package's folders are its architecture (README, *Architecture*):

- :mod:`~lightning_stthree.core`: the functional core in plain torch, no Lightning (schedule, threshold selection,
  FLOPs arithmetic, prunable layers, sharded counting, fused kernels);
- :mod:`~lightning_stthree.methods`: the sparse parametrizations (the shared machinery, ST-3, STR) and the export of
  the sparse model;
- :mod:`~lightning_stthree.callbacks`: the Lightning wiring;
- :mod:`~lightning_stthree.inference`: sparse kernels for inference;
- :mod:`~lightning_stthree.report` and :mod:`~lightning_stthree.plots`: tables and figures;
- :mod:`~lightning_stthree.recipes`: DataModules, example models and the ``stthree`` command, apart from the library.

This namespace holds what a user calls; everything else is importable from its own module.
"""

from typing import Any

from lightning_stthree import _moved
from lightning_stthree.callbacks import (
    ActivationSparsityCallback,
    SparseTrainingCallback,
    ST3PruningCallback,
    STRPruningCallback,
)
from lightning_stthree.core.layers import find_prunable_layers
from lightning_stthree.core.schedule import cubic_sparsity
from lightning_stthree.core.selection import NonFiniteScoresError
from lightning_stthree.core.threshold import global_threshold, weighted_global_threshold
from lightning_stthree.inference import restore_sparse_inference, to_sparse_inference
from lightning_stthree.methods.export import load_sparse_weights, make_permanent, sparse_state_dict
from lightning_stthree.methods.parametrization import remove_sparse_parametrization
from lightning_stthree.methods.st3 import (
    SoftThresholdParametrization,
    channel_rescale,
    effective_weight,
    register_st3_parametrization,
)
from lightning_stthree.methods.str import STRParametrization, register_str_parametrization, str_effective_weight
from lightning_stthree.report import format_report, sparsity_report

__all__ = [
    "ActivationSparsityCallback",
    "NonFiniteScoresError",
    "ST3PruningCallback",
    "STRParametrization",
    "STRPruningCallback",
    "SoftThresholdParametrization",
    "SparseTrainingCallback",
    "channel_rescale",
    "cubic_sparsity",
    "effective_weight",
    "find_prunable_layers",
    "format_report",
    "global_threshold",
    "load_sparse_weights",
    "make_permanent",
    "register_st3_parametrization",
    "register_str_parametrization",
    "remove_sparse_parametrization",
    "restore_sparse_inference",
    "sparse_state_dict",
    "sparsity_report",
    "str_effective_weight",
    "to_sparse_inference",
    "weighted_global_threshold",
]

__version__ = "0.2.0"

_moved.install()


def __getattr__(name: str) -> Any:
    # The top-level names of 0.1 that left `__all__` still resolve, with a FutureWarning naming their module.
    return _moved.moved_attribute(__name__, name)
