"""The machinery every sparse parametrization of this package shares: register, find, remove, raw weight, hooks.

A method (ST-3 in :mod:`~lightning_stthree.methods.st3`, STR in :mod:`~lightning_stthree.methods.str`) is a
:class:`SparseParametrization` subclass that turns the raw weight into the effective (sparse) one and says which raw
entries it zeroes. This module puts it on a layer's pruned tensor with ``torch.nn.utils.parametrize`` (the layer keeps
its class, bias and behaviour), adds the state-dict hooks that let a checkpoint load with or without this package,
and takes it off again (:func:`remove_sparse_parametrization`, the effective weight baked into a plain Parameter).
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_stthree.core.distributed import is_dtensor
from lightning_stthree.core.layers import pruned_tensor, pruned_tensor_name


class SparseParametrization(nn.Module):
    """Base of this package's weight parametrizations: what the callbacks, reports and exports rely on.

    A subclass turns the raw weight into the effective (sparse) weight in :meth:`effective` and says which raw entries
    it zeroes (:meth:`pruned`), so that the sparsity can be measured without building the effective weight.

    Attributes:
        reuse_outside_autograd: While ``True``, a forward pass run without autograd (``torch.no_grad()``,
            ``torch.inference_mode()``) returns the effective weight the previous such pass built, as long as the raw
            weight and this parametrization's own tensors (threshold, mask, ``s``) are the same tensors, in the same
            memory, not modified in place since (their version counters), and the settings are the same. The
            callbacks set it for their trainer's validation, test and predict loops, where the weights do not change
            from batch to batch, and unset it at the end of each loop (:meth:`stop_reusing`). It costs one effective
            weight per layer held for the loop (1x the pruned weights). In-place changes through ``.data``, which
            version counters do not see, are not detected. Off by default; never under autograd or
            ``torch.compile``, nor for a DTensor weight (the callbacks leave it off when the raw weights are sharded
            by FSDP2, whose forward passes see each layer's gathered weight).
    """

    #: Whether the effective weight is written into memory kept from one forward pass to the next (ST-3's, see
    #: :class:`~lightning_stthree.methods.st3.SoftThresholdParametrization`); the callbacks turn it off for weights
    #: sharded by FSDP2.
    reuse_memory: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.reuse_outside_autograd = False
        self._reused: tuple[tuple[Any, ...], Tensor] | None = None

    def forward(self, weight: Tensor) -> Tensor:
        """Return the effective weight for the raw ``weight`` (:meth:`effective`, or the one reused, see
        ``reuse_outside_autograd``)."""
        if torch.compiler.is_compiling() or not self.reuse_outside_autograd:
            return self.effective(weight)
        if torch.is_grad_enabled() or is_dtensor(weight):
            self._reused = None
            return self.effective(weight)
        key = self._reuse_key(weight)
        if self._reused is None or self._reused[0] != key:
            self._reused = None  # free the stale one before building the new one
            self._reused = (key, self.effective(weight))
        return self._reused[1]

    def _reuse_key(self, weight: Tensor) -> tuple[Any, ...]:
        tensors = (weight, *self.parameters(recurse=False), *self.buffers(recurse=False))
        return (*((id(t), t.data_ptr(), t._version) for t in tensors), *self._settings())

    def _settings(self) -> tuple[Any, ...]:
        """The plain-Python settings the effective weight depends on (part of the reuse key)."""
        return ()

    def forget_values(self) -> None:
        """Forget the effective weights kept for reuse: the next forward pass rebuilds them (after in-place changes
        made through ``.data``, which version counters do not see)."""
        self._reused = None

    def stop_reusing(self) -> None:
        """Unset ``reuse_outside_autograd`` and drop the effective weight held for reuse."""
        self.reuse_outside_autograd = False
        self._reused = None

    def effective(self, weight: Tensor) -> Tensor:
        """The effective weight for the raw ``weight``."""
        raise NotImplementedError

    @property
    def frozen(self) -> bool:
        """Whether a fixed mask decides what is pruned (fine-tune phase)."""
        return False

    def pruned(self, weight: Tensor) -> Tensor:
        """Boolean mask of the raw ``weight`` entries whose effective value is exactly zero."""
        raise NotImplementedError

    def missing_state(self) -> dict[str, Tensor]:
        """Values for this parametrization's state-dict entries when a plain (dense) state dict is loaded."""
        return {}


# A parametrized tensor's raw value in a state dict: `<module prefix>parametrizations.<tensor name>.original`.
RAW_KEY_PATTERN = re.compile(r"^(?P<prefix>.*?)parametrizations\.(?P<name>[^.]+)\.original$")


def _raw_key(name: str) -> str:
    """State-dict key of the raw tensor ``name`` of a parametrized module, relative to the module's prefix."""
    return f"parametrizations.{name}.original"


def find_sparse_parametrization(module: nn.Module) -> SparseParametrization | None:
    """This package's parametrization (ST-3 or STR) on ``module``'s pruned tensor (``weight``, or
    ``in_proj_weight`` of ``nn.MultiheadAttention``), or ``None``."""
    name = pruned_tensor_name(module)
    if not parametrize.is_parametrized(module, name):
        return None
    found = [p for p in module.parametrizations[name] if isinstance(p, SparseParametrization)]
    return found[0] if found else None


def raw_weight(module: nn.Module) -> Tensor:
    """The raw (unthresholded) weight of a module carrying the ST-3 parametrization: what the optimizer updates."""
    return module.parametrizations[pruned_tensor_name(module)].original


def _save_effective_weight(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook: also save the effective weight under the layer's plain ``weight`` key.

    So a checkpoint of a model under ST-3 (or STR) loads into the same model without this package: the plain model
    takes ``<layer>.weight`` (``<layer>.in_proj_weight`` for attention; zeros included) and ignores the
    ``parametrizations`` keys.
    """
    if find_sparse_parametrization(module) is not None:
        with torch.no_grad():
            state_dict[prefix + pruned_tensor_name(module)] = pruned_tensor(module).detach()


def _load_raw_or_effective(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """``load_state_dict`` pre-hook of a parametrized layer.

    A state dict from a parametrized model has both the raw weight and the derived effective ``weight``: the derived
    one is dropped. A state dict from a dense or permanent model has only ``weight``: it becomes the raw weight, and
    the parametrization's own entries get :meth:`SparseParametrization.missing_state` (threshold 0 for ST-3, the
    current ``s`` for STR), so sparse training can start from pretrained dense weights.
    """
    parametrization = find_sparse_parametrization(module)
    if parametrization is None:
        return
    name = pruned_tensor_name(module)
    plain = prefix + name
    if prefix + _raw_key(name) in state_dict:
        state_dict.pop(plain, None)
    elif plain in state_dict:
        state_dict[prefix + _raw_key(name)] = state_dict.pop(plain)
        for key, value in parametrization.missing_state().items():
            state_dict.setdefault(f"{prefix}parametrizations.{name}.0.{key}", value)


def _open_parametrization_cache(module: nn.Module, args: Any) -> None:
    """Forward pre-hook of a parametrized ``nn.MultiheadAttention``: build its effective ``in_proj_weight`` once
    per call.

    ``nn.MultiheadAttention.forward`` reads ``in_proj_weight`` up to five times per call (checks of its fast path,
    then the computation), and each read of a parametrized tensor recomputes it. Inside
    :func:`torch.nn.utils.parametrize.cached` the first read computes it and the others reuse that tensor (autograd
    included); the cache is dropped when the call ends (:func:`_close_parametrization_cache`). ``torch.compile``
    traces the same (no graph break); not while ``torch.jit.trace`` runs, whose tracing torch's cache refuses.
    """
    if torch.jit.is_tracing():
        return
    context = parametrize.cached()
    context.__enter__()
    module.__dict__["_st3_parametrization_cache"] = context


def _close_parametrization_cache(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook (``always_call``: also when the call raises) closing :func:`_open_parametrization_cache`'s
    cache."""
    context = module.__dict__.pop("_st3_parametrization_cache", None)
    if context is not None:
        context.__exit__(None, None, None)


# Every hook `register_sparse_parametrization` installs, which `remove_sparse_parametrization` removes again.
_HOOKS = (
    _save_effective_weight,
    _load_raw_or_effective,
    _open_parametrization_cache,
    _close_parametrization_cache,
)

ParametrizationT = TypeVar("ParametrizationT", bound=SparseParametrization)


def register_sparse_parametrization(module: nn.Module, parametrization: ParametrizationT) -> ParametrizationT:
    """Put ``parametrization`` on ``module``'s pruned tensor (``weight``, or ``in_proj_weight`` of
    ``nn.MultiheadAttention``), with the state-dict hooks, unless one of its type is there.

    Besides :func:`torch.nn.utils.parametrize.register_parametrization`, this installs two state-dict hooks on
    ``module``: its ``state_dict`` also carries the effective weight under the plain ``weight`` key, and its
    ``load_state_dict`` accepts both parametrized and plain (dense or permanent) state dicts. On an
    ``nn.MultiheadAttention`` it also installs two forward hooks that compute the effective ``in_proj_weight`` once
    per call instead of once per read (:func:`_open_parametrization_cache`).

    Args:
        module: A layer with a ``weight`` (output channels on dim 0).
        parametrization: A new parametrization (moved to the weight's device).

    Returns:
        The parametrization now on ``module.weight``: the one already there if it has ``parametrization``'s type.

    Raises:
        ValueError: If ``module.weight`` already carries another parametrization.
    """
    existing = find_sparse_parametrization(module)
    if type(existing) is type(parametrization):
        return existing  # type: ignore[return-value]
    name = pruned_tensor_name(module)
    if parametrize.is_parametrized(module, name):
        names = [type(p).__name__ for p in module.parametrizations[name]]
        raise ValueError(
            f"`{name}` already has the parametrizations {names}, which {type(parametrization).__name__} cannot "
            "combine with"
        )
    parametrization = parametrization.to(getattr(module, name).device)
    parametrize.register_parametrization(module, name, parametrization)
    module.register_state_dict_post_hook(_save_effective_weight)
    module.register_load_state_dict_pre_hook(_load_raw_or_effective)
    if isinstance(module, nn.MultiheadAttention):
        module.register_forward_pre_hook(_open_parametrization_cache)
        module.register_forward_hook(_close_parametrization_cache, always_call=True)
    return parametrization


class TiedView(nn.Module):
    """On another holder of a pruned layer's tensor (tied weights: a token embedding tied to the ``lm_head``), the
    layer's effective weight: one parameter, one matrix for every user of it.

    The layer's parametrization is referenced, not held as a submodule, so its state (threshold, mask) is saved
    once, with the layer; :func:`remove_sparse_parametrization` of the layer unties the holders first.
    """

    def __init__(self, source: SparseParametrization) -> None:
        super().__init__()
        self.__dict__["source"] = source

    def forward(self, weight: Tensor) -> Tensor:
        """The source layer's effective weight for the shared raw ``weight``."""
        return self.__dict__["source"](weight)


def _tied_names(module: nn.Module) -> list[str]:
    """The tensors of ``module`` that read another layer's effective weight (:class:`TiedView`)."""
    if not parametrize.is_parametrized(module):
        return []
    return [n for n, chain in module.parametrizations.items() if any(isinstance(p, TiedView) for p in chain)]


def _save_tied_effective(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` post-hook of a tied holder: its effective tensor also under the plain key (as a pruned layer's,
    :func:`_save_effective_weight`)."""
    with torch.no_grad():
        for name in _tied_names(module):
            state_dict[prefix + name] = getattr(module, name).detach()


def _load_tied_raw_or_effective(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of a tied holder: a parametrized state dict's derived plain key is dropped; a plain
    one's becomes the raw tensor (which the pruned layer's entry loads too: they are one parameter)."""
    for name in _tied_names(module):
        if prefix + _raw_key(name) in state_dict:
            state_dict.pop(prefix + name, None)
        elif prefix + name in state_dict:
            state_dict[prefix + _raw_key(name)] = state_dict.pop(prefix + name)


_TIED_HOOKS = (_save_tied_effective, _load_tied_raw_or_effective)


def reads_tied_weight(module: nn.Module) -> bool:
    """Whether ``module``'s pruned tensor is another layer's effective weight (:func:`tie_sparse_parametrization`)."""
    return pruned_tensor_name(module) in _tied_names(module)


def tensor_holders(model: nn.Module, tensor: Tensor, layer: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """The other modules of ``model`` holding ``tensor`` as a plain parameter: ``(module name, module, attribute)``
    (``layer``, where its parametrization keeps ``tensor``, and holders already tied are not listed)."""
    own = {id(layer), *(id(chain) for chain in getattr(layer, "parametrizations", {}).values())}
    return [
        (name, module, attribute)
        for name, module in model.named_modules()
        if id(module) not in own and not isinstance(module, parametrize.ParametrizationList)
        for attribute, parameter in module._parameters.items()
        if parameter is tensor
    ]


def tie_sparse_parametrization(module: nn.Module, holders: list[tuple[nn.Module, str]]) -> None:
    """Make every ``(holder, name)``, which holds ``module``'s pruned tensor as ``holder.<name>`` (the same
    Parameter), read ``module``'s effective weight (:class:`TiedView`), with state-dict hooks like a pruned layer's.

    Raises:
        ValueError: If ``module`` carries no sparse parametrization, or a holder does not hold its raw tensor.
    """
    source = find_sparse_parametrization(module)
    if source is None:
        raise ValueError("the layer has no sparse parametrization to share")
    raw = raw_weight(module)
    for holder, name in holders:
        if holder._parameters.get(name) is not raw:
            raise ValueError(f"`{name}` of the {type(holder).__name__} is not the layer's pruned tensor")
        parametrize.register_parametrization(holder, name, TiedView(source), unsafe=True)
        holder.register_state_dict_post_hook(_save_tied_effective)
        holder.register_load_state_dict_pre_hook(_load_tied_raw_or_effective)
    source.__dict__.setdefault("tied", []).extend(holders)


def _untie(parametrization: SparseParametrization) -> None:
    """Give each holder of :func:`tie_sparse_parametrization` its plain tensor back (the shared Parameter)."""
    for holder, name in parametrization.__dict__.pop("tied", []):
        if parametrize.is_parametrized(holder, name):
            _own_class(holder)
            parametrize.remove_parametrizations(holder, name, leave_parametrized=False)
        _drop_hooks(holder)


def remove_sparse_parametrization(module: nn.Module) -> None:
    """Bake the effective weight into a plain ``weight`` Parameter and restore the layer's original class.

    Works for both of this package's parametrizations (ST-3 and STR). The Parameter object is kept (its data
    replaced), so optimizers holding it stay valid. The state-dict and forward hooks of
    :func:`register_sparse_parametrization` are removed too, so the module pickles and loads without this package.

    Raises:
        ValueError: If the raw weight is sharded by FSDP2 (a DTensor).
    """
    if find_sparse_parametrization(module) is None:
        return
    if is_dtensor(raw_weight(module)):
        raise ValueError(
            "the layer's weight is sharded (FSDP2): removing its parametrization would leave FSDP2 gathering a "
            "parameter the layer no longer uses. HINT: gather a full state dict (e.g. a checkpoint with "
            "`ModelParallelStrategy(save_distributed_checkpoint=False)`) and load it into an unsharded model with "
            "`load_sparse_weights`, or call `make_permanent` on such a model"
        )
    _untie(find_sparse_parametrization(module))  # before the raw tensor they share becomes the effective one
    _own_class(module)
    parametrize.remove_parametrizations(module, pruned_tensor_name(module), leave_parametrized=True)
    _drop_hooks(module)


def _own_class(module: nn.Module) -> None:
    """Give ``module`` a parametrized class of its own before a parametrization is removed.

    `copy.deepcopy` of a parametrized module shares torch's generated `Parametrized<Layer>` class with the original,
    and removing a parametrization deletes its property from that class, which would break the other copy
    (`make_permanent(copy.deepcopy(model))` would leave `model` without `weight`).
    """
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k != "__weakref__"})


def _drop_hooks(module: nn.Module) -> None:
    """Remove this module's hooks (torch keeps them in dicts by handle id; a load pre-hook is wrapped in
    `_WrappedHook`)."""
    for hooks in (
        module._state_dict_hooks,
        module._load_state_dict_pre_hooks,
        module._forward_pre_hooks,
        module._forward_hooks,
    ):
        for key in [k for k, h in hooks.items() if getattr(h, "hook", h) in (*_HOOKS, *_TIED_HOOKS)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)
