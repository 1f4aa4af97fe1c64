"""Interleaved wall-clock timing of a few functions on the same call: the measurement behind every choice of
:func:`~lightning_stthree.inference.to_sparse_inference`, also used by ``benchmarks/inference.py``.

Not part of the public surface of :mod:`lightning_stthree.inference`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

# How a layer was called: its positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


def interleaved_times(
    functions: Mapping[str, Callable[..., Any]], call: Call, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall times in seconds of ``repeats`` calls ``function(*args, **kwargs)`` of each function, interleaved round
    by round after one warm-up round (synchronizing a GPU around each call)."""
    args, kwargs = call
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats + 1):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function(*args, **kwargs)
            synchronize()
            if round_index:  # round 0 warms up (allocations, MKL's sparse handles, cuSPARSE descriptors)
                times[name].append(time.perf_counter() - start)
    return times


def median_ms(
    functions: Mapping[str, Callable[..., Any]], call: Call, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median of :func:`interleaved_times` per function, in milliseconds."""
    times = interleaved_times(functions, call, repeats, device)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}
