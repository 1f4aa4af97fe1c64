"""Where an ST-3 training step spends its extra time: threshold selection, forward, backward, optimizer step.

    python benchmarks/step_breakdown.py [--model resnet18|resnet20] [--steps 16] [--compile-kernels]

A plain PyTorch loop (no Lightning) over a dense model and the same model with the ST-3 parametrization on every
Conv/Linear weight, steps interleaved. Each ST-3 step recomputes the global threshold at 90% sparsity with the
package's selection, as the callback does (searched near the previous threshold, in the window the callback uses,
checking that the weights are finite) before its forward pass. With ``--compile-kernels`` the selection's counting
pass and the effective weight are fused kernels, as with the callback's ``compile_kernels=True``. Prints the median
time of each phase over the steps after the first three, for both models; the part of the ST-3 forward pass spent
building the effective weights (inside the parametrizations); the minor page faults per step (memory the allocator
got anew from the operating system, see the README's *Performance*); the median per-step ratio and the median
window; and the time of an evaluation forward pass (no autograd, as in validation) for the dense model and the ST-3
model, building its effective weights at every batch or reusing them as the callbacks do in evaluation loops.
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import time
from typing import Any

import torch
import torchvision
from torch import nn

from lightning_stthree.core.selection import PIVOT_WINDOW, pivot_window
from lightning_stthree.core.threshold import global_threshold
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.st3 import register_st3_parametrization
from lightning_stthree.recipes.models import cifar_resnet

PHASES = ("selection", "forward", "backward", "optimizer")


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the comparison, print its table and return the medians (milliseconds, faults, ratio, window)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("resnet18", "resnet20"), default="resnet18")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--compile-kernels", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 4:
        parser.error(f"--steps must be at least 4 (the first 3 are warm-up), got {args.steps}")
    torch.manual_seed(0)
    if args.model == "resnet20":
        dense, batch, size = cifar_resnet(20), 128, 32
    else:
        dense, batch, size = torchvision.models.resnet18(num_classes=10), 32, 64
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    sparse = copy.deepcopy(dense)
    layers = [m for m in sparse.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parametrizations = [register_st3_parametrization(m, compile_kernels=args.compile_kernels) for m in layers]
    inside = [0.0]  # seconds spent in the parametrizations during the current forward pass
    entered = [0.0]

    def enter(*_: object) -> None:
        entered[0] = time.perf_counter()

    def leave(*_: object) -> None:
        inside[0] += time.perf_counter() - entered[0]

    for parametrization in parametrizations:
        parametrization.register_forward_pre_hook(enter)
        parametrization.register_forward_hook(leave)
    previous: list[float | None] = [None]
    last_move = [PIVOT_WINDOW]  # of the threshold, relative: the callback searches within twice that of it
    windows: list[float] = []

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, pruned: bool) -> tuple[float, ...]:
        faults = page_faults()
        inside[0] = 0.0
        start = time.perf_counter()
        if pruned:
            weights = [raw_weight(m) for m in layers]
            windows.append(pivot_window(last_move[0]))
            threshold = global_threshold(weights, 0.9, "l1", previous[0], windows[-1], args.compile_kernels, True)
            if previous[0] is not None:
                last_move[0] = abs(float(threshold) - previous[0]) / previous[0]
            previous[0] = float(threshold)
            for parametrization in parametrizations:
                parametrization.threshold.copy_(threshold)
        selected = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        forward = time.perf_counter()
        loss.backward()
        backward = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad()
        return (
            selected - start,
            forward - selected,
            backward - forward,
            time.perf_counter() - backward,
            inside[0],
            page_faults() - faults,
        )

    runs = {
        "dense": (dense, torch.optim.SGD(dense.parameters(), lr=0.01, momentum=0.9), False),
        "st3": (sparse, torch.optim.SGD(sparse.parameters(), lr=0.01, momentum=0.9), True),
    }
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for _ in range(args.steps):
        for name, run in runs.items():
            times[name].append(step(*run))
    dense_times, st3_times = times["dense"][3:], times["st3"][3:]

    def median(run: list[tuple[float, ...]], index: int, scale: float = 1000.0) -> float:
        return scale * statistics.median(t[index] for t in run)

    parts = len(PHASES)
    result: dict[str, Any] = {
        "phases_ms": {
            phase: {"dense": median(dense_times, i), "st3": median(st3_times, i)} for i, phase in enumerate(PHASES)
        },
        "effective_weights_ms": median(st3_times, parts),
        "page_faults": {"dense": median(dense_times, parts + 1, 1), "st3": median(st3_times, parts + 1, 1)},
        "step_ratio": statistics.median(
            sum(s[:parts]) / sum(d[:parts]) for s, d in zip(st3_times, dense_times, strict=True)
        ),
        "window": statistics.median(windows),
    }
    # Evaluation (the validation, test and predict loops): forward passes without autograd, in blocks of 3 batches,
    # the last 2 of each timed. Reusing, as the callbacks do in those loops, the first batch of a block builds the
    # effective weights and the others reuse them; rebuilding, every batch builds them.
    evaluation: dict[str, list[float]] = {"dense": [], "st3_rebuilding": [], "st3_reusing": []}
    dense.eval()
    sparse.eval()
    with torch.inference_mode():
        for _ in range(args.steps):
            for name, times_of in evaluation.items():
                for parametrization in parametrizations:
                    parametrization.stop_reusing()
                    parametrization.reuse_outside_autograd = name == "st3_reusing"
                for i in range(3):
                    start = time.perf_counter()
                    (dense if name == "dense" else sparse)(x)
                    if i:
                        times_of.append(time.perf_counter() - start)
    for parametrization in parametrizations:
        parametrization.stop_reusing()
    result["evaluation_ms"] = {name: 1000.0 * statistics.median(t) for name, t in evaluation.items()}
    print(f"{args.model}, {sum(m.weight.numel() for m in layers):,} prunable weights, batch {batch} at {size}x{size}")
    for phase, ms in result["phases_ms"].items():
        print(f"{phase:<10} dense {ms['dense']:7.1f} ms   ST-3 {ms['st3']:7.1f} ms")
    print(f"  of the ST-3 forward, building the effective weights: {result['effective_weights_ms']:.1f} ms")
    faults = result["page_faults"]
    print(f"minor page faults per step: dense {faults['dense']:.0f}   ST-3 {faults['st3']:.0f}")
    print(f"step ratio (median over steps): {result['step_ratio']:.3f}")
    print(f"window searched around the previous threshold (median): {result['window']:.4f}")
    evaluation_ms = result["evaluation_ms"]
    print(
        f"evaluation forward per batch: dense {evaluation_ms['dense']:.1f} ms   ST-3 rebuilding the effective weights "
        f"{evaluation_ms['st3_rebuilding']:.1f} ms   ST-3 reusing them {evaluation_ms['st3_reusing']:.1f} ms"
    )
    return result


if __name__ == "__main__":
    main()
