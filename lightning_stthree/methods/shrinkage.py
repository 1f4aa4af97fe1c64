r"""What the forward pass makes of a kept weight: the shrinkage functions of ST-3's effective weight.

ST-3 (arXiv:2212.01076) shrinks every kept weight by the threshold: the soft threshold, the proximal map of the l1
norm. The l0-like operators below keep large weights closer to their raw value ("Beyond l1 sparse coding in V1",
Rentzeperis et al., PLOS Comput. Biol. 2023, arXiv:2301.10002, finds them far better than the soft threshold for
sparse codes). Every one of them is zero exactly on :math:`|w| \le t`, with ``t`` from the same schedule and exact
global selection, so the sparsity and the MACs do not depend on the shrinkage; only the kept weights' values do.
Each is the proximal map of a penalty :math:`p`: the minimiser over :math:`u` of :math:`(x - u)^2 / 2 + p(u)`.

- ``"soft"`` (ST-3's default): :math:`\mathrm{sign}(w)(|w| - t)`; penalty :math:`t|u|` (l1).
- ``"hard"`` (GMP's mask, ``soft_threshold=False``): :math:`w`; penalty :math:`\frac{t^2}{2}\mathbb{1}[u \ne 0]`
  (l0).
- ``"firm"`` (Gao & Bruce, "WaveShrink with firm shrinkage", Statistica Sinica 1997): with :math:`\mu = r t`
  (``firm_ratio`` :math:`r > 1`), :math:`\mathrm{sign}(w)\,\mu(|w| - t)/(\mu - t)` for :math:`t < |w| \le \mu`,
  then :math:`w`. The proximal map of the MCP penalty (Zhang 2010; :math:`\lambda = t`, :math:`\gamma = r`) and of
  CEL0 (Soubies, Blanc-Feraud & Aubert 2015; :math:`\mu = t / a^2`, i.e. :math:`a = r^{-1/2}`).
- ``"half"`` (the l1/2 thresholding of Xu, Chang, Xu & Zhang, IEEE TNNLS 2012, Theorem 1):
  :math:`\frac{2}{3} w\,(1 + \cos(\frac{2\pi}{3} - \frac{2}{3}\varphi))` with
  :math:`\varphi = \arccos(\frac{1}{\sqrt 2}(t/|w|)^{3/2})`; penalty :math:`\frac{\lambda}{2}|u|^{1/2}` with
  :math:`\lambda = 8 t^{3/2} / \sqrt{54}`, the value whose dead zone :math:`(54^{1/3}/4)\lambda^{2/3}` is
  exactly ``t``. A kept weight jumps from 0 to :math:`\frac{2}{3}|w|` at the threshold and tends to :math:`w` above.

Plain functions of tensors; :mod:`~lightning_stthree.methods.effective` applies them with the channel rescale.
"""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_stthree.core.checks import check_bool, check_choice, check_number

Shrinkage = Literal["soft", "hard", "firm", "half"]
SHRINKAGES: tuple[str, ...] = get_args(Shrinkage)
#: ``firm``'s default ratio :math:`\mu / t`: linear from 0 at ``t`` to ``w`` at ``2 t``.
DEFAULT_FIRM_RATIO = 2.0

# The half-thresholding operator of Xu, Chang, Xu & Zhang, "L1/2 regularization: a thresholding representation theory
# and a fast solver" (IEEE TNNLS 2012), Theorem 1, for the penalty (lambda/2)|u|^(1/2) in this module's scaling.
_SQRT_HALF = math.sqrt(0.5)
_TWO_PI_THIRDS = 2.0 * math.pi / 3.0


def resolve_shrinkage(shrinkage: object, soft_threshold: object = None) -> str:
    """The shrinkage that ``shrinkage`` and the older flag ``soft_threshold`` name together.

    ``soft_threshold=True`` is ``"soft"`` and ``soft_threshold=False`` is ``"hard"`` (its meaning before
    ``shrinkage`` existed); ``None`` for either means "not given". Both given must agree.

    Raises:
        TypeError: If ``shrinkage`` is not a string or ``soft_threshold`` not a bool.
        ValueError: If ``shrinkage`` is not one of :data:`SHRINKAGES`, or the two disagree.

    Example::

        >>> resolve_shrinkage(None, False)
        'hard'
    """
    check_bool("soft_threshold", soft_threshold, allow_none=True)
    if shrinkage is None:
        return "hard" if soft_threshold is False else "soft"
    check_choice("shrinkage", shrinkage, SHRINKAGES)
    if soft_threshold is not None and ("soft" if soft_threshold else "hard") != shrinkage:
        raise ValueError(
            f"`soft_threshold={soft_threshold}` contradicts `shrinkage={shrinkage!r}`: `soft_threshold` is the older "
            "name of `shrinkage='soft'` (True) and `shrinkage='hard'` (False); give `shrinkage` alone"
        )
    return str(shrinkage)


def soft_threshold_alias() -> property:
    """The ``soft_threshold`` attribute of an object with a ``shrinkage``: whether it is ``"soft"``; assigning
    ``True`` / ``False`` sets ``"soft"`` / ``"hard"`` (the flag's meaning before ``shrinkage`` existed)."""

    def get(owner: Any) -> bool:
        return owner.shrinkage == "soft"

    def set_(owner: Any, value: bool) -> None:
        owner.shrinkage = resolve_shrinkage(None, value)

    return property(get, set_, doc="Whether the shrinkage is the soft threshold (``False``: set it to ``'hard'``).")


