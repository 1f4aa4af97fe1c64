"""Which layers a sparse-training callback prunes in the model at hand, and what it refuses or leaves dense, and why.

The registry (:mod:`~lightning_stthree.core.registry`) says which layer types are prunable; this module applies it to
a LightningModule when a callback attaches, with the messages a user acts on:

- a layer whose class overrides a registered type's ``forward`` is refused (its forward may transform the weight, so
  the zeros the callback reports would not be the zeros the operation receives), naming the ways out;
- a layer whose tensor other modules hold too (tied weights: a language model's ``lm_head`` and token embedding) is
  left dense, said once: pruning it for one of its users would give one parameter two matrices; with
  ``prune_tied=True`` it is pruned and every other holder reads the same effective weight (:func:`tie_holders`);
- at the end of ``fit``, the zeros the layers' operations receive are checked against the zeros reported
  (:func:`check_received_sparsity`), so a layer type nobody has seen yet cannot make the report lie silently;
- attention layers with separate ``q/k/v_proj_weight``, two callbacks on one layer, and sharded layers a method cannot
  prune are said or refused as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_stthree.core.distributed import is_dtensor
from lightning_stthree.core.layers import (
    find_prunable_layers,
    forward_overriding_layers,
    layer_type,
    output_dim,
    shared_tensors,
    unpruned_attention,
)
from lightning_stthree.methods.measure import layer_sparsity, raw_or_plain, received_sparsity
from lightning_stthree.methods.parametrization import (
    raw_weight,
    reads_tied_weight,
    tensor_holders,
    tie_sparse_parametrization,
)

if TYPE_CHECKING:
    from lightning_stthree.callbacks.base import SparseTrainingCallback


def choose_layers(
    callback: SparseTrainingCallback, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool
) -> dict[str, nn.Module] | None:
    """The layers ``callback`` prunes in ``pl_module``, by name; ``None`` to wait for the final pass.

    ``final=False`` is the early pass over the layers that exist at the callback's ``setup``: an ``exclude`` pattern
    that matches nothing, an empty model or a refused layer is only an error once all layers are built.

    Raises:
        MisconfigurationException: On the final pass, when nothing is left to prune, a layer overrides its registered
            type's ``forward``, two callbacks prune one layer, or a layer is sharded in a way the method cannot prune.
        ValueError: On the final pass, when an ``exclude`` pattern matches no prunable layer.
    """
    name = type(callback).__name__
    types = None if callback._all_types else callback.include_types
    try:
        layers = find_prunable_layers(pl_module, types, callback.exclude)
    except ValueError:
        if final:
            raise
        return None
    transforming = forward_overriding_layers(layers)
    if transforming:
        if not final:
            return None
        _refuse_transforming(name, layers, transforming)
    layers = _without_shared(callback, pl_module, layers, warn=final)
    if not layers and final:
        kinds = "every registered layer type" if types is None else list(types)
        raise MisconfigurationException(
            f"{name} found no layer to prune in {type(pl_module).__name__}: it prunes the weights of {kinds} not "
            f"matched by `exclude={list(callback.exclude)}` (and not tied to other modules). HINT: check "
            "`include_types` and `exclude`, or remove the callback."
        )
    if final and "MultiheadAttention" in callback.include_types:
        separate = [n for n in unpruned_attention(pl_module) if n not in callback._warned_separate_attention]
        if separate:
            callback._warned_separate_attention.update(separate)
            rank_zero_warn(
                f"{name}: the attention layers {separate[:10]} have `kdim`/`vdim` other than `embed_dim`, so their "
                "query/key/value projections are separate tensors (`q/k/v_proj_weight`), which are not pruned; their "
                "`out_proj` is."
            )
    _check_no_overlap(callback, trainer, layers)
    for layer_name, module in layers.items():
        tensor = raw_or_plain(module)
        if output_dim(module) >= tensor.ndim:
            raise MisconfigurationException(
                f"{name}: `{layer_name}` ({layer_type(module).__name__}) is registered with out_dim="
                f"{output_dim(module)}, but its tensor has {tensor.ndim} dims (shape {list(tensor.shape)}). HINT: fix "
                "its `layer_types` entry (out_dim is the output-channel dim of the tensor)."
            )
        _check_shardable(callback, layer_name, module)
    return layers


def _refuse_transforming(name: str, layers: dict[str, nn.Module], transforming: dict[str, str]) -> None:
    paths = sorted({f"{layer_type(layers[n]).__module__}.{layer_type(layers[n]).__qualname__}" for n in transforming})
    listed = [f"{layer} ({cls})" for layer, cls in list(transforming.items())[:10]]
    more = f" and {len(transforming) - 10} more" if len(transforming) > 10 else ""
    raise MisconfigurationException(
        f"{name} refuses {listed}{more}: their classes override the `forward` of a prunable type, so they may "
        "transform the weight before using it (timm's StdConv2d standardises it), and the zeros the callback makes "
        "would not be the zeros the operation receives. HINT: leave them out with "
        f"`exclude={sorted(transforming)[:3]}`, or, if their forward uses the weight as is, register the class: "
        f"`layer_types={{{paths[0]!r}: {{}}}}` (for each of {paths})."
    )


def _without_shared(
    callback: SparseTrainingCallback, pl_module: nn.Module, layers: dict[str, nn.Module], warn: bool
) -> dict[str, nn.Module]:
    if callback.prune_tied:
        return _one_layer_per_tensor(layers)
    shared = shared_tensors(pl_module, layers)
    new = {n: holders for n, holders in shared.items() if n not in callback._warned_shared}
    if warn and new:
        callback._warned_shared.update(new)
        rank_zero_warn(
            f"{type(callback).__name__} leaves {sorted(new)} dense: their weights are also held by "
            f"{dict(list(new.items())[:5])} (tied weights, e.g. an lm_head tied to the token "
            "embedding), and pruning them for one module would give one parameter two different matrices. The report "
            "lists them as not pruned. HINT: pass `prune_tied=True` to prune them for every module that uses them, or "
            "untie them (e.g. `tie_word_embeddings=False` in a Hugging Face config)."
        )
    return {n: m for n, m in layers.items() if n not in shared}


def _one_layer_per_tensor(layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``prune_tied=True``: one pruned layer per tensor, the first by name; the other holders of a tied tensor read
    its effective weight (:func:`tie_holders`)."""
    kept: dict[str, nn.Module] = {}
    seen: set[int] = set()
    for name, module in layers.items():
        tensor = raw_or_plain(module)
        if reads_tied_weight(module) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kept[name] = module
    return kept


