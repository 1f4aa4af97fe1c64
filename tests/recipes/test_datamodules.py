from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import make_tiny_idx_dataset, quiet_trainer, write_idx
from lightning.pytorch import LightningModule
from torch import nn

from lightning_stthree.recipes import data as data_module
from lightning_stthree.recipes.data import (
    DEBIAN_FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_FILES,
    MNIST_MEAN,
    MNIST_STD,
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    parse_idx,
    random_crop,
    random_horizontal_flip,
    read_idx,
)
from lightning_stthree.recipes.data import mnist as mnist_module

# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def collect(loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def to_pixels(images: torch.Tensor, mean: float, std: float, scale: float = 255) -> np.ndarray:
    """Undo the normalisation: back to integer pixels."""
    return torch.round((images * std + mean) * scale).to(torch.int64).numpy()


def as_multiset(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return sorted((image.astype(np.uint8).tobytes(), int(label)) for image, label in zip(images, labels, strict=True))


@pytest.fixture
def no_debian_fashion_mnist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Point the Debian fallback at a folder that does not exist, so the machine's own files cannot interfere."""
    missing = tmp_path / "no-debian-package"
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST_DIR", missing)
    return missing


# ---------------------------------------------------------------------------------------------------------------------
# Arguments and attributes


@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "message"),
    [
        (DigitsDataModule, {"batch_size": 0}, ValueError, r"`batch_size` must be an int >= 1, got 0"),
        (DigitsDataModule, {"batch_size": 8.0}, TypeError, r"`batch_size` must be an int >= 1, got 8.0"),
        (DigitsDataModule, {"batch_size": True}, TypeError, r"`batch_size` must be an int >= 1, got True"),
        (DigitsDataModule, {"num_workers": -1}, ValueError, r"`num_workers` must be an int >= 0, got -1"),
        (DigitsDataModule, {"seed": -2}, ValueError, r"`seed` must be an int >= 0, got -2"),
        (DigitsDataModule, {"val_fraction": 1.0}, ValueError, r"`val_fraction` must be in \(0, 1\), got 1.0"),
        (DigitsDataModule, {"test_fraction": "0.1"}, TypeError, r"`test_fraction` must be a number in \(0, 1\)"),
        (
            DigitsDataModule,
            {"val_fraction": 0.5, "test_fraction": 0.5},
            ValueError,
            r"`val_fraction \+ test_fraction` must be < 1",
        ),
        (FashionMNISTDataModule, {"val_size": -1}, ValueError, r"`val_size` must be an int >= 0, got -1"),
        (FashionMNISTDataModule, {"augment": "yes"}, TypeError, r"`augment` must be True or False, got 'yes'"),
        (FashionMNISTDataModule, {"data_dir": 3}, TypeError, r"`data_dir` must be a path or None, got 3"),
        (MNISTDataModule, {"batch_size": -5}, ValueError, r"`batch_size` must be an int >= 1, got -5"),
        (CIFAR10DataModule, {"data_dir": None}, TypeError, r"`data_dir` must be a path, got None"),
        (CIFAR100DataModule, {"data_dir": "x", "augment": 1}, TypeError, r"`augment` must be True or False, got 1"),
        (ImageNetDataModule, {"data_dir": "x", "image_size": 0}, ValueError, r"`image_size` must be an int >= 1"),
        (ImageNetDataModule, {"data_dir": "x", "num_classes": 0}, ValueError, r"`num_classes` must be an int >= 1"),
    ],
)
def test_invalid_arguments(factory: type, kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        factory(**kwargs)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (DigitsDataModule(), (10, 1, 8)),
        (FashionMNISTDataModule("/nonexistent"), (10, 1, 28)),
        (MNISTDataModule("/nonexistent"), (10, 1, 28)),
        (CIFAR10DataModule("/nonexistent"), (10, 3, 32)),
        (CIFAR100DataModule("/nonexistent"), (100, 3, 32)),
        (ImageNetDataModule("/nonexistent"), (1000, 3, 224)),
        (ImageNetDataModule("/nonexistent", image_size=160, num_classes=100), (100, 3, 160)),
    ],
)
def test_shape_attributes_are_known_before_setup(data: ImageDataModule, expected: tuple[int, int, int]) -> None:
    # A command line links these to the model's arguments before any data is read.
    assert isinstance(data, ImageDataModule)
    assert (data.num_classes, data.in_channels, data.image_size) == expected


