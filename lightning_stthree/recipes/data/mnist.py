"""The MNIST family from local IDX files: :class:`FashionMNISTDataModule` and :class:`MNISTDataModule`.

Both look for the four standard IDX files (plain or ``.gz``) in ``data_dir`` and in torchvision's
``<data_dir>/<name>/raw`` layout; Fashion-MNIST also falls back to the folder of Debian's ``dataset-fashion-mnist``
package, :data:`DEBIAN_FASHION_MNIST_DIR` (read at call time, so tests patch it in this module). The files are
read with :mod:`~lightning_stthree.recipes.data.idx` and held in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_stthree.core.checks import check_bool, check_int
from lightning_stthree.recipes.data.base import ImageDataModule, InMemoryImageDataset, _in_memory_splits
from lightning_stthree.recipes.data.idx import IDX_FILES, _find_idx_files, read_idx
from lightning_stthree.recipes.data.transforms import BatchImageTransform

# Where Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``) puts the files.
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Mean and std of the training images (pixels scaled to [0, 1]); the values used throughout the literature.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


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
        check_int("val_size", val_size, minimum=0)
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
        return [DEBIAN_FASHION_MNIST_DIR]  # read at call time: patch it in this module (not the package) to change it

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
