r"""Sparsifying activations with a clipped magnitude (Price et al., ICLR 2024, arXiv:2402.16184).

.. math::

    \mathrm{CReLU}_{\tau,m}(x) = \min(\max(x - \tau, 0), m), \qquad
    \mathrm{CST}_{\tau,m}(x) = \mathrm{sign}(x)\,\min(\max(|x| - \tau, 0), m)

With :math:`m = \infty` they are the shifted ReLU and the soft threshold, which the paper proves unstable in deep
networks (:mod:`~lightning_stthree.core.variance_map`). :class:`SparseActivation` is the module that replaces an
activation: its shift :math:`\tau` is chosen on each training batch so that the fraction of exact zeros of its output
is the scheduled sparsity, and kept as a running estimate (like BatchNorm's statistics) for evaluation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stthree.core.checks import check_choice, check_number
from lightning_stthree.core.variance_map import SPARSE_ACTIVATIONS, edge_of_chaos, prescribed_clip

_INIT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def crelu(x: Tensor, tau: Tensor | float, clip: Tensor | float = math.inf) -> Tensor:
    r"""The clipped shifted ReLU :math:`\min(\max(x - \tau, 0), m)`; zero exactly where :math:`x \le \tau`.

    Example::

        >>> crelu(torch.tensor([-1.0, 0.5, 1.5, 4.0]), 1.0, 2.0)
        tensor([0.0000, 0.0000, 0.5000, 2.0000])
    """
    return torch.clamp(x - tau, min=0.0).clamp(max=clip)


def cst(x: Tensor, tau: Tensor | float, clip: Tensor | float = math.inf) -> Tensor:
    r"""The clipped soft threshold :math:`\mathrm{sign}(x)\min(\max(|x| - \tau, 0), m)`; zero exactly where
    :math:`|x| \le \tau`.

    Example::

        >>> cst(torch.tensor([-4.0, -1.5, 0.5, 1.5]), 1.0, 2.0)
        tensor([-2.0000, -0.5000,  0.0000,  0.5000])
    """
    return torch.copysign(torch.clamp(x.abs() - tau, min=0.0).clamp(max=clip), x) + 0.0  # + 0.0: no -0.0


def effective_sparsity(activation: str, sparsity: float) -> float:
    """The fraction of zeros a :class:`SparseActivation` gives on a centred Gaussian at the target ``sparsity``:
    ``sparsity``, but at least 0.5 for CReLU, whose shift is never below 0 (:func:`activation_shift`)."""
    return max(sparsity, 0.5) if activation == "crelu" else sparsity


def resolve_clip(activation: str, sparsity: float, clip: float | None) -> float:
    """``clip``, checked (``> 0``, ``inf`` allowed), or, when it is ``None``, the prescribed clip at the
    :func:`effective_sparsity` (none for CST at sparsity 0, the identity)."""
    if clip is None:
        sparsity = effective_sparsity(activation, sparsity)
        return prescribed_clip(activation, sparsity) if sparsity > 0 else math.inf
    return check_number("clip", clip, 0.0, math.inf, "(]", finite=False)


@torch.no_grad()
def edge_of_chaos_init_(
    module: nn.Module,
    activation: str,
    sparsity: float,
    clip: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    r"""Initialise every Linear/Conv layer of ``module`` at the edge of chaos of ``activation`` (Price et al.):
    weights from :math:`N(0, \sigma_w^2 / \text{fan-in})` and biases from :math:`N(0, \sigma_b^2)`, with
    :math:`\sigma_w^2, \sigma_b^2` of :func:`~lightning_stthree.core.variance_map.edge_of_chaos` (fixed point
    :math:`q^* = 1`, :math:`\chi_1 = 1`). ``("crelu", 0.5, math.inf)`` is He's initialisation of a ReLU network.

    For deep networks without normalisation layers, whose default PyTorch initialisation shrinks the signal layer
    by layer. With :class:`SparseActivation` (shift and clip proportional to the batch's spread) the Gaussian
    variance map is :math:`q \mapsto (1 - \sigma_b^2) q + \sigma_b^2`, stable clipped or not, but a network of
    finite width is not Gaussian: unclipped, the large values that pass the threshold grow heavier tails layer
    after layer. In a 30-layer, width-1000 network at 85% zeros (``tests/methods/test_activations.py``) the mean
    square of the pre-activations stays within 10% of 1 with the prescribed clip and explodes (above 1e6) without.

    Args:
        module: The network (or the part of it) to initialise, in place.
        activation: ``"crelu"`` or ``"cst"``.
        sparsity: The activations' target fraction of exact zeros, in ``[0, 1)`` (for CReLU at least 0.5 is used:
            :func:`effective_sparsity`).
        clip: As for :class:`SparseActivation` (``None``: the prescribed clip; ``math.inf``: none).
        generator: The random generator to draw from (default: the global one).

    Returns:
        ``module``.

    Example::

        >>> layer = edge_of_chaos_init_(nn.Linear(1000, 1000), "crelu", 0.5, math.inf)  # He
        >>> round(float(layer.weight.detach().var() * 1000), 1), float(layer.bias.detach().abs().max())
        (2.0, 0.0)
    """
    check_choice("activation", activation, SPARSE_ACTIVATIONS)
    sparsity = check_number("sparsity", sparsity, 0.0, 1.0, "[)")
    clip = resolve_clip(activation, sparsity, clip)
    point = edge_of_chaos(activation, effective_sparsity(activation, sparsity), clip)
    # sigma_b^2 >= 0 for CReLU at sparsity >= 0.5 and CST at any (tests/methods/test_activations.py scans them), 0 at
    # the He point; below 0.5, where CReLU's would be negative, the module is a ReLU (`effective_sparsity`).
    bias_std = math.sqrt(max(point.bias_variance, 0.0))
    for layer in module.modules():
        if isinstance(layer, _INIT_TYPES):
            layer.weight.normal_(0.0, math.sqrt(point.weight_variance / layer.weight[0].numel()), generator=generator)
            if layer.bias is not None:
                layer.bias.normal_(0.0, bias_std, generator=generator)
    return module


def activation_shift(pre: Tensor, sparsity: float, activation: str) -> Tensor:
    """The shift ``tau`` that makes ``activation`` zero on the fraction ``sparsity`` of ``pre`` (exactly, rounded to
    the nearest element; ties at ``tau`` add zeros): the ``k``-th smallest value (CReLU) or magnitude (CST) of
    ``pre``, ``k = round(sparsity * n)``, as a 0-dim float32 tensor.

    CReLU's shift is never below 0: the layer is never denser than the ReLU it replaces (a ReLU of a centred
    pre-activation is already about half zeros), so a scheduled sparsity below that gives the ReLU's own.
    """
    values = pre.detach().reshape(-1).float()
    if activation == "cst":
        values = values.abs()
    k = min(max(round(sparsity * values.numel()), 0), values.numel())
    if k == 0:
        return values.new_zeros(())
    shift = torch.kthvalue(values, k).values
    return shift.clamp(min=0.0) if activation == "crelu" else shift


class SparseActivation(nn.Module):
    """CReLU or CST whose shift follows a target sparsity (see the module docstring).

    In training, the shift of each batch is :func:`activation_shift` of its pre-activations at :attr:`sparsity`
    (so the batch's fraction of zeros is the target), and the clip is ``clip`` times their root mean square
    (:math:`\\sqrt{q}`, the variance map's unit); both are folded into running estimates (``momentum``), which
    evaluation uses. The running shift and scale are buffers of the ``state_dict``, so a checkpoint resumes them.

    Args:
        activation: ``"crelu"`` or ``"cst"``.
        target_sparsity: The run's final sparsity; with ``clip=None`` it sets the prescribed clip.
        clip: The clip ``m`` in units of the pre-activations' root mean square; ``None``:
            :func:`~lightning_stthree.core.variance_map.prescribed_clip` at ``target_sparsity``; ``math.inf``: no
            clip (the shifted ReLU or soft threshold of the paper's instability).
        momentum: Weight of each batch in the running estimates, in ``(0, 1]``.
    """

    tau: Tensor
    scale: Tensor

    def __init__(
        self, activation: str = "crelu", target_sparsity: float = 0.8, clip: float | None = None, momentum: float = 0.1
    ) -> None:
        super().__init__()
        self.activation = check_choice("activation", activation, SPARSE_ACTIVATIONS)
        self.target_sparsity = check_number("target_sparsity", target_sparsity, 0.0, 1.0, "[)")
        self.clip = resolve_clip(activation, self.target_sparsity, clip)
        self.momentum = check_number("momentum", momentum, 0.0, 1.0, "(]")
        self.sparsity = 0.0  # this step's target, set by the callback
        self.register_buffer("tau", torch.zeros(()))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self.register_buffer("zeros", torch.zeros((), dtype=torch.long), persistent=False)
        self.elements = 0

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                tau = activation_shift(x, self.sparsity, self.activation)
                scale = x.detach().float().square().mean().sqrt()
                weight = torch.where(self.started, self.momentum, 1.0)  # the first batch sets them
                self.tau.lerp_(tau.to(self.tau.dtype), weight.to(self.tau.dtype))
                self.scale.lerp_(scale.to(self.scale.dtype), weight.to(self.scale.dtype))
                self.started.fill_(True)
        else:
            tau, scale = self.tau, self.scale
        tau = tau.to(x.dtype)
        clip = scale.to(x.dtype) * self.clip if math.isfinite(self.clip) else math.inf
        out = crelu(x, tau, clip) if self.activation == "crelu" else cst(x, tau, clip)
        if self.training:
            with torch.no_grad():
                self.zeros += (out == 0).sum()
            self.elements += out.numel()
        return out

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: Any, strict: bool, missing: list[str], *args: Any
    ) -> None:
        """A state dict of the dense model (the ReLU it replaced has no buffers) loads: the running shift and scale
        start afresh from the next training batch."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *args)
        own = [prefix + name for name in ("tau", "scale", "started")]
        if all(key in missing for key in own):
            for key in own:
                missing.remove(key)
            self.started.fill_(False)

    def take_measured(self) -> tuple[int, int]:
        """The exact zeros and the elements of the outputs since the last call (training batches), and reset."""
        counted = int(self.zeros), self.elements
        self.zeros.zero_()
        self.elements = 0
        return counted

    def extra_repr(self) -> str:
        return f"{self.activation!r}, target_sparsity={self.target_sparsity:g}, clip={self.clip:.4g}"
