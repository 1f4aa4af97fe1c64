"""What the callbacks measure and log: each layer's sparsity, the MACs it leaves, and layers with no weight left.

Plain functions of the layers (parametrized by this package or plain), no Lightning. Sparsity is counted on the raw
weight with the parametrization's :meth:`~lightning_stthree.methods.parametrization.SparseParametrization.pruned`
(one cheap pass over the same entries as the zeros of the effective weight the layer's operation receives); a layer
made permanent, or never parametrized, is counted on its weight. Sharded weights are counted shard by shard and the
counts all-reduced, so every rank gets the global values and every rank must call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_stthree.core.distributed import count_per_tensor
from lightning_stthree.core.flops import sparse_macs
from lightning_stthree.core.layers import pruned_tensor
from lightning_stthree.methods.parametrization import find_sparse_parametrization, raw_weight


def raw_or_plain(module: nn.Module) -> Tensor:
    """The raw weight of a parametrized layer, or the plain pruned tensor of one without this package's
    parametrization (made permanent, or never pruned)."""
    return pruned_tensor(module) if find_sparse_parametrization(module) is None else raw_weight(module)


@torch.no_grad()
def layer_sparsity(layers: Mapping[str, nn.Module]) -> tuple[float, dict[str, float]]:
    """The fraction of exactly-zero effective weights over all ``layers`` (by module name), and per layer.

    Example::

        >>> layer = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     _ = layer.weight[0].zero_()
        >>> layer_sparsity({"fc": layer})
        (0.5, {'fc': 0.5})
    """
    names = list(layers)
    weights = [raw_or_plain(layers[name]) for name in names]
    parametrizations = [find_sparse_parametrization(layers[name]) for name in names]

    def zeros(index: int, part: Tensor) -> Tensor:
        parametrization = parametrizations[index]
        return torch.count_nonzero(part == 0 if parametrization is None else parametrization.pruned(part))

    counts = count_per_tensor(weights, zeros)
    per_layer = {name: count / w.numel() for name, count, w in zip(names, counts, weights, strict=True)}
    return sum(counts) / max(sum(w.numel() for w in weights), 1), per_layer


@torch.no_grad()
def macs_summary(
    layer_macs: Mapping[str, float], pruned_sparsity: Mapping[str, float], others: Mapping[str, nn.Module]
) -> dict[str, float]:
    """Dense and sparse MACs per sample over every layer of ``layer_macs``, and their ratio.

    Args:
        layer_macs: Dense MACs per sample of every Linear/Conv layer, by name (empty: nothing measured).
        pruned_sparsity: The measured sparsity of the pruned layers (:func:`layer_sparsity`).
        others: The layers of ``layer_macs`` that are not pruned: counted with their own (usually full) density.

    Returns:
        ``{"macs_dense", "macs_sparse", "macs_ratio"}``, or ``{}`` when ``layer_macs`` is empty.
    """
    if not layer_macs:
        return {}
    densities = {name: 1.0 - value for name, value in pruned_sparsity.items()}
    tensors = [pruned_tensor(module) for module in others.values()]
    nonzero = count_per_tensor(tensors, lambda _, part: torch.count_nonzero(part))
    for name, weight, count in zip(others, tensors, nonzero, strict=True):
        densities[name] = count / weight.numel()
    dense = sum(layer_macs.values())
    sparse = sparse_macs(layer_macs, densities)
    return {"macs_dense": dense, "macs_sparse": sparse, "macs_ratio": sparse / dense if dense else 1.0}


@torch.no_grad()
def emptied_layers(layers: Mapping[str, nn.Module], per_layer: Mapping[str, float]) -> list[str]:
    """The layers whose every weight is pruned (sparsity 1) although their raw weights are not all zero: pruning,
    not initialisation, emptied them (torchvision ViT's zero-initialised head is not reported)."""
    candidates = [name for name, value in per_layer.items() if value == 1.0 and name in layers]
    nonzero = count_per_tensor(
        [raw_or_plain(layers[name]) for name in candidates], lambda _, part: torch.count_nonzero(part)
    )
    return [name for name, count in zip(candidates, nonzero, strict=True) if count]
