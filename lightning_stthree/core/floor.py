r"""A floor on every layer's density inside the exact global-threshold selection, so that no layer collapses.

A global magnitude threshold takes the weights of a small-initialised layer first (a classifier head initialised with
std 0.01 next to fan-in scaled convolutions) and can leave it without a single weight. :func:`floored_global_threshold`
keeps at least ``ceil(min_density * n)`` of each layer's ``n`` weights and still prunes exactly the goal in total.

With :math:`c_i(t)` layer ``i``'s number of scores ``<= t`` and :math:`m_i` its cap (:func:`density_caps`), a layer is
*held* at threshold ``t`` when :math:`c_i(t) > m_i`; it then prunes :math:`g_i = c_i(o_i)` weights, where its own
threshold :math:`o_i` is the largest score with :math:`c_i(o_i) \le m_i` (its :math:`m_i` smallest scores, fewer when
scores are tied at the boundary: ties never take a layer below its floor). The result is the smallest score ``t``
with

.. math:: \sum_i \mathrm{shares}_i\, c_i(\min(t, o_i)) \ge \mathrm{goal},

a non-decreasing function of ``t``, so the answer is unique. It is found by water-filling: select over the layers not
held with the held layers' pruned weights taken off the goal; hold those over their cap; repeat until no further
layer is over. The threshold only rises from round to round, so a held layer stays held; at most one round per layer,
one or two in practice. A run's held set changes little between optimizer steps: started from the last update's held
set (``start_held``), one selection usually suffices, and a counting pass over those few layers confirms that each is
still over its cap (or the selection starts over without them).

Exact zeros are zeros whatever the threshold: a layer with more exact zeros than its cap keeps only its non-zero
weights (its own threshold is 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_stthree.core.distributed import is_dtensor
from lightning_stthree.core.selection import (
    PIVOT_WINDOW,
    counts_at_most,
    score_chunks,
    select_threshold,
    select_threshold_counted,
)
from lightning_stthree.core.threshold import (
    Criterion,
    check_shares,
    global_threshold,
    layer_score_factor,
    num_pruned,
    weighted_global_threshold,
)


def density_caps(sizes: Sequence[int], min_density: float) -> list[int]:
    """The most weights each layer may lose under a density floor: ``n - ceil(min_density * n)`` for ``n`` weights
    (a layer keeps at least one weight whenever ``min_density > 0``).

    Example::

        >>> density_caps([1000, 50, 1], 0.01)
        [990, 49, 0]
    """
    # `round` first: 0.07 * 100 is 7.000000000000001 in floats, whose ceiling would keep one weight too many.
    return [n - math.ceil(round(min_density * n, 9)) for n in sizes]


class FlooredThresholds(NamedTuple):
    """What :func:`floored_global_threshold` selects."""

    #: The global threshold (score units) of the layers not held at the floor.
    threshold: Tensor
    #: ``{layer index: its own threshold in score units}`` for each layer held at the floor (see the module
    #: docstring), below the global threshold.
    held: dict[int, Tensor]


@torch.no_grad()
def largest_within_cap(
    weight: Tensor, factor: float, cap: int, pivot: float | None = None, compile_kernels: bool = False
) -> tuple[Tensor, int]:
    """The largest score ``o`` of ``weight`` with at most ``cap`` scores ``<= o``, and how many there are (0 and the
    number of exact zeros when even the smallest score is tied beyond the cap). A sharded weight (DTensor) is
    gathered first (the held layers are few and usually small).

    Example::

        >>> largest_within_cap(torch.tensor([0.1, 0.5, 0.5, 0.5, 0.9]), 1.0, cap=3)  # 0.5 is tied beyond the cap
        (tensor(0.1000), 1)
    """
    if is_dtensor(weight):
        weight = weight.full_tensor()
    if cap >= weight.numel():
        return torch.cat(list(score_chunks(weight, factor))).max(), weight.numel()
    above = select_threshold([weight], [factor], [1.0], float(cap + 1), pivot, compile_kernels=compile_kernels)
    count = torch.zeros((), dtype=torch.int64, device=above.device)
    largest = torch.zeros((), dtype=torch.float32, device=above.device)
    for scores in score_chunks(weight, factor):
        below = scores[scores < above]
        count += below.numel()
        if below.numel():
            largest = torch.maximum(largest, below.max())
    if int(count) == 0:  # the smallest score is tied beyond the cap: prune only exact zeros
        zeros = sum(int(torch.count_nonzero(scores == 0)) for scores in score_chunks(weight, factor))
        return largest, zeros
    return largest, int(count)


@torch.no_grad()
def floored_global_threshold(
    weights: Sequence[Tensor],
    sparsity: float,
    min_density: float = 0.0,
    criterion: Criterion = "l1",
    shares: Sequence[float] | None = None,
    pivot: float | None = None,
    window: float = PIVOT_WINDOW,
    compile_kernels: bool = False,
    check_finite: bool = False,
    held_pivots: dict[int, float] | None = None,
    start_held: Sequence[int] = (),
) -> FlooredThresholds:
    """The global threshold, with a floor on every layer's density (see the module docstring): no layer keeps fewer
    than ``ceil(min_density * n)`` of its ``n`` weights (barring exact zeros), and the total pruned is the goal.

    The goal is :func:`~lightning_stthree.core.threshold.global_threshold`'s (``num_pruned(sparsity, N)`` weights)
    without ``shares``, and :func:`~lightning_stthree.core.threshold.weighted_global_threshold`'s (``sparsity`` of the
    total share, e.g. of the MACs) with them; the total overshoots it only by ties at the global threshold, as there.
    ``min_density=0`` (and a goal of 0) is the paper's pure global threshold, bitwise. When the floors leave less to
    prune than the goal (``sparsity > 1 - min_density``), every layer is held: the floor wins.

    Args:
        weights: The raw prunable weight tensors.
        sparsity: The fraction to prune, in ``[0, 1]``.
        min_density: The floor on each layer's kept fraction, in ``[0, 1]``.
        criterion: ``"l1"`` or ``"l1_std"``.
        shares: One non-negative share per tensor (the FLOPs budget), or ``None`` to count weights.
        pivot: The previous global threshold (score units), if any.
        window: Half-width of the window searched around a pivot first, relative to it.
        compile_kernels: Count with fused kernels (see :func:`~lightning_stthree.core.selection.select_threshold`).
        check_finite: Raise if some weights are not finite (as ``global_threshold``).
        held_pivots: The previous own thresholds of held layers (score units), by layer index, to search near.
        start_held: Layers to hold from the start (the last update's); the result is the same with any start.

    Returns:
        The :class:`FlooredThresholds`.

    Raises:
        ValueError: On empty ``weights``, mismatched or negative ``shares``, ``sparsity`` outside ``[0, 1]`` or
            ``min_density`` outside ``[0, 1]``.
        NonFiniteScoresError: With ``check_finite``, if some tensor's scores do not sum to a finite number.

    Example::

        >>> small, large = torch.tensor([0.01, 0.02]), torch.tensor([0.3, 0.4, 0.5, 0.6])
        >>> floored_global_threshold([small, large], 0.5)  # the pure global threshold empties the small layer
        FlooredThresholds(threshold=tensor(0.3000), held={})
        >>> floored_global_threshold([small, large], 0.5, min_density=0.5)
        FlooredThresholds(threshold=tensor(0.4000), held={0: tensor(0.0100)})
    """
    if not 0.0 <= min_density <= 1.0:
        raise ValueError(f"`min_density` must be in [0, 1], got {min_density}")
    if shares is None:
        if min_density == 0.0 or len(weights) == 0 or not 0.0 <= sparsity <= 1.0:
            threshold = global_threshold(weights, sparsity, criterion, pivot, window, compile_kernels, check_finite)
            return FlooredThresholds(threshold, {})
        shares = [1.0] * len(weights)
        goal = float(num_pruned(sparsity, sum(w.numel() for w in weights)))
    else:
        check_shares(weights, shares, sparsity)
        if min_density == 0.0:
            threshold = weighted_global_threshold(
                weights, shares, sparsity, criterion, pivot, window, compile_kernels, check_finite
            )
            return FlooredThresholds(threshold, {})
        goal = sparsity * sum(share * w.numel() for w, share in zip(weights, shares, strict=True))
    factors = [layer_score_factor(w.shape, criterion) for w in weights]
    if goal <= 0:  # nothing to prune, nothing to hold
        return FlooredThresholds(select_threshold(weights, factors, shares, 0.0, check_finite=check_finite), {})
    caps = density_caps([w.numel() for w in weights], min_density)
    held_pivots = held_pivots or {}

    def solve(initial: Sequence[int], check: bool) -> tuple[Tensor, dict[int, tuple[Tensor, int]]]:
        held: dict[int, tuple[Tensor, int]] = {}  # layer -> (own threshold, weights it prunes)

        def hold(indices: Sequence[int]) -> None:
            for i in indices:
                held[i] = largest_within_cap(weights[i], factors[i], caps[i], held_pivots.get(i), compile_kernels)

        hold(initial)
        rest = [i for i in range(len(weights)) if i not in held]
        while rest:
            left = goal - sum(shares[i] * pruned for i, (_, pruned) in held.items())
            threshold, counts = select_threshold_counted(
                [weights[i] for i in rest],
                [factors[i] for i in rest],
                [shares[i] for i in rest],
                left,
                pivot,
                window,
                compile_kernels,
                check,
            )
            check = False  # the weights were checked once
            over = [i for i, count in zip(rest, counts, strict=True) if count > caps[i]]
            if not over:
                return threshold, held
            hold(over)
            rest = [i for i in rest if i not in held]
        return torch.zeros((), dtype=torch.float32, device=weights[0].device), held  # every layer held

    start = sorted({i for i in start_held if 0 <= i < len(weights)})
    if check_finite and start:  # the layers held from the start are not in the selection's pass
        select_threshold(
            [weights[i] for i in start], [factors[i] for i in start], [1.0] * len(start), 0.0, None, check_finite=True
        )
    threshold, held = solve(start, check_finite)
    if start:
        # Held from the start: each must still be over its cap at the threshold found, or it is not held at all.
        still = counts_at_most([weights[i] for i in start], [factors[i] for i in start], threshold)
        if any(count <= caps[i] for i, count in zip(start, still, strict=True)):
            threshold, held = solve((), False)
    return FlooredThresholds(threshold, {i: own for i, (own, _) in sorted(held.items())})
