"""Which weights ST-3 prunes: the ``weight`` of every ``nn.Linear`` and ``nn.Conv1d/2d/3d``, and the packed
``in_proj_weight`` of every ``nn.MultiheadAttention``, narrowed by the user.

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

# Layer types whose pruned tensor has its output channels on dim 0, which the per-channel rescale relies on.
PRUNABLE_TYPES: dict[str, type[nn.Module]] = {
    "Linear": nn.Linear,
    "Conv1d": nn.Conv1d,
    "Conv2d": nn.Conv2d,
    "Conv3d": nn.Conv3d,
    "MultiheadAttention": nn.MultiheadAttention,
}
# The pruned tensor of the types that do not call it `weight`. MultiheadAttention's `in_proj_weight` stacks the query,
# key and value projections' output rows on dim 0; it is None when `kdim`/`vdim` differ from `embed_dim` (then three
# separate `q/k/v_proj_weight` hold them, which are not pruned).
_TENSOR_NAMES: dict[type[nn.Module], str] = {nn.MultiheadAttention: "in_proj_weight"}


def layer_type(module: nn.Module) -> type[nn.Module]:
    """The class ``module`` was built as, before the classes that parametrizations (``Parametrized<Layer>``) and
    FSDP2's ``fully_shard`` (``FSDP<Layer>``) generate around it."""
    for cls in type(module).__mro__:
        if cls.__module__ != parametrize.__name__ and not cls.__module__.startswith("torch.distributed."):
            return cls
    return type(module)


def pruned_tensor_name(module: nn.Module) -> str:
    """The name of the tensor of ``module`` that is pruned: ``"in_proj_weight"`` for ``nn.MultiheadAttention``
    (and subclasses), ``"weight"`` for every other layer."""
    cls = layer_type(module)
    return next((name for base, name in _TENSOR_NAMES.items() if issubclass(cls, base)), "weight")


def pruned_tensor(module: nn.Module) -> Tensor | None:
    """The tensor of ``module`` that is pruned, as the forward pass sees it (the effective weight if parametrized)."""
    return getattr(module, pruned_tensor_name(module), None)


def validate_include_types(include_types: Sequence[str]) -> tuple[str, ...]:
    """Check layer type names given by the user; return them as a tuple.

    Raises:
        TypeError: If ``include_types`` is not a list of non-empty strings.
        ValueError: If it is empty or names a type other than those of :data:`PRUNABLE_TYPES`.
    """
    names = check_strings("include_types", include_types, "layer type names")
    if not names:
        raise ValueError(f"`include_types` must name at least one of {sorted(PRUNABLE_TYPES)}, got an empty list")
    unknown = [name for name in names if name not in PRUNABLE_TYPES]
    if unknown:
        raise ValueError(f"`include_types` has unknown layer types {unknown}; allowed: {sorted(PRUNABLE_TYPES)}")
    return names


def validate_exclude(exclude: Sequence[str]) -> tuple[str, ...]:
    """Check glob patterns on module names given by the user; return them as a tuple.

    Raises:
        TypeError: If ``exclude`` is not a sequence of non-empty strings.
    """
    return check_strings("exclude", exclude, "glob patterns on module names (e.g. ['fc', 'layer4.*'])")


def find_prunable_layers(
    model: nn.Module, include_types: Sequence[str] = tuple(PRUNABLE_TYPES), exclude: Sequence[str] = ()
) -> dict[str, nn.Module]:
    """The modules whose ``weight`` ST-3 prunes, by qualified module name, in ``named_modules`` order.

    A module is prunable when it is an instance of one of ``include_types`` (subclasses included), has its
    :func:`pruned_tensor` (parametrized or not; a ``MultiheadAttention`` with ``kdim``/``vdim`` other than ``embed_dim``
    has no ``in_proj_weight`` and is skipped), and its name matches none of the ``exclude`` glob patterns (``fnmatch``
    syntax, e.g. ``"fc"``, ``"layer4.*"``, ``"*.downsample.0"``).

    Args:
        model: The model to search.
        include_types: Names from :data:`PRUNABLE_TYPES`.
        exclude: Glob patterns on module names.

    Returns:
        ``{module name: module}``.

    Raises:
        ValueError: If a pattern of ``exclude`` matches none of the layers of ``include_types``; the message lists
            the layers it could have matched.
    """
    types = tuple(PRUNABLE_TYPES[name] for name in validate_include_types(include_types))
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