def test_hyperparameters_are_saved() -> None:
    data = FashionMNISTDataModule("/some/dir", batch_size=32, val_size=10, augment=True, seed=3)
    assert dict(data.hparams) == {
        "data_dir": "/some/dir",
        "batch_size": 32,
        "val_size": 10,
        "augment": True,
        "num_workers": 0,
        "seed": 3,
    }


@pytest.mark.parametrize(
    "data",
    [
        DigitsDataModule(batch_size=7, seed=2),
        FashionMNISTDataModule("/d", augment=True),
        MNISTDataModule("/d", val_size=0),
        CIFAR10DataModule("/d", augment=False),
        CIFAR100DataModule("/d", batch_size=9),
        ImageNetDataModule("/d", image_size=64, num_classes=10),
    ],
)
def test_saved_hyperparameters_rebuild_the_module(data: ImageDataModule) -> None:
    # What a checkpoint stores must be exactly the class's own arguments, or reloading it fails.
    rebuilt = type(data)(**data.hparams)
    assert dict(rebuilt.hparams) == dict(data.hparams)
    assert (rebuilt.num_classes, rebuilt.image_size) == (data.num_classes, data.image_size)


def test_loader_before_setup_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match=r"DigitsDataModule has no train dataset yet: call `setup\(\)`"):
        DigitsDataModule().train_dataloader()


# ---------------------------------------------------------------------------------------------------------------------
# Digits (scikit-learn, bundled)


def test_digits_splits_shapes_and_values() -> None:
    from sklearn.datasets import load_digits

    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (1257, 270, 270)

    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (64, 1, 8, 8)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64

    train_x, train_y = collect(data.train_dataloader())
    # Normalised with the training split's own statistics.
    assert train_x.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert train_x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert set(train_y.tolist()) == set(range(10))

    # The three splits together are exactly scikit-learn's samples, each once.
    splits = [train_x, *(collect(loader)[0] for loader in (data.val_dataloader(), data.test_dataloader()))]
    labels = [train_y, collect(data.val_dataloader())[1], collect(data.test_dataloader())[1]]
    pixels = np.concatenate([to_pixels(x, data.mean, data.std, scale=16) for x in splits]).reshape(-1, 8, 8)
    digits = load_digits()
    assert as_multiset(pixels, torch.cat(labels).numpy()) == as_multiset(digits.images, digits.target)
    assert all(int(y.min()) >= 0 and int(y.max()) <= 9 for y in labels)


def test_digits_split_is_deterministic_per_seed() -> None:
    def test_images(seed: int) -> torch.Tensor:
        data = DigitsDataModule(seed=seed)
        data.setup("test")
        return collect(data.test_dataloader())[0]

    assert torch.equal(test_images(0), test_images(0))
    assert not torch.equal(test_images(0), test_images(1))


def test_loaders_shuffle_only_for_training() -> None:
    first, second = DigitsDataModule(batch_size=16, seed=5), DigitsDataModule(batch_size=16, seed=5)
    for data in (first, second):
        data.setup("fit")
        data.setup("predict")
    # Same seed, same training order; successive epochs of one loader differ.
    loader = first.train_dataloader()
    epoch_one, epoch_two = collect(loader)[1], collect(loader)[1]
    assert torch.equal(epoch_one, collect(second.train_dataloader())[1])
    assert not torch.equal(epoch_one, epoch_two)
    assert not torch.equal(epoch_one, first.train_dataset.labels)
    # Evaluation loaders keep the dataset order; predict is the test set.
    assert torch.equal(collect(first.val_dataloader())[1], first.val_dataset.labels)
    image, label = first.val_dataset[-1]  # single samples go through the same transform
    assert torch.equal(image, collect(first.val_dataloader())[0][-1])
    assert label == first.val_dataset.labels[-1]
    assert torch.equal(collect(first.predict_dataloader())[0], collect(first.test_dataloader())[0])


def test_worker_processes_give_the_same_evaluation_batches() -> None:
    data = DigitsDataModule(batch_size=100, num_workers=1)
    data.setup("test")
    reference = DigitsDataModule(batch_size=100)
    reference.setup("test")
    assert torch.equal(collect(data.test_dataloader())[0], collect(reference.test_dataloader())[0])


