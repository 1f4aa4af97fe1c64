"""Exact selection of the global threshold, tensor by tensor, without concatenating or sorting the weights.

The question every threshold update asks: which is the smallest score ``t`` such that the weights with score ``<= t``
carry at least ``goal`` (``k`` weights for the parameter budget, a number of MACs for the FLOPs budget)? The authors'
code answers with a full ``torch.sort`` of all weights; :func:`select_threshold` answers exactly (the result is
always one of the scores, and for unit shares it is bitwise the k-th smallest score), in a few elementwise passes:

1. *Near the previous threshold* (``pivot``): the threshold moves little between optimizer steps. One pass counts
   the share below ``pivot * (1 - window)`` and gathers the few scores inside ``(pivot * (1 - window),
   pivot * (1 + window)]``; if the answer lies inside, a k-th value selection among those few candidates (a sort,
   when the shares differ) finishes the job. With ``compile_kernels`` that pass is one fused kernel per tensor, which
   counts instead of gathering and says where the few candidates are (:func:`_near_pivot_fused`).
2. *Otherwise* (first update, or the threshold jumped): a two-pass radix selection over the float32 bit patterns of
   the scores (non-negative floats order like their int32 views): a histogram of the high 16 bits finds the bucket
   holding the answer, a histogram of the low 16 bits within that bucket finds the answer.

Scores are produced in chunks of :data:`CHUNK_SIZE` elements, so the extra memory is a few chunk-sized temporaries
(plus the candidates) whatever the model's size. Everything runs on the weights' device (CPU or GPU).

Sharded weights (DTensors, FSDP2): every rank builds both histograms over its own shards and the histograms are
all-reduced (:mod:`~lightning_stthree.core.distributed`), so each update communicates ``2 * 65536`` float64 counts
(1 MiB) whatever the number of weights, and every rank gets the threshold a single process gets on the whole weights
(the counts are exact). The near-pivot pass is skipped there: its candidates would have to be gathered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_stthree.core.distributed import LocalParts, Reduce, local_parts
from lightning_stthree.core.kernels import compiled, scores_of, window_column_counts

# Elements per scored chunk: 4M float32 scores are 16 MB, large enough for full-speed kernels.
CHUNK_SIZE = 1 << 22
# Default half-width of the window around the previous threshold, relative to it (callers that know how much the
# threshold moved lately pass a tighter one, see `pivot_window`: fewer candidates to read back and select among).
PIVOT_WINDOW = 0.02
# Narrowest window `pivot_window` gives.
MIN_PIVOT_WINDOW = 1e-3


def pivot_window(last_relative_move: float) -> float:
    """The window to search around the last threshold: twice its last relative move, within ``[MIN_PIVOT_WINDOW,
    PIVOT_WINDOW]`` (wide enough to hold the next threshold most of the time, narrow enough for few candidates)."""
    return min(max(2.0 * last_relative_move, MIN_PIVOT_WINDOW), PIVOT_WINDOW)


class NonFiniteScoresError(FloatingPointError):
    """Raised by :func:`select_threshold` with ``check_finite=True``: scores of some weights do not sum to a finite
    number, so they hold NaN or Inf (or, rarely, finite scores so large that their sum overflows).

    Attributes:
        suspects: Indices, in the weights given, of the tensors whose sums are not finite.
    """

    def __init__(self, suspects: list[int]) -> None:
        super().__init__(f"the scores of the weight tensors at indices {suspects} do not sum to a finite number")
        self.suspects = suspects


def nonfinite_sums(weights: Sequence[Tensor]) -> list[int]:
    """Indices of the tensors of ``weights`` whose sum is not finite: every tensor holding NaN or Inf, and rarely one
    of finite entries whose sum overflows. One sum per tensor and one device sync; sharded tensors (DTensors) are
    summed shard by shard and the sums all-reduced."""
    return _nonfinite_sums(local_parts(weights))


def _nonfinite_sums(parts: LocalParts) -> list[int]:
    """:func:`nonfinite_sums` of weights already split into this rank's parts."""
    sums = parts.total(
        torch.stack([w.detach().sum(dtype=torch.promote_types(w.dtype, torch.float32)).double() for w in parts.tensors])
    )
    return _nonfinite_indices(sums)


def _nonfinite_indices(sums: Tensor) -> list[int]:
    return torch.nonzero(~torch.isfinite(sums)).flatten().tolist()


