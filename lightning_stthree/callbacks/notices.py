"""What :class:`~lightning_stthree.callbacks.st3.ST3PruningCallback` tells the user while it runs, as text: weights
that are not finite (training has diverged, and what ``on_nonfinite`` does about it), and layers held at the density
floor. The callback decides when to say it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

NONFINITE_HINT = (
    " HINT: clip gradients (`Trainer(gradient_clip_val=1.0)`) or lower the learning rate; "
    "`Trainer(detect_anomaly=True)` finds the operation that produced the first NaN."
)


def nonfinite_weights(
    step: int, names: Sequence[str], weights: Sequence[Tensor], counts: dict[int, tuple[int, int]]
) -> str:
    """The message for raw weights holding NaN or Inf (``counts``: by layer index, the NaN and Inf counts)."""
    where = ", ".join(
        f"`{names[i]}` ({nans} NaN and {infs} Inf of {weights[i].numel()})" for i, (nans, infs) in counts.items()
    )
    return (
        f"ST3PruningCallback: at optimizer step {step}, the raw weights of {where} are not finite, so no "
        "meaningful global threshold exists (training has diverged)."
    )


def handle_nonfinite_weights(
    callback: Any, step: int, names: Sequence[str], weights: Sequence[Tensor], counts: dict[int, tuple[int, int]]
) -> None:
    """What ``ST3PruningCallback(on_nonfinite=...)`` does about non-finite raw weights at ``step``: raise a
    ``FloatingPointError`` (``"raise"``), or warn once per run and keep the last threshold (``"warn"``)."""
    message = nonfinite_weights(step, names, weights, counts)
    if callback.on_nonfinite == "raise":
        raise FloatingPointError(
            message + NONFINITE_HINT + " Pass `on_nonfinite='warn'` to keep the last threshold instead of stopping."
        )
    if not callback._warned_nonfinite:
        callback._warned_nonfinite = True
        rank_zero_warn(
            message + f" The threshold stays at {callback.threshold:.6g} and updates are skipped while any weight is "
            "not finite (`on_nonfinite='warn'`; warned once per run)." + NONFINITE_HINT
        )


def newly_held(step: int, sparsity: float, names: Sequence[str], ratio: float) -> str:
    """The line said when layers are first held at the density floor in a run."""
    more = " and more" if len(names) > 10 else ""
    return (
        f"ST3PruningCallback: at step {step} (sparsity {sparsity:.4f}) the global threshold would leave "
        f"{list(names[:10])}{more} at less than min_density_ratio={ratio:g} of the model's density: they keep their "
        "largest weights, and the other layers are pruned a little more so that the total stays at the schedule's "
        "sparsity (`min_density_ratio=0` gives the pure global threshold)."
    )


def held_note(names: Sequence[str], sparsity: float, ratio: float) -> list[str]:
    """The report's note on the layers the last update held (none if none)."""
    if not names:
        return []
    floor = ratio * (1.0 - sparsity)
    return [
        f"Held at the density floor (min_density_ratio={ratio:g}: at least {floor:.4%} of their weights kept): "
        f"{list(names)}"
    ]
