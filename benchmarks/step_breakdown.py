"""Where an ST-3 training step spends its extra time: threshold selection, forward, backward, optimizer step.

    python benchmarks/step_breakdown.py [--model resnet18|resnet20] [--steps 16] [--compile-kernels]

A plain PyTorch loop (no Lightning) over a dense model and the same model with the ST-3 parametrization on every
Conv/Linear weight, steps interleaved. Each ST-3 step recomputes the global threshold at 90% sparsity with the
package's selection, as the callback does (searched near the previous threshold, in the window the callback uses,
checking that the weights are finite) before its forward pass. With ``--compile-kernels`` the selection's counting
pass and the effective weight are fused kernels, as with the callback's ``compile_kernels=True``. Prints the median
time of each phase over the steps after the first three, for both models, the median per-step ratio and the median
window.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision
from torch import nn

from lightning_stthree.models import cifar_resnet
from lightning_stthree.parametrization import raw_weight, register_st3_parametrization
from lightning_stthree.selection import PIVOT_WINDOW, pivot_window
from lightning_stthree.threshold import global_threshold

PHASES = ("selection", "forward", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("resnet18", "resnet20"), default="resnet18")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--compile-kernels", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "resnet20":
        dense, batch, size = cifar_resnet(20), 128, 32
    else:
        dense, batch, size = torchvision.models.resnet18(num_classes=10), 32, 64
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    sparse = copy.deepcopy(dense)
    layers = [m for m in sparse.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    parametrizations = [register_st3_parametrization(m, compile_kernels=args.compile_kernels) for m in layers]
    previous: list[float | None] = [None]
    last_move = [PIVOT_WINDOW]  # of the threshold, relative: the callback searches within twice that of it
    windows: list[float] = []

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, pruned: bool) -> tuple[float, ...]:
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
    print(f"{args.model}, {sum(m.weight.numel() for m in layers):,} prunable weights, batch {batch} at {size}x{size}")
    for i, phase in enumerate(PHASES):
        d = statistics.median(t[i] for t in dense_times)
        s = statistics.median(t[i] for t in st3_times)
        print(f"{phase:<10} dense {1000 * d:7.1f} ms   ST-3 {1000 * s:7.1f} ms")
    ratio = statistics.median(sum(s) / sum(d) for s, d in zip(st3_times, dense_times, strict=True))
    print(f"step ratio (median over steps): {ratio:.3f}")
    print(f"window searched around the previous threshold (median): {statistics.median(windows):.4f}")


if __name__ == "__main__":
    main()
