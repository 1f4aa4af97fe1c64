r"""The Gaussian-process variance map of a sparsifying activation at the edge of chaos, and the clip it prescribes.

Price, Daultry Ball, Lam, Jones & Tanner, "Deep Neural Network Initialization with Sparsity Inducing Activations"
(ICLR 2024, arXiv:2402.16184): in the large-width limit the pre-activations of layer ``l`` are Gaussian with variance
:math:`q_l`, and :math:`q_{l+1} = V(q_l) = \sigma_w^2\,\mathbb{E}_{z \sim N(0,1)}[\phi(\sqrt{q_l} z)^2] + \sigma_b^2`.
At the edge of chaos the fixed point :math:`q^*` has :math:`V(q^*) = q^*` and
:math:`\chi_1 = \sigma_w^2\,\mathbb{E}[\phi'(\sqrt{q^*} z)^2] = 1`. For the shifted ReLU and the soft threshold the
kinks sit where :math:`\phi = 0`, so :math:`V'(q^*) = \chi_1 = 1` while :math:`V''(q^*) > 0`: a variance above
:math:`q^*` grows without bound with depth (the paper's instability). Clipping the magnitude at ``m`` adds
:math:`-\kappa\,\sigma_w^2\,m\,\varphi((\tau + m)/\sqrt{q^*})/\sqrt{q^*}` to the slope (:math:`\kappa = 1` for CReLU,
2 for CST), which makes the fixed point stable.

Everything scales with :math:`\sqrt{q^*}`, so this module works at :math:`q^* = 1`: ``tau`` and ``clip`` are in units
of the pre-activations' standard deviation. The closed forms below (from Stein's lemma,
:math:`\frac{d}{dq}\mathbb{E}[\phi(\sqrt q z)^2] = \mathbb{E}[\phi'^2 + \phi\phi'']`) are this package's derivation;
``tests/core/test_variance_map.py`` checks them against the variance map integrated numerically.

Which clip the paper chooses is a heuristic read off its plots of :math:`V'(q^*)` and :math:`V''(q^*)` against ``m``
(its Sec. 3.1), whose numbers were not available here. :func:`prescribed_clip` makes one rule of it: the clip at which
the slope of the variance map at its fixed point is :data:`DEFAULT_SLOPE` (0.8): attracting with a margin (a
perturbation of the variance decays by a factor 0.8 per layer), with as little clipping as that allows. The slope
grows with the clip from 0 to 1, so the clip is unique. On the digits MLP of ``benchmarks/activation_sparsity.py``
(``--clips prescribed inf 0.711 0.453 --sparsities 0.85 0.9``), clips of 0.71 and 0.45 (what the largest clip with
:math:`V''(q^*) \le 0` gives for CReLU at 90% and CST at 80 and 85%) lost 2.6 to 85 points, while the clips of this rule
trained within 1.5 points of the dense network for CReLU at 80 to 90% and CST at 80 to 85%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from lightning_stthree.core.checks import check_choice, check_number

SparseActivationName = Literal["crelu", "cst"]
SPARSE_ACTIVATIONS: tuple[str, ...] = get_args(SparseActivationName)
# The bracket searched by `prescribed_clip`, in units of sqrt(q*): a clip above 10 standard deviations is no clip.
_LARGEST_CLIP = 10.0
#: The slope of the variance map at its fixed point that :func:`prescribed_clip` aims for (see the module docstring).
DEFAULT_SLOPE = 0.8


def _pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def zero_fraction_shift(activation: str, sparsity: float) -> float:
    r"""``tau / sqrt(q)`` at which a Gaussian pre-activation gives the fraction ``sparsity`` of exact zeros.

    CReLU (and the shifted ReLU): :math:`s = \Phi(\tau/\sqrt q)`; CST (and the soft threshold):
    :math:`s = 2\Phi(\tau/\sqrt q) - 1`. Clipping does not change the zeros.

    Example::

        >>> round(zero_fraction_shift("crelu", 0.5), 12)
        0.0
    """
    check_choice("activation", activation, SPARSE_ACTIVATIONS)
    sparsity = check_number("sparsity", sparsity, 0.0, 1.0, "[)")
    probability = sparsity if activation == "crelu" else (1.0 + sparsity) / 2.0
    return float(torch.special.ndtri(torch.tensor(probability, dtype=torch.float64)))


@dataclass(frozen=True)
class EdgeOfChaos:
    """The edge-of-chaos initialisation of a sparsifying activation at :math:`q^* = 1` (see the module docstring).

    Attributes:
        tau: The shift, in units of :math:`\\sqrt{q^*}`.
        clip: The clip ``m``, in the same units (``inf`` for none).
        weight_variance: :math:`\\sigma_w^2` (:math:`\\chi_1 = 1`).
        bias_variance: :math:`\\sigma_b^2 = q^* - \\sigma_w^2\\,\\mathbb{E}[\\phi^2]`; negative means this fixed point
            cannot be reached (no edge-of-chaos initialisation at :math:`q^* = 1`).
        slope: :math:`V'(q^*)`; 1 without clip.
        curvature: :math:`V''(q^*)`.
    """

    tau: float
    clip: float
    weight_variance: float
    bias_variance: float
    slope: float
    curvature: float


def edge_of_chaos(activation: str, sparsity: float, clip: float = math.inf) -> EdgeOfChaos:
    r"""The variance map's slope and curvature at its fixed point, for ``activation`` at ``sparsity``.

    With :math:`a = \tau/\sqrt{q^*}`, :math:`b = a + m/\sqrt{q^*}` and :math:`F(q) = \mathbb{E}[\phi(\sqrt q z)^2]`
    for CReLU (twice that for CST, which is odd):

    .. math::

        F(1) &= (1 + a^2)(\Phi(b) - \Phi(a)) - (b\varphi(b) - a\varphi(a)) + 2a(\varphi(b) - \varphi(a))
            + m^2 (1 - \Phi(b)) \\
        F'(1) &= \Phi(b) - \Phi(a) - m\varphi(b) \\
        F''(1) &= \tfrac{1}{2}(a\varphi(a) - b\varphi(b)) - \tfrac{1}{2} m \varphi(b)(b^2 - 1)

    and :math:`\sigma_w^2 = 1 / (\kappa(\Phi(b) - \Phi(a)))`, :math:`V' = \sigma_w^2 \kappa F'`,
    :math:`V'' = \sigma_w^2 \kappa F''` with :math:`\kappa = 1` (CReLU) or 2 (CST).

    Args:
        activation: ``"crelu"`` or ``"cst"``.
        sparsity: The fraction of exact zeros, in ``[0, 1)``.
        clip: The clip ``m`` in units of :math:`\sqrt{q^*}`, ``> 0``; ``inf`` for the unclipped activation.

    Example::

        >>> round(edge_of_chaos("crelu", 0.85).slope, 12)  # the shifted ReLU: slope exactly 1
        1.0
    """
    a = zero_fraction_shift(activation, sparsity)
    if math.isinf(a):
        raise ValueError(
            f"edge_of_chaos: sparsity must be > 0 for {activation!r} (at 0 its shift is -inf: the identity, with no "
            "edge of chaos); got 0"
        )
    m = check_number("clip", clip, 0.0, math.inf, "(]", finite=False)
    b = a + m
    kappa = 1.0 if activation == "crelu" else 2.0
    passing = _cdf(b) - _cdf(a)  # P(tau < x < tau + m): where the derivative is 1
    clipped = m * _pdf(b) if math.isfinite(m) else 0.0
    square = (1 + a * a) * passing - ((b * _pdf(b) if math.isfinite(b) else 0.0) - a * _pdf(a))
    square += 2 * a * (_pdf(b) - _pdf(a)) + (m * m * (1.0 - _cdf(b)) if math.isfinite(m) else 0.0)
    slope = passing - clipped
    curvature = 0.5 * (a * _pdf(a) - (b * _pdf(b) if math.isfinite(b) else 0.0))
    curvature -= 0.5 * clipped * (b * b - 1.0) if math.isfinite(m) else 0.0
    weight_variance = 1.0 / (kappa * passing)
    return EdgeOfChaos(
        tau=a,
        clip=m,
        weight_variance=weight_variance,
        bias_variance=1.0 - weight_variance * kappa * square,
        slope=weight_variance * kappa * slope,
        curvature=weight_variance * kappa * curvature,
    )


def prescribed_clip(activation: str, sparsity: float, slope: float = DEFAULT_SLOPE) -> float:
    """The clip (in units of the pre-activations' standard deviation) at which the variance map's slope at its
    edge-of-chaos fixed point is ``slope``, found by bisection to 1e-9 (see the module docstring for the rule).

    Args:
        activation: ``"crelu"`` or ``"cst"``.
        sparsity: The fraction of exact zeros, in ``[0, 1)``.
        slope: The slope :math:`V'(q^*)` to reach, in ``(0, 1)``.

    Returns:
        The clip; :data:`_LARGEST_CLIP` (10, no clip to speak of) where the slope stays below ``slope`` up to it.

    Example::

        >>> round(prescribed_clip("crelu", 0.85), 3)
        1.404
    """
    slope = check_number("slope", slope, 0.0, 1.0, "()")
    if edge_of_chaos(activation, sparsity, _LARGEST_CLIP).slope <= slope:
        return _LARGEST_CLIP
    low, high = 1e-9, _LARGEST_CLIP
    while high - low > 1e-9:
        middle = (low + high) / 2.0
        if edge_of_chaos(activation, sparsity, middle).slope < slope:
            low = middle
        else:
            high = middle
    return (low + high) / 2.0
