"""ST-3's effective weight: soft threshold, channel rescale and straight-through gradient (arXiv:2212.01076).

ST-3 never changes a layer's class. Each prunable weight gets a :class:`SoftThresholdParametrization` (through the
shared machinery of :mod:`~lightning_stthree.methods.parametrization`) that turns the raw weight ``w`` (stored as
``parametrizations.weight.original``) into the effective weight used by the forward pass. The maths lives in
:func:`effective_weight`; the parametrization only holds the per-layer threshold buffer and chooses the gradient.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stthree.core.distributed import is_dtensor, on_local_rows
from lightning_stthree.core.kernels import compiled
from lightning_stthree.core.layers import output_dim
from lightning_stthree.methods.parametrization import (
    SparseParametrization,
    find_sparse_parametrization,
    register_sparse_parametrization,
)

# Both constants are the rescale of the authors' code (arXiv:2212.01076, Sec. 3.2): a small epsilon that keeps the
# channel-mean ratio defined for all-zero channels, and the offset that bounds the scale by 1.01 / 0.01 = 101.
RESCALE_EPSILON = 1e-6
RESCALE_OFFSET = 0.01


def channel_rescale(weight: Tensor, keep: Tensor) -> Tensor:
    r"""Per-output-channel scale that restores the magnitude removed by pruning (no gradient flows through it).

    .. math::

        r_c = \frac{\mathrm{mean}_c(|w| \cdot m) + 10^{-6}}{\mathrm{mean}_c(|w|) + 10^{-6}}, \qquad
        \mathrm{scale}_c = \frac{1.01}{r_c + 0.01}

    The output channel is dim 0 (``nn.Linear`` and ``nn.Conv*`` weights). Statistics are taken in float32 whatever
    the weight's dtype; a channel with nothing pruned gets a scale of exactly 1.

    Args:
        weight: The raw weight, output channels on dim 0.
        keep: Boolean mask of the kept weights, ``|w| > t_layer``.

    Returns:
        The scale, shaped ``(out_channels, 1, ..., 1)``, in ``weight``'s dtype.
    """
    rows = weight.detach().reshape(weight.shape[0], -1)
    magnitude = rows.abs()
    kept_sum = torch.where(keep.reshape(rows.shape), magnitude, 0.0).sum(1, dtype=torch.float32)
    full_sum = magnitude.sum(1, dtype=torch.float32)
    return _rescale_from_sums(full_sum, kept_sum, rows.shape[1], weight.ndim, weight.dtype)


def above_threshold(weight: Tensor, threshold: Tensor) -> Tensor:
    """Boolean mask of the kept weights, ``|w| > t``, compared in at least float32.

    Half-precision weights (``precision="bf16-true"`` / ``"16-true"``) are compared as float32, against the float32
    threshold: every bf16/fp16 magnitude is exact in float32, so the mask is exactly the rule the global selection
    counted with (rounding the threshold to bf16 instead could prune weights that rank above it).
    """
    if weight.dtype in (torch.float32, torch.float64):
        return weight.abs() > threshold.to(weight.dtype)
    return weight.abs().float() > threshold.float()


def effective_weight(weight: Tensor, threshold: Tensor, soft_threshold: bool = True, rescale: bool = True) -> Tensor:
    r"""The weight the forward pass uses, given the raw weight and this layer's threshold on magnitudes.

    .. math::

        w_{\mathrm{eff}} = \mathrm{scale} \cdot \mathrm{sign}(w) \max(|w| - t, 0)
        \quad \text{(soft)}, \qquad
        w_{\mathrm{eff}} = \mathrm{scale} \cdot w \cdot \mathbb{1}[|w| > t] \quad \text{(hard)}

    Entries with ``|w| <= t`` are exactly zero in both cases. Half-precision weights are thresholded and rescaled in
    float32 and rounded back once. With ``t = 0`` the weight passes through unchanged
    (bitwise), which is how a dense phase of the schedule is represented. Differentiable with respect to ``weight``
    everywhere the mask is 1 (the scale is treated as a constant); :class:`SoftThresholdParametrization` swaps this
    gradient for the straight-through one.

    Args:
        weight: The raw weight, output channels on dim 0.
        threshold: 0-dim tensor, this layer's threshold on ``|w|`` (``t / layer_score_factor``), ``>= 0``.
        soft_threshold: Shrink kept weights by ``t`` (ST-3) instead of only masking (hard threshold, GMP).
        rescale: Multiply by :func:`channel_rescale`.

    Returns:
        The effective weight, same shape and dtype as ``weight``.

    Example::

        >>> effective_weight(torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor(0.15), rescale=False)
        tensor([[ 0.3500, -0.0500,  0.0000]])
    """
    if weight.dtype in (torch.float16, torch.bfloat16):
        # In half precision `|w| - t` with `t` rounded to the weight's dtype can give 0 (or flip the sign) for a kept
        # weight just above the threshold: compute in float32 and round once.
        return effective_weight(weight.float(), threshold, soft_threshold, rescale).to(weight.dtype)
    # On rows (one per output channel): the channel statistics reduce along dim 1, and `torch.compile` fuses the
    # whole function into one kernel per weight (see `compile_kernels`).
    rows = weight.reshape(weight.shape[0], -1)
    keep = above_threshold(rows, threshold)
    threshold = threshold.to(weight.dtype)
    if soft_threshold:
        # Equals sign(w) * max(|w| - t, 0) bitwise; the `where` also gives pruned entries (|w| == t included) an
        # exactly zero gradient when autograd differentiates this function (``straight_through=False``).
        out = torch.where(keep, rows - torch.copysign(threshold, rows), 0.0)
    else:
        out = torch.where(keep, rows, 0.0)
    if rescale:
        out = out * channel_rescale(rows, keep)
    return out.reshape(weight.shape)


def _rescale_from_sums(full_sum: Tensor, kept_sum: Tensor, count: int, ndim: int, dtype: torch.dtype) -> Tensor:
    r""":func:`channel_rescale` from per-channel sums of ``|w|`` (all, and kept only) over ``count`` entries.

    With :math:`F = \sum_c |w| + 10^{-6} n` and :math:`K = \sum_c |w| m + 10^{-6} n` (``n = count``), the ratio of
    means is :math:`K / F`, so the scale is :math:`1.01 F / (K + 0.01 F)`: one division, not four (two means, the
    ratio, the scale). It matters in the fused kernel of ``compile_kernels``, which recomputes the scale for every
    vector of a row. Exactly 1 where nothing was pruned (the sums are equal).
    """
    padding = RESCALE_EPSILON * count
    full = full_sum + padding
    scale = (1.0 + RESCALE_OFFSET) * full / (kept_sum + padding + RESCALE_OFFSET * full)
    return torch.where(kept_sum == full_sum, 1.0, scale).reshape(-1, *([1] * (ndim - 1))).to(dtype)


def _effective_weight_value(weight: Tensor, threshold: Tensor, soft_threshold: bool, rescale: bool) -> Tensor:
    """:func:`effective_weight`'s value for when no gradient flows through it, with one large allocation.

    On a CPU most of the cost of an elementwise pass over a large weight is allocating its output, so the soft
    threshold is built in place in the ``|w|`` buffer: ``relu(|w| - t)`` then the sign of ``w``. Pruned entries
    are (signed) zeros. The rescale's kept sum is ``sum(relu(|w| - t)) + t * #kept`` (equal to ``sum(|w| * m)`` up to
    float rounding; exactly when ``t = 0``, so a dense layer still passes through bitwise unchanged).
    """
    if weight.dtype not in (torch.float32, torch.float64):
        # In half precision relu(|w| - t) rounds too coarsely for the rescale's kept sum: use the reference.
        return effective_weight(weight, threshold, soft_threshold, rescale)
    threshold = threshold.to(weight.dtype)
    dims = tuple(range(1, weight.ndim))  # reductions over dims, not a reshape: weights may be non-contiguous
    if not soft_threshold:
        magnitude = weight.abs()
        out = weight.masked_fill(magnitude <= threshold, 0.0)
        if not rescale:
            return out
        full_sum = magnitude.sum(dims, dtype=torch.float32)
        kept_sum = magnitude.masked_fill_(magnitude <= threshold, 0.0).sum(dims, dtype=torch.float32)
        return out.mul_(_rescale_from_sums(full_sum, kept_sum, math.prod(weight.shape[1:]), weight.ndim, weight.dtype))
    out = weight.abs()
    full_sum = out.sum(dims, dtype=torch.float32) if rescale else None
    out.sub_(threshold).clamp_(min=0)  # relu(|w| - t), in place
    if rescale:
        kept = torch.sign(out).sum(dims, dtype=torch.float32)  # relu(|w| - t) > 0 exactly where kept
        kept_sum = out.sum(dims, dtype=torch.float32) + threshold.float() * kept
        scale = _rescale_from_sums(full_sum, kept_sum, math.prod(weight.shape[1:]), weight.ndim, weight.dtype)
    out.copysign_(weight)
    if rescale:
        out.mul_(scale)
    return out.add_(0.0)  # -0.0 + 0.0 = +0.0: pruned entries are +0.0, as in the reference


class _StraightThroughEffectiveWeight(torch.autograd.Function):
    """:func:`effective_weight` in the forward pass, identity in the backward pass (straight-through estimator).

    With ``fused``, the forward pass is :func:`effective_weight` compiled into one kernel
    (:func:`~lightning_stthree.core.kernels.compiled`), except while the caller's own ``torch.compile`` traces it (its
    graph then holds the eager operations, which it fuses itself).
    """

    # A forward taking `ctx` rather than a separate `setup_context`: autograd's `apply` of the latter form costs about
    # 25 us more per call on a CPU, once per layer and forward pass.
    @staticmethod
    def forward(
        ctx: object, weight: Tensor, threshold: Tensor, soft_threshold: bool, rescale: bool, fused: bool
    ) -> Tensor:
        if fused and not torch.compiler.is_compiling():
            # Detached: torch.compile gives a Parameter static shapes (one kernel per layer shape); a plain tensor
            # gets dynamic ones (one kernel for all layers).
            return compiled(effective_weight)(weight.detach(), threshold, soft_threshold, rescale)
        return _effective_weight_value(weight, threshold, soft_threshold, rescale)

    @staticmethod
    def backward(ctx: object, grad_output: Tensor) -> tuple[Tensor, None, None, None, None]:
        return grad_output, None, None, None, None


class SoftThresholdParametrization(SparseParametrization):
    """Parametrization registered on a prunable ``weight`` by :class:`~lightning_stthree.ST3PruningCallback`.

    Holds this layer's threshold on raw magnitudes as a 0-dim float32 buffer (saved in the ``state_dict``, so a
    checkpoint reproduces the effective weights on its own). The threshold enters the forward pass as a tensor, never as
    a Python number, so changing it never recompiles a compiled model. A threshold of 0 is the identity.

    In the fine-tune phase (:meth:`freeze`) the parametrization instead applies a fixed boolean mask (a
    non-persistent buffer, re-derived from the zeros of the raw weight on resume): ``where(mask, w, 0)``, with
    gradients through kept weights only.

    Args:
        soft_threshold: Soft threshold (ST-3) instead of a hard mask.
        straight_through: Gradients reach every raw weight unchanged, pruned ones included, so pruned weights can
            grow back (ST-3). ``False`` lets gradients through kept weights only (times the rescale).
        rescale: Per-output-channel rescale of :func:`channel_rescale`.
        compile_kernels: With ``straight_through``, build the effective weight with one fused kernel
            (:mod:`~lightning_stthree.core.kernels`; needs ``torch.compile`` to work here) instead of a chain of eager
            operations. Same values up to float rounding.
        out_dim: The weight's output-channel dim, which the rescale works per (0 for ``nn.Linear`` / ``nn.Conv*``,
            1 for HF ``Conv1D``; :func:`register_st3_parametrization` sets it from the layer registry).

    Example::

        >>> from torch.nn.utils import parametrize
        >>> layer = nn.Linear(4, 2)
        >>> parametrize.register_parametrization(layer, "weight", SoftThresholdParametrization())
        ParametrizedLinear(...)
    """

    threshold: Tensor
    mask: Tensor | None
    out_dim: int = 0  # a class default: parametrizations pickled by 0.1 have no such attribute

    def __init__(
        self,
        soft_threshold: bool = True,
        straight_through: bool = True,
        rescale: bool = True,
        compile_kernels: bool = False,
        out_dim: int = 0,
    ) -> None:
        super().__init__()
        self.soft_threshold = soft_threshold
        self.straight_through = straight_through
        self.rescale = rescale
        self.compile_kernels = compile_kernels
        self.out_dim = out_dim
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("mask", None, persistent=False)

    @property
    def frozen(self) -> bool:
        """Whether a fixed mask replaces the threshold (fine-tune phase)."""
        return self.mask is not None

    def pruned(self, weight: Tensor) -> Tensor:
        """``|w| <= t_layer`` (exactly where the soft and hard thresholds give zero; the rescale is >= 1), or, in the
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
            return _StraightThroughEffectiveWeight.apply(
                weight, self.threshold, self.soft_threshold, self.rescale, self.compile_kernels
            )
        return effective_weight(weight, self.threshold, self.soft_threshold, self.rescale)

    def _settings(self) -> tuple[Any, ...]:
        return self.soft_threshold, self.straight_through, self.rescale, self.compile_kernels, self.out_dim

    def extra_repr(self) -> str:
        flags = (
            f"soft_threshold={self.soft_threshold}, straight_through={self.straight_through}, rescale={self.rescale}"
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
    soft_threshold: bool = True,
    straight_through: bool = True,
    rescale: bool = True,
    compile_kernels: bool = False,
) -> SoftThresholdParametrization:
    """Put the ST-3 parametrization on ``module.weight`` (or update the flags of the one already there).

    See :func:`register_sparse_parametrization` for the state-dict hooks that come with it.

    Args:
        module: A layer with a ``weight`` (output channels on dim 0).
        soft_threshold: See :class:`SoftThresholdParametrization`.
        straight_through: See :class:`SoftThresholdParametrization`.
        rescale: See :class:`SoftThresholdParametrization`.
        compile_kernels: See :class:`SoftThresholdParametrization`.

    Returns:
        The parametrization, whose ``threshold`` buffer the caller sets.

    Raises:
        ValueError: If ``module.weight`` already carries another parametrization.
    """
    existing = register_sparse_parametrization(module, SoftThresholdParametrization())
    existing.soft_threshold = soft_threshold
    existing.straight_through = straight_through
    existing.rescale = rescale
    existing.compile_kernels = compile_kernels
    existing.out_dim = output_dim(module)
    return existing
