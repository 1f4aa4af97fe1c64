import math

import pytest
from helpers import cubic_reference

from lightning_stthree import cubic_sparsity
from lightning_stthree.core.schedule import resolve_step


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
