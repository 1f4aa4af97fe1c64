"""Sparse activations on Fashion-MNIST: a deep MLP and the ResNet-8, dense, CReLU / CST, unclipped, and with ST-3.

    python benchmarks/activation_fashion.py            # both models, 20 trainings each, about an hour on 2 CPU cores
    python benchmarks/activation_fashion.py --models mlp --sparsities 0.85
    python benchmarks/activation_fashion.py --quick    # a smoke run of every configuration in a couple of minutes

Per model, every configuration trains once from the same seed (0) and data order:

- ``dense``: the ReLU network;
- ``crelu`` / ``cst`` at each of ``--sparsities`` (default 50 / 70 / 85%), ``ActivationSparsityCallback`` with the
  prescribed clip, and again with ``clip=inf``: the unclipped shifted ReLU and soft threshold of the paper's
  instability;
- ``st3``: ``ST3PruningCallback(target_sparsity=--weight-sparsity)`` (default 90%, its default schedule), alone and
  together with each CReLU / CST configuration (prescribed clip).

The sparse activations hold their target from the first step (the callback's default ``end=0``, as in the paper).

Models. ``mlp``: ``--mlp-depth`` (default 10) hidden ``Linear(--mlp-width, default 256)`` + ``nn.ReLU`` layers, no
normalisation, initialised at the edge of chaos of each run's activation
(:func:`~lightning_stthree.methods.activations.edge_of_chaos_init_`; He's initialisation for the dense ReLU
network), SGD (lr 0.01, momentum 0.9, cosine schedule) for ``--mlp-epochs`` (default 3) epochs. ``resnet8``:
``ImageClassifier(model="resnet8")`` (BatchNorm, its 7 ``nn.ReLU`` modules replaced), the recipe of
``benchmarks/accuracy.py`` (SGD lr 0.1, momentum 0.9, weight decay 5e-4, cosine) for ``--resnet-epochs`` (default 1).
Both: batch 128 on the 60,000 training images, gradient norm clipped to 1.0.

Measured on the 10,000 test images (evaluation mode: the running shifts): top-1 accuracy; the activation sparsity,
the fraction of exact zeros in the inputs of every Linear/Conv layer after the first (all the hidden activations the
layers receive); effective MACs per image, ``sparsity_report(..., input_density=...)`` with each layer's measured
fraction of non-zero inputs (weight density x input density x dense MACs), relative to the dense network's.

Writes ``activation_fashion.json`` (every run), ``.md`` (the table) and ``.png`` (accuracy against activation
sparsity) into ``--out`` (default ``benchmarks/results``). Data is read from local IDX files (Debian's
``dataset-fashion-mnist``, or ``--data-dir``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import Subset

from lightning_stthree import ActivationSparsityCallback, ST3PruningCallback, find_prunable_layers, sparsity_report
from lightning_stthree.methods.activations import edge_of_chaos_init_
from lightning_stthree.recipes.data import FashionMNISTDataModule
from lightning_stthree.recipes.models import ImageClassifier

MODELS = ("mlp", "resnet8")


class DeepMLP(pl.LightningModule):
    """Flatten, ``depth`` hidden ``Linear(width)`` + ``nn.ReLU`` layers, a Linear classifier; SGD with a cosine
    schedule. ``self.model`` is the network, as in ``ImageClassifier``."""

    def __init__(self, width: int, depth: int, lr: float = 0.01) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for index in range(depth):
            layers += [nn.Linear(784 if index == 0 else width, width), nn.ReLU()]
        self.model = nn.Sequential(*layers, nn.Linear(width, 10))
        self.lr = lr
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def evaluate(network: nn.Module, loader: Any) -> tuple[float, float, dict[str, float]]:
    """Test accuracy, the fraction of exact zeros in the inputs of the Linear/Conv layers after the first, and each
    layer's fraction of non-zero input elements."""
    layers = find_prunable_layers(network)
    counts = {name: [0, 0] for name in layers}  # non-zeros, elements

    def counter(name: str) -> Any:
        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            counts[name][0] += int(torch.count_nonzero(inputs[0]))
            counts[name][1] += inputs[0].numel()

        return count

    hooks = [module.register_forward_pre_hook(counter(name)) for name, module in layers.items()]
    network.eval()
    correct = total = 0
    try:
        for x, y in loader:
            correct += int((network(x).argmax(1) == y).sum())
            total += len(y)
    finally:
        for hook in hooks:
            hook.remove()
    hidden = list(counts.values())[1:]
    zeros = 1.0 - sum(c[0] for c in hidden) / sum(c[1] for c in hidden)
    return correct / total, zeros, {name: c[0] / c[1] for name, c in counts.items()}


