"""The shrinkage functions against their formulas, hand values and defining property (the proximal map of a penalty).

The references here are numpy, written from the formulas of the issue and the papers (Gao & Bruce 1997 for the firm
threshold, Zhang 2010 for MCP, Soubies et al. 2015 for CEL0, Xu et al. 2012 for the half threshold), not from the
package's code.
"""

import math

import numpy as np
import pytest
import torch

from lightning_stthree import effective_weight
from lightning_stthree.methods.shrinkage import SHRINKAGES, resolve_shrinkage, shrink

T = 0.5
GRID = np.linspace(-3.0, 3.0, 6001)  # steps of 1e-3, through -t, 0, t and 2t exactly


def _formula(name: str, x: np.ndarray, t: float, ratio: float = 2.0) -> np.ndarray:
    """The operators as the issue writes them, in float64 numpy."""
    a = np.abs(x)
    if name == "soft":
        return np.sign(x) * np.maximum(a - t, 0.0)
    if name == "hard":
        return x * (a > t)
    if name == "firm":
        mu = ratio * t
        middle = np.sign(x) * mu * (a - t) / (mu - t)
        return np.where(a <= t, 0.0, np.where(a <= mu, middle, x))
    if name == "half":
        lam = (4.0 * t / 54.0 ** (1.0 / 3.0)) ** 1.5  # Xu et al.'s threshold (54^(1/3) / 4) lam^(2/3) equals t
        with np.errstate(divide="ignore", invalid="ignore"):
            phi = np.arccos(lam / 8.0 * (a / 3.0) ** -1.5)
            value = 2.0 / 3.0 * x * (1.0 + np.cos(2.0 * np.pi / 3.0 - 2.0 / 3.0 * phi))
        return np.where(a > t, value, 0.0)
    raise AssertionError(name)


def _penalty(name: str, u: np.ndarray, t: float, ratio: float = 2.0) -> np.ndarray:
    """The penalty each operator is the proximal map of (``argmin_u (x - u)^2 / 2 + penalty(u)``)."""
    a = np.abs(u)
    if name == "soft":  # l1
        return t * a
    if name == "hard":  # l0, scaled so the dead zone is |x| <= t
        return t**2 / 2.0 * (a > 0)
    if name == "firm":  # MCP (Zhang 2010) with lambda = t, gamma = mu / t
        lam, gamma = t, ratio
        return np.where(a <= gamma * lam, lam * a - u**2 / (2.0 * gamma), gamma * lam**2 / 2.0)
    if name == "cel0":  # CEL0 (Soubies et al. 2015) with mu = t / a^2, so a = ratio^(-1/2) and lambda = t^2 / (2 a^2)
        a2 = 1.0 / ratio
        lam = t**2 / (2.0 * a2)
        edge = math.sqrt(2.0 * lam) / math.sqrt(a2)
        return lam - a2 / 2.0 * (a - edge) ** 2 * (a <= edge)
    if name == "half":  # (lambda / 2) |u|^(1/2), lambda = 8 t^(3/2) / sqrt(54)
        lam = 8.0 * t**1.5 / math.sqrt(54.0)
        return lam / 2.0 * np.sqrt(a)
    raise AssertionError(name)


