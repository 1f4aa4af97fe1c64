"""LightningDataModules for the image classification benchmarks of ST-3 (arXiv:2212.01076), read from local files.

**Local files only, never downloads.** Every data module reads a dataset that is already on disk and raises a
:class:`FileNotFoundError` that lists where it looked, and how to provide the data, when it is missing.
``prepare_data`` is not overridden: nothing is fetched at run time (clusters and CI machines often have no
internet access, and a silent multi-gigabyte download in the middle of a job is never what anyone wanted).

- :class:`DigitsDataModule` (``digits``): scikit-learn's bundled 8x8 digits (shipped inside the wheel), for smoke runs.
- :class:`FashionMNISTDataModule` / :class:`MNISTDataModule` (``mnist``): the four standard IDX files (``.gz`` or
  not), parsed by ``idx``.
- :class:`CIFAR10DataModule` / :class:`CIFAR100DataModule` (``cifar``): torchvision's ``cifar-10-batches-py`` layout.
- :class:`ImageNetDataModule` (``imagenet``): an ``ImageFolder`` tree ``<data_dir>/train/<class>/*`` and
  ``<data_dir>/val/<class>/*``.
- :class:`ByteTextDataModule` (``text``): byte-level language modelling on the Python standard library's sources (on
  every machine) or any folder of text files, split by file.

The shared base class :class:`ImageDataModule` and the in-memory dataset are in ``base``, the batched augmentations in
``transforms``. Every module exposes ``num_classes``, ``in_channels`` and ``image_size`` right after ``__init__``, so
a command line can link them to the model's arguments before ``setup`` runs::

    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
"""

from __future__ import annotations

from lightning_stthree.recipes.data.base import _TORCHVISION_HINT as _TORCHVISION_HINT
from lightning_stthree.recipes.data.base import ImageDataModule, InMemoryImageDataset, split_indices
from lightning_stthree.recipes.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
)
from lightning_stthree.recipes.data.digits import _SKLEARN_HINT as _SKLEARN_HINT
from lightning_stthree.recipes.data.digits import DigitsDataModule
from lightning_stthree.recipes.data.idx import _IDX_UNSIGNED_BYTE as _IDX_UNSIGNED_BYTE
from lightning_stthree.recipes.data.idx import IDX_FILES, parse_idx, read_idx
from lightning_stthree.recipes.data.imagenet import _IMAGENET_RESIZE_RATIO as _IMAGENET_RESIZE_RATIO
from lightning_stthree.recipes.data.imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetDataModule
from lightning_stthree.recipes.data.mnist import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    FashionMNISTDataModule,
    MNISTDataModule,
)
from lightning_stthree.recipes.data.text import BYTE_VOCAB_SIZE, END_OF_FILE, ByteTextDataModule
from lightning_stthree.recipes.data.transforms import BatchImageTransform, random_crop, random_horizontal_flip

# The underscore constants imported above are no API: they stay attributes of this package because the single module
# it replaced defined them.
__all__ = [
    "BYTE_VOCAB_SIZE",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DEBIAN_FASHION_MNIST_DIR",
    "END_OF_FILE",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IDX_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "BatchImageTransform",
    "ByteTextDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "ImageDataModule",
    "ImageNetDataModule",
    "InMemoryImageDataset",
    "MNISTDataModule",
    "parse_idx",
    "random_crop",
    "random_horizontal_flip",
    "read_idx",
    "split_indices",
]
