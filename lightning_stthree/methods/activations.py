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
from lightning_stthree.core.variance_map import SPARSE_ACTIVATIONS, prescribed_clip


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
        if clip is None:
            clip = prescribed_clip(activation, target_sparsity) if target_sparsity > 0 else math.inf
        self.clip = check_number("clip", clip, 0.0, math.inf, "(]", finite=False)
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
