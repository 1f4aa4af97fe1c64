"""Training-step time with ST3PruningCallback vs dense training, in one process, interleaved rounds.

    python benchmarks/step_overhead.py [--rounds 7] [--steps 12] [--models resnet20 resnet18]
                                       [--variants eager compiled copy] [--out FILE.json]

Each round fits the dense model and one model per variant for ``--steps`` optimizer steps each: ``eager`` is the
default ST3PruningCallback (threshold recomputed every step, at its target sparsity), ``compiled`` the callback with
``compile_kernels=True``, and ``copy`` no callback but a weight parametrization that only returns a copy of each
Conv/Linear weight: the least any ``torch.nn.utils.parametrize`` weight costs (one read and one write of every
weight per forward pass, the copies held until the backward pass), a floor for ST-3's forward pass. All run on
the same synthetic batches; every step is timed from the start of ``on_train_batch_start`` (so the callback's
threshold update counts) to the end of ``on_train_batch_end``. The ratio of each variant's median to the dense
median is taken per round; the table reports the median of those ratios (robust to a noisy machine) and their
interquartile range. A warm-up fit of each model comes first (it compiles the kernels). ResNet-50 (batch 64,
224x224) is added when a GPU is present.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree import ST3PruningCallback
from lightning_stthree.recipes.models import cifar_resnet

CONFIGS = {
    "resnet20": {"batch": 128, "size": 32, "build": lambda: cifar_resnet(20)},
    "resnet18": {"batch": 32, "size": 64, "build": lambda: torchvision.models.resnet18(num_classes=10)},
    "resnet50": {"batch": 64, "size": 224, "build": lambda: torchvision.models.resnet50(num_classes=1000)},
}


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


class Copy(nn.Module):
    """The ``copy`` variant's parametrization: the weight's value, in new memory (gradient: the identity)."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.clone()


def register_copies(net: nn.Module) -> None:
    """Put the ``copy`` variant's parametrization on every Conv/Linear weight of ``net``."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            parametrize.register_parametrization(module, "weight", Copy())


class StepTimer(pl.Callback):
    """Wall time of each training batch, from the first `on_train_batch_start` to the last `on_train_batch_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def run_round(module: Classifier, loader: DataLoader, steps: int, pruning: ST3PruningCallback | None) -> float:
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer] if pruning is None else [timer, pruning]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    return statistics.median(timer.times[2:])  # the first steps warm up allocators and caches


# Variant: `compile_kernels` of its ST3PruningCallback, or None for the `copy` parametrization (no callback).
VARIANTS = {"eager": False, "compiled": True, "copy": None}


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method), as reported next to the median."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def benchmark(name: str, rounds: int, steps: int, variants: list[str]) -> dict[str, Any]:
    config = CONFIGS[name]
    torch.manual_seed(0)
    x = torch.randn(config["batch"], 3, config["size"], config["size"])
    y = torch.randint(0, 10, (config["batch"],))
    loader = DataLoader(TensorDataset(x.repeat(steps, 1, 1, 1), y.repeat(steps)), batch_size=config["batch"])
    dense = Classifier(config["build"]())
    runs: dict[str, tuple[Classifier, ST3PruningCallback | None]] = {"dense": (dense, None)}
    for variant in variants:
        sparse = Classifier(config["build"]())
        sparse.load_state_dict(dense.state_dict())
        if VARIANTS[variant] is None:
            register_copies(sparse.net)
            runs[variant] = (sparse, None)
            continue
        # Target reached at step 1 and recomputed every step: the steady-state cost of ST-3.
        pruning = ST3PruningCallback(
            0.9,
            start=0,
            end=1,
            update_every=1,
            report=False,
            log_layer_sparsity=False,
            compile_kernels=VARIANTS[variant],
        )
        runs[variant] = (sparse, pruning)
    for module, pruning in runs.values():
        run_round(module, loader, min(steps, 4), pruning)  # warm-up: allocators, caches, kernel compilation
    times: dict[str, list[float]] = {run: [] for run in runs}
    for _ in range(rounds):
        for run, (module, pruning) in runs.items():
            times[run].append(run_round(module, loader, steps, pruning))
    row: dict[str, Any] = {
        "model": name,
        "batch": config["batch"],
        "input": f"{config['size']}x{config['size']}",
        "prunable_weights": sum(m.weight.numel() for m in dense.modules() if isinstance(m, (nn.Conv2d, nn.Linear))),
        "dense_step_s": statistics.median(times["dense"]),
        "variants": {},
    }
    for variant in variants:
        ratios = [s / d for s, d in zip(times[variant], times["dense"], strict=True)]
        row["variants"][variant] = {
            "step_s": statistics.median(times[variant]),
            "overhead_median_ratio": statistics.median(ratios),
            "overhead_quartile_ratios": quartiles(ratios) if len(ratios) > 1 else (ratios[0], ratios[0]),
            "ratios": ratios,
        }
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = parser.parse_args(argv)
    models = args.models or (["resnet20", "resnet18"] + (["resnet50"] if torch.cuda.is_available() else []))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    rows = [benchmark(name, args.rounds, args.steps, args.variants) for name in models]
    print(f"\nStep time with ST3PruningCallback vs dense on {device}, torch {torch.__version__}, {args.rounds} rounds")
    print(
        f"{'model':<10} {'batch':>5} {'input':>8} {'weights':>11} {'dense s':>8} {'variant':>9} {'ST-3 s':>8} "
        f"{'overhead':>9} {'IQR':>17}"
    )
    for r in rows:
        for variant, v in r["variants"].items():
            low, high = (100 * (q - 1) for q in v["overhead_quartile_ratios"])
            print(
                f"{r['model']:<10} {r['batch']:>5} {r['input']:>8} {r['prunable_weights']:>11,} "
                f"{r['dense_step_s']:>8.4f} {variant:>9} {v['step_s']:>8.4f} "
                f"{100 * (v['overhead_median_ratio'] - 1):>8.1f}% {f'{low:.1f}% to {high:.1f}%':>17}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": device, "torch": torch.__version__, "platform": platform.platform(), "rounds": args.rounds}
    out.write_text(json.dumps({"machine": info, "steps": args.steps, "results": rows}, indent=2))
    print(f"written {out}")
    return rows


if __name__ == "__main__":
    main()