def tie_holders(callback: SparseTrainingCallback, pl_module: nn.Module, name: str, layer: nn.Module) -> None:
    """``prune_tied=True``: make every other module holding ``layer``'s raw tensor read its effective weight, said once
    per layer."""
    holders = tensor_holders(pl_module, raw_weight(layer), layer)
    if not holders:
        return
    tie_sparse_parametrization(layer, [(module, attribute) for _, module, attribute in holders])
    names = [holder for holder, _, _ in holders]
    callback._tied[name] = sorted({*callback._tied.get(name, []), *names})
    rank_zero_info(
        f"{type(callback).__name__} prunes `{name}` for every module that uses its tensor (`prune_tied=True`): "
        f"{names} read the same effective weight."
    )


def _check_no_overlap(callback: SparseTrainingCallback, trainer: pl.Trainer, layers: dict[str, nn.Module]) -> None:
    from lightning_stthree.callbacks.base import SparseTrainingCallback

    for other in trainer.callbacks:
        if other is callback or not isinstance(other, SparseTrainingCallback):
            continue
        shared = sorted(set(layers) & set(other.layers))
        if shared:
            raise MisconfigurationException(
                f"Two sparse-training callbacks ({type(callback).__name__} and {type(other).__name__}) prune the same "
                f"layers {shared[:10]}. HINT: give each callback its own layers with `include_types` and `exclude`."
            )


