"""LightningDataModules for the image classification benchmarks of ST-3 (arXiv:2212.01076), read from local files.

**Local files only, never downloads.** Every data module reads a dataset that is already on disk and raises a
:class:`FileNotFoundError` that lists where it looked, and how to provide the data, when it is missing.
``prepare_data`` is not overridden: nothing is fetched at run time (clusters and CI machines often have no
internet access, and a silent multi-gigabyte download in the middle of a job is never what anyone wanted).

- :class:`DigitsDataModule`: scikit-learn's bundled 8x8 digits (shipped inside the wheel), for smoke runs.
- :class:`FashionMNISTDataModule` / :class:`MNISTDataModule`: the four standard IDX files (``.gz`` or not).
- :class:`CIFAR10DataModule` / :class:`CIFAR100DataModule`: torchvision's ``cifar-10-batches-py`` layout.
- :class:`ImageNetDataModule`: an ``ImageFolder`` tree ``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*``.

The small datasets (digits, MNIST, CIFAR) live in memory as ``uint8`` tensors; a batch is gathered with one
indexing operation and converted, augmented and normalised as a whole, which keeps an epoch fast on a few CPU
cores. Random augmentation draws from the global torch generator (seeded per worker by the ``DataLoader``, and
by :func:`lightning.pytorch.seed_everything` in the main process).

Every module exposes ``num_classes``, ``in_channels`` and ``image_size`` right after ``__init__``, so a command
line can link them to the model's arguments before ``setup`` runs::

    parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
"""

from __future__ import annotations

import gzip
import math
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_stthree.core.checks import check_bool

# Where Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``) puts the files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Mean and std of the training images (pixels scaled to [0, 1]); the values used throughout the literature.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# The four files of the MNIST family, by role; each may also exist with a ``.gz`` suffix.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type code of unsigned bytes, the only element type the MNIST family uses.
_IDX_UNSIGNED_BYTE = 0x08
# The usual ImageNet evaluation transform resizes to 256 before a 224 centre crop; other sizes keep the ratio.
_IMAGENET_RESIZE_RATIO = 256 / 224

_TORCHVISION_HINT = "torchvision is required for this data module: `pip install torchvision`"
_SKLEARN_HINT = "scikit-learn is required for DigitsDataModule: `pip install scikit-learn`"


def _check_int(name: str, value: Any, minimum: int) -> None:
    """Raise if ``value`` is not an ``int`` (``bool`` excluded) that is ``>= minimum``."""
    message = f"`{name}` must be an int >= {minimum}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(message)
    if value < minimum:
        raise ValueError(message)


