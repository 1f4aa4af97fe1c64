"""Time and peak extra memory of one global-threshold selection: torch.sort, torch.kthvalue and this package.

    python benchmarks/threshold_selection.py [--sizes 0.27M 11.7M 25.6M 124M 1B] [--out FILE.json]

The weights are random float32 tensors with the shapes of a real model of each size (ResNet-20, ResNet-18, ResNet-50,
GPT-2 small, and 1B weights as 64 tensors of 16M). `sort` and `kthvalue` run on the concatenated scores, as the
authors' code and the simple O(N) alternative do; `package (no pivot)` is the first update of a run (radix selection),
`package (pivot)` a later one (the previous threshold, here the k-th value of slightly different weights, is the
pivot, searched in the callback's window), and `package (pivot, compiled)` the same with `compile_kernels=True` (its
kernel compiled before the measurement). Every result is checked bitwise against kthvalue where kthvalue ran.
Peak extra memory is the peak resident set size above the resident size before the call (Linux `/proc/self/status`,
VmHWM reset through `/proc/self/clear_refs`, after `malloc_trim` returned freed heap memory to the OS); time is the
median of `--repeats` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lightning_stthree.core.selection import pivot_window
from lightning_stthree.core.threshold import global_threshold, num_pruned

GPT2_SMALL = [(50257, 768), (1024, 768)] + [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12


def shapes(size: str) -> list[tuple[int, ...]]:
    import torchvision

    from lightning_stthree.core.layers import find_prunable_layers
    from lightning_stthree.recipes.models import cifar_resnet

    if size == "0.27M":
        net = cifar_resnet(20)
    elif size == "11.7M":
        net = torchvision.models.resnet18()
    elif size == "25.6M":
        net = torchvision.models.resnet50()
    elif size == "124M":
        return GPT2_SMALL
    elif size == "1B":
        return [(4096, 4096)] * 64
    else:
        raise ValueError(f"unknown size {size}")
    return [tuple(m.weight.shape) for m in find_prunable_layers(net).values()]


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc), so that the next call's allocations show in the resident size."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, float, torch.Tensor]:
    """Median seconds, peak extra memory in GB, result."""
    times, peaks, result = [], [], None
    for _ in range(repeats):
        gc.collect()
        _release_free_memory()
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
        before = _rss_kb("VmRSS:")
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        peaks.append(max(0, _rss_kb("VmHWM:") - before) / 1024**2)
        del result
        result = None
    result = fn()
    return statistics.median(times), max(peaks), result


def sort_threshold(weights: list[torch.Tensor], k: int) -> torch.Tensor:
    return torch.sort(torch.cat([w.abs().flatten() for w in weights])).values[k - 1]


def kthvalue_threshold(weights: list[torch.Tensor], k: int) -> torch.Tensor:
    return torch.kthvalue(torch.cat([w.abs().flatten() for w in weights]), k).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.27M", "11.7M", "25.6M", "124M", "1B"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--sort-max", type=float, default=130e6, help="skip sort above this many weights")
    parser.add_argument("--kthvalue-max", type=float, default=130e6, help="skip kthvalue above this many weights")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "threshold_selection.json"))
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    for size in args.sizes:
        generator = torch.Generator().manual_seed(0)
        weights = [torch.randn(s, generator=generator) * 0.05 for s in shapes(size)]
        n = sum(w.numel() for w in weights)
        k = num_pruned(args.sparsity, n)
        reference = None
        methods: dict[str, Callable[[], torch.Tensor]] = {}
        if n <= args.kthvalue_max:
            methods["kthvalue"] = lambda weights=weights, k=k: kthvalue_threshold(weights, k)
        if n <= args.sort_max:
            methods["sort"] = lambda weights=weights, k=k: sort_threshold(weights, k)
        methods["package (no pivot)"] = lambda weights=weights: global_threshold(weights, args.sparsity)
        # A later step: the previous threshold is that of the weights before one small update, and the window is the
        # callback's: twice the threshold's last relative move, within [MIN_PIVOT_WINDOW, PIVOT_WINDOW].
        previous = global_threshold([w * 1.001 for w in weights[:1]] + weights[1:], args.sparsity).item()
        now = global_threshold(weights, args.sparsity).item()
        window = pivot_window(abs(now - previous) / previous)
        methods["package (pivot)"] = lambda weights=weights, p=previous, w=window: global_threshold(
            weights, args.sparsity, pivot=p, window=w
        )
        methods["package (pivot, compiled)"] = lambda weights=weights, p=previous, w=window: global_threshold(
            weights, args.sparsity, pivot=p, window=w, compile_kernels=True
        )
        methods["package (pivot, compiled)"]()  # compiles the counting kernel (a few seconds, once per process)
        for method, fn in methods.items():
            seconds, peak_gb, result = measure(fn, args.repeats)
            if method == "kthvalue":
                reference = result
            exact = None if reference is None else bool(result.view(torch.int32) == reference.view(torch.int32))
            rows.append(
                {
                    "size": size,
                    "weights": n,
                    "method": method,
                    "seconds": seconds,
                    "peak_extra_gb": peak_gb,
                    "equals_kthvalue": exact,
                }
            )
            print(f"{size:>6} {n:>13,} {method:<26} {seconds:>9.4f} s {peak_gb:>7.3f} GB  exact={exact}", flush=True)
        del weights
        gc.collect()
    machine = {
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "sparsity": args.sparsity, "results": rows}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    main()
