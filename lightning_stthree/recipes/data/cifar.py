"""CIFAR-10 and CIFAR-100 from torchvision's local layout: :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.

torchvision reads (and checks the md5 sums of) the official Python pickles in ``<data_dir>/cifar-10-batches-py`` or
``<data_dir>/cifar-100-python``, with ``download=False``; the images then live in memory as ``uint8`` tensors and get
the standard CIFAR augmentation (random crop with zero padding 4, horizontal flip) in batches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_stthree.core.checks import check_bool, check_int
from lightning_stthree.recipes.data.base import (
    ImageDataModule,
    InMemoryImageDataset,
    _import_torchvision,
    _in_memory_splits,
)
from lightning_stthree.recipes.data.transforms import BatchImageTransform

# Per-channel mean and std of the training images (pixels scaled to [0, 1]).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


class _CIFARDataModule(ImageDataModule):
    """Shared code of CIFAR-10 and CIFAR-100: torchvision reads the pickles, the images then live in memory."""

    _dataset_name: str
    _torchvision_class: str
    _folder: str
    _archive: str
    _mean: tuple[float, ...]
    _std: tuple[float, ...]

    def __init__(
        self,
        data_dir: str,
        batch_size: int,
        val_size: int,
        augment: bool,
        num_workers: int,
        seed: int,
        num_classes: int,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not isinstance(data_dir, (str, Path)):
            raise TypeError(f"`data_dir` must be a path, got {data_dir!r}")
        check_int("val_size", val_size, minimum=0)
        check_bool("augment", augment)
        self.data_dir = data_dir
        self.val_size = val_size
        self.augment = augment
        self.num_classes, self.in_channels, self.image_size = num_classes, 3, 32

    def _read_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torchvision = _import_torchvision()
        root = Path(self.data_dir).expanduser()
        folder = root / self._folder
        how_to = (
            f"To provide it, extract the official {self._archive} (https://www.cs.toronto.edu/~kriz/cifar.html) into "
            f"`data_dir` so that {folder} holds its files (torchvision's layout; torchvision verifies their md5 sums). "
            "This data module never downloads."
        )
        if not folder.is_dir():
            raise FileNotFoundError(
                f"{self._dataset_name} not found: looked for {folder}, which does not exist. {how_to}"
            )
        dataset_class = getattr(torchvision.datasets, self._torchvision_class)
        try:
            dataset = dataset_class(root=str(root), train=train, download=False)
        except RuntimeError as err:  # torchvision's "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"{self._dataset_name} in {folder} is incomplete or corrupted (torchvision: {err}). {how_to}"
            ) from err
        images = torch.as_tensor(dataset.data, dtype=torch.uint8).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(dataset.targets, dtype=torch.int64)

    def _transform(self, train: bool) -> BatchImageTransform:
        augment = train and self.augment
        return BatchImageTransform(
            255, self._mean, self._std, crop_padding=4 if augment else 0, horizontal_flip=augment
        )

    @override
    def _load_train_and_val(self) -> tuple[Dataset, Dataset | None]:
        images, labels = self._read_split(train=True)
        return _in_memory_splits(
            images, labels, self.val_size, self.seed, self._transform(train=True), self._transform(train=False)
        )

    @override
    def _load_test(self) -> Dataset:
        return InMemoryImageDataset(*self._read_split(train=False), self._transform(train=False))


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50000 train + 10000 test 32x32 colour images, 10 classes) from ``<data_dir>/cifar-10-batches-py``.

    Read with ``torchvision.datasets.CIFAR10(root=data_dir, download=False)`` (which checks the files' md5 sums),
    then held in memory. Images are ``(3, 32, 32)`` ``float32`` normalised per channel. Training images get the
    standard augmentation (random crop with zero padding 4, horizontal flip) when ``augment=True``. ``val_size``
    training samples (seeded random choice, never augmented) form the validation set; ``val_size=0`` trains on
    all 50000 and validates on the test set, the usual protocol for reporting CIFAR accuracy.

    Args:
        data_dir: The folder that contains ``cifar-10-batches-py``.
        batch_size: Samples per batch.
        val_size: Training samples held out for validation; 0 validates on the test set.
        augment: Random crop and flip of the training images.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the split and the train loader's shuffling.

    Raises:
        FileNotFoundError: In ``setup``, if the folder is missing or torchvision rejects its files.
    """

    _dataset_name = "CIFAR-10"
    _torchvision_class = "CIFAR10"
    _folder = "cifar-10-batches-py"
    _archive = "cifar-10-python.tar.gz"
    _mean, _std = CIFAR10_MEAN, CIFAR10_STD

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        val_size: int = 5000,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, augment, num_workers, seed, num_classes=10)
        self.save_hyperparameters()


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50000 train + 10000 test 32x32 colour images, 100 classes) from ``<data_dir>/cifar-100-python``.

    Works like :class:`CIFAR10DataModule`, with ``torchvision.datasets.CIFAR100`` and CIFAR-100's fine labels.

    Args:
        data_dir: The folder that contains ``cifar-100-python``.
        batch_size: Samples per batch.
        val_size: Training samples held out for validation; 0 validates on the test set.
        augment: Random crop and flip of the training images.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the split and the train loader's shuffling.

    Raises:
        FileNotFoundError: In ``setup``, if the folder is missing or torchvision rejects its files.
    """

    _dataset_name = "CIFAR-100"
    _torchvision_class = "CIFAR100"
    _folder = "cifar-100-python"
    _archive = "cifar-100-python.tar.gz"
    _mean, _std = CIFAR100_MEAN, CIFAR100_STD

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 128,
        val_size: int = 5000,
        augment: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, augment, num_workers, seed, num_classes=100)
        self.save_hyperparameters()
