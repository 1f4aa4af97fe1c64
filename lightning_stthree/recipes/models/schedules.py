"""The learning-rate schedules of :class:`~lightning_stthree.recipes.models.ImageClassifier`, as step factors.

:func:`lr_factor_fn` gives the multiplier of the learning rate at each optimizer step (cosine annealing, step decay
or constant, optionally after a linear warm-up) for ``torch.optim.lr_scheduler.LambdaLR``. The factors are
``functools.partial`` objects of the module-level functions here, so a scheduler that holds them can be pickled.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

LRSchedule = Literal["cosine", "step", "constant"]
LR_SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")
# Step decay at 50% and 75% of training: the CIFAR recipe of He et al. 2016 (32k and 48k of 64k iterations).
DEFAULT_LR_MILESTONES: tuple[float, ...] = (0.5, 0.75)


def _cosine_factor(step: int, total_steps: int) -> float:
    """Cosine annealing from 1 at step 0 to 0 at ``total_steps`` (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _step_factor(step: int, milestones: tuple[int, ...], gamma: float) -> float:
    """``gamma`` to the number of milestones reached by ``step``."""
    return gamma ** sum(step >= milestone for milestone in milestones)


def _constant_factor(step: int) -> float:
    """1 at every step."""
    return 1.0


def _warmup_factor(step: int, warmup_steps: int, after: functools.partial[float]) -> float:
    """Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, times ``after``."""
    return min(1.0, (step + 1) / warmup_steps) * after(step)


def lr_factor_fn(
    schedule: LRSchedule,
    total_steps: int,
    milestones: tuple[float, ...] = DEFAULT_LR_MILESTONES,
    gamma: float = 0.1,
    warmup_fraction: float = 0.0,
) -> functools.partial[float]:
    r"""The learning-rate multiplier as a function of the optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    .. math::

        \text{cosine: } \tfrac12\bigl(1 + \cos(\pi \min(t, T) / T)\bigr), \qquad
        \text{step: } \gamma^{\#\{i : t \ge \operatorname{round}(m_i T)\}}, \qquad \text{constant: } 1

    with ``t`` the optimizer step, ``T`` = ``total_steps`` and ``m_i`` the milestone fractions; with a warm-up of
    ``W = round(warmup_fraction * T)`` steps the factor is also multiplied by ``min(1, (t + 1) / W)``.

    Args:
        schedule: ``"cosine"``, ``"step"`` or ``"constant"``.
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``), >= 1.
        milestones: Fractions of the run at which the step schedule multiplies the rate by ``gamma``.
        gamma: The step schedule's factor.
        warmup_fraction: Fraction of the run with a linear learning-rate warm-up (0: none).

    Returns:
        A picklable function of the step (a ``functools.partial`` of a module-level function).

    Example::

        >>> [lr_factor_fn("step", 8, (0.5,), 0.1)(t) for t in (3, 4)]
        [1.0, 0.1]
    """
    if schedule == "cosine":
        factor = functools.partial(_cosine_factor, total_steps=total_steps)
    elif schedule == "step":
        steps = tuple(round(fraction * total_steps) for fraction in milestones)
        factor = functools.partial(_step_factor, milestones=steps, gamma=gamma)
    else:
        factor = functools.partial(_constant_factor)
    warmup_steps = round(warmup_fraction * total_steps)
    if warmup_steps > 0:
        return functools.partial(_warmup_factor, warmup_steps=warmup_steps, after=factor)
    return factor
