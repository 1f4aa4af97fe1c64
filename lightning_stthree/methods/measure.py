"""What the callbacks measure and log: each layer's sparsity, the MACs it leaves, and layers with no weight left.

Plain functions of the layers (parametrized by this package or plain), no Lightning. Sparsity is counted on the raw
weight with the parametrization's :meth:`~lightning_stthree.methods.parametrization.SparseParametrization.pruned`
(one cheap pass over the same entries as the zeros of the effective weight the layer's operation receives); a layer
made permanent, or never parametrized, is counted on its weight. Sharded weights are counted shard by shard and the
counts all-reduced, so every rank gets the global values and every rank must call these functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_stthree.core.distributed import count_per_tensor
from lightning_stthree.core.flops import example_forward, sparse_macs
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
    layer_macs: Mapping[str, float],
    pruned_sparsity: Mapping[str, float],
    others: Mapping[str, nn.Module],
    input_density: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Dense and sparse MACs per sample over every layer of ``layer_macs``, and their ratio.

    Args:
        layer_macs: Dense MACs per sample of every Linear/Conv layer, by name (empty: nothing measured).
        pruned_sparsity: The measured sparsity of the pruned layers (:func:`layer_sparsity`).
        others: The layers of ``layer_macs`` that are not pruned: counted with their own (usually full) density.
        input_density: The fraction of non-zero elements in each layer's input (sparse activations, from
            :class:`~lightning_stthree.ActivationSparsityCallback`): a zero input element skips its share of the
            layer's work, independently of the zero weights, so a layer's MACs scale by both densities.

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
    for name, value in (input_density or {}).items():
        if name in layer_macs:
            densities[name] = densities.get(name, 1.0) * value
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


# The aten operations that multiply a layer's weight with its input, and the position of the weight among their
# arguments (`linear` reaches dispatch as `addmm(bias, input, weight.t())` or `mm(input, weight.t())`).
_WEIGHT_OPS = {"mm": 1, "addmm": 2, "bmm": 1, "baddbmm": 2, "convolution": 1, "linear": 1}


def _owner(operand: Tensor, running: list[str], sizes: Mapping[str, int]) -> str | None:
    """The watched layer whose weight ``operand`` is: the innermost running one of its size, else a layer inside the
    innermost running one (``nn.MultiheadAttention`` calls its ``out_proj`` functionally, not as a module)."""
    for name in reversed(running):
        if sizes[name] == operand.numel():
            return name
    inner = running[-1] + "." if running[-1] else ""
    return next(
        (n for n, size in sizes.items() if n.startswith(inner) and n != running[-1] and size == operand.numel()), None
    )


@torch.no_grad()
def received_sparsity(model: nn.Module, example_input: Any, layers: Mapping[str, nn.Module]) -> dict[str, float | None]:
    """The fraction of zeros in the weight each layer's matrix products and convolutions really receive, from one
    forward pass of ``model`` on ``example_input`` (eval mode, ``no_grad``; train/eval flags restored).

    A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten ``mm`` / ``addmm`` / ``bmm`` /
    ``baddbmm`` / ``convolution`` / ``linear`` while a layer of ``layers`` runs; the operand with as many entries as
    the layer's pruned tensor is its weight as the operation gets it (transposed, standardised, or whatever the layer's
    forward made of it). This is what the reported sparsity must match: a layer whose forward transforms its weight
    (timm's ``StdConv2d``) receives no zeros whatever its stored weight holds.

    Args:
        model: The model; ``example_input`` as for :func:`~lightning_stthree.core.flops.measure_layer_macs`.
        example_input: An example batch (a tensor, a tuple/list of positional arguments, or a dict of keywords).
        layers: The layers to watch, by name.

    Returns:
        ``{name: fraction of zeros}``, the largest over the layer's calls; ``None`` for a layer none of whose
        operations received a tensor of its weight's size (never called, or used functionally).
    """
    sizes = {name: raw_or_plain(module).numel() for name, module in layers.items()}
    running: list[str] = []
    seen: dict[str, float] = {}

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            position = _WEIGHT_OPS.get(func.overloadpacket.__name__)
            if running and position is not None and len(args) > position:
                operand = args[position]
                name = _owner(operand, running, sizes) if isinstance(operand, Tensor) else None
                if name is not None:
                    zeros = float((operand == 0).sum()) / operand.numel()
                    seen[name] = max(seen.get(name, 0.0), zeros)
            return func(*args, **(kwargs or {}))

    def enter(name: str) -> Any:
        return lambda module, args: running.append(name)  # `append` returns None: the input is kept

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()  # a forward hook that returned the popped name would replace the layer's output

    hooks = []
    for name, module in layers.items():
        hooks.append(module.register_forward_pre_hook(enter(name)))
        hooks.append(module.register_forward_hook(leave, always_call=True))
    try:  # attention's fused fast path, which is not a matrix product of its weight, is off there
        example_forward(model, example_input, _Recorder())
    finally:
        for hook in hooks:
            hook.remove()
    return {name: seen.get(name) for name in layers}
