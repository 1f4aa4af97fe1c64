"""The maths of ST-3's effective weight (arXiv:2212.01076): the soft threshold, the channel rescale, and the ways to
compute them (the reference, an eager one with one large allocation, an eager one into given memory, a fused one).

Plain functions of tensors; :mod:`~lightning_stthree.methods.st3` builds the parametrization and its straight-through
gradient on them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_stthree.core.kernels import compiled
from lightning_stthree.methods.shrinkage import (
    DEFAULT_FIRM_RATIO,
    Shrinkage,
    above_threshold,
    check_firm_ratio,
    kept_magnitude,
    resolve_shrinkage,
    shrink,
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
    return rescale_from_sums(full_sum, kept_sum, rows.shape[1], weight.ndim, weight.dtype)


def effective_weight(
    weight: Tensor,
    threshold: Tensor,
    soft_threshold: bool | None = None,
    rescale: bool = True,
    shrinkage: Shrinkage | None = None,
    firm_ratio: float = DEFAULT_FIRM_RATIO,
) -> Tensor:
    r"""The weight the forward pass uses, given the raw weight and this layer's threshold on magnitudes.

    .. math::

        w_{\mathrm{eff}} = \mathrm{scale} \cdot \mathrm{sign}(w) \max(|w| - t, 0)
        \quad \text{(soft)}, \qquad
        w_{\mathrm{eff}} = \mathrm{scale} \cdot w \cdot \mathbb{1}[|w| > t] \quad \text{(hard)}

    and the firm and half thresholds of :mod:`~lightning_stthree.methods.shrinkage` in place of the soft one. Entries
    with ``|w| <= t`` are exactly zero whatever the shrinkage, and the scale (computed from the mask and the raw
    magnitudes) is the same for all. Half-precision weights are thresholded and rescaled in float32 and rounded back
    once. With ``t = 0`` the weight passes through unchanged (bitwise), which is how a dense phase of the schedule is
    represented. Differentiable with respect to ``weight`` everywhere the mask is 1 (the scale is treated as a
    constant); :class:`SoftThresholdParametrization` swaps this gradient for the straight-through one.

    Args:
        weight: The raw weight, output channels on dim 0.
        threshold: 0-dim tensor, this layer's threshold on ``|w|`` (``t / layer_score_factor``), ``>= 0``.
        soft_threshold: The older name of ``shrinkage`` for two of its values: ``True`` is ``"soft"``, ``False``
            ``"hard"``; ``None`` (default) leaves it to ``shrinkage``.
        rescale: Multiply by :func:`channel_rescale`.
        shrinkage: What a kept weight becomes: ``"soft"`` (ST-3, the default), ``"hard"``, ``"firm"`` or ``"half"``
            (:func:`~lightning_stthree.methods.shrinkage.shrink`).
        firm_ratio: ``mu / t`` of the firm threshold, ``> 1``.

    Returns:
        The effective weight, same shape and dtype as ``weight``.

    Raises:
        ValueError: If ``shrinkage`` is unknown or contradicts ``soft_threshold``, or ``firm_ratio <= 1``.

    Example::

        >>> effective_weight(torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor(0.15), rescale=False)
        tensor([[ 0.3500, -0.0500,  0.0000]])
        >>> effective_weight(torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor(0.15), rescale=False, shrinkage="firm")
        tensor([[ 0.5000, -0.1000,  0.0000]])
    """
    shrinkage = resolve_shrinkage(shrinkage, soft_threshold)
    return _effective_weight(weight, threshold, shrinkage, check_firm_ratio(firm_ratio), rescale)


def _effective_weight(weight: Tensor, threshold: Tensor, shrinkage: str, firm_ratio: float, rescale: bool) -> Tensor:
    """:func:`effective_weight` with its shrinkage resolved (what the kernels compile)."""
    if weight.dtype in (torch.float16, torch.bfloat16):
        # In half precision `|w| - t` with `t` rounded to the weight's dtype can give 0 (or flip the sign) for a kept
        # weight just above the threshold: compute in float32 and round once.
        return _effective_weight(weight.float(), threshold, shrinkage, firm_ratio, rescale).to(weight.dtype)
    # On rows (one per output channel): the channel statistics reduce along dim 1, and `torch.compile` fuses the
    # whole function into one kernel per weight (see `compile_kernels`).
    rows = weight.reshape(weight.shape[0], -1)
    keep = above_threshold(rows, threshold)
    out = shrink(rows, threshold, shrinkage, firm_ratio, keep)
    if rescale:
        out = out * channel_rescale(rows, keep)
    return out.reshape(weight.shape)


def rescale_from_sums(full_sum: Tensor, kept_sum: Tensor, count: int, ndim: int, dtype: torch.dtype) -> Tensor:
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


def effective_weight_value(
    weight: Tensor, threshold: Tensor, shrinkage: str, rescale: bool, firm_ratio: float = DEFAULT_FIRM_RATIO
) -> Tensor:
    """:func:`effective_weight`'s value for when no gradient flows through it, with one large allocation.

    On a CPU most of the cost of an elementwise pass over a large weight is allocating its output, so the soft
    threshold is built in place in the ``|w|`` buffer: ``relu(|w| - t)`` then the sign of ``w``. Pruned entries
    are (signed) zeros. The rescale's kept sum is ``sum(relu(|w| - t)) + t * #kept`` (equal to ``sum(|w| * m)`` up to
    float rounding; exactly when ``t = 0``, so a dense layer still passes through bitwise unchanged). The firm and
    half thresholds take a few more passes (and temporaries) than the soft and hard ones.
    """
    if weight.dtype not in (torch.float32, torch.float64):
        # In half precision relu(|w| - t) rounds too coarsely for the rescale's kept sum: use the reference.
        return _effective_weight(weight, threshold, shrinkage, firm_ratio, rescale)
    out = weight.abs()
    # Reductions over dims, not a reshape: weights may be non-contiguous.
    _shrink_magnitudes(weight, out, threshold, shrinkage, firm_ratio, rescale, tuple(range(1, weight.ndim)))
    return out


def _shrink_magnitudes(
    raw: Tensor,
    value: Tensor,
    threshold: Tensor,
    shrinkage: str,
    firm_ratio: float,
    rescale: bool,
    dims: tuple[int, ...],
) -> None:
    """Turn ``value``, which holds ``|raw|``, into the effective weight of ``raw`` in place (the rescale's sums over
    ``dims``, the output channel being dim 0): the chain of :func:`effective_weight_value` and of each slice of
    :func:`write_effective_weight`."""
    threshold = threshold.to(raw.dtype)
    full_sum = value.sum(dims, dtype=torch.float32) if rescale else None
    if shrinkage == "soft":
        value.sub_(threshold).clamp_(min=0)  # relu(|w| - t)
        if rescale:  # relu(|w| - t) > 0 exactly where kept
            kept = torch.sign(value).sum(dims, dtype=torch.float32)
            kept_sum = value.sum(dims, dtype=torch.float32) + threshold.float() * kept
    else:
        value.masked_fill_(value <= threshold, 0.0)
        if rescale:
            kept_sum = value.sum(dims, dtype=torch.float32)
        if shrinkage != "hard":  # firm and half map a pruned (zeroed) entry to 0
            value.copy_(kept_magnitude(value, threshold, shrinkage, firm_ratio))
    value.copysign_(raw)  # |w| with the sign of w: w itself where kept
    if rescale:
        scale = rescale_from_sums(full_sum, kept_sum, math.prod(raw.shape[1:]), raw.ndim, raw.dtype)  # type: ignore[arg-type]
        value.mul_(scale)
    value.add_(0.0)  # -0.0 + 0.0 = +0.0: pruned entries are +0.0, as in the reference


# Elements per slice of rows in `write_effective_weight`: a slice's passes stay in the CPU's cache (4 MB of float32).
_SLICE_ELEMENTS = 1 << 20


def write_effective_weight(
    weight: Tensor,
    threshold: Tensor,
    shrinkage: str,
    rescale: bool,
    out: Tensor,
    firm_ratio: float = DEFAULT_FIRM_RATIO,
) -> None:
    """Write :func:`effective_weight`'s value into ``out`` (contiguous, ``weight``'s shape and dtype), eagerly.

    Slices of whole rows (output channels) of about 4 MB go through the chain of elementwise passes one after the
    other, so each pass after the first reads and writes cached memory: about one read of ``weight`` and one write of
    ``out`` from main memory in all, and no allocation larger than a slice. The values are those of
    :func:`effective_weight_value` (float rounding of the rescale's sums apart: they reduce per row the same way).
    """
    if weight.dtype not in (torch.float32, torch.float64) or (weight.ndim > 2 and not weight.is_contiguous()):
        out.copy_(effective_weight_value(weight, threshold, shrinkage, rescale, firm_ratio))
        return
    rows = weight.reshape(weight.shape[0], -1)  # a view: contiguous, or 2-D (HF Conv1D's transposed weight)
    out_rows = out.view(rows.shape)
    step = max(1, _SLICE_ELEMENTS // max(rows.shape[1], 1))
    for first in range(0, rows.shape[0], step):
        raw, value = rows[first : first + step], out_rows[first : first + step]
        _shrink_magnitudes(raw, torch.abs(raw, out=value), threshold, shrinkage, firm_ratio, rescale, (1,))


def copy_effective_weight(
    weight: Tensor,
    threshold: Tensor,
    shrinkage: str,
    rescale: bool,
    out: Tensor,
    firm_ratio: float = DEFAULT_FIRM_RATIO,
) -> None:
    """``out.copy_(effective_weight(...))``: compiled (:func:`~lightning_stthree.core.kernels.compiled`), one fused
    kernel that reads ``weight`` and writes ``out``, with no intermediate tensor."""
    out.copy_(_effective_weight(weight, threshold, shrinkage, firm_ratio, rescale))


def try_effective_weight_kernel(device: torch.device) -> None:
    """Compile and run the effective weight's fused kernel on a tiny tensor of ``device`` (a
    :func:`~lightning_stthree.core.kernels.build_failure` trial)."""
    one = torch.ones((), device=device)
    compiled(copy_effective_weight)(
        torch.ones(2, 4, device=device), one, "soft", True, torch.empty(2, 4, device=device)
    )
