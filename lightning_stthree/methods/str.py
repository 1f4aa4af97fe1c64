"""STR, Soft Threshold weight Reparameterization (Kusupati et al., ICML 2020, arXiv:2002.03231).

The method ST-3 was built against, here as a second method on the same machinery (parametrizations, logging, MACs,
reports, export). Each layer learns its own threshold: ``s_l`` is a trainable scalar and

.. math::

    w_{\\mathrm{eff}} = \\mathrm{sign}(w)\\, \\mathrm{relu}(|w| - \\mathrm{sigmoid}(s_l)).

Nothing schedules the sparsity: weight decay on ``s_l`` (from the optimizer, as in the authors' code) pulls it up
toward 0, so the threshold grows, while the task loss pushes it down; the sparsity is where the two balance, set by
``s_init`` and the weight decay. Gradients are those of the formula (plain autograd, as in the authors' code): a
pruned weight gets none, a kept one gets the incoming gradient, and ``s_l`` gets
``-sigmoid'(s_l) * sum(sign(w) * grad)`` over the kept weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_stthree.methods.st3 import SparseParametrization, register_sparse_parametrization

# The name of the learnable threshold in a layer's state dict: `<layer>.parametrizations.weight.0.s`.
S_NAME = "s"


def str_effective_weight(weight: Tensor, s: Tensor) -> Tensor:
    r"""STR's effective weight, :math:`\mathrm{sign}(w)\,\mathrm{relu}(|w| - \mathrm{sigmoid}(s))`.

    Differentiable with respect to both ``weight`` and ``s`` (autograd). Entries with ``|w| <= sigmoid(s)`` are
    exactly zero. The threshold is computed in float32 from ``s`` and applied in ``weight``'s dtype.

    Args:
        weight: The raw weight.
        s: This layer's 0-dim threshold parameter (the threshold on ``|w|`` is ``sigmoid(s)``).

    Returns:
        The effective weight, same shape and dtype as ``weight``.

    Example::

        >>> str_effective_weight(torch.tensor([0.5, -0.2, 0.1]), torch.tensor(math.log(0.15 / 0.85)))
        tensor([ 0.3500, -0.0500,  0.0000])
    """
    threshold = torch.sigmoid(s.float()).to(weight.dtype)
    return torch.sign(weight) * torch.relu(weight.abs() - threshold)


class STRParametrization(SparseParametrization):
    """Parametrization registered on a prunable ``weight`` by :class:`~lightning_stthree.STRPruningCallback`.

    Holds the layer's learnable threshold parameter ``s`` (0-dim, float32; saved in the ``state_dict`` as
    ``<layer>.parametrizations.weight.0.s``). Being a parameter of the model, it is trained by the model's optimizer
    and gets its weight decay, which is what makes STR prune.

    Args:
        s_init: Initial value of ``s``; the initial threshold on ``|w|`` is ``sigmoid(s_init)``.
    """

    def __init__(self, s_init: float) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init), dtype=torch.float32))

    @property
    def threshold(self) -> Tensor:
        """The current threshold on ``|w|``, ``sigmoid(s)`` (detached, float32)."""
        return torch.sigmoid(self.s.detach())

    def effective(self, weight: Tensor) -> Tensor:
        """The effective weight for the raw ``weight``."""
        return str_effective_weight(weight, self.s)

    def _apply(self, fn: Any, recurse: bool = True) -> STRParametrization:
        """Moves like any module, but ``s`` stays float32 when the model is cast (``precision="bf16-true"`` casts every
        floating parameter): at the authors' ``s = -3200`` bf16's spacing is 16, so most weight-decay steps on ``s``
        would round away."""
        saved = self.s.detach().clone()  # before the cast: bf16 would round it for good
        super()._apply(fn, recurse)
        if self.s.dtype != torch.float32:
            self.s.data = saved.to(self.s.device)
        return self

    def pruned(self, weight: Tensor) -> Tensor:
        """``|w| <= sigmoid(s)``, in ``weight``'s dtype: exactly where the effective weight is zero."""
        return weight.abs() <= self.threshold.to(weight.dtype)

    def missing_state(self) -> dict[str, Tensor]:
        """A dense state dict loads with the current ``s`` (``s_init`` before training)."""
        return {S_NAME: self.s.detach().clone()}

    def extra_repr(self) -> str:
        return f"s={float(self.s):.4g}, threshold={float(self.threshold):.4g}"


def register_str_parametrization(module: nn.Module, s_init: float) -> STRParametrization:
    """Put the STR parametrization on ``module.weight`` (the one already there is kept, with its ``s``).

    Args:
        module: A layer with a ``weight``.
        s_init: Initial ``s`` of a new parametrization; must be finite.

    Returns:
        The parametrization now on ``module.weight``.

    Raises:
        ValueError: If ``s_init`` is not finite, or ``module.weight`` already carries another parametrization.
    """
    if not math.isfinite(s_init):
        raise ValueError(f"`s_init` must be a finite number, got {s_init!r}")
    return register_sparse_parametrization(module, STRParametrization(s_init))
