"""A tiny Lightning model and a quiet Trainer, in the style of Lightning's own pruning tests."""

from __future__ import annotations

import csv
import gzip
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree.recipes.data import IDX_FILES


class TinyNet(pl.LightningModule):
    """Conv2d + BatchNorm + Linear on 3x8x8 inputs, 10 classes."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.conv = nn.Conv2d(3, 16, 3)
        self.norm = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 6 * 6, 10)
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.norm(self.conv(x))).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=1e-4)


class ImageClassifier(pl.LightningModule):
    """Wraps any image classifier (e.g. a torchvision model) for a plain cross-entropy training step."""

    def __init__(self, model: nn.Module, lr: float = 0.01) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def random_loader(
    num_batches: int, batch_size: int = 8, shape: tuple[int, ...] = (3, 8, 8), num_classes: int = 10, seed: int = 0
) -> DataLoader:
    """A fixed (unshuffled) loader of random images and labels."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_batches * batch_size, *shape, generator=generator)
    y = torch.randint(0, num_classes, (num_batches * batch_size,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def quiet_trainer(tmp_path: Path | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar or summary; logs to CSV under ``tmp_path`` when given."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "logger": CSVLogger(tmp_path, name="csv", version=0) if tmp_path is not None else False,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def read_metrics(tmp_path: Path) -> dict[int, dict[str, float]]:
    """The CSVLogger's metrics, ``{step: {name: value}}``, empty cells dropped."""
    rows: dict[int, dict[str, float]] = {}
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            values = {k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"}
            rows.setdefault(int(row["step"]), {}).update(values)
    return rows


def cubic_reference(step: int, target: float, start: int, end: int, power: float = 3.0) -> float:
    """The schedule written out independently of the package, for comparison."""
    if end == start:
        return target if step >= end else 0.0
    p = min(max((step - start) / (end - start), 0.0), 1.0)
    return target * (1 - (1 - p) ** power)


class EvalNet(TinyNet):
    """TinyNet that also validates, tests and predicts (loss and accuracy logged as ``<stage>_loss/acc``)."""

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}_loss", nn.functional.cross_entropy(logits, y))
        self.log(f"{stage}_acc", (logits.argmax(1) == y).float().mean())

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, written out from the format description, gzip'd if ``.gz``."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def make_tiny_idx_dataset(
    directory: Path, num_train: int = 20, num_test: int = 10, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four IDX files of a tiny random 28x28 dataset into ``directory``; return what was written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(num_train, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(num_test, dtype=np.uint8) * 3) % 10,
    }
    directory.mkdir(parents=True, exist_ok=True)
    for role, name in IDX_FILES.items():
        write_idx(directory / (f"{name}.gz" if gz else name), arrays[role])
    return arrays


# The scripts the subprocess tests run (multi-process DDP and FSDP2 runs).
SCRIPTS = Path(__file__).parent / "scripts"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: Path, *args: str, expect_failure: bool = False, timeout: int = 600) -> str:
    """Run ``python script *args`` in the tests' directory with one thread per process (several processes share the
    cores); assert that it succeeds (or fails, with ``expect_failure``) and return the end of its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent)}
    result = subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parent,
    )
    output = result.stdout[-4000:] + result.stderr[-4000:]
    assert (result.returncode != 0) == expect_failure, output
    return output
