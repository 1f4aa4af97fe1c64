import math

import numpy as np
import pytest
import torch

from lightning_stthree import global_threshold
from lightning_stthree.core.threshold import layer_score_factor, num_pruned

SHAPES = [(16, 3, 3, 3), (32, 16, 3, 3), (10, 288), (7,)]


def _weights(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * (i + 1) for i, shape in enumerate(SHAPES)]


def _numpy_threshold(weights: list[torch.Tensor], sparsity: float, criterion: str) -> np.float32:
    """Independent reference: k-th smallest score by np.partition on the concatenation."""
    scores = []
    for w in weights:
        a = np.abs(w.numpy()).ravel()
        if criterion == "l1_std":
            a = a * np.float32(math.sqrt(sum(w.shape)))
        scores.append(a.astype(np.float32))
    flat = np.concatenate(scores)
    k = round(sparsity * flat.size)
    return np.partition(flat, k - 1)[k - 1]


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
@pytest.mark.parametrize("sparsity", [0.001, 0.3, 0.5, 0.9, 0.98, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_global_threshold_matches_numpy(criterion: str, sparsity: float, seed: int) -> None:
    weights = _weights(seed)
    threshold = global_threshold(weights, sparsity, criterion)
    assert threshold.dtype == torch.float32
    assert threshold.ndim == 0
    assert threshold.item() == _numpy_threshold(weights, sparsity, criterion)


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_global_threshold_prunes_exactly_k_scores(criterion: str) -> None:
    weights = _weights(3)
    total = sum(w.numel() for w in weights)
    for sparsity in (0.1, 0.5, 0.9):
        t = global_threshold(weights, sparsity, criterion)
        pruned = sum(int((w.abs() * layer_score_factor(w.shape, criterion) <= t).sum()) for w in weights)
        assert pruned == num_pruned(sparsity, total)


def test_l1_std_prunes_more_uniformly_than_l1() -> None:
    # A small layer with large weights and a large layer with small ones: l1 prunes almost only the large layer,
    # l1_std (ST-3 sigma) spreads the pruning according to layer size.
    generator = torch.Generator().manual_seed(0)
    small = torch.randn(8, 8, generator=generator) * 4.0
    large = torch.randn(256, 256, generator=generator)

    def per_layer(criterion: str) -> list[float]:
        t = global_threshold([small, large], 0.5, criterion)
        return [float((w.abs() * layer_score_factor(w.shape, criterion) <= t).float().mean()) for w in (small, large)]

    l1_small, l1_large = per_layer("l1")
    std_small, std_large = per_layer("l1_std")
    assert abs(std_small - std_large) < abs(l1_small - l1_large)


def test_zero_sparsity_gives_zero_threshold() -> None:
    # k = 0: the threshold must be 0 (identity), not the smallest magnitude.
    assert global_threshold(_weights(0), 0.0).item() == 0.0
    assert global_threshold(_weights(0), 1e-9).item() == 0.0


def test_layer_score_factor() -> None:
    assert layer_score_factor((64, 3, 7, 7), "l1") == 1.0
    assert layer_score_factor((64, 3, 7, 7), "l1_std") == math.sqrt(81)
    with pytest.raises(ValueError, match=r"`criterion` must be one of \('l1', 'l1_std'\), got 'l2'"):
        layer_score_factor((3, 3), "l2")  # type: ignore[arg-type]


def test_num_pruned_rounds_to_nearest() -> None:
    assert num_pruned(0.29, 100) == 29  # 0.29 * 100 = 28.999999999999996 in floating point
    assert num_pruned(0.9, 1000) == 900
    assert num_pruned(0.0, 5) == 0


def test_global_threshold_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one tensor"):
        global_threshold([], 0.5)
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\], got 1.5"):
        global_threshold(_weights(0), 1.5)