def parse_idx(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Parse the bytes of an IDX file of unsigned bytes (the MNIST format) into a ``uint8`` tensor.

    The format is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian ``uint32`` sizes, then the
    data in row-major order. Only type ``0x08`` (unsigned byte) is supported: it is the one all MNIST-like
    datasets use.

    Args:
        data: The whole (decompressed) file content.
        source: A name for the data in error messages, usually the file path.

    Returns:
        A ``uint8`` tensor of the shape given in the header (a copy, independent of ``data``).

    Raises:
        ValueError: If the header is not an IDX header of unsigned bytes or the size does not match it.

    Example::

        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
        [7, 8, 9]
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source} is not an IDX file: its first two bytes must be zero, got {data[:2]!r}")
    if data[2] != _IDX_UNSIGNED_BYTE:
        raise ValueError(
            f"{source} holds IDX type {data[2]:#04x}; only unsigned bytes ({_IDX_UNSIGNED_BYTE:#04x}) are supported"
        )
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_size:
        raise ValueError(f"{source} has a truncated IDX header ({ndim} dimensions, {len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) - header_size != math.prod(shape):
        raise ValueError(
            f"{source} should hold {math.prod(shape)} bytes of data for shape {tuple(shape)}, "
            f"got {len(data) - header_size} (truncated or corrupted file?)"
        )
    return torch.frombuffer(bytearray(data[header_size:]), dtype=torch.uint8).view(*shape)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes, gzip-compressed when its name ends with ``.gz``.

    Args:
        path: The file.

    Returns:
        The ``uint8`` tensor it holds, see :func:`parse_idx`.
    """
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return parse_idx(data, source=str(path))


def random_crop(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Zero-pad a batch by ``padding`` pixels on every side and crop each image back at a random offset.

    The batched equivalent of ``torchvision.transforms.RandomCrop(size, padding=padding)``: each image gets its own
    offset, drawn from the global torch generator.

    Args:
        images: A ``(N, C, H, W)`` batch.
        padding: Pixels of zero padding on each side; 0 returns ``images`` unchanged.

    Returns:
        A ``(N, C, H, W)`` batch.
    """
    if padding == 0:
        return images
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    left = torch.randint(0, 2 * padding + 1, (n, 1, 1))
    rows = top + torch.arange(height).view(1, height, 1)
    cols = left + torch.arange(width).view(1, 1, width)
    # Advanced indices separated by a slice put the broadcast (N, H, W) dimensions first: (N, H, W, C).
    return padded[torch.arange(n).view(n, 1, 1), :, rows, cols].permute(0, 3, 1, 2).contiguous()


def random_horizontal_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of a ``(N, C, H, W)`` batch left-right with probability 1/2 (global torch generator)."""
    flip = torch.rand(images.shape[0]) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class BatchImageTransform:
    """Turn a batch of integer images into normalised ``float32``, optionally with crop and flip augmentation.

    Args:
        scale: The pixel value that maps to 1.0 (255 for 8-bit images, 16 for scikit-learn's digits).
        mean: Per-channel mean of the scaled pixels.
        std: Per-channel standard deviation of the scaled pixels.
        crop_padding: Padding of the random crop (see :func:`random_crop`); 0 disables it.
        horizontal_flip: Mirror each image with probability 1/2.
    """

    def __init__(
        self,
        scale: float,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        horizontal_flip: bool = False,
    ) -> None:
        self.scale = float(scale)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Transform a ``(N, C, H, W)`` integer batch into a normalised ``float32`` batch of the same shape."""
        x = images.to(torch.float32) / self.scale
        x = random_crop(x, self.crop_padding)
        if self.horizontal_flip:
            x = random_horizontal_flip(x)
        return (x - self.mean) / self.std


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
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("seed", seed, 0)
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
        ValueError: If a fraction is out of range.

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
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"`{name}` must be a float in (0, 1), got {value!r}")
        if val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction + test_fraction` must be < 1 to leave training samples, "
                f"got {val_fraction} + {test_fraction}"
            )
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


def _find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The IDX files in ``directory`` by role (uncompressed preferred over ``.gz``), and the names it lacks."""
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, name in IDX_FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    return found, missing


class _IDXDataModule(ImageDataModule):
    """Shared code of the MNIST family: locate the four IDX files, read them into memory, split and normalise."""

    _dataset_name: str
    _torchvision_folder: str
    _mean: tuple[float, ...]
    _std: tuple[float, ...]
    _install_hint: str = ""

    def __init__(
        self,
        data_dir: str | None,
        batch_size: int,
        val_size: int,
        augment: bool,
        num_workers: int,
        seed: int,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if data_dir is not None and not isinstance(data_dir, (str, Path)):
            raise TypeError(f"`data_dir` must be a path or None, got {data_dir!r}")
        _check_int("val_size", val_size, 0)
        check_bool("augment", augment)
        self.data_dir = data_dir
        self.val_size = val_size
        self.augment = augment
        self.num_classes, self.in_channels, self.image_size = 10, 1, 28

    def _fallback_dirs(self) -> list[Path]:
        """System-wide locations tried after ``data_dir``."""
        return []

    def _candidate_dirs(self) -> list[Path]:
        candidates = []
        if self.data_dir is not None:
            root = Path(self.data_dir).expanduser()
            candidates += [root, root / self._torchvision_folder / "raw"]
        return candidates + self._fallback_dirs()

    def find_files(self) -> dict[str, Path]:
        """The four IDX files, from the first directory that holds all of them.

        Looks in ``data_dir``, then ``<data_dir>/<FashionMNIST|MNIST>/raw`` (torchvision's layout), then (for
        Fashion-MNIST only) :data:`DEBIAN_FASHION_MNIST_DIR`.

        Returns:
            The file of each role (``train_images``, ``train_labels``, ``test_images``, ``test_labels``).

        Raises:
            FileNotFoundError: If no directory holds all four files; the message lists every directory tried.
        """
        looked_in = []
        for directory in self._candidate_dirs():
            found, missing = _find_idx_files(directory)
            if not missing:
                self._report_location(directory)
                return found
            status = "does not exist" if not directory.is_dir() else f"missing {', '.join(missing)}"
            looked_in.append(f"  - {directory} ({status})")
        if not looked_in:
            looked_in.append("  - nowhere: `data_dir` is None")
        files = ", ".join(IDX_FILES.values())
        raise FileNotFoundError(
            f"{self._dataset_name} not found; this data module never downloads. Looked in:\n"
            + "\n".join(looked_in)
            + f"\nTo provide it, {self._install_hint}put the four IDX files ({files}, each optionally .gz) "
            f"in a folder and pass it as `data_dir` (torchvision's layout <data_dir>/{self._torchvision_folder}/raw "
            "works too)."
        )

    def _report_location(self, directory: Path) -> None:
        if self.data_dir is not None and directory in self._fallback_dirs():
            rank_zero_warn(
                f"{self._dataset_name} is not in `data_dir={self.data_dir!r}`; reading it from {directory} instead"
            )
        else:
            rank_zero_info(f"Reading {self._dataset_name} from {directory}")

    def _read_split(self, images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = read_idx(images_path), read_idx(labels_path)
        size = self.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise ValueError(f"{images_path} should hold (N, {size}, {size}) images, got {tuple(images.shape)}")
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"{labels_path} holds {tuple(labels.shape)} labels for {images.shape[0]} images in {images_path}"
            )
        if labels.numel() and int(labels.max()) >= self.num_classes:
            raise ValueError(f"{labels_path} has label {int(labels.max())}, expected 0 to {self.num_classes - 1}")
        return images.unsqueeze(1), labels.to(torch.int64)

    def _eval_transform(self) -> BatchImageTransform:
        return BatchImageTransform(255, self._mean, self._std)

    def _train_transform(self) -> BatchImageTransform:
        return self._eval_transform()

    @override
    def _load_train_and_val(self) -> tuple[Dataset, Dataset | None]:
        files = self.find_files()
        images, labels = self._read_split(files["train_images"], files["train_labels"])
        return _in_memory_splits(
            images, labels, self.val_size, self.seed, self._train_transform(), self._eval_transform()
        )

    @override
    def _load_test(self) -> Dataset:
        files = self.find_files()
        images, labels = self._read_split(files["test_images"], files["test_labels"])
        return InMemoryImageDataset(images, labels, self._eval_transform())


class FashionMNISTDataModule(_IDXDataModule):
    """Fashion-MNIST (60000 train + 10000 test 28x28 grey images, 10 classes) from local IDX files.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``) in, in order: ``data_dir``; ``<data_dir>/FashionMNIST/raw``
    (torchvision's layout); Debian's :data:`DEBIAN_FASHION_MNIST_DIR` (``apt-get install dataset-fashion-mnist``),
    which is also used when ``data_dir`` is given but holds no data (with a warning).

    Images are ``(1, 28, 28)`` ``float32`` normalised with mean 0.2860 and std 0.3530. ``val_size`` training
    samples, chosen by a permutation seeded with ``seed``, form the validation set (never augmented); with
    ``val_size=0`` the model trains on all 60000 and validates on the test set.

    Args:
        data_dir: Folder with the IDX files, or ``None`` for the Debian location only.
        batch_size: Samples per batch.
        val_size: Training samples held out for validation; 0 validates on the test set.
        augment: Random crop (zero padding 2) and horizontal flip of the training images. Off by default:
            Fashion-MNIST is usually trained without augmentation.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the split and the train loader's shuffling.

    Raises:
        FileNotFoundError: In ``setup``, if no location holds the four files.

    Example::

        >>> data = FashionMNISTDataModule(batch_size=256)
        >>> (data.num_classes, data.in_channels, data.image_size)
        (10, 1, 28)
    """

    _dataset_name = "Fashion-MNIST"
    _torchvision_folder = "FashionMNIST"
    _mean, _std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    _install_hint = "install Debian's package (`apt-get install dataset-fashion-mnist`) or "

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        augment: bool = False,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, augment, num_workers, seed)
        self.save_hyperparameters()

    @override
    def _fallback_dirs(self) -> list[Path]:
        return [DEBIAN_FASHION_MNIST_DIR]  # read at call time, so it can be changed (e.g. in tests)

    @override
    def _train_transform(self) -> BatchImageTransform:
        if not self.augment:
            return self._eval_transform()
        return BatchImageTransform(255, self._mean, self._std, crop_padding=2, horizontal_flip=True)


class MNISTDataModule(_IDXDataModule):
    """MNIST (60000 train + 10000 test 28x28 handwritten digits) from local IDX files.

    Looks in ``data_dir``, then ``<data_dir>/MNIST/raw`` (torchvision's layout) for the four standard IDX files
    (plain or ``.gz``). Images are ``(1, 28, 28)`` ``float32`` normalised with mean 0.1307 and std 0.3081. There
    is no augmentation (flipping digits changes their meaning). The validation split works as in
    :class:`FashionMNISTDataModule`.

    Args:
        data_dir: Folder with the IDX files.
        batch_size: Samples per batch.
        val_size: Training samples held out for validation; 0 validates on the test set.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the split and the train loader's shuffling.

    Raises:
        FileNotFoundError: In ``setup``, if neither location holds the four files.
    """

    _dataset_name = "MNIST"
    _torchvision_folder = "MNIST"
    _mean, _std = MNIST_MEAN, MNIST_STD

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 128,
        val_size: int = 5000,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(data_dir, batch_size, val_size, False, num_workers, seed)
        self.save_hyperparameters()


def _import_torchvision() -> Any:
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(_TORCHVISION_HINT) from err
    return torchvision


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
        _check_int("val_size", val_size, 0)
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


class ImageNetDataModule(ImageDataModule):
    """ImageNet (ILSVRC-2012) or any tree of class folders, read with ``torchvision.datasets.ImageFolder``.

    Expects ``<data_dir>/train/<class>/<image>`` and ``<data_dir>/val/<class>/<image>``; the validation folder
    doubles as the test set (ImageNet's test labels are not public). The official validation archive is flat: sort
    it into class folders first (e.g. with the ``valprep.sh`` script of PyTorch's ImageNet example).

    Training images get ``RandomResizedCrop(image_size)`` and a horizontal flip; evaluation images are resized to
    ``round(image_size * 256 / 224)`` and centre-cropped to ``image_size``. Both are normalised with the ImageNet
    mean and std. Decoding JPEGs is CPU-bound: give it ``num_workers``.

    Args:
        data_dir: The folder holding ``train`` and ``val``.
        image_size: Side of the square crops fed to the model.
        num_classes: Expected number of class folders; checked in ``setup``.
        batch_size: Samples per batch.
        num_workers: ``DataLoader`` worker processes.
        seed: Seeds the train loader's shuffling.

    Raises:
        FileNotFoundError: In ``setup``, if a folder is missing.
        ValueError: In ``setup``, if the number of class folders is not ``num_classes`` or ``train`` and ``val``
            have different classes.
    """

    def __init__(
        self,
        data_dir: str,
        image_size: int = 224,
        num_classes: int = 1000,
        batch_size: int = 256,
        num_workers: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed)
        if not isinstance(data_dir, (str, Path)):
            raise TypeError(f"`data_dir` must be a path, got {data_dir!r}")
        _check_int("image_size", image_size, 1)
        _check_int("num_classes", num_classes, 1)
        self.data_dir = data_dir
        self.num_classes, self.in_channels, self.image_size = num_classes, 3, image_size
        self.save_hyperparameters()

    def _image_folder(self, split: str, transform: Callable[[Any], torch.Tensor]) -> Dataset:
        torchvision = _import_torchvision()
        root = Path(self.data_dir).expanduser()
        folder = root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageNet folder {folder} does not exist; this data module never downloads. Expected the tree\n"
                f"  {root}/\n"
                "    train/<class>/<image>   e.g. train/n01440764/n01440764_10026.JPEG\n"
                "    val/<class>/<image>     e.g. val/n01440764/ILSVRC2012_val_00000293.JPEG\n"
                "with the same class folders in both (sort the flat official val archive into class folders first)."
            )
        dataset = torchvision.datasets.ImageFolder(str(folder), transform=transform)
        if len(dataset.classes) != self.num_classes:
            raise ValueError(
                f"`num_classes={self.num_classes}` does not match the {len(dataset.classes)} class folders in "
                f"{folder}; pass `num_classes={len(dataset.classes)}` or fix the folder"
            )
        return dataset

    def _check_same_classes(self, train: Any, val: Any) -> None:
        if train.classes != val.classes:
            only_train = sorted(set(train.classes) - set(val.classes))[:5]
            only_val = sorted(set(val.classes) - set(train.classes))[:5]
            raise ValueError(
                f"The class folders of {train.root} and {val.root} differ (only in train: {only_train}, only in "
                f"val: {only_val}); labels are folder indices, so both must hold the same classes"
            )

    def _train_transform(self) -> Callable[[Any], torch.Tensor]:
        transforms = _import_torchvision().transforms
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(self.image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    def _eval_transform(self) -> Callable[[Any], torch.Tensor]:
        transforms = _import_torchvision().transforms
        return transforms.Compose(
            [
                transforms.Resize(round(self.image_size * _IMAGENET_RESIZE_RATIO)),
                transforms.CenterCrop(self.image_size),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    @override
    def _load_train_and_val(self) -> tuple[Dataset, Dataset | None]:
        train = self._image_folder("train", self._train_transform())
        val = self._image_folder("val", self._eval_transform())
        self._check_same_classes(train, val)
        return train, val

    @override
    def _load_test(self) -> Dataset:
        return self._image_folder("val", self._eval_transform())
