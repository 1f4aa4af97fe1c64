"""The prunable-layer registry: which layer types have a tensor ST-3 may prune, what it is called, where its output
channels are.

Built in: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (``weight``, output channels on dim 0), ``nn.MultiheadAttention`` (its
packed ``in_proj_weight``, output rows on dim 0) and, when ``transformers`` is imported, Hugging Face's ``Conv1D``
(GPT-2's attention and MLP layers: ``weight`` stored ``(in, out)``, output channels on dim 1). ``transformers`` is
never imported by this package: ``Conv1D`` is registered the first time it is looked up with ``transformers`` already
imported, which it is whenever a model holding one exists.

The output dim matters to everything that works per output channel: ST-3's rescale, the export of the sparse model and
the sharding check. Users add types from Python (:func:`register_layer_type`) or from a LightningCLI YAML by import path
(``ST3PruningCallback(layer_types={"mypkg.layers.MyLinear": {"tensor": "weight", "out_dim": 0}})``). A registered
type's own ``forward`` is taken to use the tensor as is (a matrix product or a convolution of it); a subclass that
overrides ``forward`` is not assumed to (timm's ``StdConv2d`` standardises its weight, turning every pruned zero into a
non-zero), so the callbacks refuse it until it is registered itself.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_stthree.core.checks import check_int


@dataclass(frozen=True)
class LayerSpec:
    """How a prunable layer type holds its pruned tensor.

    Attributes:
        tensor: The attribute name of the pruned tensor.
        out_dim: The tensor's output-channel dim (0 for ``nn.Linear`` / ``nn.Conv*``, 1 for HF ``Conv1D``).
    """

    tensor: str = "weight"
    out_dim: int = 0


# In registration order; the names users give in `include_types` are the classes' names.
_REGISTRY: dict[type[nn.Module], LayerSpec] = {
    nn.Linear: LayerSpec(),
    nn.Conv1d: LayerSpec(),
    nn.Conv2d: LayerSpec(),
    nn.Conv3d: LayerSpec(),
    # `in_proj_weight` stacks the query, key and value projections' output rows on dim 0; it is None when `kdim`/`vdim`
    # differ from `embed_dim` (then three separate `q/k/v_proj_weight` hold them, which are not pruned).
    nn.MultiheadAttention: LayerSpec("in_proj_weight"),
}
# Types of packages this one never imports: (module, class name) -> spec, registered once their module is imported.
# Besides HF's Conv1D, subclasses of prunable types whose own `forward` uses the weight as is (read in their source):
# timm's Linear (casts the weight to the input's dtype: zeros stay zeros) and Conv2dSame (pads the input), HF Falcon's
# FalconLinear (`input @ weight.T`). Without them these models' layers would be refused as forward-overriding.
_OPTIONAL: dict[tuple[str, str], LayerSpec] = {
    ("transformers.pytorch_utils", "Conv1D"): LayerSpec(out_dim=1),
    ("timm.layers.linear", "Linear"): LayerSpec(),
    ("timm.layers.conv2d_same", "Conv2dSame"): LayerSpec(),
    ("timm.layers.conv2d_same", "Conv2dSameExport"): LayerSpec(),
    ("transformers.models.falcon.modeling_falcon", "FalconLinear"): LayerSpec(),
}
# The built-in types of 0.1 by name: its `PRUNABLE_TYPES`, and its default `include_types` (callback state keys of
# 0.1's checkpoints hold those names).
PRUNABLE_TYPES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in _REGISTRY}
LEGACY_TYPE_NAMES: tuple[str, ...] = tuple(PRUNABLE_TYPES)


def _registry() -> dict[type[nn.Module], LayerSpec]:
    """The registry itself (not a copy: the lookups below run per layer on the per-step path), with the optional
    built-ins whose packages are imported by now."""
    for (module_name, class_name), spec in _OPTIONAL.items():
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type) and cls not in _REGISTRY:
            _REGISTRY[cls] = spec
    return _REGISTRY


def registered_types() -> dict[type[nn.Module], LayerSpec]:
    """The registered layer types and their specs, in registration order (a copy)."""
    return dict(_registry())


def type_names() -> tuple[str, ...]:
    """The names ``include_types`` accepts: every registered type's class name, and the optional built-ins' names
    (``"Conv1D"``, ...) whether or not their package is imported yet; each name once."""
    names = [cls.__name__ for cls in _registry()] + [name for _, name in _OPTIONAL]
    return tuple(dict.fromkeys(names))


def types_named(names: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    """The registered types with these class names (an optional type whose package is not imported has none)."""
    return tuple(cls for cls in _registry() if cls.__name__ in names)


def register_layer_type(cls: type[nn.Module], tensor: str = "weight", out_dim: int = 0) -> None:
    """Make ``cls`` (and its subclasses that keep its ``forward``) prunable, process-wide.

    Register a type only if its ``forward`` uses the tensor as is (a matrix product or a convolution of it): the
    sparsity the callbacks report is then the sparsity the operation receives.

    Args:
        cls: An ``nn.Module`` subclass.
        tensor: The attribute holding the tensor to prune.
        out_dim: The tensor's output-channel dim (ST-3 rescales each output channel).

    Raises:
        TypeError: If ``cls`` is not an ``nn.Module`` subclass, or ``tensor`` not a non-empty string.
        ValueError: If ``out_dim`` is negative.

    Example::

        >>> class MyLinear(nn.Linear): ...
        >>> register_layer_type(MyLinear)
        >>> "MyLinear" in type_names()
        True
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"`cls` must be an nn.Module subclass, got {cls!r}")
    if not isinstance(tensor, str) or not tensor:
        raise TypeError(f"`tensor` must be the name of the layer's tensor to prune, got {tensor!r}")
    spec = LayerSpec(tensor, check_int("out_dim", out_dim, minimum=0))
    built_in = _OPTIONAL.get((cls.__module__, cls.__name__))
    if built_in is not None and spec != built_in:
        raise ValueError(
            f"{cls.__module__}.{cls.__name__} is built in as {built_in}; registering it as {spec} would prune it "
            "wrongly (e.g. rescale the wrong channels). HINT: leave it out of `layer_types`"
        )
    _REGISTRY[cls] = spec


