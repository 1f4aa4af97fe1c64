import math

import pytest
from helpers import cubic_reference

from lightning_stthree import cubic_sparsity
from lightning_stthree.core.schedule import ScheduleError, SparsitySchedule, resolve_step


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        # Hand-computed: start=10, end=110, target=0.9, power 3.
        (0, 0.0),
        (10, 0.0),
        (35, 0.9 * (1 - 0.75**3)),  # p = 0.25 -> 0.9 * 0.578125 = 0.5203125
        (60, 0.7875),  # p = 0.5 -> 0.9 * 0.875
        (85, 0.9 * (1 - 0.25**3)),  # p = 0.75 -> 0.8859375
        (110, 0.9),
        (10_000, 0.9),
    ],
)
def test_cubic_sparsity_hand_values(step: int, expected: float) -> None:
    assert cubic_sparsity(step, 0.9, start=10, end=110) == pytest.approx(expected, abs=1e-12)


def test_cubic_sparsity_matches_formula_everywhere() -> None:
    for power in (1.0, 2.0, 3.0, 5.5):
        for step in range(-5, 130):
            assert cubic_sparsity(step, 0.95, 7, 101, power) == pytest.approx(
                cubic_reference(step, 0.95, 7, 101, power), abs=1e-12
            )


def test_cubic_sparsity_is_monotone_and_linear_for_power_one() -> None:
    values = [cubic_sparsity(s, 0.8, 0, 100, 1.0) for s in range(101)]
    assert values == sorted(values)
    assert values[25] == pytest.approx(0.2)


def test_one_shot_schedule_when_start_equals_end() -> None:
    assert cubic_sparsity(49, 0.9, 50, 50) == 0.0
    assert cubic_sparsity(50, 0.9, 50, 50) == 0.9


def test_resolve_step_int_and_fraction() -> None:
    assert resolve_step(7, 1000, "start") == 7
    assert resolve_step(0.05, 1000, "start") == 50
    assert resolve_step(0.03125, 160 * 391, "start") == 1955  # epoch 5 of 160 at 391 steps per epoch
    assert resolve_step(1.0, 123, "end") == 123


def test_resolve_step_fraction_of_unknown_length() -> None:
    with pytest.raises(ValueError, match=r"`start=0.5` is a fraction of the run"):
        resolve_step(0.5, math.inf, "start")


# SparsitySchedule: the callback's schedule as an object, driven without a Trainer.


def test_schedule_resolves_fractions_to_the_nearest_step_and_follows_cubic_sparsity() -> None:
    schedule = SparsitySchedule(0.9, start=0.05, end=0.5, freeze_at=0.75)
    schedule.resolve(391)  # 0.05 * 391 = 19.55, 0.5 * 391 = 195.5 (rounds to even), 0.75 * 391 = 293.25
    assert (schedule.start_step, schedule.end_step, schedule.freeze_step) == (20, 196, 293)
    for step in (0, 19, 20, 50, 195, 196, 10_000):
        assert schedule.sparsity_at(step) == cubic_reference(step, 0.9, 20, 196, 3.0)
    assert not schedule.is_fine_tune(292)
    assert schedule.is_fine_tune(293)


def test_schedule_of_int_steps_needs_no_run_length() -> None:
    schedule = SparsitySchedule(0.5, start=10, end=30, power=1)
    schedule.check_run_length_known(unbounded=True)
    schedule.resolve(math.inf)
    assert schedule.sparsity_at(20) == pytest.approx(0.25)
    assert schedule.freeze_step is None
    assert not schedule.is_fine_tune(10**9)


def test_schedule_is_unusable_until_resolved() -> None:
    schedule = SparsitySchedule()
    assert not schedule.resolved
    with pytest.raises(RuntimeError, match="resolved when training starts"):
        schedule.sparsity_at(0)
    schedule.resolve(100)
    assert schedule.resolved


@pytest.mark.parametrize(
    ("kwargs", "total", "message"),
    [
        ({"start": 0.1, "end": 0.5}, math.inf, r"`start=0.1`, `end=0.5` as a fraction of the run.*no known length"),
        ({"start": 10, "end": 0.5}, -1, r"`end=0.5` as a fraction of the run"),
        ({"start": 80, "end": 0.5}, 100, r"ramp starts after it ends: start=80 -> step 80, end=0.5 -> step 50"),
        (
            {"start": 0, "end": 60, "freeze_at": 0.5},
            100,
            r"freeze the mask before the ramp ends: freeze_at=0.5 -> step 50, end=60 -> step 60 \(of 100",
        ),
    ],
)
def test_schedule_that_cannot_be_resolved_says_why(kwargs: dict, total: float, message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        SparsitySchedule(**kwargs).resolve(total)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_sparsity": 1.0}, ValueError, r"`target_sparsity` must be in \[0, 1\), got 1.0"),
        ({"target_sparsity": None}, TypeError, r"`target_sparsity` must be a number in \[0, 1\), got None"),
        ({"start": -3}, ValueError, r"`start` must be >= 0 optimizer steps, got -3"),
        ({"end": "half"}, TypeError, r"`end` must be an int \(optimizer steps\) or a float in \[0, 1\]"),
        ({"freeze_at": 1.5}, ValueError, r"`freeze_at` as a float is a fraction of the run"),
        ({"start": 0.6, "end": 0.5}, ValueError, r"`start` must be <= `end`, got start=0.6 and end=0.5"),
        ({"end": 40, "freeze_at": 20}, ValueError, r"`freeze_at` must be >= `end`"),
        ({"power": float("nan")}, ValueError, r"`power` must be a finite number in \(0, inf\), got nan"),
    ],
)
def test_schedule_rejects_bad_settings_at_construction(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        SparsitySchedule(**kwargs)
