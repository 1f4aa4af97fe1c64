"""Sparse activations on the scikit-learn digits: a ReLU MLP dense, and with ``ActivationSparsityCallback``.

    python benchmarks/activation_sparsity.py                         # dense, CReLU and CST at 80% and 85%, ~30 s
    python benchmarks/activation_sparsity.py --clips prescribed inf 0.71 0.45 --sparsities 0.8 0.9
    python benchmarks/activation_sparsity.py --optimizer adam          # the same with Adam

An MLP 64-256-256-256-10 with ``nn.ReLU`` modules, SGD (lr 0.05, momentum 0.9; ``--optimizer adam``: Adam, lr 1e-3),
batch 64, ``--epochs`` epochs on the digits' training split (``DigitsDataModule``: 70% train, 15% test), seed 0.
``--clips`` trains each sparse configuration once per clip (in units of the pre-activations' root mean square;
``prescribed`` is the callback's default, ``inf`` no clip). Reports the test accuracy and the fraction of exact
zeros in the inputs of the Linear layers after the first (the hidden activations those layers receive) on the test
images. Writes ``activation_sparsity.json`` and ``.md`` into ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_stthree import ActivationSparsityCallback
from lightning_stthree.recipes.data import DigitsDataModule


class MLP(pl.LightningModule):
    """Flatten, three hidden Linear + ReLU layers, a Linear classifier."""

    def __init__(self, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(), nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    optimizer = "sgd"

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-3)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


@torch.no_grad()
def evaluate(model: MLP, data: DigitsDataModule) -> tuple[float, float]:
    """Test accuracy, and the fraction of exact zeros in the inputs of the Linear layers after the first."""
    zeros, elements = [0], [0]

    def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        zeros[0] += int((inputs[0] == 0).sum())
        elements[0] += inputs[0].numel()

    linears = [m for m in model.net if isinstance(m, nn.Linear)][1:]
    hooks = [layer.register_forward_pre_hook(count) for layer in linears]
    model.eval()
    correct = total = 0
    for x, y in data.test_dataloader():
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    for hook in hooks:
        hook.remove()
    return correct / total, zeros[0] / elements[0]


def run(
    activation: str | None, sparsity: float, epochs: int, clip: float | None = None, optimizer: str = "sgd"
) -> dict[str, Any]:
    """Train the MLP dense (``activation=None``) or with the callback (``clip=None``: the prescribed one)."""
    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=64)
    model = MLP()
    model.optimizer = optimizer
    callbacks = [] if activation is None else [ActivationSparsityCallback(sparsity, activation, clip=clip)]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    data.setup("test")
    accuracy, zeros = evaluate(model, data)
    row = {"activation": activation or "relu (dense)", "target": sparsity if activation else None}
    used = callbacks[0].layers["net.2"].clip if callbacks else None
    row.update({"clip": used, "test_acc": accuracy, "hidden_input_zeros": zeros, "train_seconds": seconds})
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.85])
    parser.add_argument("--clips", nargs="+", default=["prescribed"], help="floats, 'prescribed' or 'inf'")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--activations", nargs="+", default=["crelu", "cst"], choices=["crelu", "cst"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    clips = [None if c == "prescribed" else float(c) for c in args.clips]
    rows = [run(None, 0.0, args.epochs, optimizer=args.optimizer)]
    for sparsity in args.sparsities:
        for activation in args.activations:
            rows += [run(activation, sparsity, args.epochs, clip, args.optimizer) for clip in clips]
    lines = [
        "| activation | target | clip (x rms) | test acc. | zeros in the hidden Linear layers' inputs |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        target = "-" if r["target"] is None else f"{100 * r['target']:.0f}%"
        clip = "-" if r["clip"] is None else f"{r['clip']:.3g}"
        accuracy, zeros = 100 * r["test_acc"], 100 * r["hidden_input_zeros"]
        lines.append(f"| {r['activation']} | {target} | {clip} | {accuracy:.2f} | {zeros:.1f}% |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"epochs": args.epochs, "optimizer": args.optimizer, "torch": torch.__version__}
    name = "activation_sparsity" + ("" if args.optimizer == "sgd" else f"_{args.optimizer}")
    name += "" if args.clips == ["prescribed"] else "_clips"
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    (out / f"{name}.md").write_text("\n".join(lines) + f"\n\n{info}\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    main()
