"""The edge-of-chaos quantities of CReLU and CST against the variance map integrated numerically (numpy quadrature
and finite differences), and the instability the paper proves for the unclipped activations."""

import math

import numpy as np
import pytest

from lightning_stthree.core.variance_map import edge_of_chaos, prescribed_clip, zero_fraction_shift

Z = np.linspace(-12.0, 12.0, 600_001)  # a fine grid for E_z[.] under N(0, 1)
DENSITY = np.exp(-0.5 * Z**2) / math.sqrt(2 * math.pi)


def _expect(values: np.ndarray) -> float:
    return float(np.trapezoid(values * DENSITY, Z))


def _activation(name: str, x: np.ndarray, tau: float, clip: float) -> np.ndarray:
    if name == "crelu":  # min(max(x - tau, 0), m)
        return np.minimum(np.maximum(x - tau, 0.0), clip)
    return np.sign(x) * np.minimum(np.maximum(np.abs(x) - tau, 0.0), clip)  # sign(x) min(max(|x| - tau, 0), m)


def _variance_map(name: str, q: float, tau: float, clip: float, weight: float, bias: float) -> float:
    return weight * _expect(_activation(name, math.sqrt(q) * Z, tau, clip) ** 2) + bias


@pytest.mark.parametrize("name", ["crelu", "cst"])
@pytest.mark.parametrize(("sparsity", "clip"), [(0.5, math.inf), (0.7, 1.0), (0.85, 0.5), (0.85, 2.0), (0.9, math.inf)])
def test_the_closed_forms_are_the_numerically_integrated_variance_map(name: str, sparsity: float, clip: float) -> None:
    eoc = edge_of_chaos(name, sparsity, clip)
    # The zeros: the fraction of a unit Gaussian the activation maps to exactly 0.
    assert _expect((_activation(name, Z, eoc.tau, clip) == 0).astype(float)) == pytest.approx(sparsity, abs=1e-5)
    # chi_1 = sigma_w^2 E[phi'(z)^2] = 1, and q* = 1 is a fixed point.
    derivative = np.gradient(_activation(name, Z, eoc.tau, clip), Z)
    assert eoc.weight_variance * _expect(derivative**2) == pytest.approx(1.0, rel=1e-4)
    v = lambda q: _variance_map(name, q, eoc.tau, clip, eoc.weight_variance, eoc.bias_variance)  # noqa: E731
    assert v(1.0) == pytest.approx(1.0, abs=1e-9)
    h = 1e-3
    assert (v(1 + h) - v(1 - h)) / (2 * h) == pytest.approx(eoc.slope, abs=1e-5)
    assert (v(1 + h) - 2 * v(1.0) + v(1 - h)) / h**2 == pytest.approx(eoc.curvature, abs=5e-4)


@pytest.mark.parametrize("name", ["crelu", "cst"])
@pytest.mark.parametrize("sparsity", [0.6, 0.7, 0.85])
def test_unclipped_the_fixed_point_is_unstable_above_and_clipping_at_the_prescription_stabilises_it(
    name: str, sparsity: float
) -> None:
    unclipped = edge_of_chaos(name, sparsity)
    assert unclipped.slope == pytest.approx(1.0, abs=1e-12)  # the kinks are where phi = 0: V'(q*) = chi_1 = 1
    assert unclipped.curvature > 0  # so a variance above q* grows with depth (the paper's instability)
    clip = prescribed_clip(name, sparsity)
    clipped = edge_of_chaos(name, sparsity, clip)
    assert clipped.slope == pytest.approx(0.8, abs=1e-7)  # the rule: slope 0.8 at the fixed point
    assert edge_of_chaos(name, sparsity, clip * 0.99).slope < 0.8 < edge_of_chaos(name, sparsity, clip * 1.01).slope
    assert prescribed_clip(name, sparsity, slope=0.5) < clip  # less slope, more clipping

    # Iterated from a variance above q* (a deep network), the unclipped map grows and the clipped one comes back.
    def depth(tau: float, clip: float, weight: float, bias: float, layers: int) -> float:
        q = 1.5
        for _ in range(layers):
            q = _variance_map(name, q, tau, clip, weight, bias)
        return q

    assert depth(unclipped.tau, math.inf, unclipped.weight_variance, unclipped.bias_variance, 10) > 1.5
    assert depth(clipped.tau, clip, clipped.weight_variance, clipped.bias_variance, 100) == pytest.approx(1, abs=0.05)


def test_hand_values() -> None:
    assert zero_fraction_shift("crelu", 0.5) == pytest.approx(0.0, abs=1e-15)  # ReLU: half the Gaussian is <= 0
    assert zero_fraction_shift("cst", 0.6826894921370859) == pytest.approx(1.0, rel=1e-9)  # |z| <= 1
    relu = edge_of_chaos("crelu", 0.5)  # ReLU at the edge of chaos: sigma_w^2 = 2, sigma_b^2 = 0 (He init)
    assert (relu.weight_variance, relu.bias_variance, relu.curvature) == pytest.approx((2.0, 0.0, 0.0), abs=1e-12)
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1.0"):
        edge_of_chaos("crelu", 1.0)
    with pytest.raises(ValueError, match=r"`activation` must be one of \('crelu', 'cst'\), got 'relu'"):
        edge_of_chaos("relu", 0.5)
