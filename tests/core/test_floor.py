"""The density floor inside the exact selection (`floored_global_threshold`), against a brute-force numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_stthree.core.selection import select_threshold, select_threshold_counted
from lightning_stthree.core.threshold import (
    density_caps,
    floored_global_threshold,
    global_threshold,
    layer_score_factor,
    layer_thresholds,
    num_pruned,
    weighted_global_threshold,
)
from lightning_stthree.core.tracking import ThresholdTracker


def _reference(
    weights: list[torch.Tensor], goal: float, caps: list[int], factors: list[float], shares: list[float]
) -> tuple[float, dict[int, float]]:
    """Brute force: the smallest score t with sum_i shares_i * min(c_i(t), caps_i) >= goal; the held layers (c_i(t) >
    caps_i) with their caps_i-th smallest score (0 for a cap of 0)."""
    scores = [
        np.abs(w.detach().numpy().astype(np.float32)).ravel() * np.float32(f)
        for w, f in zip(weights, factors, strict=True)
    ]
    order = [np.sort(s) for s in scores]
    for t in np.unique(np.concatenate(scores)):
        counts = [int(np.searchsorted(s, t, side="right")) for s in order]
        if sum(share * min(c, cap) for share, c, cap in zip(shares, counts, caps, strict=True)) >= goal:
            held = {i: float(order[i][caps[i] - 1]) if caps[i] else 0.0 for i, c in enumerate(counts) if c > caps[i]}
            return float(t), held
    raise AssertionError("goal above the capacity")


def _layers(seed: int) -> list[torch.Tensor]:
    """Layers of very different scales: the pure global threshold empties the small-initialised ones."""
    generator = torch.Generator().manual_seed(seed)
    scales = [1.0, 0.5, 0.01, 0.002, 0.8]
    shapes = [(64, 32), (16, 16, 3, 3), (10, 64), (7,), (128, 8)]
    return [torch.randn(shape, generator=generator) * scale for shape, scale in zip(shapes, scales, strict=True)]


def test_density_caps_keep_the_ceiling_of_the_floor() -> None:
    assert density_caps([1000, 50, 1, 100], 0.01) == [990, 49, 0, 99]
    assert density_caps([100], 0.07) == [93]  # 0.07 * 100 is 7.000000000000001 in floats
    assert density_caps([5, 0], 0.0) == [5, 0]


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.92])
@pytest.mark.parametrize("seed", [0, 1])
def test_floor_matches_the_brute_force_reference(criterion: str, sparsity: float, seed: int) -> None:
    weights = _layers(seed)
    min_density = 0.05
    sizes = [w.numel() for w in weights]
    caps = density_caps(sizes, min_density)
    factors = [layer_score_factor(w.shape, criterion) for w in weights]
    goal = float(num_pruned(sparsity, sum(sizes)))
    want, want_held = _reference(weights, goal, caps, factors, [1.0] * len(weights))
    got = floored_global_threshold(weights, sparsity, min_density, criterion)
    assert float(got.threshold) == want
    assert {i: float(t) for i, t in got.held.items()} == want_held
    assert want_held, "the case must hold some layer, or it does not test the floor"
    # What the thresholds prune: exactly the goal in total, and no layer below its floor.
    per_layer = layer_thresholds(got.threshold, [w.shape for w in weights], criterion, got.held)
    pruned = [int((w.abs() <= t).sum()) for w, t in zip(weights, per_layer, strict=True)]
    assert sum(pruned) == goal
    assert all(n - p >= math.ceil(min_density * n) for n, p in zip(sizes, pruned, strict=True))


def test_without_the_floor_the_small_layers_empty_and_the_result_is_the_pure_global_threshold() -> None:
    weights = _layers(0)
    plain = floored_global_threshold(weights, 0.8, 0.0)
    assert plain.held == {}
    assert plain.threshold == global_threshold(weights, 0.8)
    assert bool((weights[2].abs() <= plain.threshold).all())  # the case the floor is for
    floored = floored_global_threshold(weights, 0.8, 0.005)
    assert sorted(floored.held) == [2, 3]
    assert floored.threshold > plain.threshold  # the others are pruned a little more


def test_a_floor_that_holds_nothing_gives_the_global_threshold_bitwise() -> None:
    weights = [torch.randn(50, 20), torch.randn(30, 30)]
    for sparsity in (0.0, 0.3, 0.9):
        got = floored_global_threshold(weights, sparsity, 0.005, "l1_std")
        assert got.held == {}
        assert got.threshold.item() == global_threshold(weights, sparsity, "l1_std").item()


def test_flops_budget_with_the_floor_matches_the_reference() -> None:
    weights = _layers(3)
    shares = [2.0, 9.0, 1.0, 0.5, 3.0]
    caps = density_caps([w.numel() for w in weights], 0.02)
    goal = 0.9 * sum(s * w.numel() for s, w in zip(shares, weights, strict=True))
    want, want_held = _reference(weights, goal, caps, [1.0] * 5, shares)
    got = floored_global_threshold(weights, 0.9, 0.02, shares=shares)
    assert float(got.threshold) == want
    assert {i: float(t) for i, t in got.held.items()} == want_held
    assert want_held
    plain = floored_global_threshold(weights, 0.9, 0.0, shares=shares)
    assert plain.threshold == weighted_global_threshold(weights, shares, 0.9)
    assert plain.held == {}


def test_search_near_the_last_thresholds_gives_the_same_answer() -> None:
    weights = _layers(1)
    first = floored_global_threshold(weights, 0.8, 0.05)
    with torch.no_grad():
        for w in weights:
            w.mul_(1.0 + 0.001 * torch.randn_like(w))  # one optimizer step's worth of change
    fresh = floored_global_threshold(weights, 0.81, 0.05)
    pivots = {i: float(t) for i, t in first.held.items()}
    near = floored_global_threshold(weights, 0.81, 0.05, pivot=float(first.threshold), held_pivots=pivots)
    assert near.threshold.item() == fresh.threshold.item()
    assert {i: t.item() for i, t in near.held.items()} == {i: t.item() for i, t in fresh.held.items()}


def test_a_goal_above_what_the_floors_leave_holds_every_layer_at_its_floor() -> None:
    weights = [torch.randn(100), torch.randn(40) * 0.1]
    got = floored_global_threshold(weights, 0.99, 0.05)
    assert sorted(got.held) == [0, 1]
    per_layer = layer_thresholds(got.threshold, [w.shape for w in weights], "l1", got.held)
    assert [int((w.abs() <= t).sum()) for w, t in zip(weights, per_layer, strict=True)] == [95, 38]


def test_a_floor_at_the_model_density_gives_every_layer_the_same_sparsity() -> None:
    weights = _layers(4)
    tracker = ThresholdTracker(min_density_ratio=1.0)
    threshold = tracker.update(weights, 0.75, 0)
    per_layer = layer_thresholds(threshold, [w.shape for w in weights], "l1", tracker.held)
    kept = [int((w.abs() > t).sum()) for w, t in zip(weights, per_layer, strict=True)]
    assert kept == [math.ceil(0.25 * w.numel()) for w in weights]


def test_floor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`min_density` must be in \[0, 1\], got 1.5"):
        floored_global_threshold([torch.ones(3)], 0.5, 1.5)
    with pytest.raises(ValueError, match="`sparsity` must be in"):
        floored_global_threshold([torch.ones(3)], 1.5, 0.1)
    with pytest.raises(ValueError, match="`shares` must hold one non-negative number"):
        floored_global_threshold([torch.ones(3)], 0.5, 0.1, shares=[-1.0])
    with pytest.raises(TypeError, match="`min_density_ratio` must be a number"):
        ThresholdTracker(min_density_ratio="0.1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`min_density_ratio` must be in \[0, 1\], got 1.2"):
        ThresholdTracker().set("min_density_ratio", 1.2)


@pytest.mark.parametrize(("pivot", "compile_kernels"), [(None, False), ("near", False), ("far", False), ("near", True)])
@pytest.mark.parametrize("weighted", [False, True])
def test_counted_selection_counts_what_the_threshold_prunes(
    pivot: str | None, compile_kernels: bool, weighted: bool
) -> None:
    weights = _layers(2)
    factors = [1.0, 2.0, 1.0, 3.0, 0.5]
    shares = [1.0, 1.0, 2.0, 1.0, 0.25] if weighted else [1.0] * 5
    goal = 0.6 * sum(s * w.numel() for s, w in zip(shares, weights, strict=True))
    plain = select_threshold(weights, factors, shares, goal)
    start = {"near": float(plain) * 1.001, "far": float(plain) * 3.0, None: None}[pivot]
    threshold, counts = select_threshold_counted(
        weights, factors, shares, goal, pivot=start, compile_kernels=compile_kernels
    )
    assert threshold.item() == plain.item()
    assert counts == [int((w.abs() * f <= threshold).sum()) for w, f in zip(weights, factors, strict=True)]
    nothing, zero_counts = select_threshold_counted(weights, factors, shares, 0.0)
    assert nothing.item() == 0.0
    assert zero_counts == [0] * 5


def test_tracker_keeps_the_held_layers_of_its_last_update() -> None:
    weights = _layers(0)
    tracker = ThresholdTracker(min_density_ratio=0.025)  # at sparsity 0.8: each layer keeps at least 0.5%
    threshold = tracker.update(weights, 0.8, 0)
    assert sorted(tracker.held) == [2, 3]
    assert threshold.item() == floored_global_threshold(weights, 0.8, 0.005).threshold.item()
    tracker.update(weights, 0.9, 1)  # the floor follows the schedule: 0.25% at 0.9
    assert threshold.item() != floored_global_threshold(weights, 0.9, 0.0025).threshold.item()
    assert tracker.threshold == floored_global_threshold(weights, 0.9, 0.0025).threshold.item()
    tracker.set("min_density_ratio", 0.0)
    tracker.update(weights, 0.8, 2)
    assert tracker.held == {}
    assert tracker.state_dict() == {"sparsity": 0.8, "threshold": tracker.threshold, "last_update_step": 2}
