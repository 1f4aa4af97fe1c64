"""Run by ``tests/callbacks/test_ddp.py`` as a script: 2-process CPU DDP training.

With ``ddp``, Lightning launches the second process by running this script again, and each rank saves its masks and
threshold. With ``ddp_spawn``, the workers are spawned and the main process gets the trained weights back through a
non-strict ``load_state_dict``; the main process saves what it got. With ``ddp_activations``, an MLP with ``nn.ReLU``
modules trains under DDP with ``ActivationSparsityCallback`` and ``ST3PruningCallback`` together, and each rank saves
its state dict, logged sparsities and measured input densities.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import ImageClassifier, TinyNet, quiet_trainer, random_loader
from torch import nn

from lightning_stthree import ActivationSparsityCallback, ST3PruningCallback


def activations(out_dir: Path) -> None:
    pl.seed_everything(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    model = ImageClassifier(mlp, lr=0.05)
    model.example_input_array = torch.zeros(2, 3, 8, 8)  # for the MACs
    sparse = ActivationSparsityCallback(0.8, "cst")
    trainer = quiet_trainer(max_steps=6, devices=2, strategy="ddp", callbacks=[sparse, ST3PruningCallback(0.9)])
    trainer.fit(model, random_loader(12))
    torch.save(
        {
            "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "sparsity": float(trainer.callback_metrics["act/sparsity"]),
            "input_density": dict(sparse.input_density),
            "macs_sparse": float(trainer.callback_metrics["st3/macs_sparse"]),
        },
        out_dir / f"rank{trainer.global_rank}.pt",
    )


def main(strategy: str, out_dir: Path) -> None:
    if strategy == "ddp_activations":
        activations(out_dir)
        return
    pl.seed_everything(0)
    model = TinyNet()
    initial_fc = model.fc.weight.detach().clone()
    cb = ST3PruningCallback(0.9, start=2, end=10)
    trainer = quiet_trainer(max_steps=12, devices=2, strategy=strategy, callbacks=[cb])
    # Different data on each rank (DistributedSampler), identical weights after each all-reduced step.
    trainer.fit(model, random_loader(24))
    if strategy == "ddp_spawn":
        with torch.no_grad():
            fc = model.fc.weight.detach()
        torch.save(
            {"fc": fc, "initial_fc": initial_fc, "sparsity": float((fc == 0).float().mean())}, out_dir / "main.pt"
        )
        return
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
    main(sys.argv[1], Path(sys.argv[2]))
    # Exiting with a live gloo process group can abort at interpreter shutdown (pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
