"""Run by ``test_ddp.py`` as a script: 2-process CPU DDP training; each rank saves its masks and threshold.

Lightning's ``ddp`` strategy launches the second process by running this script again with its own environment.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import TinyNet, quiet_trainer, random_loader

from lightning_stthree import ST3PruningCallback


def main(out_dir: Path) -> None:
    pl.seed_everything(0)
    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=2, end=10)
    trainer = quiet_trainer(max_steps=12, devices=2, strategy="ddp", callbacks=[cb])
    # Different data on each rank (DistributedSampler), identical weights after each all-reduced step.
    trainer.fit(model, random_loader(24))
    with torch.no_grad():
        masks = {name: (layer.weight != 0) for name, layer in cb.layers.items()}
        raw = {name: layer.parametrizations.weight.original.clone() for name, layer in cb.layers.items()}
    torch.save(
        {
            "world_size": trainer.world_size,
            "threshold": cb.threshold,
            "sparsity": cb.measure_sparsity()[0],
            "masks": masks,
            "raw": raw,
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
