"""ST-3's effective weight: soft threshold, channel rescale and straight-through gradient (arXiv:2212.01076).

ST-3 never changes a layer's class. Each prunable weight gets a :class:`SoftThresholdParametrization` (through the
shared machinery of :mod:`~lightning_stthree.methods.parametrization`) that turns the raw weight ``w`` (stored as
``parametrizations.weight.original``) into the effective weight used by the forward pass. The maths lives in
:mod:`~lightning_stthree.methods.effective` (:func:`effective_weight`); the parametrization holds the per-layer
threshold buffer and the memory its effective weight is written into, and chooses the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from typing_extensions import override

from lightning_stthree.core.distributed import is_dtensor, on_local_rows
from lightning_stthree.core.kernels import compiled
from lightning_stthree.core.layers import output_dim
from lightning_stthree.methods.effective import (  # noqa: F401 (re-exported: the public names live here too)
    RESCALE_EPSILON,
    RESCALE_OFFSET,
    _effective_weight,
    above_threshold,
    channel_rescale,
    copy_effective_weight,
    effective_weight,
    effective_weight_value,
    try_effective_weight_kernel,
    write_effective_weight,
)
from lightning_stthree.methods.memory import ReusedWeightMemory
from lightning_stthree.methods.parametrization import (
    SparseParametrization,
    find_sparse_parametrization,
    raw_weight,
    register_sparse_parametrization,
)
from lightning_stthree.methods.shrinkage import (
    DEFAULT_FIRM_RATIO,
    Shrinkage,
    check_firm_ratio,
    resolve_shrinkage,
    soft_threshold_alias,
)


class _StraightThroughEffectiveWeight(torch.autograd.Function):
    """:func:`effective_weight` in the forward pass, identity in the backward pass (straight-through estimator).

    With ``memory``, the value is written into (and reused from) that layer's :class:`ReusedWeightMemory`; with
    ``fused``, by one compiled kernel (:func:`~lightning_stthree.core.kernels.compiled`), else by
    :func:`write_effective_weight`. While the caller's own ``torch.compile`` traces it, the eager operations go into its
    graph, which fuses and plans their memory itself.
    """

    # A forward taking `ctx` rather than a separate `setup_context`: autograd's `apply` of the latter form costs about
    # 25 us more per call on a CPU, once per layer and forward pass.
    @staticmethod
    def forward(
        ctx: object,
        weight: Tensor,
        threshold: Tensor,
        shrinkage: str,
        firm_ratio: float,
        rescale: bool,
        fused: bool,
        memory: ReusedWeightMemory | None,
    ) -> Tensor:
        if torch.compiler.is_compiling():
            return effective_weight_value(weight, threshold, shrinkage, rescale, firm_ratio)
        plain = _get_current_dispatch_mode() is None  # no dispatch mode: fused kernels run compiled
        if memory is not None:
            settings = (shrinkage, rescale, firm_ratio)
            if plain and not torch.is_inference_mode_enabled():
                # Detached: torch.compile gives a Parameter static shapes (one kernel per layer shape); a plain tensor
                # gets dynamic ones (one kernel for all layers).
                write = compiled(copy_effective_weight) if fused else write_effective_weight
                return memory.value(
                    weight,
                    (threshold,),
                    settings,
                    lambda raw, out: write(raw.detach(), threshold, shrinkage, rescale, out, firm_ratio),
                )
            # Under a dispatch mode (FLOP counting, the end-of-fit check; fused kernels run eagerly there, with other
            # float rounding) or in inference mode: the value already built, else one built here and not kept.
            reused = memory.reused(weight, (threshold,), settings)
            if reused is not None:
                return reused
        if fused and plain:
            return compiled(_effective_weight)(weight.detach(), threshold, shrinkage, firm_ratio, rescale)
        return effective_weight_value(weight, threshold, shrinkage, rescale, firm_ratio)

    @staticmethod
    def backward(ctx: object, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        return grad_output, None, None, None, None, None, None


class SoftThresholdParametrization(SparseParametrization):
    """Parametrization registered on a prunable ``weight`` by :class:`~lightning_stthree.ST3PruningCallback`.

    Holds this layer's threshold on raw magnitudes as a 0-dim float32 buffer (saved in the ``state_dict``, so a
    checkpoint reproduces the effective weights on its own). The threshold enters the forward pass as a tensor, never as
    a Python number, so changing it never recompiles a compiled model. A threshold of 0 is the identity.

    In the fine-tune phase (:meth:`freeze`) the parametrization instead applies a fixed boolean mask (a
    non-persistent buffer, re-derived from the zeros of the raw weight on resume): ``where(mask, w, 0)``, with
    gradients through kept weights only.

    Args:
        soft_threshold: The older name of ``shrinkage``: ``True`` is ``"soft"``, ``False`` is ``"hard"`` (``None``:
            leave it to ``shrinkage``). Read back, whether the shrinkage is ``"soft"``.
        straight_through: Gradients reach every raw weight unchanged, pruned ones included, so pruned weights can
            grow back (ST-3). ``False`` lets gradients through kept weights only (times the rescale).
        rescale: Per-output-channel rescale of :func:`channel_rescale`.
        compile_kernels: With ``straight_through``, build the effective weight with one fused kernel
            (:mod:`~lightning_stthree.core.kernels`; needs ``torch.compile`` to work here) instead of a chain of eager
            operations. Same values up to float rounding.
        out_dim: The weight's output-channel dim, which the rescale works per (0 for ``nn.Linear`` / ``nn.Conv*``,
            1 for HF ``Conv1D``; :func:`register_st3_parametrization` sets it from the layer registry).
        reuse_memory: With ``straight_through``, write the effective weight into memory kept from one forward pass to
            the next, and reuse its value while the raw weight and the threshold are unchanged
            (:class:`~lightning_stthree.methods.memory.ReusedWeightMemory`: never overwritten while a graph holds it).
            Holds one effective weight per layer between steps (1x the pruned weights). The callback turns it off for
            weights sharded by FSDP2.
        shrinkage: What a kept weight becomes (:mod:`~lightning_stthree.methods.shrinkage`): ``"soft"`` (ST-3's
            default), ``"hard"``, ``"firm"`` or ``"half"``. The pruned set, ``|w| <= t_layer``, is the same for all.
        firm_ratio: ``mu / t`` of the firm threshold, ``> 1``.

    Raises:
        ValueError: If ``shrinkage`` is unknown or contradicts ``soft_threshold``, or ``firm_ratio <= 1``.

    Example::

        >>> from torch.nn.utils import parametrize
        >>> layer = nn.Linear(4, 2)
        >>> parametrize.register_parametrization(layer, "weight", SoftThresholdParametrization())
        ParametrizedLinear(...)
    """

    threshold: Tensor
    mask: Tensor | None
    out_dim: int = 0  # class defaults: parametrizations pickled by 0.1 have no such attributes
    reuse_memory: bool = True
    firm_ratio: float = DEFAULT_FIRM_RATIO

    def __init__(
        self,
        soft_threshold: bool | None = None,
        straight_through: bool = True,
        rescale: bool = True,
        compile_kernels: bool = False,
        out_dim: int = 0,
        reuse_memory: bool = True,
        shrinkage: Shrinkage | None = None,
        firm_ratio: float = DEFAULT_FIRM_RATIO,
    ) -> None:
        super().__init__()
        self.reuse_memory = reuse_memory
        self.memory = ReusedWeightMemory()
        self.shrinkage = resolve_shrinkage(shrinkage, soft_threshold)
        self.firm_ratio = check_firm_ratio(firm_ratio)
        self.straight_through = straight_through
        self.rescale = rescale
        self.compile_kernels = compile_kernels
        self.out_dim = out_dim
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("mask", None, persistent=False)

    @property
    def shrinkage(self) -> str:
        """What a kept weight becomes: ``"soft"``, ``"hard"``, ``"firm"`` or ``"half"``."""
        # A parametrization pickled by 0.1 holds only its `soft_threshold` flag.
        found = vars(self).get("_shrinkage")
        return found if found is not None else resolve_shrinkage(None, vars(self).get("soft_threshold", True))

    @shrinkage.setter
    def shrinkage(self, value: str) -> None:
        vars(self)["_shrinkage"] = resolve_shrinkage(value)

    soft_threshold = soft_threshold_alias()

    @property
    def frozen(self) -> bool:
        """Whether a fixed mask replaces the threshold (fine-tune phase)."""
        return self.mask is not None

    def pruned(self, weight: Tensor) -> Tensor:
        """``|w| <= t_layer`` (exactly where every shrinkage gives zero; the rescale is >= 1), or, in the
        fine-tune phase, the zeros of ``where(mask, w, 0)`` (masked entries and kept weights that are exactly 0)."""
        if self.mask is not None:
            return torch.where(self._mask_like(weight), weight, 0.0) == 0
        return ~above_threshold(weight, self.threshold)

    def missing_state(self) -> dict[str, Tensor]:
        """A dense state dict loads with threshold 0 (unchanged weights until the next threshold update)."""
        return {"threshold": torch.zeros((), dtype=torch.float32)}

    def _apply(self, fn: Any, recurse: bool = True) -> SoftThresholdParametrization:
        """Moves like any module, but the threshold stays float32 when the model is cast (``precision="bf16-true"``
        casts every floating buffer): the selection's threshold is a float32 score, and bf16 would round it."""
        saved = self.threshold.detach().clone()  # before the cast: bf16 would round it for good
        super()._apply(fn, recurse)
        if self.threshold.dtype != torch.float32:
            self.threshold = saved.to(self.threshold.device)
        return self

    def freeze(self, mask: Tensor) -> None:
        """Apply the fixed boolean ``mask`` from now on, instead of the threshold (which is set to 0)."""
        self.threshold.zero_()
        self.mask = mask.to(dtype=torch.bool, device=self.threshold.device)
        self._memory().release()  # the masked weight is built by autograd from here on

    def _mask_like(self, weight: Tensor) -> Tensor:
        """The fixed mask for ``weight``: the whole mask, or this rank's rows of a mask sharded like the raw weight.

        Under FSDP2 the mask is a DTensor sharded like the raw weight; the forward pass sees the gathered weight, and
        then gathers the mask too (one byte per weight, in the fine-tune phase only)."""
        mask = self.mask
        if not is_dtensor(mask):
            return mask
        local = mask.to_local()
        return local if local.shape == weight.shape else mask.full_tensor()

    def effective(self, weight: Tensor) -> Tensor:
        """The effective weight for the raw ``weight`` (a DTensor sharded on dim 0 is thresholded shard by shard: the
        rescale only needs whole output channels). Output channels on another dim are moved to dim 0 for the
        computation (a view, no copy) and back.

        Raises:
            ValueError: If a sharded (DTensor) weight has its output channels on a dim other than 0.
        """
        if self.out_dim == 0 or self.mask is not None:  # the fixed mask is elementwise
            return on_local_rows(self._effective, weight)
        if is_dtensor(weight):
            raise ValueError(
                f"a weight with its output channels on dim {self.out_dim} (e.g. HF Conv1D) cannot be thresholded "
                "shard by shard: FSDP2 shards dim 0, which splits each output channel across ranks"
            )
        return self._effective(weight.movedim(self.out_dim, 0)).movedim(0, self.out_dim)

    def _effective(self, weight: Tensor) -> Tensor:
        if self.mask is not None:
            return torch.where(self._mask_like(weight), weight, 0.0)
        if self.straight_through:
            memory = self._memory() if self.reuse_memory and not is_dtensor(weight) else None
            return _StraightThroughEffectiveWeight.apply(
                weight, self.threshold, self.shrinkage, self.firm_ratio, self.rescale, self.compile_kernels, memory
            )
        return _effective_weight(weight, self.threshold, self.shrinkage, self.firm_ratio, self.rescale)

    @override
    def forget_values(self) -> None:
        super().forget_values()
        self._memory().invalidate()

    def _memory(self) -> ReusedWeightMemory:
        memory = vars(self).get("memory")
        if memory is None:  # unpickled from 0.1
            memory = self.memory = ReusedWeightMemory()
        return memory

    def _settings(self) -> tuple[Any, ...]:
        return self.shrinkage, self.firm_ratio, self.straight_through, self.rescale, self.compile_kernels, self.out_dim

    def extra_repr(self) -> str:
        flags = (
            f"shrinkage={self.shrinkage!r}"
            + (f", firm_ratio={self.firm_ratio:g}" if self.shrinkage == "firm" else "")
            + f", straight_through={self.straight_through}, rescale={self.rescale}"
            + (", compile_kernels=True" if self.compile_kernels else "")
            + (f", out_dim={self.out_dim}" if self.out_dim else "")
        )
        return flags + (", frozen=True" if self.frozen else "")