@torch.no_grad()
def nonfinite_counts(weights: Sequence[Tensor]) -> dict[int, tuple[int, int]]:
    """Which tensors hold NaN or infinite entries: ``{index: (number of NaNs, number of infinities)}``.

    A threshold selected over such weights means nothing (NaN scores are never counted, infinite ones always sort
    last), so :func:`select_threshold` checks the sums of the weights (``check_finite``) and raises
    :class:`NonFiniteScoresError` when one is not finite; this gives the exact counts. The common case, all finite,
    costs one sum per tensor and one device sync: a sum is finite whenever every entry is (barring overflow, which the
    exact count below then clears); only the tensors whose sum is not finite are counted entry by entry.

    Args:
        weights: Floating-point tensors on one device; DTensors are checked shard by shard, with one all-reduce of
            the sums (and of the counts, if any sum is not finite).

    Returns:
        The offending tensors' indices in ``weights`` with their NaN and infinity counts; empty if all are finite.

    Example::

        >>> nonfinite_counts([torch.ones(3), torch.tensor([1.0, float("nan"), float("-inf")])])
        {1: (1, 1)}
    """
    if not weights:
        return {}
    parts = local_parts(weights)
    suspects = _nonfinite_sums(parts)
    if not suspects:
        return {}
    chosen = parts.subset(suspects)
    nans = chosen.count(lambda _, part: torch.isnan(part.detach()).sum())
    infs = chosen.count(lambda _, part: torch.isinf(part.detach()).sum())
    return {index: (n, i) for index, n, i in zip(suspects, nans, infs, strict=True) if n or i}


_RADIX_BITS = 16
_RADIX_BUCKETS = 1 << _RADIX_BITS


def score_chunks(weight: Tensor, factor: float = 1.0, buffer: Tensor | None = None) -> Iterator[Tensor]:
    """Float32 pruning scores ``|w| * factor`` of ``weight``, flattened, in chunks of at most :data:`CHUNK_SIZE`.

    Computed as ``weight.abs().float() * factor`` chunk by chunk: bitwise the same values as on the whole tensor.
    With a float32 ``buffer`` of at least ``CHUNK_SIZE`` elements, the chunks are written into it (each chunk is only
    valid until the next one is produced): on a CPU, filling reused memory is several times faster than allocating.
    """
    flat = weight.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK_SIZE):
        part = flat[start : start + CHUNK_SIZE]
        if buffer is None:
            scores = part.abs().float()
        else:
            scores = buffer[: part.numel()]
            torch.abs(part, out=scores) if part.dtype == torch.float32 else scores.copy_(part).abs_()
        yield scores if factor == 1.0 else scores.mul_(factor)


def _score_buffer(weights: Sequence[Tensor]) -> Tensor:
    size = min(CHUNK_SIZE, max(max(w.numel() for w in weights), 1))
    return torch.empty(size, dtype=torch.float32, device=weights[0].device)


def _first_reaching(cumulative: Tensor, goal: float) -> int:
    """First index where the non-decreasing ``cumulative`` reaches ``goal``; past the end if it never does."""
    return int(torch.searchsorted(cumulative, torch.tensor([goal], dtype=cumulative.dtype, device=cumulative.device)))


# Marked columns `_near_pivot_fused` gathers before reading them back (the read-back holds about 100 bytes for each).
_DECODE_BLOCK = 1 << 18
# Rows of the view the fused counting pass reads each weight as (see `_near_pivot_fused`; at most 31, the bits of
# the int32 marks per column).
FUSED_ROWS = 16


class _Window(NamedTuple):
    """What one pass over the weights found around the previous threshold."""

    below: list[int]  # per tensor, the number of scores <= low
    candidates: Tensor  # the scores in (low, high], of all tensors, tensor after tensor
    counts: list[int]  # per tensor, how many of the candidates are its
    sums: Tensor | None  # per tensor, the float64 sum of the scores, if the pass computed them


def _near_pivot_eager(weights: Sequence[Tensor], factors: Sequence[float], low: Tensor, high: Tensor) -> _Window:
    """Per tensor, the number of scores ``<= low`` and the scores in ``(low, high]`` (one pass, chunk by chunk)."""
    buffer = _score_buffer(weights)
    below: list[Tensor] = []
    candidates: list[Tensor] = []
    for weight, factor in zip(weights, factors, strict=True):
        count = torch.zeros((), dtype=torch.int64, device=low.device)
        inside = []
        for scores in score_chunks(weight, factor, buffer):
            count += torch.count_nonzero(scores <= low)
            inside.append(scores[(scores > low) & (scores <= high)])
        below.append(count)
        candidates.append(torch.cat(inside) if inside else low.new_empty(0))
    return _Window(torch.stack(below).tolist(), torch.cat(candidates), [c.numel() for c in candidates], None)


