"""The density floor inside the exact selection (`floored_global_threshold`), against a brute-force numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_stthree.core.floor import density_caps, floored_global_threshold, largest_within_cap
from lightning_stthree.core.selection import select_threshold, select_threshold_counted
from lightning_stthree.core.threshold import (
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
    """Brute force of the module docstring's definition: a layer over its cap at t prunes the g_i scores below its
    (cap + 1)-th smallest (its own threshold o_i the largest of them; 0 and its exact zeros if there is none); the
    smallest score t with sum_i shares_i * (c_i(t) if c_i(t) <= cap_i else g_i) >= goal."""
    scores = [
        np.abs(w.detach().numpy().astype(np.float32)).ravel() * np.float32(f)
        for w, f in zip(weights, factors, strict=True)
    ]
    order = [np.sort(s) for s in scores]
    own = []
    for s, cap in zip(order, caps, strict=True):
        below = int(np.searchsorted(s, s[cap], side="left")) if cap < s.size else s.size
        own.append((float(s[below - 1]), below) if below else (0.0, int((s == 0).sum())))
    for t in np.unique(np.concatenate(scores)):
        counts = [int(np.searchsorted(s, t, side="right")) for s in order]
        pruned = [c if c <= cap else own[i][1] for i, (c, cap) in enumerate(zip(counts, caps, strict=True))]
        if sum(share * p for share, p in zip(shares, pruned, strict=True)) >= goal:
            return float(t), {i: own[i][0] for i, c in enumerate(counts) if c > caps[i]}
    return 0.0, {i: own[i][0] for i in range(len(order))}  # the floors leave less than the goal: all held


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
    assert tracker.state_dict() == {"sparsity": 0.8, "threshold": tracker.threshold, "last_update_step": 2, "held": {}}


@pytest.mark.parametrize("seed", range(6))
def test_ties_at_a_held_layers_boundary_never_take_it_below_its_floor(seed: int) -> None:
    # Magnitudes on a coarse grid: many ties, at the global threshold and at the held layers' boundaries.
    generator = torch.Generator().manual_seed(seed)
    weights = [(torch.randn(40, generator=generator) * scale * 20).round() / 20 for scale in (1.0, 0.05, 0.3, 0.02)]
    min_density, sparsity = 0.3, 0.6
    sizes = [w.numel() for w in weights]
    caps = density_caps(sizes, min_density)
    goal = float(num_pruned(sparsity, sum(sizes)))
    want, want_held = _reference(weights, goal, caps, [1.0] * 4, [1.0] * 4)
    got = floored_global_threshold(weights, sparsity, min_density)
    assert float(got.threshold) == want
    assert {i: float(t) for i, t in got.held.items()} == want_held
    per_layer = layer_thresholds(got.threshold, [w.shape for w in weights], "l1", got.held)
    kept = [int((w.abs() > t).sum()) for w, t in zip(weights, per_layer, strict=True)]
    nonzero = [int((w != 0).sum()) for w in weights]
    floors = [n - c for n, c in zip(sizes, caps, strict=True)]
    assert all(k >= min(f, nz) for k, f, nz in zip(kept, floors, nonzero, strict=True))  # exact zeros stay zeros


def test_a_boundary_tie_as_the_review_found_it() -> None:
    a = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.5, 0.5])  # cap 3: 0.5 is tied beyond it, so only 0.1 may go
    b = torch.tensor([0.2, 0.3, 0.45, 0.47, 0.48, 0.9, 0.95, 0.99, 1.0, 1.1])
    got = floored_global_threshold([a, b], 7 / 16, 0.5)  # a goal of 7 the floors cannot give: both held
    assert {i: float(t) for i, t in got.held.items()} == {0: pytest.approx(0.1), 1: pytest.approx(0.48)}
    per_layer = layer_thresholds(got.threshold, [a.shape, b.shape], "l1", got.held)
    assert [int((w <= t).sum()) for w, t in zip((a, b), per_layer, strict=True)] == [1, 5]  # a keeps 5 >= 3
    assert largest_within_cap(a, 1.0, 3) == (torch.tensor(0.1), 1)


@pytest.mark.parametrize("seed", range(4))
def test_starting_from_any_held_set_gives_the_same_answer(seed: int) -> None:
    weights = _layers(seed)
    fresh = floored_global_threshold(weights, 0.85, 0.03)
    assert fresh.held
    for start in ([], list(fresh.held), [0, 1], [0, 1, 2, 3, 4], [4]):  # right, stale or wrong starts
        got = floored_global_threshold(weights, 0.85, 0.03, pivot=float(fresh.threshold), start_held=start)
        assert got.threshold.item() == fresh.threshold.item(), start
        assert {i: t.item() for i, t in got.held.items()} == {i: t.item() for i, t in fresh.held.items()}


def test_nothing_to_prune_holds_nothing_even_with_many_exact_zeros() -> None:
    mostly_zero = torch.zeros(100)
    mostly_zero[:3] = 1.0
    got = floored_global_threshold([mostly_zero, torch.randn(50)], 0.0, 0.2)
    assert got.held == {}
    assert float(got.threshold) == 0.0
