"""The dense MACs a sparse-training callback measures when ``fit`` starts, with what it tells the user about them.

The arithmetic is :func:`~lightning_stthree.core.flops.measure_layer_macs`; this module decides where the example input
comes from (``input_shape`` or the LightningModule's ``example_input_array``) and which problems are errors (with
``budget="flops"``, which needs MACs) or only messages (MACs are then not logged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_stthree.core.flops import measure_layer_macs

if TYPE_CHECKING:
    from lightning_stthree.callbacks.base import SparseTrainingCallback


def measure_fit_macs(
    callback: SparseTrainingCallback, pl_module: pl.LightningModule, all_layers: dict[str, nn.Module]
) -> dict[str, float]:
    """Dense MACs per sample of each of ``all_layers`` (every Linear/Conv layer), or ``{}`` when they cannot be
    measured.

    Raises:
        MisconfigurationException: When the callback needs MACs (``budget="flops"``) and there is no example input,
            the example forward pass fails, or it calls none of the pruned layers.
    """
    name = type(callback).__name__
    pruned = callback.layers
    required = callback._macs_required
    example = callback.example_input(pl_module)
    if example is None:
        if required:
            raise MisconfigurationException(
                f"{name}(budget='flops') needs each layer's MACs, measured from an example input, but "
                f"{type(pl_module).__name__} has no `example_input_array`. HINT: set `self.example_input_array` "
                "in the LightningModule or pass `input_shape=[1, 3, 224, 224]` (your input's shape) to the "
                "callback."
            )
        rank_zero_info(
            f"{name}: MACs are not logged because the model has no `example_input_array`; "
            f"pass `input_shape` to the callback to log {callback.log_prefix}/macs_*."
        )
        return {}
    try:
        layer_macs = measure_layer_macs(pl_module, example, all_layers)
    except Exception as err:
        if required:
            raise MisconfigurationException(
                f"{name}(budget='flops') could not measure MACs: the forward pass on the example input "
                f"failed with {type(err).__name__}: {err}. HINT: check `example_input_array` / `input_shape`."
            ) from err
        rank_zero_warn(
            f"{name}: MACs are not logged: the forward pass on the example input failed with "
            f"{type(err).__name__}: {err}"
        )
        return {}
    uncounted = [layer for layer in pruned if layer_macs[layer] == 0]
    if uncounted and len(uncounted) == len(pruned) and required:
        raise MisconfigurationException(
            f"{name}(budget='flops'): the example input's forward pass called none of the pruned "
            "layers, so they have no MACs. HINT: check `example_input_array` / `input_shape`."
        )
    if uncounted:
        rank_zero_warn(
            f"{name}: {len(uncounted)} pruned layers were not called as modules in the example forward "
            f"pass (used functionally, or only in training mode) and count 0 MACs: {uncounted[:10]}"
            + (" With budget='flops' their weights are pruned as if free." if required else "")
        )
    return layer_macs


def macs_per_weight(
    layer_macs: Mapping[str, float],
    layers: Mapping[str, nn.Module],
    weights: Sequence[torch.Tensor],
    tied: Mapping[str, Sequence[str]],
) -> list[float]:
    """The FLOPs budget's share of each pruned layer's weights: its MACs per sample divided by its weight count, the
    MACs of the other users of a tied tensor (``prune_tied=True``) included (its weights do their work too)."""
    return [
        (layer_macs[name] + sum(layer_macs.get(user, 0.0) for user in tied.get(name, []))) / weight.numel()
        for name, weight in zip(layers, weights, strict=True)
    ]


def activation_input_density(trainer: pl.Trainer) -> dict[str, float] | None:
    """With sparse activations (an :class:`~lightning_stthree.ActivationSparsityCallback` in the Trainer), each
    Linear/Conv layer's fraction of non-zero inputs in the last optimizer step; else ``None``."""
    return next((c.input_density for c in trainer.callbacks if hasattr(c, "input_density")), None)
