"""Run by ``tests/callbacks/test_sharded.py`` as a script: the same ST-3 training in one process, under 2-process DDP
and under 2-process FSDP2 (``ModelParallelStrategy`` with ``fully_shard`` in ``configure_model``), on CPU with gloo.

Every run sees the same 16 samples per optimizer step: one process takes batches of 16, two processes take 8 each
(``DistributedSampler`` without shuffling deals samples 0, 2, 4, ... to rank 0 and 1, 3, 5, ... to rank 1), and the
gradients are averaged across ranks, so the runs differ only by float rounding. Each rank saves its thresholds per
step, its measured sparsity and MACs, and the model's full raw and effective weights (gathered from the shards).

Usage: ``python sharded_run.py {single,ddp,fsdp} OUT_DIR [--budget flops] [--resume CKPT] [--checkpoints]
[--method str] [--full-checkpoint]
[--make-permanent]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from helpers import random_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_stthree import ST3PruningCallback, STRPruningCallback
from lightning_stthree.core.distributed import is_dtensor
from lightning_stthree.core.layers import pruned_tensor
from lightning_stthree.methods.parametrization import raw_weight

SAMPLES_PER_STEP, STEPS_PER_EPOCH, EPOCHS = 16, 4, 4
# Ramp from step 2 to 7, fine-tune phase (frozen mask) from step 9; checkpoints at the end of each epoch.
SCHEDULE = {"target_sparsity": 0.8, "start": 2, "end": 7, "freeze_at": 9}


class ConvMLP(pl.LightningModule):
    """Conv + three Linear layers, built (and, under FSDP2, sharded layer by layer) in ``configure_model``; the
    37-row layer is split unevenly across 2 ranks (19 + 18 rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Sequential | None = None
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def configure_model(self) -> None:
        if self.net is not None:
            return
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(8 * 8 * 8, 64),
            nn.ReLU(),
            nn.Linear(64, 37),
            nn.ReLU(),
            nn.Linear(37, 10),
        )
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.net is not None
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        """The same 16 samples per step whatever the number of ranks: each rank takes every other one."""
        world, rank = self.trainer.world_size, self.trainer.global_rank
        dataset = random_loader(STEPS_PER_EPOCH, batch_size=SAMPLES_PER_STEP).dataset
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=SAMPLES_PER_STEP // world, sampler=sampler)


class _HeldInValidation(pl.Callback):
    """Whether any layer held an effective weight for reuse after a validation batch (not under FSDP2)."""

    def __init__(self, callback: ST3PruningCallback) -> None:
        self.callback = callback
        self.held: list[bool] = []

    def on_validation_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        self.held.append(any(p._reused is not None for p in self.callback._parametrizations()))


def _full(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    return tensor.full_tensor() if is_dtensor(tensor) else tensor.clone()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("strategy", choices=["single", "ddp", "fsdp"])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--budget", default="params")
    parser.add_argument("--resume", type=Path, default=None)
    parser.add_argument("--checkpoints", action="store_true")
    parser.add_argument("--method", choices=["st3", "str"], default="st3")
    parser.add_argument("--make-permanent", action="store_true")
    parser.add_argument("--shrinkage", default="soft")
    parser.add_argument("--full-checkpoint", action="store_true", help="FSDP2 saves one full checkpoint file")
    args = parser.parse_args()

    devices = 1 if args.strategy == "single" else 2
    strategy: Any = {
        "single": "auto",
        "ddp": "ddp",
        "fsdp": ModelParallelStrategy(
            data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=not args.full_checkpoint
        ),
    }[args.strategy]
    if args.method == "str":
        callbacks: list[pl.Callback] = [STRPruningCallback(s_init=-3.0)]
    else:
        callback = ST3PruningCallback(
            **SCHEDULE,
            budget=args.budget,
            report=True,
            make_permanent_at_end=args.make_permanent,
            shrinkage=args.shrinkage,
        )
        callbacks = [callback]
    if args.checkpoints:
        callbacks.append(ModelCheckpoint(dirpath=args.out_dir / "checkpoints", filename="{step}", save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=EPOCHS,
        callbacks=callbacks,
        logger=False,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=args.checkpoints,
        deterministic=True,
        use_distributed_sampler=False,
    )
    model = ConvMLP()
    trainer.fit(model, ckpt_path=args.resume)
    layers = callback.layers
    with torch.no_grad():
        result = {
            "world_size": trainer.world_size,
            "thresholds": {int(h["step"]): h["threshold"] for h in callback.history},
            "measured": {int(h["step"]): h["sparsity"] for h in callback.history},
            "macs_ratio": callback.history[-1].get("macs_ratio"),
            "threshold": callback.threshold,
            "sparsity": callback.measure_sparsity(),
            "frozen": callback.frozen,
            "raw": {name: _full(raw_weight(layer)) for name, layer in layers.items()},
            "effective": {name: _full(pruned_tensor(layer)) for name, layer in layers.items()},
            "sharded": {name: is_dtensor(raw_weight(layer)) for name, layer in layers.items()},
        }
    if args.method == "st3" and not args.make_permanent:
        # After the run: a validation loop, to see whether the effective weights were held for reuse.
        held = _HeldInValidation(callback)
        trainer.callbacks.append(held)
        trainer.validate(model, dataloaders=model.train_dataloader(), verbose=False)
        result["held_in_validation"] = held.held
    torch.save(result, args.out_dir / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main()
    # Exiting with a live gloo process group can abort at interpreter shutdown (pytorch#190489).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