class DigitsNet(LightningModule):
    def __init__(self, num_classes: int, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.Flatten(), nn.LazyLinear(num_classes))
        self.net(torch.zeros(1, in_channels, image_size, image_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_runs_fit_test_and_predict_on_digits() -> None:
    data = DigitsDataModule(batch_size=32)
    model = DigitsNet(data.num_classes, data.in_channels, data.image_size)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 3
    assert "val_loss" in trainer.callback_metrics
    assert "test_loss" in trainer.test(model, datamodule=data, verbose=False)[0]
    predictions = quiet_trainer(limit_predict_batches=2).predict(model, datamodule=data)
    assert [p.shape for p in predictions] == [(32, 10), (32, 10)]


# ---------------------------------------------------------------------------------------------------------------------
# IDX files and the MNIST family


def test_parse_idx_matches_torchvision(tmp_path: Path) -> None:
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    arrays = make_tiny_idx_dataset(tmp_path, gz=False)
    for role, name in IDX_FILES.items():
        ours = read_idx(tmp_path / name)
        assert ours.dtype == torch.uint8
        assert torch.equal(ours, read_sn3_pascalvincent_tensor(str(tmp_path / name)))
        assert np.array_equal(ours.numpy(), arrays[role])
    write_idx(tmp_path / "copy.gz", arrays["test_images"])
    assert np.array_equal(read_idx(tmp_path / "copy.gz").numpy(), arrays["test_images"])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x08\x03", r"<bytes> is not an IDX file: its first two bytes must be zero"),
        (bytes([0, 0, 0x0D, 1, 0, 0, 0, 1]) + b"\0\0\0\0", r"IDX type 0x0d; only unsigned bytes \(0x08\)"),
        (bytes([0, 0, 8, 3, 0, 0]), r"truncated IDX header"),
        (bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3]), r"should hold 4 bytes of data for shape \(4,\), got 3"),
    ],
)
def test_parse_idx_rejects_bad_files(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_idx(data)


def check_tiny_dataset(data: ImageDataModule, arrays: dict[str, np.ndarray], mean: float, std: float) -> None:
    """The modules' splits hold exactly the written pixels and labels."""
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (15, 5, 10)

    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64

    # The test set keeps the file's order.
    test_x, test_y = collect(data.test_dataloader())
    assert np.array_equal(to_pixels(test_x, mean, std)[:, 0], arrays["test_images"])
    assert np.array_equal(test_y.numpy(), arrays["test_labels"])
    # Train and validation split the training file between them.
    parts = [collect(data.train_dataloader()), collect(data.val_dataloader())]
    pixels = np.concatenate([to_pixels(x, mean, std)[:, 0] for x, _ in parts])
    labels = np.concatenate([y.numpy() for _, y in parts])
    assert as_multiset(pixels, labels) == as_multiset(arrays["train_images"], arrays["train_labels"])


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("torchvision_layout", [False, True])
def test_fashion_mnist_reads_tiny_idx_files(
    tmp_path: Path, no_debian_fashion_mnist: Path, gz: bool, torchvision_layout: bool
) -> None:
    directory = tmp_path / "FashionMNIST" / "raw" if torchvision_layout else tmp_path
    arrays = make_tiny_idx_dataset(directory, gz=gz)
    data = FashionMNISTDataModule(str(tmp_path), batch_size=4, val_size=5)
    assert data.find_files()["train_images"].name == "train-images-idx3-ubyte" + (".gz" if gz else "")
    check_tiny_dataset(data, arrays, FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0])


def test_mnist_reads_torchvision_layout(tmp_path: Path) -> None:
    arrays = make_tiny_idx_dataset(tmp_path / "MNIST" / "raw", gz=True, seed=1)
    check_tiny_dataset(MNISTDataModule(tmp_path, batch_size=4, val_size=5), arrays, MNIST_MEAN[0], MNIST_STD[0])


def test_val_size_zero_validates_on_the_test_set(tmp_path: Path, no_debian_fashion_mnist: Path) -> None:
    make_tiny_idx_dataset(tmp_path)
    data = FashionMNISTDataModule(tmp_path, batch_size=4, val_size=0)
    data.setup("fit")
    assert len(data.train_dataset) == 20
    assert data.val_dataset is None
    assert torch.equal(collect(data.val_dataloader())[0], collect(data.test_dataloader())[0])


def test_val_size_larger_than_the_training_set(tmp_path: Path, no_debian_fashion_mnist: Path) -> None:
    make_tiny_idx_dataset(tmp_path)
    with pytest.raises(ValueError, match=r"`val_size` must be smaller than the 20 training samples, got 5000"):
        FashionMNISTDataModule(tmp_path).setup("fit")