def _near_pivot_fused(weights: Sequence[Tensor], factors: Sequence[float], low: Tensor, high: Tensor) -> _Window:
    """:func:`_near_pivot_eager` with one compiled kernel per tensor (:func:`~lightning_stthree.core.kernels.compiled`).

    Each weight is read as ``FUSED_ROWS`` rows of many columns; the kernel counts the scores ``<= low`` and marks, per
    column, the rows whose score is in the window. Only the few marked columns of each tensor are kept (its marks,
    one int32 per column, are dropped before the next tensor's kernel runs), and they are read back for groups of
    tensors at once (:func:`_read_marked`), so each tensor costs the kernel and two small operations. The kernel
    also sums the scores, which checks them for NaN and Inf without another pass.
    """
    device = low.device
    factor_tensors = torch.tensor(list(factors), dtype=torch.float32, device=device)
    views = [weight.detach().reshape(math.gcd(weight.numel(), FUSED_ROWS), -1) for weight in weights]
    below: list[Tensor] = []
    sums: list[Tensor] = []
    candidates: list[Tensor] = []
    counts: list[int] = []
    group: list[tuple[int, Tensor, Tensor]] = []  # (tensor index, marked columns, their marks), not yet read back
    group_size = 0  # marked columns in `group`
    for i, columns in enumerate(views):
        count, marks, total = compiled(window_column_counts)(columns, factor_tensors[i], low, high)
        marked = torch.nonzero(marks).flatten()
        group.append((i, marked, marks[marked]))
        group_size += marked.numel()
        below.append(count)
        sums.append(total)
        if i == len(views) - 1 or group_size >= _DECODE_BLOCK:
            scores, group_counts = _read_marked(views, factor_tensors, group, low, high)
            candidates.append(scores)
            counts += group_counts
            group, group_size = [], 0
    return _Window(torch.stack(below).tolist(), torch.cat(candidates), counts, torch.stack(sums))


def _read_marked(
    views: Sequence[Tensor], factors: Tensor, group: Sequence[tuple[int, Tensor, Tensor]], low: Tensor, high: Tensor
) -> tuple[Tensor, list[int]]:
    """The in-window scores of a group of tensors, tensor after tensor, and how many each tensor has, from the marked
    columns and marks of :func:`~lightning_stthree.core.kernels.window_column_counts`: one decode for the group, one
    gather per tensor, and the scores recomputed with the kernel's own formula
    (:func:`~lightning_stthree.core.kernels.scores_of`)."""
    device = low.device
    indices = [i for i, _, _ in group]
    marks = torch.cat([m for _, _, m in group])
    entry, row = torch.nonzero((marks.unsqueeze(1) >> torch.arange(FUSED_ROWS, device=device)) & 1, as_tuple=True)
    per_column = torch.tensor([len(c) for _, c, _ in group], device=device)
    local = torch.repeat_interleave(torch.arange(len(group), device=device), per_column)[entry]  # within the group
    columns = torch.cat([c for _, c, _ in group])[entry]
    widths = torch.tensor([views[i].shape[1] for i in indices], device=device)
    flat = row * widths[local] + columns  # index in the tensor's flat view
    # Entries come in column order, so grouped by tensor: one gather per tensor.
    pieces = flat.split(torch.bincount(local, minlength=len(group)).tolist())
    values = torch.cat([views[i].reshape(-1)[piece].float() for i, piece in zip(indices, pieces, strict=True)])
    scores = scores_of(values, factors[torch.tensor(indices, device=device)][local])
    inside = (scores > low) & (scores <= high)  # all of them: the marks are the kernel's own comparisons
    return scores[inside], torch.bincount(local[inside], minlength=len(group)).tolist()


