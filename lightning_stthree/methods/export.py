"""The sparse model the user takes home: permanent layers, and sparse weights out of a checkpoint.

A model under ST-3 keeps each pruned layer's raw weight (``<layer>.parametrizations.weight.original``, what the
optimizer updates) and derives the effective, zero-filled weight from it. Its ``state_dict`` carries both: the raw
weight (to resume) and the effective weight under the plain ``<layer>.weight`` key (to load anywhere).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_stthree.methods.parametrization import RAW_KEY_PATTERN, remove_sparse_parametrization
from lightning_stthree.methods.st3 import find_sparse_parametrization

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_PARAMETRIZATION_MARK = ".parametrizations."


def make_permanent(model: ModuleT) -> ModuleT:
    """Remove every ST-3 parametrization of ``model`` in place, leaving plain layers with sparse weights.

    Afterwards each pruned layer is an ordinary ``nn.Linear``/``nn.Conv*`` (``type(layer) is nn.Conv2d``) whose
    ``weight`` Parameter holds the effective weight (exact zeros included); ``state_dict`` keys are the original ones,
    and the model pickles, deep-copies and loads without this package. The raw values of pruned weights are gone, so
    training continued from here cannot bring them back the straight-through way.

    Args:
        model: Any module; layers without an ST-3 parametrization are left alone.

    Returns:
        ``model`` itself.

    Example::

        trainer.fit(model)
        make_permanent(model)
        torch.save(model.state_dict(), "sparse.pt")
    """
    for module in list(model.modules()):  # a list: removing one may change another's children (a tied holder)
        if find_sparse_parametrization(module) is not None:
            remove_sparse_parametrization(module)
    return model


def _load_checkpoint(checkpoint: str | os.PathLike[str] | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(checkpoint, (str, os.PathLike)):
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    return checkpoint


def sparse_state_dict(checkpoint: str | os.PathLike[str] | Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    """The plain state dict of the sparse model in an ST-3 checkpoint: effective weights under their ``weight`` keys.

    Args:
        checkpoint: A path to a Lightning ``.ckpt`` (loaded with ``weights_only=True``), a loaded checkpoint (a dict
            with a ``"state_dict"``), or a model ``state_dict``.
        prefix: Keep only the keys under this prefix, with the prefix removed, e.g. ``"model."`` to get the state dict
            of the network a LightningModule holds as ``self.model``.

    Returns:
        A new dict without any ``parametrizations`` key, ready for ``load_state_dict`` of the unparametrized model.

    Raises:
        KeyError: If ``checkpoint`` has no ``"state_dict"`` and is not a state dict, or if a raw ST-3 weight comes
            without its effective weight (a state dict written by another tool).
    """
    loaded = _load_checkpoint(checkpoint)
    state = loaded.get("state_dict", loaded)
    if not all(isinstance(k, str) for k in state):
        raise KeyError("`checkpoint` is neither a Lightning checkpoint (no 'state_dict' entry) nor a state dict")
    for key in state:
        raw = RAW_KEY_PATTERN.match(key)
        if raw is not None:
            effective = raw["prefix"] + raw["name"]
            if effective not in state:
                raise KeyError(
                    f"The checkpoint has the raw ST-3 weight '{key}' but not the effective weight '{effective}'; it "
                    "was not written by lightning_stthree. Load it into the parametrized model, then `make_permanent`."
                )
    return {
        key[len(prefix) :]: value
        for key, value in state.items()
        if key.startswith(prefix) and _PARAMETRIZATION_MARK not in "." + key
    }


def load_sparse_weights(
    model: ModuleT, checkpoint: str | os.PathLike[str] | Mapping[str, Any], prefix: str = "", strict: bool = True
) -> ModuleT:
    """Load the sparse weights of an ST-3 checkpoint into a plain (or ST-3) ``model``, in one call.

    Args:
        model: The model to load into, e.g. a freshly built LightningModule or the network it wraps.
        checkpoint: As for :func:`sparse_state_dict`.
        prefix: As for :func:`sparse_state_dict` (``"model."`` for a network held as ``self.model``).
        strict: Passed to ``load_state_dict``.

    Returns:
        ``model``, with the effective weights of the checkpoint.

    Example::

        model = load_sparse_weights(MyModule(), "epoch=159.ckpt").eval()
    """
    model.load_state_dict(sparse_state_dict(checkpoint, prefix), strict=strict)
    return model