def test_fashion_mnist_augmentation_changes_only_training_images(tmp_path: Path, no_debian_fashion_mnist: Path) -> None:
    make_tiny_idx_dataset(tmp_path)
    plain = FashionMNISTDataModule(tmp_path, batch_size=20, val_size=5)
    augmented = FashionMNISTDataModule(tmp_path, batch_size=20, val_size=5, augment=True)
    for data in (plain, augmented):
        data.setup("fit")
    assert torch.equal(collect(plain.val_dataloader())[0], collect(augmented.val_dataloader())[0])
    torch.manual_seed(0)
    x, _ = collect(augmented.train_dataloader())
    assert x.shape == (15, 1, 28, 28)
    assert not torch.equal(x, collect(plain.train_dataloader())[0])


def test_missing_fashion_mnist_lists_every_place_and_the_fix(tmp_path: Path, no_debian_fashion_mnist: Path) -> None:
    data = FashionMNISTDataModule(tmp_path / "data", batch_size=4)
    with pytest.raises(FileNotFoundError) as error:
        data.setup("fit")
    message = str(error.value)
    assert "Fashion-MNIST not found; this data module never downloads" in message
    for directory in (tmp_path / "data", tmp_path / "data" / "FashionMNIST" / "raw", no_debian_fashion_mnist):
        assert f"  - {directory} (does not exist)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "pass it as `data_dir`" in message
    assert "train-images-idx3-ubyte" in message


def test_missing_files_are_named(tmp_path: Path, no_debian_fashion_mnist: Path) -> None:
    make_tiny_idx_dataset(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing t10k-labels-idx1-ubyte\[.gz\]"):
        FashionMNISTDataModule(tmp_path).setup("test")


def test_missing_mnist_has_no_debian_fallback(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        MNISTDataModule().setup("fit")
    assert "nowhere: `data_dir` is None" in str(error.value)
    assert "apt-get" not in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"MNIST/raw \(does not exist\)"):
        MNISTDataModule(tmp_path).setup("test")


def test_fashion_mnist_falls_back_to_the_debian_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = make_tiny_idx_dataset(debian)
    monkeypatch.setattr(mnist_module, "DEBIAN_FASHION_MNIST_DIR", debian)
    data = FashionMNISTDataModule(batch_size=4, val_size=5)
    check_tiny_dataset(data, arrays, FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0])
    with pytest.warns(UserWarning, match=r"Fashion-MNIST is not in `data_dir=.*`; reading it from .*fashion-mnist"):
        FashionMNISTDataModule(tmp_path / "empty", val_size=5).setup("test")


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_the_debian_package() -> None:
    data = FashionMNISTDataModule(batch_size=256, augment=True)
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (55000, 5000, 10000)
    train_labels = torch.cat([data.train_dataset.labels, data.val_dataset.labels])
    assert torch.bincount(train_labels).tolist() == [6000] * 10
    assert torch.bincount(data.test_dataset.labels).tolist() == [1000] * 10
    # The normalisation constants are the statistics of the training images.
    pixels = torch.cat([data.train_dataset.images, data.val_dataset.images]).to(torch.float64) / 255
    assert pixels.mean().item() == pytest.approx(FASHION_MNIST_MEAN[0], abs=5e-4)
    assert pixels.std().item() == pytest.approx(FASHION_MNIST_STD[0], abs=5e-4)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (256, 1, 28, 28)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------------
# Batched augmentation


def test_random_crop_is_a_window_of_the_zero_padded_image() -> None:
    torch.manual_seed(0)
    images = torch.rand(64, 3, 6, 5)
    cropped = random_crop(images, padding=2)
    padded = nn.functional.pad(images, (2, 2, 2, 2))
    offsets = set()
    for original, crop in zip(padded, cropped, strict=True):
        matches = [
            (top, left)
            for top in range(5)
            for left in range(5)
            if torch.equal(original[:, top : top + 6, left : left + 5], crop)
        ]
        assert len(matches) == 1
        offsets.add(matches[0])
    assert len(offsets) > 10  # each image draws its own offset
    assert random_crop(images, padding=0) is images


