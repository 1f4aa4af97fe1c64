"""Why ST-3 collapsed at 98% without gradient clipping: the accuracy benchmark's setting, one variant per run.

    python benchmarks/collapse.py                      # every variant at 98%, seed 0 (about 45 s each on 2 cores)
    python benchmarks/collapse.py st3 no_straight_through clip1 --seed 1

Trains the accuracy benchmark's model and recipe (``benchmarks/accuracy.py``: ResNet-8 on Fashion-MNIST, one epoch,
SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine; no gradient clipping unless the variant says so) with
``ST3PruningCallback(target_sparsity=0.98, start=0.05, end=0.5)`` changed as each variant says, and prints the test
accuracy, the layer with the fewest weights left at the end, and the largest and the final global threshold: in a
collapsing run the raw weights, and with them the threshold, blow up by orders of magnitude within a few steps.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
from accuracy import fit_and_test  # this folder's accuracy benchmark: the same model and recipe

from lightning_stthree import ST3PruningCallback

# name -> (callback arguments, other settings)
VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "st3": ({}, {}),
    "hard_straight_through": ({"soft_threshold": False, "rescale": False}, {}),
    "no_straight_through": ({"straight_through": False}, {}),
    "no_rescale": ({"rescale": False}, {}),
    "ramp_to_90pct": ({"end": 0.9}, {}),
    "lr_0.02": ({}, {"lr": 0.02}),
    "gmp": ({"soft_threshold": False, "straight_through": False, "rescale": False}, {}),
    "clip1": ({}, {"clip": 1.0}),
    "clip5": ({}, {"clip": 5.0}),
    "gmp_clip1": ({"soft_threshold": False, "straight_through": False, "rescale": False}, {"clip": 1.0}),
    "st3_sigma_clip1": ({"criterion": "l1_std"}, {"clip": 1.0}),
}


class ThresholdProbe(pl.Callback):
    """The largest global threshold of the run, and its step: it explodes with the raw weights in a collapse."""

    def __init__(self, pruning: ST3PruningCallback) -> None:
        self.pruning = pruning
        self.peak = (0.0, -1)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.pruning.threshold > self.peak[0]:
            self.peak = (self.pruning.threshold, trainer.global_step)


def run(variant: str, sparsity: float, seed: int) -> dict[str, Any]:
    callback_args, settings = VARIANTS[variant]
    schedule = {"start": 0.05, "end": 0.5, **callback_args}
    pruning = ST3PruningCallback(target_sparsity=sparsity, report=False, log_layer_sparsity=False, **schedule)
    probe = ThresholdProbe(pruning)
    _, accuracy, _ = fit_and_test(
        [pruning, probe], seed, lr=settings.get("lr", 0.1), gradient_clip_val=settings.get("clip")
    )
    per_layer = pruning.measure_sparsity()[1]
    emptiest = max(per_layer, key=per_layer.__getitem__)
    return {
        "variant": variant,
        "test_acc": accuracy,
        "emptiest_layer": emptiest,
        "emptiest_density": 1.0 - per_layer[emptiest],
        "peak_threshold": probe.peak[0],
        "peak_step": probe.peak[1],
        "final_threshold": pruning.threshold,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help=f"any of {list(VARIANTS)} (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.98)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    rows = [run(variant, args.sparsity, args.seed) for variant in args.variants or VARIANTS]
    print(f"\nResNet-8, Fashion-MNIST, 1 epoch, {100 * args.sparsity:g}% target, seed {args.seed}")
    print(f"{'variant':<22} {'test acc':>8}  {'emptiest layer (density)':<34} {'largest threshold (step)':<26} final")
    for r in rows:
        emptiest = f"{r['emptiest_layer']} ({100 * r['emptiest_density']:.2f}%)"
        peak = f"{r['peak_threshold']:.4g} ({r['peak_step']})"
        print(f"{r['variant']:<22} {100 * r['test_acc']:>7.2f}%  {emptiest:<34} {peak:<26} {r['final_threshold']:.4g}")


if __name__ == "__main__":
    main()
