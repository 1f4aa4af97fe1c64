"""The sparsity schedule of ST-3 (arXiv:2212.01076, Sec. 3): a polynomial (cubic by default) ramp.

Pure functions, no Lightning: the callback turns the trainer's optimizer step into a target sparsity with them.
"""

from __future__ import annotations

import math

# The paper's ramp is the cubic schedule of Zhu & Gupta (2017), which ST-3 adopts.
DEFAULT_POWER = 3.0


def cubic_sparsity(step: int, target_sparsity: float, start: int, end: int, power: float = DEFAULT_POWER) -> float:
    r"""Scheduled sparsity at optimizer step ``step``.

    .. math::

        p = \mathrm{clamp}\left(\frac{\mathrm{step} - \mathrm{start}}{\mathrm{end} - \mathrm{start}}, 0, 1\right),
        \qquad s = s_{\mathrm{target}} \left(1 - (1 - p)^{\mathrm{power}}\right)

    Before ``start`` the sparsity is 0 (dense network), from ``end`` on it is ``target_sparsity``. When
    ``start == end`` the schedule is a single jump at that step (one-shot pruning).

    Args:
        step: The optimizer step (``trainer.global_step``).
        target_sparsity: Final fraction of pruned weights, in ``[0, 1)``.
        start: First step of the ramp.
        end: Step at which the ramp reaches ``target_sparsity``.
        power: Exponent of the ramp; 3 is the paper's cubic schedule.

    Returns:
        The fraction of prunable weights to prune at ``step``.

    Example::

        >>> cubic_sparsity(50, 0.9, start=0, end=100)
        0.7875
    """
    if step < start:
        return 0.0
    if step >= end:
        return target_sparsity
    progress = (step - start) / (end - start)
    return target_sparsity * (1.0 - (1.0 - progress) ** power)


def resolve_step(value: int | float, total_steps: float, name: str) -> int:
    """Turn a step given as an int (optimizer steps) or a float fraction of ``total_steps`` into an optimizer step.

    Args:
        value: An ``int`` number of optimizer steps, or a ``float`` in ``[0, 1]`` giving a fraction of the run.
        total_steps: The run's total number of optimizer steps (``trainer.estimated_stepping_batches``).
        name: The argument's name, used in error messages.

    Returns:
        The step, rounded to the nearest integer for fractions.

    Raises:
        ValueError: If ``value`` is a fraction and ``total_steps`` is not a finite number.
    """
    if isinstance(value, int):
        return value
    if not math.isfinite(total_steps):
        raise ValueError(
            f"`{name}={value}` is a fraction of the run, but the run's length is unknown "
            f"(estimated_stepping_batches={total_steps})."
        )
    return round(value * total_steps)