def find_st3_parametrization(module: nn.Module) -> SoftThresholdParametrization | None:
    """The ST-3 parametrization on ``module.weight``, or ``None``."""
    found = find_sparse_parametrization(module)
    return found if isinstance(found, SoftThresholdParametrization) else None


def register_st3_parametrization(
    module: nn.Module,
    soft_threshold: bool | None = None,
    straight_through: bool = True,
    rescale: bool = True,
    compile_kernels: bool = False,
    shrinkage: Shrinkage | None = None,
    firm_ratio: float = DEFAULT_FIRM_RATIO,
) -> SoftThresholdParametrization:
    """Put the ST-3 parametrization on ``module.weight`` (or update the flags of the one already there).

    See :func:`register_sparse_parametrization` for the state-dict hooks that come with it.

    Args:
        module: A layer with a ``weight`` (output channels on dim 0).
        soft_threshold: See :class:`SoftThresholdParametrization`.
        straight_through: See :class:`SoftThresholdParametrization`.
        rescale: See :class:`SoftThresholdParametrization`.
        compile_kernels: See :class:`SoftThresholdParametrization`.
        shrinkage: See :class:`SoftThresholdParametrization`.
        firm_ratio: See :class:`SoftThresholdParametrization`.

    Returns:
        The parametrization, whose ``threshold`` buffer the caller sets.

    Raises:
        ValueError: If ``module.weight`` already carries another parametrization.
    """
    existing = register_sparse_parametrization(module, SoftThresholdParametrization())
    existing.shrinkage = resolve_shrinkage(shrinkage, soft_threshold)
    existing.firm_ratio = check_firm_ratio(firm_ratio)
    existing.straight_through = straight_through
    existing.rescale = rescale
    existing.compile_kernels = compile_kernels
    existing.out_dim = output_dim(module)
    return existing


@torch.no_grad()
def fix_masks(modules: Iterable[nn.Module]) -> None:
    """Start the fine-tune phase of each ST-3 layer in ``modules``: a fixed mask keeps the weights whose raw value is
    non-zero now (:meth:`SoftThresholdParametrization.freeze`)."""
    for module in modules:
        find_st3_parametrization(module).freeze(raw_weight(module) != 0)


@torch.no_grad()
def zero_masked_raw_weights(modules: Iterable[nn.Module]) -> None:
    """Zero the raw weights the fixed masks of ``modules`` prune (undoing what momentum or weight decay did to them)."""
    for module in modules:
        mask = find_st3_parametrization(module).mask
        if mask is not None:
            raw_weight(module).masked_fill_(~mask, 0.0)
