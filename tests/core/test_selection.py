"""The exact threshold selection against torch.kthvalue and numpy, on the inputs that break selections (issue 6)."""

import math

import numpy as np
import pytest
import torch

from lightning_stthree.core import selection
from lightning_stthree.core.selection import select_threshold
from lightning_stthree.core.threshold import global_threshold, layer_score_factor


def _reference(weights: list[torch.Tensor], factors: list[float], k: int) -> torch.Tensor:
    """torch.kthvalue on the concatenated float32 scores (the definition)."""
    scores = torch.cat([w.detach().abs().flatten().float() * f for w, f in zip(weights, factors, strict=True)])
    return torch.kthvalue(scores, k).values


def _cases(dtype: torch.dtype) -> dict[str, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    random = [torch.randn(64, 3, 3, 3, generator=g), torch.randn(300, 70, generator=g) * 0.1, torch.randn(17)]
    tied = [torch.randint(-3, 4, (2000,), generator=g).float() / 4, torch.randint(-3, 4, (40, 30), generator=g) / 4.0]
    equal = [torch.full((500,), 0.25), torch.full((10, 10), -0.25)]
    zeros = [torch.where(torch.rand(3000, generator=g) < 0.9, 0.0, torch.randn(3000, generator=g)), torch.zeros(64)]
    tiny = torch.tensor(1e-40)  # a float32 denormal
    denormal = [torch.randn(1000, generator=g) * tiny, torch.randn(100, generator=g) * tiny * 50, torch.randn(100)]
    cases = {"random": random, "tied": tied, "all_equal": equal, "zero_heavy": zeros, "denormal": denormal}
    if dtype != torch.float32:  # denormal float32 values are zeros or other denormals in half precision
        cases = {name: [w.to(dtype) for w in ws] for name, ws in cases.items()}
    return cases


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["random", "tied", "all_equal", "zero_heavy", "denormal"])
@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
@pytest.mark.parametrize("compile_kernels", [False, True])
def test_selection_equals_kthvalue(
    dtype: torch.dtype, case: str, criterion: str, compile_kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(selection, "CHUNK_SIZE", 4099)  # several chunks per tensor, chunk ends inside tensors
    weights = _cases(dtype)[case]
    factors = [layer_score_factor(w.shape, criterion) for w in weights]
    total = sum(w.numel() for w in weights)
    for k in sorted({1, 2, total // 3, total // 2, (9 * total) // 10, total - 1, total}):
        expected = _reference(weights, factors, k)
        for pivot in (None, expected.item(), expected.item() * 1.01, expected.item() * 0.5, 1e-30):
            for window in (0.02, 1e-3):  # 1e-3 misses the answer from 1.01 * expected: the radix fallback answers
                got = select_threshold(weights, factors, [1.0] * len(weights), float(k), pivot, window, compile_kernels)
                assert got.dtype == torch.float32
                assert got.view(torch.int32) == expected.view(torch.int32), (case, k, pivot, window)  # bitwise


def test_global_threshold_uses_the_pivot_and_stays_exact() -> None:
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(100_000, generator=g), torch.randn(200, 300, generator=g)]
    previous = global_threshold(weights, 0.9)
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn(w.shape, generator=g) * 1e-3)  # one optimizer step's worth of change
    calls = []
    original = selection._radix_select
    selection._radix_select = lambda *a: calls.append(1) or original(*a)
    try:
        now = global_threshold(weights, 0.9, pivot=previous.item())
    finally:
        selection._radix_select = original
    assert calls == []  # answered from the window around the previous threshold
    assert now == _reference(weights, [1.0, 1.0], round(0.9 * sum(w.numel() for w in weights)))


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("scale", [0.1, 1.0])  # at 1.0 the window around the answer holds scores of both tensors
def test_weighted_selection_matches_numpy_with_pivots(scale: float, compile_kernels: bool) -> None:
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(64, 3, 3, 3, generator=g), torch.randn(128, 64, 3, 3, generator=g) * scale]
    shares = [1024.0, 64.0]
    scores = np.concatenate([np.abs(w.numpy()).ravel() for w in weights]).astype(np.float32)
    per_weight = np.concatenate([np.full(w.numel(), s) for w, s in zip(weights, shares, strict=True)])
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(per_weight[order])
    for fraction in (0.1, 0.5, 0.9, 0.99):
        goal = fraction * cumulative[-1]
        expected = scores[order][np.searchsorted(cumulative, goal, side="left")]
        for pivot in (None, float(expected), float(expected) * 1.015, float(expected) * 3):
            got = select_threshold(weights, [1.0, 1.0], shares, goal, pivot, compile_kernels=compile_kernels)
            assert got.item() == expected


def test_extra_memory_is_bounded_by_chunks() -> None:
    # The scores of one 16M-element tensor are never materialised whole: each chunk is CHUNK_SIZE elements.
    sizes = [chunk.numel() for chunk in selection.score_chunks(torch.zeros(3 * selection.CHUNK_SIZE + 5))]
    assert sizes == [selection.CHUNK_SIZE] * 3 + [5]


def test_nan_free_large_goal_gives_the_largest_score() -> None:
    weights = [torch.tensor([0.5, -2.0, 1.0])]
    assert select_threshold(weights, [1.0], [1.0], 3.0).item() == 2.0
    assert select_threshold(weights, [1.0], [1.0], 3.0 + 1e-9).item() == 2.0
    assert math.isclose(select_threshold(weights, [1.0], [1.0], 1.0, pivot=2.0).item(), 0.5)