def check_firm_ratio(firm_ratio: object) -> float:
    """``firm_ratio`` (``mu / t`` of the firm threshold) as a float ``> 1``.

    Raises:
        TypeError: If it is not a number.
        ValueError: If it is not a finite number above 1 (at 1 the firm threshold would be the hard one, with an
            infinite slope).
    """
    return check_number("firm_ratio", firm_ratio, 1.0, math.inf, "()")


def above_threshold(weight: Tensor, threshold: Tensor) -> Tensor:
    """Boolean mask of the kept weights, ``|w| > t``, compared in at least float32.

    Half-precision weights (``precision="bf16-true"`` / ``"16-true"``) are compared as float32, against the float32
    threshold: every bf16/fp16 magnitude is exact in float32, so the mask is exactly the rule the global selection
    counted with (rounding the threshold to bf16 instead could prune weights that rank above it).
    """
    if weight.dtype in (torch.float32, torch.float64):
        return weight.abs() > threshold.to(weight.dtype)
    return weight.abs().float() > threshold.float()


def half_factor(ratio: Tensor) -> Tensor:
    r"""The half threshold's ``|h(w)| / |w|`` as a function of ``ratio = t / |w|`` in ``[0, 1]``.

    .. math::

        \frac{2}{3}\left(1 + \cos\left(\frac{2\pi}{3} - \frac{2}{3}\arccos\left(\frac{\rho^{3/2}}{\sqrt 2}\right)
        \right)\right)

    From :math:`2/3` at :math:`\rho = 1` (the jump at the threshold) up to exactly 1 at :math:`\rho = 0` (which is
    set, not computed: with ``t = 0`` the weight passes through bitwise).
    """
    angle = torch.acos(ratio.pow(1.5) * _SQRT_HALF)
    factor = (2.0 / 3.0) * (1.0 + torch.cos(_TWO_PI_THIRDS - (2.0 / 3.0) * angle))
    return torch.where(ratio == 0, 1.0, factor)


def kept_magnitude(
    magnitude: Tensor, threshold: Tensor, shrinkage: str, firm_ratio: float = DEFAULT_FIRM_RATIO
) -> Tensor:
    r"""``|shrink(w)|`` as a function of ``magnitude = |w|``, for kept entries (``|w| > t``), for the shrinkages other
    than ``"soft"`` and ``"hard"`` (which :func:`shrink` and the eager chain compute directly, bitwise as before).

    Finite for every ``magnitude >= 0`` (whatever is computed where ``|w| <= t`` is for the caller to mask), and 0 at
    ``magnitude = 0``, which the in-place eager chain relies on.

    Args:
        magnitude: ``|w|``, in the weight's dtype.
        threshold: 0-dim tensor ``t >= 0``, in the weight's dtype.
        shrinkage: ``"firm"`` or ``"half"``.
        firm_ratio: ``mu / t`` of ``"firm"``, ``> 1``.

    Raises:
        ValueError: For another ``shrinkage``.
    """
    if shrinkage == "firm":
        # min(|w|, relu((|w| - t) mu / (mu - t))): the linear piece below mu, |w| itself (bitwise) above it.
        slope = firm_ratio / (firm_ratio - 1.0)
        return torch.minimum(magnitude, ((magnitude - threshold) * slope).clamp(min=0.0))
    if shrinkage == "half":
        ratio = (threshold / magnitude.clamp(min=torch.finfo(magnitude.dtype).tiny)).clamp(max=1.0)
        return magnitude * half_factor(ratio)
    raise ValueError(
        f"`shrinkage` must be 'firm' or 'half' here (soft and hard are not shrunk by it), got {shrinkage!r}"
    )


def shrink(
    weight: Tensor,
    threshold: Tensor | float,
    shrinkage: Shrinkage = "soft",
    firm_ratio: float = DEFAULT_FIRM_RATIO,
    keep: Tensor | None = None,
) -> Tensor:
    r"""Apply the shrinkage ``shrinkage`` with threshold ``t`` elementwise (the table in this module's docstring).

    Zero exactly where ``|w| <= t``; with ``t = 0`` the weight passes through bitwise. Differentiable with respect to
    ``weight`` (zero gradient on pruned entries), in ``weight``'s dtype.

    Args:
        weight: Any tensor.
        threshold: ``t >= 0``, a number or a 0-dim tensor.
        shrinkage: ``"soft"``, ``"hard"``, ``"firm"`` or ``"half"``.
        firm_ratio: ``mu / t`` of ``"firm"``, ``> 1``.
        keep: :func:`above_threshold` of ``weight``, when the caller has it already.

    Returns:
        The shrunk tensor, ``weight``'s shape and dtype.

    Example::

        >>> shrink(torch.tensor([0.1, -0.3, 0.5]), 0.2, "firm")
        tensor([ 0.0000, -0.2000,  0.5000])
    """
    if not isinstance(threshold, Tensor):  # a number: float32 like the callback's thresholds (float64 weights: float64)
        threshold = torch.tensor(
            threshold, dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device
        )
    if keep is None:
        keep = above_threshold(weight, threshold)
    threshold = threshold.to(weight.dtype)
    if shrinkage == "soft":
        # Equals sign(w) * max(|w| - t, 0) bitwise; the `where` also gives pruned entries (|w| == t included) an
        # exactly zero gradient when autograd differentiates this function (``straight_through=False``).
        return torch.where(keep, weight - torch.copysign(threshold, weight), 0.0)
    if shrinkage == "hard":
        return torch.where(keep, weight, 0.0)
    # Pruned entries read |w| = 1: no 0 / 0 in the half threshold's backward pass, whose gradient there is dropped.
    magnitude = kept_magnitude(torch.where(keep, weight.abs(), 1.0), threshold, shrinkage, firm_ratio)
    return torch.where(keep, torch.copysign(magnitude, weight), 0.0)
