"""Fused kernels for ST-3's two passes over every prunable weight per step (where they build).

An ST-3 step reads each raw weight twice: once to count the scores around the last threshold (the global selection,
:mod:`~lightning_stthree.core.selection`) and once to build the effective weight (the forward pass,
:mod:`~lightning_stthree.methods.st3`). In eager PyTorch each of those is a chain of elementwise operations, each
a full pass over the weight with its own temporary (about ten for the effective weight), plus a fixed dispatch cost
per operation that dominates for small layers. :func:`compiled` turns a plain function of this package into one
fused kernel per pass with ``torch.compile`` (Inductor: C++/OpenMP on a CPU, Triton on a GPU).

What it costs: a C++ compiler on a CPU (Triton on a GPU), and a compilation the first time each kernel meets a new
kind of weight (dtype, rank, reduction size class): a few seconds each, cached on disk by Inductor for later runs.
Shapes are compiled dynamically, so layers of different sizes share a kernel. What it changes in the results:
nothing in the selection (the counts are exact, the threshold bitwise the same) and float rounding only in the
effective weight (sums reduce in another order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])

_COMPILED: dict[Callable[..., Any], Callable[..., Any]] = {}


def compiled(function: FunctionT) -> FunctionT:
    """``function`` compiled with ``torch.compile(dynamic=True)``, once per process (the compiled function caches its
    own graphs: one per dtype, rank and reduction size class, whatever the shapes)."""
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function, dynamic=True)
    return _COMPILED[function]  # type: ignore[return-value]


def scores_of(weight: Tensor, factor: Tensor) -> Tensor:
    """The selection's pruning scores of ``weight``: ``|w|`` in float32, times the float32 0-dim ``factor``."""
    return weight.abs().float() * factor


def window_column_counts(columns: Tensor, factor: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count the scores ``|w| * factor`` of a weight viewed as at most 31 rows of many columns that are ``<= low``,
    mark per column the rows whose score lies in ``(low, high]``, and sum all scores.

    The scores are :func:`scores_of`'s, so the counts are exactly those of the scores the selection reads back.
    Reducing over the rows (dim 0) keeps the compiled kernel a streaming pass, and the marks locate the few
    in-window scores without another pass over the weight. The sum comes almost free with the counts and says
    whether every score is finite (NaN and Inf make it so; huge finite scores can too, by overflow).

    Returns:
        The int64 total count ``<= low``; per column an int32 whose bit ``r`` is set when row ``r``'s score is in
        ``(low, high]``; and the float64 sum of all scores (column sums in float32).
    """
    scores = scores_of(columns, factor)
    row_bits = torch.ones((), dtype=torch.int32, device=columns.device) << torch.arange(
        columns.shape[0], dtype=torch.int32, device=columns.device
    ).unsqueeze(1)
    inside = ((scores > low) & (scores <= high)).int() * row_bits
    below = (scores <= low).sum(0, dtype=torch.int32)
    return below.sum(dtype=torch.int64), inside.sum(0, dtype=torch.int32), scores.sum(0).sum(dtype=torch.float64)


# Per device type, why fused kernels cannot be built there ("" when they can): probed once per process.
_PROBED: dict[str, str] = {}

Trial = Callable[[torch.device], Any]


def try_selection_kernel(device: torch.device) -> None:
    """Compile and run the selection's fused kernel (:func:`window_column_counts`) on a tiny tensor of ``device``."""
    one = torch.ones((), device=device)
    compiled(window_column_counts)(torch.ones(2, 4, device=device), one, one, one)


def build_failure(device: torch.device, trials: Sequence[Trial] = (try_selection_kernel,)) -> str:
    """Why ``trials`` (functions that build and run a fused kernel on tiny tensors of a device) fail on ``device``, or
    ``""`` when they all work. Tried once per device type and process; later calls return the first answer."""
    if device.type not in _PROBED:
        try:
            for trial in trials:
                trial(device)
            _PROBED[device.type] = ""
        except Exception as error:  # Inductor raises many types (missing compiler, missing Triton, ...)
            first_line = (str(error).strip().splitlines() or [""])[0][:300]
            _PROBED[device.type] = f"{type(error).__name__}: {first_line}"
    return _PROBED[device.type]


def _tool(device: torch.device) -> str:
    return "Triton (installed with CUDA builds of torch)" if device.type == "cuda" else "a C++ compiler (g++)"


def check_compiles(device: torch.device, trials: Sequence[Trial] = (try_selection_kernel,)) -> None:
    """Build and run the fused kernels on tiny tensors of ``device``: a missing compiler fails at setup.

    Raises:
        RuntimeError: If ``torch.compile`` cannot build a kernel here, with what to do about it.
    """
    reason = build_failure(device, trials)
    if reason:
        raise RuntimeError(
            f"`compile_kernels=True` needs torch.compile to build kernels on {device.type}, which failed with "
            f"{reason}. HINT: install {_tool(device)}, or pass `compile_kernels=None` (the default: fused kernels "
            "where they build, else the eager ones, same results) or `False`"
        )


def decide_fused(
    setting: bool | None, device: torch.device, trials: Sequence[Trial] = (try_selection_kernel,)
) -> tuple[bool, str]:
    """Whether to run the fused kernels on ``device`` for a ``compile_kernels`` setting, and a line to log about it.

    ``True`` requires them (:func:`check_compiles`), ``False`` never uses them, and ``None`` (the callbacks' default)
    uses them where they build: the first decision per device type and process builds them on tiny tensors (a few
    seconds, less from Inductor's disk cache); when that fails, the line says why and what to install (``""``
    otherwise, and on later calls).

    Raises:
        RuntimeError: With ``True``, if the kernels cannot be built.
    """
    if setting is not None:
        if setting:
            check_compiles(device, trials)
        return setting, ""
    first = device.type not in _PROBED
    reason = build_failure(device, trials)
    if not reason or not first:
        return not reason, ""
    return False, (
        f"fused kernels cannot be built on {device.type} ({reason}); using the eager kernels (the same results, "
        f"slower). HINT: install {_tool(device)} for the fast path, or pass `compile_kernels=False` to choose the "
        "eager kernels without this message."
    )