def _select_near_pivot(
    parts: LocalParts,
    factors: Sequence[float],
    shares: Sequence[float],
    goal: float,
    pivot: float,
    window: float,
    compile_kernels: bool,
    check_finite: bool,
    counted: bool = False,
) -> tuple[Tensor, list[int] | None] | None:
    """The answer if it lies within ``window`` (relative) of ``pivot`` (one pass, then a selection of candidates),
    with, if ``counted``, each tensor's number of scores ``<= answer`` (from the same pass: its count below the
    window plus its candidates up to the answer).

    With ``check_finite``, raise :class:`NonFiniteScoresError` first if a tensor's scores do not sum to a finite
    number (from the fused pass's own sums, or from a sum per tensor).
    """
    weights = parts.tensors
    device = weights[0].device
    low = torch.tensor(pivot * (1.0 - window), dtype=torch.float32, device=device)
    high = torch.tensor(pivot * (1.0 + window), dtype=torch.float32, device=device)
    find = _near_pivot_fused if compile_kernels else _near_pivot_eager
    below, candidates, counts, sums = find(weights, factors, low, high)
    if check_finite:
        _check_finite(parts, sums)
    below_goal = sum(share * count for share, count in zip(shares, below, strict=True))
    if below_goal >= goal:
        return None  # the answer is at or below the window
    if all(share == 1.0 for share in shares):
        # Counting weights: the answer is the k-th smallest candidate (a selection, several times faster than a sort).
        rank = math.ceil(goal - below_goal)
        if rank > candidates.numel():
            return None
        answer = torch.kthvalue(candidates, rank).values
    else:
        values, order = torch.sort(candidates, stable=True)
        if values.numel() == 0:
            return None
        candidate_shares = torch.repeat_interleave(
            torch.tensor(list(shares), dtype=torch.float64, device=device), torch.tensor(counts, device=device)
        )
        cumulative = below_goal + candidate_shares[order].cumsum(0)
        index = _first_reaching(cumulative, goal)
        if index >= values.numel():
            return None  # the answer is above the window
        answer = values[index]
    if not counted:
        return answer, None
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    inside = torch.bincount(owner[candidates <= answer], minlength=len(counts)).tolist()
    return answer, [b + i for b, i in zip(below, inside, strict=True)]


def _check_finite(parts: LocalParts, sums: Tensor | None = None) -> None:
    """Raise :class:`NonFiniteScoresError` if a weight's scores do not sum to a finite number: from ``sums`` when a
    pass over the weights already computed them, else with one sum per tensor (:func:`nonfinite_sums`)."""
    suspects = _nonfinite_sums(parts) if sums is None else _nonfinite_indices(sums)
    if suspects:
        raise NonFiniteScoresError(suspects)


def _radix_select(
    weights: Sequence[Tensor],
    factors: Sequence[float],
    shares: Sequence[float],
    goal: float,
    reduce: Reduce | None = None,
) -> Tensor:
    """The answer by a two-pass radix selection over the scores' float32 bit patterns; ``reduce`` sums each
    histogram over the ranks holding the other shards of ``weights``."""
    device = weights[0].device
    buffer = _score_buffer(weights)

    def histogram(bucket: int | None) -> Tensor:
        counts = torch.zeros(_RADIX_BUCKETS, dtype=torch.float64, device=device)
        for weight, factor, share in zip(weights, factors, shares, strict=True):
            for scores in score_chunks(weight, factor, buffer):
                keys = scores.view(torch.int32)
                if bucket is None:
                    keys = keys >> _RADIX_BITS
                else:
                    keys = keys[(keys >> _RADIX_BITS) == bucket] & (_RADIX_BUCKETS - 1)
                counts += torch.bincount(keys, minlength=_RADIX_BUCKETS).double() * share
        return counts if reduce is None else reduce(counts)

    def locate(counts: Tensor, goal: float) -> tuple[int, float]:
        cumulative = counts.cumsum(0)
        # A goal above the total (rounding of a goal computed as fraction * total) gives the last non-empty bucket,
        # so the answer always holds weights.
        index = min(_first_reaching(cumulative, goal), int(torch.nonzero(counts).max()))
        return index, float(cumulative[index - 1]) if index > 0 else 0.0

    high, before = locate(histogram(None), goal)
    low, _ = locate(histogram(high), goal - before)
    return torch.tensor((high << _RADIX_BITS) | low, dtype=torch.int32, device=device).view(torch.float32)