def _check_shardable(callback: SparseTrainingCallback, name: str, module: nn.Module) -> None:
    """A method whose parametrization has parameters of its own cannot prune sharded (FSDP2) weights: FSDP2
    would not manage those parameters, so their gradients would differ across ranks. Nor can sharded layers be
    made permanent at the end of ``fit`` (said now rather than after training)."""
    if not is_dtensor(raw_or_plain(module)):
        return
    if output_dim(module) != 0:
        raise MisconfigurationException(
            f"{type(callback).__name__} cannot prune `{name}` ({layer_type(module).__name__}) sharded: its output "
            f"channels are on dim {output_dim(module)}, and FSDP2 shards dim 0, which splits each output channel "
            f"across ranks (ST-3 rescales each output channel). HINT: add '{name}' to `exclude`, or use DDP."
        )
    if callback.make_permanent_at_end:
        raise MisconfigurationException(
            f"{type(callback).__name__}(make_permanent_at_end=True) cannot make `{name}` permanent: its weight is "
            "sharded (FSDP2 / ModelParallelStrategy), and FSDP2 keeps gathering the raw weight where the "
            "parametrization put it. HINT: drop `make_permanent_at_end`; save a full checkpoint "
            "(`ModelParallelStrategy(save_distributed_checkpoint=False)`) and load its sparse weights into an "
            "unsharded model with `load_sparse_weights`."
        )
    if callback.supports_sharding:
        return
    raise MisconfigurationException(
        f"{type(callback).__name__} cannot prune `{name}`: its weight is sharded (FSDP2 / ModelParallelStrategy), and "
        f"{callback.method_name}'s per-layer threshold parameters would not be sharded and synchronised with it. "
        "HINT: use ST3PruningCallback, or DDP (`strategy='ddp'`)."
    )


def check_received_sparsity(
    callback: SparseTrainingCallback, trainer: pl.Trainer, pl_module: pl.LightningModule
) -> dict[str, float]:
    """Run the example input once and warn (rank zero) about pruned layers whose matrix products or convolutions
    receive fewer zeros than the callback measures on their weights
    (:func:`~lightning_stthree.methods.measure.received_sparsity`): their forward transforms the weight.

    The pass runs under the trainer's precision (autocast for ``"bf16-mixed"``), as training did. Skipped without an
    example input (``example_input_array`` or ``input_shape``) and for sharded (FSDP2) weights.

    Returns:
        The mismatched layers: ``{name: fraction of zeros received}`` (empty when all agree or nothing was checked).
    """
    layers = callback.layers
    example = callback.example_input(pl_module)
    if example is None or not layers or any(is_dtensor(raw_or_plain(m)) for m in layers.values()):
        return {}
    try:
        with trainer.precision_plugin.forward_context():
            received = received_sparsity(pl_module, example, layers)
    except Exception as error:  # the example pass is a check, not the run: say it, do not fail the run
        rank_zero_warn(f"{type(callback).__name__}: could not check the zeros the layers' operations receive: {error}")
        return {}
    _, measured = layer_sparsity(layers)
    tolerance = {n: max(1e-3, 1.5 / raw_or_plain(m).numel()) for n, m in layers.items()}
    wrong = {n: got for n, got in received.items() if got is not None and got < measured[n] - tolerance[n]}
    if wrong:
        shown = {n: f"{measured[n]:.3f} reported, {got:.3f} received" for n, got in list(wrong.items())[:10]}
        rank_zero_warn(
            f"{type(callback).__name__}: the operations of {len(wrong)} pruned layers receive fewer zeros than their "
            f"weights hold ({shown}): their forward transforms the weight, so their reported sparsity is not what "
            "the matrix products and convolutions skip. HINT: exclude them, or unregister their type if it was "
            "registered with `layer_types`."
        )
    return wrong
