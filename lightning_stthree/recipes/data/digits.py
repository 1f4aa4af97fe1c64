"""scikit-learn's bundled 8x8 handwritten digits as :class:`DigitsDataModule`, for smoke runs that need no files.

The 1797 digits ship inside the scikit-learn wheel, so this data module works on any machine with scikit-learn
installed; it is split by a seeded permutation into train, validation and test sets and held in memory.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_stthree.recipes.data.base import (
    ImageDataModule,
    InMemoryImageDataset,
    check_split_fractions,
    split_indices,
)
from lightning_stthree.recipes.data.transforms import BatchImageTransform

_SKLEARN_HINT = "scikit-learn is required for DigitsDataModule: `pip install scikit-learn`"


class DigitsDataModule(ImageDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled with scikit-learn: no download.

    Images are ``(1, 8, 8)`` ``float32``: pixels (0 to 16) divided by 16, then normalised with the mean and
    standard deviation of the training split (stored as ``mean`` / ``std`` after ``setup``). The samples are split
    by a seeded random permutation into train / val / test (70 / 15 / 15 % by default). Meant for quick
    end-to-end runs; there is no augmentation.

    Args:
        batch_size: Samples per batch.
        val_fraction: Fraction of the 1797 samples in the validation split, in ``(0, 1)``.
        test_fraction: Fraction in the test split, in ``(0, 1)``; ``val_fraction + test_fraction < 1``.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the split and the train loader's shuffling.

    Raises:
        TypeError: If an argument has the wrong type (a fraction that is not a number, a ``batch_size`` that is not
            an int, ...).
        ValueError: If a fraction is out of range, or an int argument is too small.

    Example::

        >>> data = DigitsDataModule(batch_size=32)
        >>> data.setup("fit")
        >>> next(iter(data.train_dataloader()))[0].shape
        torch.Size([32, 1, 8, 8])
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        check_split_fractions(val_fraction, test_fraction)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.num_classes, self.in_channels, self.image_size = 10, 1, 8
        self.save_hyperparameters()
        self.mean: float | None = None
        self.std: float | None = None
        self._splits: tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset] | None = None

    def _load_splits(self) -> tuple[InMemoryImageDataset, InMemoryImageDataset, InMemoryImageDataset]:
        if self._splits is not None:
            return self._splits
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError(_SKLEARN_HINT) from err
        digits = load_digits()
        images = torch.as_tensor(digits.images, dtype=torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
        labels = torch.as_tensor(digits.target, dtype=torch.int64)
        num_samples = images.shape[0]
        sizes = [round(self.val_fraction * num_samples), round(self.test_fraction * num_samples)]
        val_index, test_index, train_index = split_indices(num_samples, sizes, self.seed)
        train_pixels = images[train_index].to(torch.float64) / 16
        self.mean, self.std = train_pixels.mean().item(), train_pixels.std().item()
        transform = BatchImageTransform(16, (self.mean,), (self.std,))
        self._splits = (
            InMemoryImageDataset(images[train_index], labels[train_index], transform),
            InMemoryImageDataset(images[val_index], labels[val_index], transform),
            InMemoryImageDataset(images[test_index], labels[test_index], transform),
        )
        return self._splits

    @override
    def _load_train_and_val(self) -> tuple[Dataset, Dataset | None]:
        train, val, _ = self._load_splits()
        return train, val

    @override
    def _load_test(self) -> Dataset:
        return self._load_splits()[2]