@torch.no_grad()
def select_threshold(
    weights: Sequence[Tensor],
    factors: Sequence[float],
    shares: Sequence[float],
    goal: float,
    pivot: float | None = None,
    window: float = PIVOT_WINDOW,
    compile_kernels: bool = False,
    check_finite: bool = False,
) -> Tensor:
    r"""Smallest score ``t`` with :math:`\sum_i \mathrm{shares}_i \cdot \#\{|w| f_i \le t,\ w \in \mathrm{weights}_i\}
    \ge \mathrm{goal}`; ``0`` when ``goal <= 0`` (nothing to prune).

    The weights are prepared once (:func:`~lightning_stthree.core.distributed.local_parts`: what this rank counts,
    and how the ranks' counts add up), then the selection runs on those parts: near ``pivot`` when it can, by radix
    selection otherwise (see the module docstring).

    Args:
        weights: The raw weight tensors (any shapes and floating dtypes, one device); DTensors (sharded weights) are
            counted shard by shard and the counts all-reduced (see the module docstring).
        factors: Score factor per tensor (``score = |w| * factor``; 1 for ST-3's ``"l1"``).
        shares: What each weight of the tensor counts toward ``goal`` (1 to count weights).
        goal: A goal above the total gives the largest score.
        pivot: The previous threshold, if any: tried first as described in the module docstring.
        window: Half-width of the window around ``pivot``, relative to it, in ``(0, 1)``.
        compile_kernels: Count the scores around ``pivot`` with one fused kernel per tensor
            (:mod:`~lightning_stthree.core.kernels`); the counts, and so the result, are the same.
        check_finite: Check that the scores of each tensor sum to a finite number, also when ``goal <= 0`` (a
            threshold over NaN or Inf scores means nothing). Free with ``compile_kernels`` near ``pivot`` (the fused
            pass sums as it counts), otherwise one sum per tensor (:func:`nonfinite_sums`).

    Returns:
        A 0-dim float32 tensor on the weights' device, equal to one of the scores (or ``0``).

    Raises:
        NonFiniteScoresError: With ``check_finite``, if the scores of some tensor do not sum to a finite number.
    """
    return _select(weights, factors, shares, goal, pivot, window, compile_kernels, check_finite, counted=False)[0]


@torch.no_grad()
def select_threshold_counted(
    weights: Sequence[Tensor],
    factors: Sequence[float],
    shares: Sequence[float],
    goal: float,
    pivot: float | None = None,
    window: float = PIVOT_WINDOW,
    compile_kernels: bool = False,
    check_finite: bool = False,
) -> tuple[Tensor, list[int]]:
    """:func:`select_threshold` (same arguments and threshold) with each tensor's number of scores ``<= threshold``
    (summed over ranks): from the selection's own pass near ``pivot``, else one more counting pass.

    Example::

        >>> select_threshold_counted([torch.tensor([0.1, 0.4]), torch.tensor([0.3, 0.2, 0.5])], [1.0, 1.0],
        ...                          [1.0, 1.0], goal=3.0)
        (tensor(0.3000), [1, 2])
    """
    threshold, counts = _select(weights, factors, shares, goal, pivot, window, compile_kernels, check_finite, True)
    assert counts is not None
    return threshold, counts


def _select(
    weights: Sequence[Tensor],
    factors: Sequence[float],
    shares: Sequence[float],
    goal: float,
    pivot: float | None,
    window: float,
    compile_kernels: bool,
    check_finite: bool,
    counted: bool,
) -> tuple[Tensor, list[int] | None]:
    parts = local_parts(weights)
    tensors = parts.tensors
    near = goal > 0 and parts.reduce is None and pivot is not None and math.isfinite(pivot) and pivot > 0
    if check_finite and not near:
        _check_finite(parts)
    if near:
        found = _select_near_pivot(parts, factors, shares, goal, pivot, window, compile_kernels, check_finite, counted)
        if found is not None:
            return found
    if goal <= 0:
        answer = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
    else:
        answer = _radix_select(tensors, factors, shares, goal, parts.reduce)
    return answer, _counts_at_most(parts, factors, answer) if counted else None


@torch.no_grad()
def counts_at_most(weights: Sequence[Tensor], factors: Sequence[float], threshold: Tensor) -> list[int]:
    """Per tensor, the number of scores ``|w| * factor <= threshold`` (one pass; DTensors summed over the ranks)."""
    return _counts_at_most(local_parts(weights), factors, threshold)


def _counts_at_most(parts: LocalParts, factors: Sequence[float], threshold: Tensor) -> list[int]:
    buffer = _score_buffer(parts.tensors)

    def count(index: int, part: Tensor) -> Tensor:
        total = torch.zeros((), dtype=torch.int64, device=threshold.device)
        for scores in score_chunks(part, factors[index], buffer):
            total += torch.count_nonzero(scores <= threshold)
        return total

    return parts.count(count)
