"""The ST-3 weight parametrization: soft threshold, channel rescale and straight-through gradient.

ST-3 (arXiv:2212.01076) never changes a layer's class. Each prunable weight gets a ``torch.nn.utils.parametrize``
parametrization that turns the raw weight ``w`` (stored as ``parametrizations.weight.original``) into the effective
weight used by the forward pass. The maths lives in :func:`effective_weight`; :class:`SoftThresholdParametrization`
only holds the per-layer threshold buffer and chooses the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

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
    magnitude = weight.detach().abs()
    dims = tuple(range(1, weight.ndim))
    kept_mean = (magnitude * keep).mean(dim=dims, keepdim=True, dtype=torch.float32)
    full_mean = magnitude.mean(dim=dims, keepdim=True, dtype=torch.float32)
    ratio = (kept_mean + RESCALE_EPSILON) / (full_mean + RESCALE_EPSILON)
    scale = (1.0 + RESCALE_OFFSET) / (ratio + RESCALE_OFFSET)
    # Mathematically 1 where nothing was pruned; make it exactly 1 so that a dense layer passes through unchanged.
    scale = torch.where(ratio == 1.0, 1.0, scale)
    return scale.to(weight.dtype)


def effective_weight(weight: Tensor, threshold: Tensor, soft_threshold: bool = True, rescale: bool = True) -> Tensor:
    r"""The weight the forward pass uses, given the raw weight and this layer's threshold on magnitudes.

    .. math::

        w_{\mathrm{eff}} = \mathrm{scale} \cdot \mathrm{sign}(w) \max(|w| - t, 0)
        \quad \text{(soft)}, \qquad
        w_{\mathrm{eff}} = \mathrm{scale} \cdot w \cdot \mathbb{1}[|w| > t] \quad \text{(hard)}

    Entries with ``|w| <= t`` are exactly zero in both cases. With ``t = 0`` the weight passes through unchanged
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
    threshold = threshold.to(weight.dtype)
    keep = weight.abs() > threshold
    if soft_threshold:
        # w - clamp(w, -t, t) == sign(w) * max(|w| - t, 0), bitwise, in two elementwise ops.
        out = weight - torch.clamp(weight, min=-threshold, max=threshold)
    else:
        out = torch.where(keep, weight, 0.0)
    if rescale:
        out = out * channel_rescale(weight, keep)
    return out


class _StraightThroughEffectiveWeight(torch.autograd.Function):
    """:func:`effective_weight` in the forward pass, identity in the backward pass (straight-through estimator)."""

    @staticmethod
    def forward(weight: Tensor, threshold: Tensor, soft_threshold: bool, rescale: bool) -> Tensor:
        return effective_weight(weight, threshold, soft_threshold, rescale)

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[object, ...], output: Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad_output: Tensor) -> tuple[Tensor, None, None, None]:
        return grad_output, None, None, None


class SoftThresholdParametrization(nn.Module):
    """Parametrization registered on a prunable ``weight`` by :class:`~lightning_stthree.ST3PruningCallback`.

    Holds this layer's threshold on raw magnitudes as a 0-dim float32 buffer (saved in the ``state_dict``, so a
    checkpoint reproduces the effective weights on its own). The threshold enters the forward pass as a tensor, never as
    a Python number, so changing it never recompiles a compiled model. A threshold of 0 is the identity.

    Args:
        soft_threshold: Soft threshold (ST-3) instead of a hard mask.
        straight_through: Gradients reach every raw weight unchanged, pruned ones included, so pruned weights can
            grow back (ST-3). ``False`` lets gradients through kept weights only (times the rescale).
        rescale: Per-output-channel rescale of :func:`channel_rescale`.

    Example::

        >>> from torch.nn.utils import parametrize
        >>> layer = nn.Linear(4, 2)
        >>> parametrize.register_parametrization(layer, "weight", SoftThresholdParametrization())
        Linear(...)
    """

    threshold: Tensor

    def __init__(self, soft_threshold: bool = True, straight_through: bool = True, rescale: bool = True) -> None:
        super().__init__()
        self.soft_threshold = soft_threshold
        self.straight_through = straight_through
        self.rescale = rescale
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))

    def forward(self, weight: Tensor) -> Tensor:
        """Return the effective weight for the raw ``weight``."""
        if self.straight_through:
            return _StraightThroughEffectiveWeight.apply(weight, self.threshold, self.soft_threshold, self.rescale)
        return effective_weight(weight, self.threshold, self.soft_threshold, self.rescale)

    def extra_repr(self) -> str:
        return f"soft_threshold={self.soft_threshold}, straight_through={self.straight_through}, rescale={self.rescale}"
