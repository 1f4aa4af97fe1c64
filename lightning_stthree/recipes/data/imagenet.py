"""ImageNet (ILSVRC-2012), or any tree of class folders, as :class:`ImageNetDataModule`.

Images are decoded from ``<data_dir>/train/<class>/*`` and ``<data_dir>/val/<class>/*`` by
``torchvision.datasets.ImageFolder`` in the loader workers (not held in memory), with the usual ImageNet training
augmentation and evaluation resize and centre crop, normalised with :data:`IMAGENET_MEAN` and :data:`IMAGENET_STD`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from typing_extensions import override

from lightning_stthree.core.checks import check_int
from lightning_stthree.recipes.data.base import ImageDataModule, _import_torchvision

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# The usual ImageNet evaluation transform resizes to 256 before a 224 centre crop; other sizes keep the ratio.
_IMAGENET_RESIZE_RATIO = 256 / 224


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
        check_int("image_size", image_size, minimum=1)
        check_int("num_classes", num_classes, minimum=1)
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