def register_layer_types(layer_types: Mapping[str, Mapping[str, Any]]) -> None:
    """:func:`register_layer_type` for each ``{"import.path.Class": {"tensor": ..., "out_dim": ...}}`` entry (the
    form a LightningCLI YAML can hold).

    Raises:
        TypeError: If ``layer_types`` is not such a mapping, or an entry has keys other than ``tensor`` and
            ``out_dim``, or its path names something that is not an ``nn.Module`` subclass.
        ValueError: If an import path does not resolve, or an ``out_dim`` is negative.
    """
    if not isinstance(layer_types, Mapping):
        allowed = "a mapping of import paths to {'tensor': ..., 'out_dim': ...}"
        raise TypeError(f"`layer_types` must be {allowed}, got {layer_types!r}")
    for path, settings in layer_types.items():
        if not isinstance(settings, Mapping) or set(settings) - {"tensor", "out_dim"}:
            raise TypeError(
                f"`layer_types[{path!r}]` must be a mapping with the keys 'tensor' and/or 'out_dim', got {settings!r}"
            )
        register_layer_type(_import_type(path), **settings)


def _import_type(path: object) -> type[nn.Module]:
    module_name, _, class_name = str(path).rpartition(".")
    try:
        value = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(
            f"`layer_types` names {path!r}, which does not resolve ({type(error).__name__}: {error}). HINT: give the "
            "full import path of the class, e.g. 'mypkg.layers.MyLinear'"
        ) from error
    if not (isinstance(value, type) and issubclass(value, nn.Module)):
        raise TypeError(f"`layer_types` names {path!r}, which is {value!r}, not an nn.Module subclass")
    return value


def registered_base(cls: type) -> type[nn.Module] | None:
    """The registered type ``cls`` is, or derives from (the nearest in its MRO), or ``None``."""
    registry = _registry()
    return next((base for base in cls.__mro__ if base in registry), None)


def spec_of(cls: type) -> LayerSpec:
    """The spec of ``cls``'s registered base; the default (``weight``, dim 0) for an unregistered type."""
    base = registered_base(cls)
    return LayerSpec() if base is None else _REGISTRY[base]


def overrides_forward(cls: type) -> bool:
    """Whether ``cls`` is a subclass of a registered type with a ``forward`` of its own (not assumed to use its
    tensor as is)."""
    base = registered_base(cls)
    return base is not None and base is not cls and getattr(cls, "forward", None) is not base.forward
