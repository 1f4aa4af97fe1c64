"""Global magnitude-threshold selection of ST-3 (arXiv:2212.01076, Sec. 3.3).

One threshold ``t`` is the k-th smallest pruning score over *all* prunable weights of the model, where ``k`` is the
scheduled number of pruned weights. Criterion ``"l1"`` (ST-3) scores a weight by ``|w|``; criterion ``"l1_std"``
(ST-3 sigma) by ``|w| * sqrt(sum(w.shape))``, which normalises by layer size and gives a more uniform sparsity across
layers. A layer then applies ``t_layer = t / sqrt(sum(w.shape))`` to its raw magnitudes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_stthree.core.selection import PIVOT_WINDOW, score_chunks, select_threshold

Criterion = Literal["l1", "l1_std"]
CRITERIA: tuple[str, ...] = ("l1", "l1_std")


def layer_score_factor(shape: Sequence[int], criterion: Criterion) -> float:
    """Factor that turns a layer's magnitudes into pruning scores: ``score = |w| * factor``.

    Args:
        shape: The weight's shape.
        criterion: ``"l1"`` (factor 1) or ``"l1_std"`` (factor ``sqrt(sum(shape))``, ST-3 sigma).

    Returns:
        The factor; a layer's threshold on raw magnitudes is ``t / factor``.

    Raises:
        ValueError: If ``criterion`` is unknown.
    """
    if criterion == "l1":
        return 1.0
    if criterion == "l1_std":
        return math.sqrt(sum(shape))
    raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}")


def pruning_scores(weight: Tensor, criterion: Criterion) -> Tensor:
    """Flat float32 pruning scores of one weight tensor (``|w| * layer_score_factor``), as the selection sees them."""
    return torch.cat(list(score_chunks(weight, layer_score_factor(weight.shape, criterion))))


def num_pruned(sparsity: float, num_weights: int) -> int:
    """Number of weights to prune so that the pruned fraction is ``sparsity`` (rounded to the nearest weight)."""
    return min(max(round(sparsity * num_weights), 0), num_weights)


@torch.no_grad()
def global_threshold(
    weights: Sequence[Tensor],
    sparsity: float,
    criterion: Criterion = "l1",
    pivot: float | None = None,
    window: float = PIVOT_WINDOW,
    compile_kernels: bool = False,
    check_finite: bool = False,
) -> Tensor:
    """The global threshold ``t`` that prunes a fraction ``sparsity`` of all scores of ``weights``.

    ``t`` is the k-th smallest score over all weights' scores, ``k = num_pruned(sparsity, N)`` (bitwise what
    ``torch.kthvalue`` gives on the concatenated scores), found tensor by tensor without concatenating or sorting the
    weights (:func:`~lightning_stthree.core.selection.select_threshold`); ``pivot``, the previous threshold, speeds it
    up. Pruned are the weights whose score is ``<= t``, so exactly ``k`` weights when scores have no ties. When
    ``k == 0`` the threshold is ``0``, which leaves every weight unchanged (a threshold taken at k=0 would shift every
    weight by the smallest magnitude).

    Args:
        weights: The raw prunable weight tensors (any shapes, same device).
        sparsity: The fraction of all weights to prune, in ``[0, 1]``.
        criterion: ``"l1"`` (ST-3) or ``"l1_std"`` (ST-3 sigma).
        pivot: The previous threshold (in score units), if any.
        window: Half-width of the window searched around ``pivot`` first, relative to it.
        compile_kernels: Count with fused kernels (see :func:`~lightning_stthree.core.selection.select_threshold`).
        check_finite: Raise if some weights are not finite, also when nothing is pruned (see
            :func:`~lightning_stthree.core.selection.select_threshold`).

    Returns:
        A 0-dim float32 tensor on the weights' device, in score units (divide by ``layer_score_factor`` per layer).

    Raises:
        ValueError: If ``weights`` is empty or ``sparsity`` is outside ``[0, 1]``.
        NonFiniteScoresError: With ``check_finite``, if some tensor's scores do not sum to a finite number.

    Example::

        >>> global_threshold([torch.tensor([0.1, -0.4]), torch.tensor([[0.3, -0.2]])], 0.5)
        tensor(0.2000)
    """
    if len(weights) == 0:
        raise ValueError("`weights` must hold at least one tensor, got an empty sequence")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity}")
    k = num_pruned(sparsity, sum(w.numel() for w in weights))
    factors = [layer_score_factor(w.shape, criterion) for w in weights]
    ones = [1.0] * len(weights)
    return select_threshold(weights, factors, ones, float(k), pivot, window, compile_kernels, check_finite)


@torch.no_grad()
def weighted_global_threshold(
    weights: Sequence[Tensor],
    shares: Sequence[float],
    fraction: float,
    criterion: Criterion = "l1",
    pivot: float | None = None,
    window: float = PIVOT_WINDOW,
    compile_kernels: bool = False,
    check_finite: bool = False,
) -> Tensor:
    r"""Smallest score ``t`` such that pruning every weight with score ``<= t`` removes ``fraction`` of the total share.

    Each weight of ``weights[i]`` carries ``shares[i]`` (for the FLOPs budget: its layer's MACs divided by its layer's
    weight count). With :math:`W(t) = \sum_i \mathrm{shares}_i \cdot \#\{\mathrm{score} \le t \text{ in layer } i\}`,
    the result is the smallest score value with :math:`W(t) \ge \mathrm{fraction} \cdot W(\infty)`, so the pruned
    share overshoots the goal by less than the share of the weights tied at ``t``. Found tensor by tensor, without
    concatenating or sorting (:func:`~lightning_stthree.core.selection.select_threshold`). With all shares equal to 1
    this is the k-th smallest score.

    Args:
        weights: The raw prunable weight tensors.
        shares: One non-negative share per tensor (applies to each of its weights).
        fraction: The fraction of the total share to prune, in ``[0, 1]``.
        criterion: ``"l1"`` or ``"l1_std"``, as for :func:`global_threshold`.
        pivot: The previous threshold (in score units), if any.
        window: Half-width of the window searched around ``pivot`` first, relative to it.
        compile_kernels: Count with fused kernels (see :func:`~lightning_stthree.core.selection.select_threshold`).
        check_finite: As for :func:`global_threshold`.

    Returns:
        A 0-dim float32 tensor in score units; ``0`` when the goal is 0 (nothing pruned).

    Raises:
        ValueError: On empty ``weights``, mismatched or negative ``shares``, or ``fraction`` outside ``[0, 1]``.
        NonFiniteScoresError: With ``check_finite``, if some tensor's scores do not sum to a finite number.
    """
    check_shares(weights, shares, fraction)
    factors = [layer_score_factor(w.shape, criterion) for w in weights]
    goal = fraction * sum(share * w.numel() for w, share in zip(weights, shares, strict=True))
    return select_threshold(weights, factors, shares, goal, pivot, window, compile_kernels, check_finite)


def check_shares(weights: Sequence[Tensor], shares: Sequence[float], fraction: float) -> None:
    """Refuse empty ``weights``, ``shares`` that are not one non-negative number per tensor, and a ``fraction``
    outside ``[0, 1]`` (``ValueError``)."""
    if len(weights) == 0:
        raise ValueError("`weights` must hold at least one tensor, got an empty sequence")
    if len(shares) != len(weights) or any(share < 0 for share in shares):
        raise ValueError(f"`shares` must hold one non-negative number per weight tensor, got {list(shares)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1], got {fraction}")


def layer_thresholds(
    threshold: Tensor,
    shapes: Sequence[Sequence[int]],
    criterion: Criterion,
    held: dict[int, Tensor] | None = None,
) -> list[Tensor]:
    """Each layer's threshold on its raw magnitudes, ``t / layer_score_factor(shape)``, from the global ``t`` in score
    units (rounded to ``t``'s float32); a layer in ``held`` (:class:`~lightning_stthree.core.floor.FlooredThresholds`)
    divides its own instead.

    Example::

        >>> layer_thresholds(torch.tensor(6.0), [(4, 5), (3, 6)], "l1_std")
        [tensor(2.), tensor(2.)]
    """
    held = held or {}
    return [held.get(i, threshold) / layer_score_factor(shape, criterion) for i, shape in enumerate(shapes)]
