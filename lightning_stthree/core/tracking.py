"""The global threshold from one update to the next: its state, the search near the last value, non-finite weights.

:func:`~lightning_stthree.core.threshold.global_threshold` answers one question exactly. A training run asks it at
every optimizer step, and the answer moves little from step to step: :class:`ThresholdTracker` keeps the last
threshold and how far it moved at the last update, searches first in a window around it (twice that move wide,
:func:`~lightning_stthree.core.selection.pivot_window`), and tells real NaN/Inf weights apart from finite weights whose
float sum overflowed (the selection's cheap check cannot). Plain torch, no Lightning: the callback only decides what
a non-finite weight means for the run (stop or skip) and writes the thresholds into the layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_stthree.core.checks import check_bool, check_choice, check_int, check_number
from lightning_stthree.core.floor import FlooredThresholds, floored_global_threshold
from lightning_stthree.core.selection import PIVOT_WINDOW, NonFiniteScoresError, nonfinite_counts, pivot_window
from lightning_stthree.core.threshold import CRITERIA, Criterion

Budget = Literal["params", "flops"]
BUDGETS: tuple[str, ...] = ("params", "flops")


class NonFiniteWeightsError(FloatingPointError):
    """Raised by :meth:`ThresholdTracker.update` when some weights hold NaN or Inf: no threshold means anything then.

    Attributes:
        counts: ``{index in the weights given: (number of NaNs, number of infinities)}``.
    """

    def __init__(self, counts: dict[int, tuple[int, int]]) -> None:
        super().__init__(f"the weight tensors at indices {sorted(counts)} hold NaN or Inf entries: {counts}")
        self.counts = counts


# The checks of what may be assigned to a tracker's attribute, by attribute (the error names the callback's argument).
_CHECKS: dict[str, Any] = {
    "criterion": lambda value: check_choice("criterion", value, CRITERIA),
    "budget": lambda value: check_choice("budget", value, BUDGETS),
    "compile_kernels": lambda value: check_bool("compile_kernels", value),
    "min_density_ratio": lambda value: check_number("min_density_ratio", value, 0.0, 1.0),
    "threshold": lambda value: check_number("threshold", value, 0.0),
    "sparsity": lambda value: check_number("sparsity", value, 0.0, 1.0),
    "step": lambda value: check_int("last_update_step", value, minimum=-1),
}


class ThresholdTracker:
    """The global threshold of a run, updated from the raw weights at each scheduled sparsity.

    Args:
        criterion: ``"l1"`` (ST-3) or ``"l1_std"`` (ST-3 sigma), see
            :func:`~lightning_stthree.core.threshold.layer_score_factor`.
        budget: ``"params"``: ``sparsity`` is a fraction of the weights; ``"flops"``: a fraction of the total
            ``shares`` given to :meth:`update` (each layer's MACs per weight).
        compile_kernels: Count near the last threshold with fused kernels (same result).
        min_density_ratio: Floor on every layer's kept fraction, relative to the model's: at sparsity ``s`` each layer
            keeps at least ``min_density_ratio * (1 - s)`` of its weights
            (:func:`~lightning_stthree.core.threshold.floored_global_threshold`), in ``[0, 1]``; 0: the pure global
            threshold; 1: the same sparsity in every layer.

    Attributes:
        threshold: The global threshold of the last update, in score units (0 before any: nothing pruned).
        held: The layers the last update held at the floor, ``{index in the weights given: own threshold in score
            units}`` (saved, so that a run resumed where no update follows, in the fine-tune phase, still knows them;
            the next update starts from them and derives them from the weights again).
        sparsity: The sparsity it was selected for.
        step: The optimizer step of the last update (``-1`` before any).
        last_relative_move: How far the threshold moved at the last update, relative to the one before (sets the
            search window; not saved: it only changes how fast the next update is, never its result).

    Example::

        >>> tracker = ThresholdTracker()
        >>> tracker.update([torch.tensor([0.1, -0.4, 0.3, -0.2])], sparsity=0.5, step=0)
        tensor(0.2000)
        >>> tracker.state_dict()
        {'sparsity': 0.5, 'threshold': 0.20000000298023224, 'last_update_step': 0, 'held': {}}
    """

    def __init__(
        self,
        criterion: Criterion = "l1",
        budget: Budget = "params",
        compile_kernels: bool = False,
        min_density_ratio: float = 0.0,
    ) -> None:
        self.criterion: Criterion = _CHECKS["criterion"](criterion)
        self.budget: Budget = _CHECKS["budget"](budget)
        self.compile_kernels: bool = _CHECKS["compile_kernels"](compile_kernels)
        self.min_density_ratio: float = _CHECKS["min_density_ratio"](min_density_ratio)
        self.threshold = 0.0
        self.held: dict[int, Tensor] = {}
        self.sparsity = 0.0
        self.step = -1
        self.last_relative_move = PIVOT_WINDOW

    def set(self, name: str, value: Any) -> None:
        """Assign a setting (``criterion``, ``budget``, ``compile_kernels``, ``min_density_ratio``) or a state value
        (``threshold``, ``sparsity``, ``step``) with the constructor's checks.

        Raises:
            TypeError: If ``value`` has the wrong type.
            ValueError: If it is out of range, or ``name`` is none of these.
        """
        check = _CHECKS.get(name)
        if check is None:
            raise ValueError(f"`name` must be one of {tuple(_CHECKS)}, got {name!r}")
        setattr(self, name, check(value))

    @torch.no_grad()
    def update(
        self, weights: Sequence[Tensor], sparsity: float, step: int, shares: Sequence[float] | None = None
    ) -> Tensor:
        """Select the threshold for ``sparsity`` over ``weights`` and remember it as the update of ``step``.

        Searched first near the last threshold; the selection's pass also checks that every weight is finite.

        Args:
            weights: The raw prunable weights (plain tensors or DTensors).
            sparsity: The scheduled sparsity, in ``[0, 1]``.
            step: The optimizer step this update belongs to.
            shares: With ``budget="flops"``, each tensor's MACs per weight.

        Returns:
            The new global threshold, a 0-dim float32 tensor in score units.

        Raises:
            NonFiniteWeightsError: If some weights hold NaN or Inf; the tracker's state is left as it was.
            ValueError: If ``shares`` is missing with ``budget="flops"``, or given with ``budget="params"``.
        """
        if (shares is None) != (self.budget == "params"):
            raise ValueError(f"`shares` must be given exactly when budget='flops', got budget={self.budget!r}")
        pivot = self.threshold if self.threshold > 0 else None
        try:
            selected = self._select(weights, sparsity, shares, pivot, check_finite=True)
        except NonFiniteScoresError:
            counts = nonfinite_counts(weights)
            if counts:
                raise NonFiniteWeightsError(counts) from None
            selected = self._select(weights, sparsity, shares, pivot, check_finite=False)  # a float sum overflowed
        threshold = selected.threshold
        if pivot is not None:
            self.last_relative_move = abs(float(threshold) - pivot) / pivot
        self.threshold = float(threshold)
        self.held = selected.held
        self.sparsity = float(sparsity)
        self.step = step
        return threshold

    def _select(
        self,
        weights: Sequence[Tensor],
        sparsity: float,
        shares: Sequence[float] | None,
        pivot: float | None,
        check_finite: bool,
    ) -> FlooredThresholds:
        held_pivots = {i: float(t) for i, t in self.held.items()} if len(self.held) else None
        return floored_global_threshold(
            weights,
            sparsity,
            self.min_density_ratio * (1.0 - sparsity),
            self.criterion,
            shares,
            pivot,
            pivot_window(self.last_relative_move),
            self.compile_kernels,
            check_finite,
            held_pivots,
            start_held=list(self.held),
        )

    def state_dict(self) -> dict[str, Any]:
        """The state a checkpoint keeps (plain Python numbers; lightning-stthree 0.1's keys, and ``held``)."""
        held = {i: float(t) for i, t in self.held.items()}
        return {"sparsity": self.sparsity, "threshold": self.threshold, "last_update_step": self.step, "held": held}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s values (a state without ``held``, from 0.1 or 0.2.0, holds no layer)."""
        self.sparsity = float(state["sparsity"])
        self.threshold = float(state["threshold"])
        self.step = int(state["last_update_step"])
        self.held = {int(i): torch.tensor(float(t)) for i, t in state.get("held", {}).items()}
