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
    """Flat float32 pruning scores of one weight tensor (``|w| * layer_score_factor``)."""
    magnitude = weight.detach().abs().flatten().float()
    factor = layer_score_factor(weight.shape, criterion)
    return magnitude if factor == 1.0 else magnitude * factor


def num_pruned(sparsity: float, num_weights: int) -> int:
    """Number of weights to prune so that the pruned fraction is ``sparsity`` (rounded to the nearest weight)."""
    return min(max(round(sparsity * num_weights), 0), num_weights)


@torch.no_grad()
def global_threshold(weights: Sequence[Tensor], sparsity: float, criterion: Criterion = "l1") -> Tensor:
    """The global threshold ``t`` that prunes a fraction ``sparsity`` of all scores of ``weights``.

    ``t`` is the k-th smallest score over the concatenation of all weights' scores, ``k = num_pruned(sparsity, N)``,
    found with an O(N) selection (``torch.kthvalue``), not a sort. Pruned are the weights whose score is ``<= t``, so
    exactly ``k`` weights when scores have no ties. When ``k == 0`` the threshold is ``0``, which leaves every weight
    unchanged (a threshold taken at k=0 would shift every weight by the smallest magnitude).

    Args:
        weights: The raw prunable weight tensors (any shapes, same device).
        sparsity: The fraction of all weights to prune, in ``[0, 1]``.
        criterion: ``"l1"`` (ST-3) or ``"l1_std"`` (ST-3 sigma).

    Returns:
        A 0-dim float32 tensor on the weights' device, in score units (divide by ``layer_score_factor`` per layer).

    Raises:
        ValueError: If ``weights`` is empty or ``sparsity`` is outside ``[0, 1]``.

    Example::

        >>> global_threshold([torch.tensor([0.1, -0.4]), torch.tensor([[0.3, -0.2]])], 0.5)
        tensor(0.2000)
    """
    if len(weights) == 0:
        raise ValueError("`weights` must hold at least one tensor, got an empty sequence")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"`sparsity` must be in [0, 1], got {sparsity}")
    scores = torch.cat([pruning_scores(w, criterion) for w in weights])
    k = num_pruned(sparsity, scores.numel())
    if k == 0:
        return torch.zeros((), dtype=torch.float32, device=scores.device)
    return torch.kthvalue(scores, k).values


# Radix selection over the bit patterns of non-negative float32 scores (whose int32 views sort like the floats):
# first on the high 16 bits, then on the low 16 bits of the one bucket that holds the answer.
_RADIX_BITS = 16
_RADIX_BUCKETS = 1 << _RADIX_BITS


def _first_reaching(histogram: Tensor, goal: Tensor) -> tuple[int, Tensor]:
    """Index of the first bucket where the running sum of ``histogram`` reaches ``goal``, and the sum before it.

    A goal above the total (float rounding of a goal computed as ``fraction * total``) gives the last non-empty bucket,
    so the answer is always a bucket that holds weights.
    """
    cumulative = histogram.cumsum(0)
    last_non_empty = int(torch.nonzero(histogram).max())
    index = min(int(torch.searchsorted(cumulative, goal.reshape(1))), last_non_empty)
    before = cumulative[index - 1] if index > 0 else torch.zeros((), dtype=cumulative.dtype, device=goal.device)
    return index, before


@torch.no_grad()
def weighted_global_threshold(
    weights: Sequence[Tensor], shares: Sequence[float], fraction: float, criterion: Criterion = "l1"
) -> Tensor:
    r"""Smallest score ``t`` such that pruning every weight with score ``<= t`` removes ``fraction`` of the total share.

    Each weight of ``weights[i]`` carries ``shares[i]`` (for the FLOPs budget: its layer's MACs divided by its layer's
    weight count). With :math:`W(t) = \sum_i \mathrm{shares}_i \cdot \#\{\mathrm{score} \le t \text{ in layer } i\}`,
    the result is the smallest score value with :math:`W(t) \ge \mathrm{fraction} \cdot W(\infty)`, so the pruned
    share overshoots the goal by less than the share of the weights tied at ``t``. Found tensor by tensor, without
    concatenating or sorting, by a two-pass radix selection over the float32 bit patterns of the scores (two
    ``bincount`` passes over every weight). With all shares equal to 1 this is the k-th smallest score.

    Args:
        weights: The raw prunable weight tensors.
        shares: One non-negative share per tensor (applies to each of its weights).
        fraction: The fraction of the total share to prune, in ``[0, 1]``.
        criterion: ``"l1"`` or ``"l1_std"``, as for :func:`global_threshold`.

    Returns:
        A 0-dim float32 tensor in score units; ``0`` when the goal is 0 (nothing pruned).

    Raises:
        ValueError: On empty ``weights``, mismatched or negative ``shares``, or ``fraction`` outside ``[0, 1]``.
    """
    if len(weights) == 0:
        raise ValueError("`weights` must hold at least one tensor, got an empty sequence")
    if len(shares) != len(weights) or any(share < 0 for share in shares):
        raise ValueError(f"`shares` must hold one non-negative number per weight tensor, got {list(shares)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"`fraction` must be in [0, 1], got {fraction}")
    device = weights[0].device
    if fraction == 0 or all(share == 0 for share in shares):
        return torch.zeros((), dtype=torch.float32, device=device)

    def keys(weight: Tensor) -> Tensor:
        # Recomputed in each pass, so that only one tensor's scores are held at a time.
        return pruning_scores(weight, criterion).view(torch.int32)

    high_histogram = torch.zeros(_RADIX_BUCKETS, dtype=torch.float64, device=device)
    for weight, share in zip(weights, shares, strict=True):
        high_histogram += torch.bincount(keys(weight) >> _RADIX_BITS, minlength=_RADIX_BUCKETS).double() * share
    goal = fraction * high_histogram.sum()
    high, before = _first_reaching(high_histogram, goal)

    low_histogram = torch.zeros(_RADIX_BUCKETS, dtype=torch.float64, device=device)
    for weight, share in zip(weights, shares, strict=True):
        key = keys(weight)
        in_bucket = key[(key >> _RADIX_BITS) == high] & (_RADIX_BUCKETS - 1)
        low_histogram += torch.bincount(in_bucket, minlength=_RADIX_BUCKETS).double() * share
    low, _ = _first_reaching(low_histogram, goal - before)
    return torch.tensor((high << _RADIX_BITS) | low, dtype=torch.int32, device=device).view(torch.float32)
