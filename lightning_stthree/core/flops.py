"""Multiply-accumulate (MAC) accounting of prunable layers, the paper's FLOPs convention.

ST-3 reports the cost of a sparse network as its conv + linear MACs per input sample (arXiv:2212.01076, Table 1:
ResNet-50 at 224x224 is 4.09 G MACs dense). A layer's dense MACs are measured once with PyTorch's
:class:`torch.utils.flop_counter.FlopCounterMode` (which counts FLOPs = 2 x MACs per module); a pruned layer's sparse
MACs are its density times its dense MACs.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

# FlopCounterMode counts a multiply-accumulate as two floating-point operations.
FLOPS_PER_MAC = 2


def _batch_size(example_input: Any) -> int:
    if isinstance(example_input, Tensor):
        return int(example_input.shape[0]) if example_input.ndim > 0 else 1
    if isinstance(example_input, Mapping):
        return _batch_size(next(iter(example_input.values())))
    if isinstance(example_input, Sequence) and len(example_input) > 0:
        return _batch_size(example_input[0])
    raise TypeError(f"cannot find the batch size of the example input {type(example_input).__name__}")


def _to_model(example_input: Any, reference: Tensor) -> Any:
    """Move tensors to the model's device; floating tensors also to its floating dtype."""
    if isinstance(example_input, Tensor):
        dtype = reference.dtype if example_input.is_floating_point() else example_input.dtype
        return example_input.to(device=reference.device, dtype=dtype)
    if isinstance(example_input, Mapping):
        return {k: _to_model(v, reference) for k, v in example_input.items()}
    if isinstance(example_input, (list, tuple)):
        return type(example_input)(_to_model(v, reference) for v in example_input)
    return example_input


def call_with_example(model: nn.Module, example_input: Any) -> Any:
    """``model(example_input)`` as Lightning's model summary calls ``example_input_array``: a dict as keywords, a
    list or tuple as positional arguments, anything else as the one argument; tensors moved to the model's device and
    floating ones to its floating dtype."""
    arguments = _to_model(example_input, next(iter(model.parameters())))
    if isinstance(arguments, Mapping):
        return model(**arguments)
    if isinstance(arguments, (list, tuple)):
        return model(*arguments)
    return model(arguments)


@torch.no_grad()
def example_forward(model: nn.Module, example_input: Any, mode: Any) -> Any:
    """One forward pass of ``model`` on ``example_input`` (:func:`call_with_example`) inside ``mode`` (a
    ``TorchDispatchMode``, ``FlopCounterMode``, ...), in eval mode under ``no_grad``, with attention's fused fast path
    off (in eval mode under ``no_grad``, attention and transformer layers would take a fused kernel that bypasses
    their Linear submodules and operations). Every module's train/eval flag and the fast-path setting are restored, so
    batch-norm statistics and every other buffer stay as they are."""
    modes = {module: module.training for module in model.modules()}
    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    model.eval()
    try:
        with mode:
            return call_with_example(model, example_input)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def measure_layer_macs(model: nn.Module, example_input: Any, layers: Mapping[str, nn.Module]) -> dict[str, float]:
    """Dense MACs per input sample of each of ``layers``, from one forward pass of ``model`` on ``example_input``.

    The model is run in eval mode under ``no_grad`` (so batch-norm statistics and every other buffer stay as they are)
    and its train/eval flags are restored afterwards; the forward pre-hooks that record attention layers' input shapes
    are removed afterwards. An example batch of B inputs counts
    1/B of its total. A layer called several times in one forward pass counts each call.

    Args:
        model: The model (parametrized or not); its ``forward`` takes ``example_input`` (a tensor, or a tuple/list
            of positional arguments, or a dict of keyword arguments, as Lightning's ``example_input_array``).
            Layers used through the functional API rather than called or only called in training mode (e.g.
            auxiliary heads) measure 0. ``nn.MultiheadAttention`` counts only its input projections (``in_proj``,
            from the query/key/value shapes of each call; the attention products are not a layer's weights) and gives
            its ``out_proj``, which it uses functionally, the MACs of the calls it made.
        example_input: An example batch; moved to the model's device and floating dtype.
        layers: The layers to report, by module name in ``model`` (e.g. from ``find_prunable_layers``).

    Returns:
        ``{layer name: dense MACs per sample}``; a layer the forward pass never called has 0 MACs.

    Example::

        >>> net = nn.Sequential(nn.Linear(8, 4))
        >>> measure_layer_macs(net, torch.zeros(2, 8), {"0": net[0]})
        {'0': 32.0}
    """
    attention_macs: dict[str, dict[str, float]] = {}
    hooks = [
        module.register_forward_pre_hook(functools.partial(_record_attention, attention_macs, name), with_kwargs=True)
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    ]
    counter = FlopCounterMode(display=False)
    try:  # the fast path is off there, so attention's MACs are attributed to its Linear submodules
        example_forward(model, example_input, counter)
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    batch = _batch_size(example_input)
    macs = {name: sum(counts.get(f"{root}.{name}", {}).values()) / FLOPS_PER_MAC for name in layers}
    # An attention layer's own count also holds its attention products and its `out_proj` (which it calls
    # functionally): count its projections from the shapes it was called with instead.
    for attention, projections in attention_macs.items():
        for suffix, value in projections.items():
            name = f"{attention}.{suffix}" if suffix else attention
            if name in macs:
                macs[name] = value
    return {name: value / batch for name, value in macs.items()}


def _record_attention(
    macs: dict[str, dict[str, float]], name: str, module: nn.MultiheadAttention, args: tuple, kwargs: dict
) -> None:
    """Forward pre-hook: add one call's MACs of the input projections (``""``) and of ``out_proj``."""
    query, key, value = (args[i] if i < len(args) else kwargs[k] for i, k in enumerate(("query", "key", "value")))
    tokens = [t.numel() // t.shape[-1] for t in (query, key, value)]
    embed = module.embed_dim
    widths = (embed, module.kdim, module.vdim)
    calls = macs.setdefault(name, {"": 0.0, "out_proj": 0.0})
    calls[""] += float(sum(n * width * embed for n, width in zip(tokens, widths, strict=True)))
    calls["out_proj"] += float(tokens[0] * embed * embed)


def sparse_macs(dense_macs: Mapping[str, float], densities: Mapping[str, float]) -> float:
    """Sum over layers of ``density x dense MACs``: the MACs left when pruned weights are skipped.

    Args:
        dense_macs: Dense MACs per layer.
        densities: Fraction of non-zero weights per layer (missing layers count as dense).
    """
    return sum(macs * densities.get(name, 1.0) for name, macs in dense_macs.items())
