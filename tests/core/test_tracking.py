"""ThresholdTracker, the threshold from step to step, driven without a Trainer: exact at every update whatever the
search window, non-finite weights told apart from overflowing sums, state that round-trips through a checkpoint."""

import json
import math

import numpy as np
import pytest
import torch

from lightning_stthree.core import selection, tracking
from lightning_stthree.core.floor import FlooredThresholds
from lightning_stthree.core.selection import NonFiniteScoresError
from lightning_stthree.core.threshold import weighted_global_threshold
from lightning_stthree.core.tracking import NonFiniteWeightsError, ThresholdTracker


def _weights(seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=generator) for shape in ((64, 27), (10, 64), (300,))]


def _numpy_threshold(weights: list[torch.Tensor], sparsity: float, criterion: str) -> float:
    scores = np.concatenate(
        [
            np.abs(w.numpy().ravel()).astype(np.float32)
            * np.float32(math.sqrt(sum(w.shape)) if criterion == "l1_std" else 1.0)
            for w in weights
        ]
    )
    k = round(sparsity * scores.size)
    return float(np.sort(scores)[k - 1])


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_every_update_is_the_exact_kth_score_as_the_weights_drift(criterion: str) -> None:
    tracker = ThresholdTracker(criterion)
    weights = _weights()
    generator = torch.Generator().manual_seed(1)
    previous = None
    for step, sparsity in enumerate([0.3, 0.5, 0.55, 0.56, 0.9, 0.2]):
        # The optimizer moved them a little.
        weights = [w + 0.01 * torch.randn(w.shape, generator=generator) for w in weights]
        threshold = tracker.update(weights, sparsity, step)
        assert threshold.dtype == torch.float32
        assert float(threshold) == _numpy_threshold(weights, sparsity, criterion)
        assert (tracker.threshold, tracker.sparsity, tracker.step) == (float(threshold), sparsity, step)
        if previous is not None:
            assert tracker.last_relative_move == pytest.approx(abs(float(threshold) - previous) / previous)
        previous = float(threshold)


def test_a_small_move_is_answered_near_the_last_threshold_without_a_radix_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _weights(2)
    tracker = ThresholdTracker()
    tracker.update(weights, 0.6, 0)
    radix_calls: list[int] = []
    original = selection._radix_select
    monkeypatch.setattr(selection, "_radix_select", lambda *a: radix_calls.append(1) or original(*a))
    threshold = tracker.update(weights, 0.601, 1)  # the answer lies within the 2% window around the last one
    assert radix_calls == []
    assert float(threshold) == _numpy_threshold(weights, 0.601, "l1")
    tracker.update(weights, 0.95, 2)  # far outside: the radix selection answers
    assert radix_calls == [1]


def test_the_search_near_the_last_threshold_changes_nothing_but_speed() -> None:
    weights = _weights(1)
    warm = ThresholdTracker()
    warm.update(weights, 0.6, 0)
    warm.last_relative_move = 1e-9  # the narrowest window: the next answer lies outside it
    fresh = ThresholdTracker()
    assert warm.update(weights, 0.7, 1) == fresh.update(weights, 0.7, 1)


def test_nothing_pruned_is_threshold_zero() -> None:
    tracker = ThresholdTracker()
    assert tracker.update(_weights(), 0.0, 0).item() == 0.0
    assert tracker.threshold == 0.0


def test_nonfinite_weights_raise_with_counts_and_leave_the_state_as_it_was() -> None:
    tracker = ThresholdTracker()
    weights = _weights()
    tracker.update(weights, 0.5, 3)
    tracker.update(weights, 0.52, 4)
    before = (tracker.state_dict(), tracker.last_relative_move)
    weights[1][0, :2] = float("nan")
    weights[2][5] = float("-inf")
    with pytest.raises(NonFiniteWeightsError) as error:
        tracker.update(weights, 0.6, 5)
    assert error.value.counts == {1: (2, 0), 2: (0, 1)}
    assert (tracker.state_dict(), tracker.last_relative_move) == before
    with pytest.raises(NonFiniteWeightsError):  # also when nothing is to be pruned
        ThresholdTracker().update(weights, 0.0, 0)


def test_an_overflowing_sum_of_finite_weights_is_selected_without_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    original = tracking.floored_global_threshold
    calls: list[bool] = []

    def overflowing(*args: object, **kwargs: object) -> FlooredThresholds:
        check_finite = bool(args[8])
        calls.append(check_finite)
        if check_finite:  # the selection's sum said "not finite"
            raise NonFiniteScoresError([0])
        return original(*args, **kwargs)

    monkeypatch.setattr(tracking, "floored_global_threshold", overflowing)
    weights = _weights()
    assert float(ThresholdTracker().update(weights, 0.5, 0)) == _numpy_threshold(weights, 0.5, "l1")
    assert calls == [True, False]


def test_flops_budget_weighs_each_tensor_by_its_share() -> None:
    weights, shares = _weights(), [3.0, 1.0, 0.25]
    tracker = ThresholdTracker("l1_std", budget="flops")
    assert tracker.update(weights, 0.5, 0, shares) == weighted_global_threshold(weights, shares, 0.5, "l1_std")
    with pytest.raises(ValueError, match="`shares` must be given exactly when budget='flops'"):
        tracker.update(weights, 0.5, 1)
    with pytest.raises(ValueError, match="`shares` must be given exactly when budget='flops'"):
        ThresholdTracker().update(weights, 0.5, 1, shares)


def test_state_is_plain_python_and_round_trips() -> None:
    tracker = ThresholdTracker()
    tracker.update(_weights(), 0.4, 7)
    state = json.loads(json.dumps(tracker.state_dict()))
    assert set(state) == {"sparsity", "threshold", "last_update_step", "held"}  # 0.1's keys and the held layers
    restored = ThresholdTracker()
    restored.load_state_dict(state)
    assert (restored.threshold, restored.sparsity, restored.step) == (tracker.threshold, 0.4, 7)
    restored.load_state_dict({k: v for k, v in state.items() if k != "held"})  # 0.1's state: no layer held
    assert restored.held == {}
    floored = ThresholdTracker(min_density_ratio=1.0)  # every layer at the model's density: all held
    floored.update(_weights(), 0.4, 3)
    assert floored.held
    again = ThresholdTracker()
    again.load_state_dict(json.loads(json.dumps(floored.state_dict())))
    assert {i: float(t) for i, t in again.held.items()} == {i: float(t) for i, t in floored.held.items()}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"criterion": "l2"}, ValueError, r"`criterion` must be one of \('l1', 'l1_std'\), got 'l2'"),
        ({"budget": "macs"}, ValueError, r"`budget` must be one of \('params', 'flops'\), got 'macs'"),
        ({"compile_kernels": 1}, TypeError, r"`compile_kernels` must be True or False, got 1"),
    ],
)
def test_bad_settings_name_the_argument(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ThresholdTracker(**kwargs)


def test_assignments_go_through_the_constructors_checks() -> None:
    tracker = ThresholdTracker()
    tracker.set("criterion", "l1_std")
    tracker.set("step", 3)
    assert (tracker.criterion, tracker.step) == ("l1_std", 3)
    with pytest.raises(ValueError, match=r"`budget` must be one of \('params', 'flops'\), got 'macs'"):
        tracker.set("budget", "macs")
    with pytest.raises(ValueError, match=r"`threshold` must be in \[0, inf\], got -1.0"):
        tracker.set("threshold", -1.0)
    with pytest.raises(ValueError, match=r"`name` must be one of \('criterion'"):
        tracker.set("pivot", 0.1)