def _ours(name: str, x: np.ndarray, t: float, ratio: float = 2.0, dtype: torch.dtype = torch.float32) -> np.ndarray:
    weight = torch.tensor(x, dtype=dtype).reshape(1, -1)
    threshold = torch.tensor(t, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    out = effective_weight(weight, threshold, rescale=False, shrinkage=name, firm_ratio=ratio)
    return out.double().numpy().ravel()


@pytest.mark.parametrize("name", SHRINKAGES)
@pytest.mark.parametrize("t", [T, 0.013, 2.0])
def test_every_shrinkage_equals_its_formula_on_a_grid(name: str, t: float) -> None:
    x = GRID * t / T
    np.testing.assert_allclose(_ours(name, x, t), _formula(name, x, t), rtol=1e-6, atol=1e-6 * t)
    np.testing.assert_allclose(_ours(name, x, t, dtype=torch.float64), _formula(name, x, t), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("ratio", [1.5, 3.0, 10.0])
def test_the_firm_threshold_with_other_ratios(ratio: float) -> None:
    np.testing.assert_allclose(_ours("firm", GRID, T, ratio), _formula("firm", GRID, T, ratio), rtol=1e-6, atol=1e-7)


def test_hand_values() -> None:
    x = np.array([0.1, 0.2, -0.3, 0.4, 0.5, -0.8])  # t = 0.2: mu = 0.4 for the firm threshold
    np.testing.assert_allclose(_ours("soft", x, 0.2), [0, 0, -0.1, 0.2, 0.3, -0.6], atol=1e-7)
    np.testing.assert_allclose(_ours("hard", x, 0.2), [0, 0, -0.3, 0.4, 0.5, -0.8], atol=1e-7)
    # Firm: 0.4 * (|x| - 0.2) / 0.2 between 0.2 and 0.4, x beyond.
    np.testing.assert_allclose(_ours("firm", x, 0.2), [0, 0, -0.2, 0.4, 0.5, -0.8], atol=1e-7)
    # Half with t = 1: lambda = 8 / sqrt(54); at x = 4 the stationary point of (x - u)^2 / 2 + (lambda / 2) sqrt(u),
    # u = x - lambda / (4 sqrt(u)), is 3.861498 (fixed-point iteration by hand); just above t the jump is to 2x / 3.
    np.testing.assert_allclose(_ours("half", np.array([1.0, 1.0 + 1e-6, 4.0]), 1.0), [0, 2 / 3, 3.861498], atol=2e-6)


@pytest.mark.parametrize(("name", "penalty"), [("soft", "soft"), ("hard", "hard"), ("firm", "firm"), ("firm", "cel0")])
@pytest.mark.parametrize("ratio", [2.0, 4.0])
def test_each_shrinkage_is_the_proximal_map_of_its_penalty(name: str, penalty: str, ratio: float) -> None:
    _check_proximal(name, penalty, ratio)


def test_the_half_threshold_is_the_proximal_map_of_the_half_norm() -> None:
    _check_proximal("half", "half", 2.0)


def _check_proximal(name: str, penalty: str, ratio: float) -> None:
    u = np.linspace(-4.0, 4.0, 800_001)  # candidates in steps of 1e-5
    pen = _penalty(penalty, u, T, ratio)
    x = np.linspace(-3.0, 3.0, 241)
    x = x[np.abs(np.abs(x) - T) > 1e-3]  # at |x| = t exactly the l0-like penalties tie between 0 and the jump
    minimiser = np.array([u[np.argmin((value - u) ** 2 / 2.0 + pen)] for value in x])
    np.testing.assert_allclose(_ours(name, x, T, ratio, torch.float64), minimiser, atol=2e-5)


@pytest.mark.parametrize("name", ["hard", "half"])
def test_at_the_threshold_zero_and_the_jump_tie(name: str) -> None:
    # The dead zone is exactly |x| <= t: at x = t the objective at 0 equals the objective at the jump value.
    jump = {"hard": T, "half": 2.0 * T / 3.0}[name]
    at = lambda v: (T - v) ** 2 / 2.0 + _penalty(name, np.array(v), T)  # noqa: E731
    assert at(0.0) == pytest.approx(at(jump), rel=1e-12)
    assert _ours(name, np.array([T]), T)[0] == 0.0
    assert _ours(name, np.array([np.nextafter(np.float32(T), np.float32(1))]), T)[0] == pytest.approx(jump, rel=1e-6)


@pytest.mark.parametrize("name", SHRINKAGES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_zero_set_is_the_dead_zone_for_every_shrinkage(name: str, dtype: torch.dtype) -> None:
    weight = (torch.randn(64, 100, generator=torch.Generator().manual_seed(0)) * 0.1).to(dtype)
    weight[0, :3] = torch.tensor([0.0, 0.05, -0.05], dtype=dtype)  # 0.05 exactly at the threshold
    threshold = torch.tensor(0.05)
    out = effective_weight(weight, threshold, shrinkage=name)
    assert out.dtype == dtype
    assert torch.equal(out == 0, weight.float().abs() <= threshold)
    assert torch.equal(torch.sign(out), torch.sign(weight) * (out != 0))


def test_the_l0_like_shrinkages_keep_kept_weights_closer_to_their_raw_value() -> None:
    weight = torch.linspace(-2.0, 2.0, 4001, dtype=torch.float64)
    soft, hard, firm, half = (shrink(weight, 0.5, name).abs() for name in SHRINKAGES)
    assert torch.all(soft <= firm)
    assert torch.all(firm <= hard)
    assert torch.all(soft <= half)
    assert torch.all(half <= hard)


@pytest.mark.parametrize("name", SHRINKAGES)
def test_the_gradient_without_straight_through_is_the_derivative_and_finite(name: str) -> None:
    # Away from the kinks (|x| = t and |x| = mu) autograd's gradient is the operator's derivative.
    x = torch.tensor([0.0, 0.1, -0.3, 0.55, -0.9, 1.7, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: shrink(w, 0.5, name), (x,))
    for threshold in (0.0, 0.5, 100.0):  # nothing pruned, some, everything: no NaN from the pruned entries
        w = x.detach().clone().requires_grad_()
        shrink(w, threshold, name).sum().backward()
        assert torch.isfinite(w.grad).all()
        assert torch.all(w.grad[w.detach().abs() <= threshold] == 0)


def test_the_old_flag_is_an_alias_and_contradictions_are_refused() -> None:
    assert resolve_shrinkage(None, None) == "soft"
    assert resolve_shrinkage(None, False) == "hard"
    assert resolve_shrinkage("half", None) == "half"
    assert resolve_shrinkage("hard", False) == "hard"
    with pytest.raises(ValueError, match=r"`soft_threshold=True` contradicts `shrinkage='half'`"):
        resolve_shrinkage("half", True)
    with pytest.raises(
        ValueError, match=r"`soft_threshold=False` contradicts `shrinkage='firm'`.*give `shrinkage` alone"
    ):
        resolve_shrinkage("firm", False)
    with pytest.raises(ValueError, match=r"`shrinkage` must be one of \('soft', 'hard', 'firm', 'half'\), got 'l0'"):
        effective_weight(torch.ones(2, 2), torch.tensor(0.5), shrinkage="l0")
    with pytest.raises(TypeError, match=r"`soft_threshold` must be True, False or None, got 'yes'"):
        resolve_shrinkage(None, "yes")
    with pytest.raises(ValueError, match=r"`firm_ratio` must be in \(1, inf\), got 1"):
        effective_weight(torch.ones(2, 2), torch.tensor(0.5), shrinkage="firm", firm_ratio=1)
    w = torch.randn(4, 6)
    assert torch.equal(
        effective_weight(w, torch.tensor(0.3), False), effective_weight(w, torch.tensor(0.3), shrinkage="hard")
    )