def run(model_name: str, activation: str | None, sparsity: float, clip: float | None, st3: bool, args: Any) -> dict:
    """Train one configuration (``activation=None``: ReLU) and measure it on the test images."""
    pl.seed_everything(0, verbose=False)
    data = FashionMNISTDataModule(data_dir=args.data_dir, batch_size=128, val_size=0, seed=0)
    data.setup("fit")
    data.setup("test")
    if args.quick:
        data.train_dataset = Subset(data.train_dataset, range(1024))
        data.test_dataset = Subset(data.test_dataset, range(1024))
    if model_name == "mlp":
        module: pl.LightningModule = DeepMLP(args.mlp_width, args.mlp_depth)
        edge_of_chaos_init_(module.model, activation or "crelu", sparsity if activation else 0.5, clip)
        epochs = args.mlp_epochs
    else:
        module = ImageClassifier(model="resnet8", in_channels=1, image_size=28, lr=0.1, weight_decay=5e-4)
        epochs = args.resnet_epochs
    callbacks: list[pl.Callback] = []
    if activation is not None:
        callbacks.append(ActivationSparsityCallback(sparsity, activation, clip=clip, log_layer_sparsity=False))
    if st3:
        callbacks.append(ST3PruningCallback(target_sparsity=args.weight_sparsity))
    trainer = pl.Trainer(
        max_epochs=1 if args.quick else epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy, zeros, input_density = evaluate(module.model, data.test_dataloader())
    total = sparsity_report(module.model, torch.zeros(1, 1, 28, 28), input_density=input_density)[-1]
    layer = next(iter(callbacks[0].layers.values())) if activation is not None else None
    row = {
        "model": model_name,
        "activation": activation or "relu",
        "target": sparsity if activation else None,
        "clip": None if layer is None else layer.clip,
        "weight_target": args.weight_sparsity if st3 else None,
        "test_acc": accuracy,
        "activation_sparsity": zeros,
        "weight_sparsity": 1.0 - total["density"],
        "macs_dense": total["macs_dense"],
        "macs_effective": total["macs_sparse"],
        "train_seconds": seconds,
    }
    print(json.dumps(row), flush=True)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    """The table: one line per run, MACs relative to the same model's dense run."""
    lines = [
        "| model | activation | clip (x rms) | target act. sparsity | weights | test acc. | act. sparsity (test) "
        "| effective MACs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dense = {r["model"]: r["macs_dense"] for r in rows if r["activation"] == "relu" and r["weight_target"] is None}
    for r in rows:
        clip = "-" if r["clip"] is None else ("inf" if math.isinf(r["clip"]) else f"{r['clip']:.3g}")
        target = "-" if r["target"] is None else f"{100 * r['target']:.0f}%"
        weights = "dense" if r["weight_target"] is None else f"ST-3 {100 * r['weight_sparsity']:.1f}%"
        macs = 100 * r["macs_effective"] / dense.get(r["model"], r["macs_dense"])
        lines.append(
            f"| {r['model']} | {r['activation']} | {clip} | {target} | {weights} | {100 * r['test_acc']:.2f} "
            f"| {100 * r['activation_sparsity']:.1f}% | {macs:.1f}% |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Test accuracy against measured activation sparsity, one panel per model (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for axis, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        for weights in (None, "st3"):
            for r in mine:
                if r["activation"] == "relu" and (r["weight_target"] is None) == (weights is None):
                    style = "k--" if weights is None else "k:"
                    label = "dense" if weights is None else "ST-3 weights, ReLU"
                    axis.axhline(100 * r["test_acc"], color="k", linestyle=style[1:], label=label, linewidth=1)
        for activation in ("crelu", "cst"):
            for unclipped, st3, marker in ((False, False, "o-"), (True, False, "x--"), (False, True, "s:")):
                series = [
                    r
                    for r in mine
                    if r["activation"] == activation
                    and (r["weight_target"] is not None) == st3
                    and math.isinf(r["clip"]) == unclipped
                ]
                if not series:
                    continue
                series.sort(key=lambda r: r["target"])
                label = activation.upper() + (" unclipped" if unclipped else "") + (" + ST-3 weights" if st3 else "")
                x = [100 * r["activation_sparsity"] for r in series]
                axis.plot(x, [100 * r["test_acc"] for r in series], marker, label=label)
        axis.set_title(f"Fashion-MNIST, {model}")
        axis.set_xlabel("activation sparsity on the test images (%)")
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.85])
    parser.add_argument("--activations", nargs="+", choices=["crelu", "cst"], default=["crelu", "cst"])
    parser.add_argument("--weight-sparsity", type=float, default=0.9)
    parser.add_argument("--mlp-width", type=int, default=256)
    parser.add_argument("--mlp-depth", type=int, default=10)
    parser.add_argument("--mlp-epochs", type=int, default=3)
    parser.add_argument("--resnet-epochs", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 epoch on 1024 training images, 1024 test images")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    rows = []
    for model in args.models:
        rows.append(run(model, None, 0.0, None, False, args))
        for sparsity in args.sparsities:
            for activation in args.activations:
                rows += [run(model, activation, sparsity, clip, False, args) for clip in (None, math.inf)]
        rows.append(run(model, None, 0.0, None, True, args))
        for sparsity in args.sparsities:
            rows += [run(model, activation, sparsity, None, True, args) for activation in args.activations]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "activation_fashion" + ("_quick" if args.quick else "")
    info = {key: value for key, value in vars(args).items() if key not in ("out", "data_dir")}
    info.update(torch=torch.__version__, machine=platform.machine(), threads=torch.get_num_threads())
    (out / f"{name}.json").write_text(json.dumps({"settings": info, "rows": rows}, indent=2))
    table = markdown(rows)
    (out / f"{name}.md").write_text(f"{table}\n\n{info}\n")
    plot(rows, out / f"{name}.png")
    print(table)
    return rows


if __name__ == "__main__":
    main()
