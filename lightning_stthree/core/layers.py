"""Which weights ST-3 prunes: the tensor of every layer of a registered type (:mod:`~lightning_stthree.core.registry`:
the ``weight`` of every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and HF ``Conv1D``, the packed ``in_proj_weight`` of every
``nn.MultiheadAttention``), narrowed by the user.

The paper prunes all Linear and Conv layers, the first convolution and the classifier included; biases and normalisation
layers are never pruned. ``nn.MultiheadAttention`` is not a ``Linear``: it holds its query, key and value projections as
one ``(3 * embed_dim, embed_dim)`` parameter, ``in_proj_weight`` (most of an attention layer's weights; its ``out_proj``
is a ``Linear`` and pruned as one), so it is a prunable type of its own. Users narrow the set with layer type names and
glob patterns on module names, both plain strings so that they can be written in a LightningCLI YAML.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_stthree.core.checks import check_strings
from lightning_stthree.core.registry import overrides_forward, spec_of, type_names, types_named


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` was built as, before the classes that parametrizations (``Parametrized<Layer>``) and
    FSDP2's ``fully_shard`` (``FSDP<Layer>``) generate around it."""
    for cls in type(module).__mro__:
        if cls.__module__ != parametrize.__name__ and not cls.__module__.startswith("torch.distributed."):
            return cls
    return type(module)


def pruned_tensor_name(module: nn.Module) -> str:
    """The name of the tensor of ``module`` that is pruned, from the registry: ``"in_proj_weight"`` for
    ``nn.MultiheadAttention`` (and subclasses), ``"weight"`` for the other built-in layers."""
    return spec_of(layer_type(module)).tensor


def output_dim(module: nn.Module) -> int:
    """The output-channel dim of ``module``'s pruned tensor, from the registry (1 for HF ``Conv1D``, else 0)."""
    return spec_of(layer_type(module)).out_dim


def pruned_tensor(module: nn.Module) -> Tensor | None:
    """The tensor of ``module`` that is pruned, as the forward pass sees it (the effective weight if parametrized)."""
    return getattr(module, pruned_tensor_name(module), None)


def validate_include_types(include_types: Sequence[str]) -> tuple[str, ...]:
    """Check layer type names given by the user; return them as a tuple.

    Raises:
        TypeError: If ``include_types`` is not a list of non-empty strings.
        ValueError: If it is empty or names a type the registry does not know.
    """
    names = check_strings("include_types", include_types, "layer type names")
    allowed = sorted(type_names())
    if not names:
        raise ValueError(f"`include_types` must name at least one of {allowed}, got an empty list")
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise ValueError(
            f"`include_types` has unknown layer types {unknown}; allowed: {allowed}. HINT: register a type of your "
            "own with `layer_types` (or `lightning_stthree.core.registry.register_layer_type`)"
        )
    return names


def validate_exclude(exclude: Sequence[str]) -> tuple[str, ...]:
    """Check glob patterns on module names given by the user; return them as a tuple.

    Raises:
        TypeError: If ``exclude`` is not a sequence of non-empty strings.
    """
    return check_strings("exclude", exclude, "glob patterns on module names (e.g. ['fc', 'layer4.*'])")


def find_prunable_layers(
    model: nn.Module, include_types: Sequence[str] | None = None, exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The modules whose ``weight`` ST-3 prunes, by qualified module name, in ``named_modules`` order.

    A module is prunable when it is an instance of one of ``include_types`` (subclasses included), has its
    :func:`pruned_tensor` (parametrized or not; a ``MultiheadAttention`` with ``kdim``/``vdim`` other than ``embed_dim``
    has no ``in_proj_weight`` and is skipped), and its name matches none of the ``exclude`` glob patterns (``fnmatch``
    syntax, e.g. ``"fc"``, ``"layer4.*"``, ``"*.downsample.0"``).

    Args:
        model: The model to search.
        include_types: Registered type names (:func:`~lightning_stthree.core.registry.type_names`); ``None``: all.
        exclude: Glob patterns on module names.

    Returns:
        ``{module name: module}``.

    Raises:
        ValueError: If a pattern of ``exclude`` matches none of the layers of ``include_types``; the message lists
            the layers it could have matched.
    """
    names = type_names() if include_types is None else validate_include_types(include_types)
    types = types_named(tuple(names))
    patterns = validate_exclude(exclude)
    candidates = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, types)
        and (parametrize.is_parametrized(module, pruned_tensor_name(module)) or pruned_tensor(module) is not None)
    }
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in candidates)]
    if unused:
        names = list(candidates)
        shown = names[:20] + ([f"... ({len(names) - 20} more)"] if len(names) > 20 else [])
        raise ValueError(
            f"`exclude` patterns {unused} match no prunable layer. Prunable layers are: {shown}. "
            "Patterns are fnmatch globs on module names, e.g. 'fc' or 'layer4.*'."
        )
    return {
        name: module for name, module in candidates.items() if not any(fnmatch.fnmatchcase(name, p) for p in patterns)
    }


def unpruned_attention(model: nn.Module) -> list[str]:
    """Names of the ``nn.MultiheadAttention`` modules of ``model`` without a packed ``in_proj_weight`` (``kdim`` or
    ``vdim`` other than ``embed_dim``): their ``q/k/v_proj_weight`` are not pruned (their ``out_proj`` still is)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention) and not module._qkv_same_embed_dim
    ]


def forward_overriding_layers(layers: dict[str, nn.Module]) -> dict[str, str]:
    """The layers whose class derives from a registered type but has a ``forward`` of its own, by name -> class
    name: their forward may transform the tensor (timm's ``StdConv2d`` standardises it), so the zeros of the pruned
    tensor would not be the zeros the operation receives."""
    return {name: layer_type(m).__name__ for name, m in layers.items() if overrides_forward(layer_type(m))}


def shared_tensors(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, list[str]]:
    """The layers whose pruned tensor is a parameter other modules of ``model`` hold too (tied weights, e.g. a language
    model's ``lm_head`` and its token embedding), by layer name -> the names of the other modules holding it."""
    holders: dict[int, dict[int, str]] = {}  # parameter -> {module identity: one of its names}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                holders.setdefault(id(parameter), {}).setdefault(id(module), module_name)
    shared = {}
    for name, layer in layers.items():
        tensor_name = pruned_tensor_name(layer)
        owners = {id(layer)}  # the layer itself, reachable under any name, and where its parametrization keeps it
        if parametrize.is_parametrized(layer, tensor_name):
            owners.add(id(layer.parametrizations[tensor_name]))
            tensor = getattr(layer.parametrizations[tensor_name], "original", None)  # weight_norm keeps two
        else:
            tensor = getattr(layer, tensor_name, None)
        others = [n for owner, n in holders.get(id(tensor), {}).items() if owner not in owners]
        if others:
            shared[name] = sorted(others)
    return shared
