"""The pieces every data module shares: :class:`ImageDataModule`, the in-memory dataset and the seeded splits.

:class:`ImageDataModule` is the base class of all the data modules of :mod:`lightning_stthree.recipes.data`: train,
validation, test and predict loaders from the datasets its subclasses load. The small datasets (digits, MNIST,
CIFAR) live in memory as ``uint8`` tensors in an :class:`InMemoryImageDataset`, whose batches are gathered with one
indexing operation and transformed as a whole; :func:`split_indices` makes the seeded train/validation/test splits.
The helpers here that start with an underscore are shared by the dataset modules of this package only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_stthree.core.checks import check_int, check_number
from lightning_stthree.recipes.data.transforms import BatchImageTransform

_TORCHVISION_HINT = "torchvision is required for this data module: `pip install torchvision`"


class InMemoryImageDataset(Dataset):
    """Integer images and labels held in memory, transformed a whole batch at a time.

    ``DataLoader`` fetches a batch through :meth:`__getitems__` (one gather, one batched transform);
    ``dataset[i]`` gives the same transformed sample on its own.

    Args:
        images: A ``(N, C, H, W)`` integer tensor (``uint8`` pixels).
        labels: A ``(N,)`` tensor of class indices.
        transform: Applied to every gathered batch of images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: BatchImageTransform) -> None:
        if images.ndim != 4 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index].unsqueeze(0))[0], self.labels[index]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The samples at ``indices``, as the list of ``(image, label)`` pairs a ``collate_fn`` expects."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        images = self.transform(self.images[index])
        return list(zip(images.unbind(0), self.labels[index].unbind(0), strict=True))


def check_split_fractions(val_fraction: float, test_fraction: float, closed: str = "()") -> None:
    """Check the validation and test fractions of a split: each in the interval from 0 to 1 (``closed`` says which
    ends are allowed, as for :func:`~lightning_stthree.core.checks.check_number`), and less than 1 together.

    Raises:
        TypeError: If a fraction is not a number.
        ValueError: If it is out of range, or the two leave nothing for training.
    """
    check_number("val_fraction", val_fraction, 0.0, 1.0, closed)
    check_number("test_fraction", test_fraction, 0.0, 1.0, closed)
    if val_fraction + test_fraction >= 1:
        raise ValueError(
            "`val_fraction + test_fraction` must be < 1 to leave training samples, "
            f"got {val_fraction} + {test_fraction}"
        )


def split_indices(num_samples: int, sizes: Sequence[int], seed: int) -> list[torch.Tensor]:
    """Split ``range(num_samples)`` into consecutive chunks of a seeded random permutation.

    Args:
        num_samples: The number of samples to split.
        sizes: The size of every chunk but the last; the last chunk gets the rest.
        seed: Seed of the permutation: the same seed always gives the same split.

    Returns:
        ``len(sizes) + 1`` sorted index tensors that together cover every sample once.
    """
    permutation = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    chunks = torch.split(permutation, [*sizes, num_samples - sum(sizes)])
    return [chunk.sort().values for chunk in chunks]


class ImageDataModule(LightningDataModule):
    """Base class: train / val / test loaders, with ``predict_dataloader`` on the test set.

    Subclasses set ``num_classes``, ``in_channels`` and ``image_size`` in ``__init__``, call
    ``self.save_hyperparameters()`` there (so the saved arguments are exactly their own), and implement
    :meth:`_load_train_and_val` and :meth:`_load_test`; ``setup`` calls them only for the stages that need them.
    The train loader shuffles with a generator seeded by ``seed``; the other loaders keep the dataset's order.

    Args:
        batch_size: Samples per batch, for every loader.
        num_workers: ``DataLoader`` worker processes (0 loads in the main process). Workers are persistent.
        seed: Seeds the train/val split and the train loader's shuffling.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``batch_size < 1``, ``num_workers < 0`` or ``seed < 0``.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self, batch_size: int, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        check_int("seed", seed, minimum=0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _load_train_and_val(self) -> tuple[Dataset, Dataset | None]:
        """The train and validation datasets; a ``None`` validation set means "validate on the test set"."""
        raise NotImplementedError

    def _load_test(self) -> Dataset:
        """The test dataset."""
        raise NotImplementedError

    @override
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_dataset is None:
            self.train_dataset, self.val_dataset = self._load_train_and_val()
        needs_test = stage in ("test", "predict") or (self.train_dataset is not None and self.val_dataset is None)
        if needs_test and self.test_dataset is None:
            self.test_dataset = self._load_test()

    def _loader(self, dataset: Dataset | None, split: str, shuffle: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(
                f"{type(self).__name__} has no {split} dataset yet: call `setup()` with the right stage first "
                "(the Trainer does this for you)"
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        if self.train_dataset is not None and self.val_dataset is None:
            return self._loader(self.test_dataset, "test")
        return self._loader(self.val_dataset, "validation")

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test")


def _in_memory_splits(
    images: torch.Tensor,
    labels: torch.Tensor,
    val_size: int,
    seed: int,
    train_transform: BatchImageTransform,
    eval_transform: BatchImageTransform,
) -> tuple[InMemoryImageDataset, InMemoryImageDataset | None]:
    """Hold out ``val_size`` seeded random training samples (none when 0) as a validation set without augmentation."""
    if val_size >= images.shape[0]:
        raise ValueError(f"`val_size` must be smaller than the {images.shape[0]} training samples, got {val_size}")
    if val_size == 0:
        return InMemoryImageDataset(images, labels, train_transform), None
    val_index, train_index = split_indices(images.shape[0], [val_size], seed)
    return (
        InMemoryImageDataset(images[train_index], labels[train_index], train_transform),
        InMemoryImageDataset(images[val_index], labels[val_index], eval_transform),
    )


def _import_torchvision() -> Any:
    """The ``torchvision`` module, or an ``ImportError`` that says how to install it."""
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(_TORCHVISION_HINT) from err
    return torchvision
