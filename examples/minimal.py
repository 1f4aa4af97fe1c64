"""Minimal ST-3 run: a small MLP on a synthetic 10-class problem, pruned to 90% sparsity while it trains.

Run with ``python examples/minimal.py`` (about 20 s on 2 CPU cores). It prints the test accuracy and the measured
sparsity of the effective weights; the sparsity curve is logged under ``lightning_logs/`` by the CSV logger.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree import ST3PruningCallback


class MLP(pl.LightningModule):
    def __init__(self, in_features: int = 32, hidden: int = 256, num_classes: int = 10, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )
        self.example_input_array = torch.zeros(1, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=5e-4)


def make_data(n: int, seed: int, in_features: int = 32, num_classes: int = 10) -> TensorDataset:
    """Gaussian clusters: one random centre per class, unit noise."""
    centres = torch.randn(num_classes, in_features, generator=torch.Generator().manual_seed(1234)) * 0.35
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, num_classes, (n,), generator=generator)
    x = centres[y] + torch.randn(n, in_features, generator=generator)
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--target-sparsity", type=float, default=0.9)
    parser.add_argument("--criterion", choices=["l1", "l1_std"], default="l1")
    parser.add_argument("--log-dir", default="lightning_logs")
    args = parser.parse_args()

    pl.seed_everything(0)
    train = DataLoader(make_data(8192, seed=0), batch_size=128, shuffle=True)
    test = DataLoader(make_data(2048, seed=1), batch_size=512)
    pruning = ST3PruningCallback(target_sparsity=args.target_sparsity, start=0.1, end=0.6, criterion=args.criterion)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[pruning],
        logger=CSVLogger(args.log_dir, name="minimal"),
        enable_checkpointing=False,
    )
    model = MLP()
    trainer.fit(model, train)
    (result,) = trainer.test(model, test, verbose=False)
    sparsity, per_layer = pruning.measure_sparsity()
    print(f"test accuracy {result['test_acc']:.4f}, sparsity {sparsity:.4f} (target {args.target_sparsity})")
    for name, value in per_layer.items():
        print(f"  {name:<8} sparsity {value:.4f}")


if __name__ == "__main__":
    main()
