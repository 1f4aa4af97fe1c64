"""The sparsity schedule of ST-3 (arXiv:2212.01076, Sec. 3): a polynomial (cubic by default) ramp.

Pure functions, no Lightning: the callback turns the trainer's optimizer step into a target sparsity with them.
"""

from __future__ import annotations

import math

from lightning_stthree.core.checks import check_number

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


StepSpec = int | float


class ScheduleError(ValueError):
    """A schedule that cannot be resolved for this run (a fraction of a run of unknown length, or steps out of order
    once fractions are resolved). The callbacks turn it into a ``MisconfigurationException``."""


def check_step_spec(name: str, value: object) -> StepSpec:
    """Return ``value`` if it is a step: an ``int >= 0`` (optimizer steps) or a ``float`` in ``[0, 1]`` (a fraction of
    the run).

    Raises:
        TypeError: If ``value`` is neither an ``int`` nor a ``float`` (a ``bool`` included).
        ValueError: If it is a negative ``int`` or a ``float`` outside ``[0, 1]``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be an int (optimizer steps) or a float in [0, 1] (fraction of the run), got {value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}` must be >= 0 optimizer steps, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` as a float is a fraction of the run and must be in [0, 1], got {value}; "
            "pass an int for a number of optimizer steps"
        )
    return value


class SparsitySchedule:
    r"""ST-3's sparsity schedule for one run: validated settings, resolved to optimizer steps, a value at any step.

    A dense phase until ``start``, the :func:`cubic_sparsity` ramp to ``target_sparsity`` at ``end``, the target from
    then on, and optionally a fine-tune phase (fixed mask) from ``freeze_at``. ``start``, ``end`` and ``freeze_at`` are
    ints (optimizer steps, ``trainer.global_step``) or floats in ``[0, 1]`` (fractions of the run's total optimizer
    steps, rounded to the nearest step), resolved by :meth:`resolve` once the run's length is known.

    Args:
        target_sparsity: Final fraction of pruned weights, in ``[0, 1)``.
        start: Where the ramp starts.
        end: Where it reaches ``target_sparsity``; ``start <= end`` (``start == end`` prunes in one shot).
        power: Exponent of the ramp, ``> 0``; 3 is the paper's cubic schedule.
        freeze_at: Where the fine-tune phase starts, ``>= end``; ``None`` never freezes.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If an argument is out of range, or the steps are out of order where both are ints or both floats.

    Example::

        >>> schedule = SparsitySchedule(0.9, start=0.0, end=0.5)
        >>> schedule.resolve(200)
        >>> schedule.end_step, schedule.sparsity_at(50)
        (100, 0.7875)
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        start: StepSpec = 0.05,
        end: StepSpec = 0.5,
        power: float = DEFAULT_POWER,
        freeze_at: StepSpec | None = None,
    ) -> None:
        self.target_sparsity = check_number("target_sparsity", target_sparsity, 0.0, 1.0, "[)")
        self.start = check_step_spec("start", start)
        self.end = check_step_spec("end", end)
        self.freeze_at = None if freeze_at is None else check_step_spec("freeze_at", freeze_at)
        self.power = check_number("power", power, 0.0, math.inf, "()")
        if type(start) is type(end) and start > end:
            raise ValueError(f"`start` must be <= `end`, got start={start} and end={end}")
        if freeze_at is not None and type(freeze_at) is type(end) and freeze_at < end:
            raise ValueError(
                f"`freeze_at` must be >= `end` (the mask is frozen once the ramp is done), got freeze_at={freeze_at} "
                f"and end={end}"
            )
        self._steps: tuple[int, int, int | None] | None = None
        self.total_steps: float | None = None  # of the run it was last resolved for

    def replace(self, **changes: object) -> SparsitySchedule:
        """A new schedule with some settings changed (validated again), resolved for the same run if this one is.

        Example::

            >>> SparsitySchedule(0.9, start=0, end=10).replace(target_sparsity=0.5).target_sparsity
            0.5
        """
        settings = {name: getattr(self, name) for name in ("target_sparsity", "start", "end", "power", "freeze_at")}
        settings.update(changes)
        schedule = SparsitySchedule(**settings)  # type: ignore[arg-type]
        if self.total_steps is not None:
            schedule.resolve(self.total_steps)
        return schedule

    @property
    def fractions(self) -> list[str]:
        """The names of the settings given as fractions of the run (they need its length)."""
        return [name for name in ("start", "end", "freeze_at") if isinstance(getattr(self, name), float)]

    def check_run_length_known(self, unbounded: bool) -> None:
        """Raise :class:`ScheduleError` if some setting is a fraction and the run is ``unbounded`` (no known length)."""
        fractions = self.fractions
        if fractions and unbounded:
            raise ScheduleError(
                f"got {', '.join(f'`{n}={getattr(self, n)}`' for n in fractions)} as a fraction of the run, but the "
                "run has no known length. HINT: set `max_epochs` or `max_steps` on the Trainer (and give the train "
                "dataloader a length), or pass them as ints (optimizer steps)."
            )

    def resolve(self, total_steps: float) -> None:
        """Turn ``start``, ``end`` and ``freeze_at`` into optimizer steps of a run of ``total_steps`` steps.

        Args:
            total_steps: ``trainer.estimated_stepping_batches``; Lightning gives ``inf`` for endless runs and
                ``max_steps`` (``-1`` when unset) for iterable datasets of unknown length.

        Raises:
            ScheduleError: If a setting is a fraction and the run's length is unknown, or the resolved steps are out
                of order (``start`` after ``end``, ``freeze_at`` before ``end``).
        """
        self.check_run_length_known(not math.isfinite(total_steps) or total_steps < 0)
        start = resolve_step(self.start, total_steps, "start")
        end = resolve_step(self.end, total_steps, "end")
        freeze = None if self.freeze_at is None else resolve_step(self.freeze_at, total_steps, "freeze_at")
        steps = f"(of {total_steps} optimizer steps)"
        if start > end:
            raise ScheduleError(
                f"the ramp starts after it ends: start={self.start} -> step {start}, end={self.end} -> step {end} "
                f"{steps}. HINT: choose `start` <= `end`."
            )
        if freeze is not None and freeze < end:
            raise ScheduleError(
                f"the schedule would freeze the mask before the ramp ends: freeze_at={self.freeze_at} -> step "
                f"{freeze}, end={self.end} -> step {end} {steps}. HINT: choose `freeze_at` >= `end`."
            )
        self._steps = (start, end, freeze)
        self.total_steps = total_steps

    @property
    def resolved(self) -> bool:
        """Whether :meth:`resolve` has run."""
        return self._steps is not None

    def _resolved_steps(self) -> tuple[int, int, int | None]:
        if self._steps is None:
            raise RuntimeError("The schedule is resolved when training starts (`resolve(total_steps)`); not yet.")
        return self._steps

    @property
    def start_step(self) -> int:
        """The optimizer step where the ramp starts."""
        return self._resolved_steps()[0]

    @property
    def end_step(self) -> int:
        """The optimizer step where the ramp reaches the target."""
        return self._resolved_steps()[1]

    @property
    def freeze_step(self) -> int | None:
        """The optimizer step where the fine-tune phase starts, or ``None``."""
        return self._resolved_steps()[2]

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at optimizer ``step`` (:func:`cubic_sparsity`)."""
        start, end, _ = self._resolved_steps()
        return cubic_sparsity(step, self.target_sparsity, start, end, self.power)

    def is_fine_tune(self, step: int) -> bool:
        """Whether ``step`` is in the fine-tune phase (``step >= freeze_step``)."""
        freeze = self._resolved_steps()[2]
        return freeze is not None and step >= freeze
