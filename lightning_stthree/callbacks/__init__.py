"""The Lightning callbacks: the shared base and one callback per method. They wire the functional core
(:mod:`lightning_stthree.core`) and the parametrizations (:mod:`lightning_stthree.methods`) to Lightning's hooks."""

from lightning_stthree.callbacks.activations import ActivationSparsityCallback
from lightning_stthree.callbacks.base import SparseTrainingCallback
from lightning_stthree.callbacks.st3 import ST3PruningCallback
from lightning_stthree.callbacks.str import STRPruningCallback

__all__ = ["ActivationSparsityCallback", "ST3PruningCallback", "STRPruningCallback", "SparseTrainingCallback"]