def test_random_horizontal_flip_mirrors_about_half() -> None:
    torch.manual_seed(0)
    images = torch.rand(200, 1, 4, 4)
    flipped = random_horizontal_flip(images)
    mirrored = [torch.equal(out, image.flip(-1)) for image, out in zip(images, flipped, strict=True)]
    kept = [torch.equal(out, image) for image, out in zip(images, flipped, strict=True)]
    assert all(m != k for m, k in zip(mirrored, kept, strict=True))
    assert 70 < sum(mirrored) < 130


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR


def test_missing_cifar_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(tmp_path).setup("fit")
    message = str(error.value)
    assert f"looked for {tmp_path / 'cifar-10-batches-py'}, which does not exist" in message
    assert "cifar-10-python.tar.gz" in message
    assert "md5" in message
    assert "never downloads" in message
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python, which does not exist"):
        CIFAR100DataModule(tmp_path).setup("test")


def test_corrupted_cifar_is_reported(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 in .*cifar-10-batches-py is incomplete or corrupted"):
        CIFAR10DataModule(tmp_path).setup("fit")


class FakeCIFAR:
    """Stands in for torchvision's CIFAR10 (which needs the real, md5-checked files): records its arguments."""

    calls: list[dict[str, Any]] = []  # noqa: RUF012

    def __init__(self, root: str, train: bool, download: bool) -> None:
        FakeCIFAR.calls.append({"root": root, "train": train, "download": download})
        rng = np.random.default_rng(int(train))
        size = 30 if train else 12
        self.data = rng.integers(0, 256, (size, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(size)]


def test_cifar_wiring_with_a_stand_in_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR)
    FakeCIFAR.calls = []
    data = CIFAR10DataModule(tmp_path, batch_size=8, val_size=6)
    data.setup("fit")
    data.setup("test")
    assert FakeCIFAR.calls == [
        {"root": str(tmp_path), "train": True, "download": False},
        {"root": str(tmp_path), "train": False, "download": False},
    ]
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (24, 6, 12)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, 32, 32)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    # Channels-last pickles become channels-first tensors, normalised per channel.
    test_x, _ = collect(data.test_dataloader())
    mean, std = torch.tensor(data_module.CIFAR10_MEAN), torch.tensor(data_module.CIFAR10_STD)
    pixels = torch.round((test_x * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)) * 255).to(torch.uint8)
    assert np.array_equal(pixels.permute(0, 2, 3, 1).numpy(), FakeCIFAR(str(tmp_path), False, False).data)


# ---------------------------------------------------------------------------------------------------------------------
# ImageNet (ImageFolder)


def make_image_tree(root: Path, classes: dict[str, tuple[str, ...]]) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                pixels = rng.integers(0, 256, (30 + 4 * i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")


def test_imagenet_reads_an_image_folder_tree(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"train": ("cat", "dog"), "val": ("cat", "dog")})
    data = ImageNetDataModule(tmp_path, image_size=16, num_classes=2, batch_size=3, num_workers=0)
    data.setup("fit")
    data.setup("test")
    assert (len(data.train_dataset), len(data.val_dataset), len(data.test_dataset)) == (4, 4, 4)
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (3, 3, 16, 16)
    assert x.dtype == torch.float32
    assert y.dtype == torch.int64
    val_x, val_y = collect(data.val_dataloader())
    assert val_y.tolist() == [0, 0, 1, 1]
    assert torch.equal(val_x, collect(data.val_dataloader())[0])  # evaluation transform is deterministic
    assert torch.equal(val_x, collect(data.test_dataloader())[0])


def test_imagenet_num_classes_mismatch(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"train": ("cat", "dog"), "val": ("cat", "dog")})
    with pytest.raises(ValueError, match=r"`num_classes=1000` does not match the 2 class folders .*`num_classes=2`"):
        ImageNetDataModule(tmp_path, num_workers=0).setup("fit")


def test_imagenet_train_and_val_classes_must_agree(tmp_path: Path) -> None:
    make_image_tree(tmp_path, {"train": ("cat", "dog"), "val": ("cat", "eel")})
    with pytest.raises(ValueError, match=r"only in train: \['dog'\], only in val: \['eel'\]"):
        ImageNetDataModule(tmp_path, num_classes=2, num_workers=0).setup("fit")


def test_missing_imagenet_shows_the_expected_tree(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        ImageNetDataModule(tmp_path, num_workers=0).setup("fit")
    message = str(error.value)
    assert f"ImageNet folder {tmp_path / 'train'} does not exist; this data module never downloads" in message
    assert "train/<class>/<image>" in message
    assert "val/<class>/<image>" in message
