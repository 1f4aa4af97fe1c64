"""The model zoo (SmallCNN, CIFAR ResNets, torchvision by name) and ImageClassifier's training loop and LR schedules."""

import itertools
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import quiet_trainer, random_loader, read_metrics
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree.recipes.models import (
    CIFAR_RESNETS,
    ImageClassifier,
    SmallCNN,
    build_model,
    cifar_resnet,
    lr_factor_fn,
)


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class LRRecorder(Callback):
    """The learning rate each optimizer step is taken with, keyed by ``trainer.global_step``."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def _record_lrs(tmp_path: Path | None = None, steps: int = 20, **kwargs: Any) -> list[float]:
    torch.manual_seed(0)
    module = ImageClassifier(**kwargs)
    recorder = LRRecorder()
    callbacks: list[Callback] = [recorder]
    if tmp_path is not None:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=callbacks)
    trainer.fit(module, random_loader(steps, batch_size=4, shape=(1, 8, 8)))
    assert sorted(recorder.lrs) == list(range(steps))
    return [recorder.lrs[step] for step in range(steps)]


# ---------------------------------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("depth", "expected"),
    # The well-known counts of He et al. 2016's CIFAR ResNets with option-A shortcuts ("0.27M", "0.46M", "0.85M").
    [(20, 269_722), (32, 464_154), (56, 853_018)],
)
def test_cifar_resnet_parameter_counts(depth: int, expected: int) -> None:
    model = cifar_resnet(depth)
    assert _num_parameters(model) == expected
    assert _num_parameters(build_model(f"resnet{depth}", num_classes=10, in_channels=3)) == expected
    # 6n + 2 weighted layers: the stem, 2 per block, the classifier; the shortcuts have no parameters.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == depth
    assert all(_num_parameters(block.shortcut) == 0 for block in model.modules() if hasattr(block, "shortcut"))


def test_cifar_resnet_option_a_shortcut_subsamples_and_zero_pads() -> None:
    model = cifar_resnet(20)
    block = model.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert not out[:, :8].any()
    assert not out[:, 24:].any()


def test_cifar_resnet_relus_are_modules_and_older_pickles_still_run() -> None:
    """The ReLUs are ``nn.ReLU`` modules (ActivationSparsityCallback replaces modules); a network pickled by 0.1/0.2.0,
    whose ``forward`` called ``F.relu`` and which has no such modules, gains them when it is unpickled."""
    import pickle

    torch.manual_seed(0)
    model = cifar_resnet(8, in_channels=1).eval()
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 7  # stem + 2 per block, 3 blocks
    x = torch.randn(2, 1, 16, 16)
    expected = model(x)
    old = pickle.loads(pickle.dumps(model))
    for module in old.modules():  # what an older version pickled: no ReLU modules
        for name in [n for n, child in module._modules.items() if isinstance(child, nn.ReLU)]:
            del module._modules[name]
    assert not any(isinstance(m, nn.ReLU) for m in old.modules())
    restored = pickle.loads(pickle.dumps(old))
    assert sum(isinstance(m, nn.ReLU) for m in restored.modules()) == 7
    assert torch.equal(restored(x), expected)


def test_cifar_resnet_stages_and_init() -> None:
    model = cifar_resnet(20, num_classes=7, in_channels=1)
    assert [model.layer1[0].conv1.out_channels, model.layer2[0].conv1.out_channels] == [16, 32]
    assert model.layer3[-1].conv2.out_channels == 64
    assert (model.conv1.in_channels, model.fc.in_features, model.fc.out_features) == (1, 64, 7)
    # Kaiming normal with fan_out for convolutions: std sqrt(2 / (out_channels * 9)).
    weight = model.layer3[0].conv2.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (64 * 9)), rel=0.05)
    assert not model.fc.bias.any()


@pytest.mark.parametrize(
    ("name", "in_channels", "size"),
    [
        ("small_cnn", 1, 8),  # scikit-learn digits
        ("small_cnn", 1, 28),  # MNIST / Fashion-MNIST
        ("small_cnn", 3, 32),  # CIFAR
        ("resnet20", 1, 8),
        ("resnet20", 1, 28),
        ("resnet20", 3, 32),
        ("resnet44", 3, 32),
        ("resnet110", 3, 32),
    ],
)
def test_output_shapes(name: str, in_channels: int, size: int) -> None:
    model = build_model(name, num_classes=5, in_channels=in_channels)
    assert model(torch.randn(3, in_channels, size, size)).shape == (3, 5)


def test_small_cnn_is_small_and_checks_arguments() -> None:
    model = SmallCNN()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 64]
    assert 20_000 < _num_parameters(model) < 100_000
    assert _num_parameters(SmallCNN(width=8)) < _num_parameters(model)
    with pytest.raises(ValueError, match=r"`width` must be an int >= 1, got 0"):
        SmallCNN(width=0)
    with pytest.raises(TypeError, match=r"`in_channels` must be an int >= 1, got 2.0"):
        SmallCNN(in_channels=2.0)


@pytest.mark.parametrize(("name", "num_classes"), [("resnet18", 10), ("mobilenet_v3_small", 7)])
def test_torchvision_model_by_name(name: str, num_classes: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=num_classes, in_channels=3)
    reference = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    assert type(model) is type(reference)
    assert _num_parameters(model) == _num_parameters(reference)
    model.eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_torchvision_auxiliary_heads_are_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # GoogLeNet and Inception-v3 return (logits, aux) tuples in training mode unless built with aux_logits=False.
    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kwargs: calls.append((name, kwargs)))
    build_model("inception_v3", num_classes=4, in_channels=3)
    build_model("resnet18", num_classes=4, in_channels=3)
    assert calls == [
        ("inception_v3", {"weights": None, "num_classes": 4, "aux_logits": False, "init_weights": True}),
        ("resnet18", {"weights": None, "num_classes": 4}),
    ]


def test_cifar_names_do_not_shadow_torchvision() -> None:
    assert not set(CIFAR_RESNETS) & set(torchvision.models.list_models(module=torchvision.models))
    assert isinstance(build_model("resnet50", num_classes=10, in_channels=3), torchvision.models.ResNet)


# ------------------------------------------------------------------------------------------------------ name errors


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match=r"`name` must be one of \['small_cnn', 'resnet8', 'resnet14', 'resnet20'.*got 'resnet21'"
    ) as info:
        build_model("resnet21", num_classes=10, in_channels=3)
    assert "'mobilenet_v3_small'" in str(info.value)
    assert "'resnet110'" in str(info.value)
    with pytest.raises(ValueError, match=r"`model` must be one of \['small_cnn'.*got 'lenet'"):
        ImageClassifier(model="lenet")


@pytest.mark.parametrize(
    ("depth", "error"),
    [
        (21, ValueError),
        (18, ValueError),
        (2, ValueError),
        (0, ValueError),
        (-4, ValueError),
        (20.0, TypeError),  # not an int: the wrong type
        (True, TypeError),
    ],
)
def test_bad_depth(depth: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"`depth` must be 6n \+ 2 for an int n >= 1 .*got " + repr(depth)):
        cifar_resnet(depth)


def test_torchvision_needs_three_channels() -> None:
    with pytest.raises(ValueError, match=r"'resnet18'.* 3-channel images, got `in_channels`=1\. HINT: use 'small_cnn'"):
        build_model("resnet18", num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match=r"`model`='mobilenet_v3_small' takes 3-channel images.*resnet20"):
        ImageClassifier(model="mobilenet_v3_small", in_channels=1)


# ------------------------------------------------------------------------------------------------- ImageClassifier


def test_hyperparameters_and_example_input() -> None:
    module = ImageClassifier("resnet20", in_channels=3, image_size=32)
    assert module.hparams == {
        "model": "resnet20",
        "num_classes": 10,
        "in_channels": 3,
        "image_size": 32,
        "lr": 0.1,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine",
        "lr_milestones": None,
        "lr_gamma": 0.1,
        "label_smoothing": 0.0,
        "warmup_fraction": 0.0,
        "decay_bias_and_norm": True,
        "shard": False,
    }
    assert module.example_input_array.shape == (1, 3, 32, 32)
    assert module(module.example_input_array).shape == (1, 10)
    assert _num_parameters(module) == 269_722  # the accuracy metrics add no parameters


def test_optimizer_settings() -> None:
    module = ImageClassifier(lr=0.3, momentum=0.8, nesterov=True, weight_decay=1e-4, lr_schedule="constant")
    trainer = quiet_trainer(max_steps=1)
    trainer.fit(module, random_loader(1, batch_size=4, shape=(1, 8, 8)))
    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["initial_lr"]) == (0.8, True, 1e-4, 0.3)
    config = trainer.lr_scheduler_configs[0]
    assert (config.interval, config.frequency) == ("step", 1)


def test_cosine_schedule(tmp_path: Path) -> None:
    lrs = _record_lrs(tmp_path, steps=20, lr=0.2, lr_schedule="cosine")
    assert lrs[0] == pytest.approx(0.2)
    for step in (5, 10, 15, 19):
        assert lrs[step] == pytest.approx(0.1 * (1 + math.cos(math.pi * step / 20)))
    assert lrs[-1] < 0.01 * 0.2  # annealed to (nearly) zero at the last optimizer step
    assert all(later < earlier for earlier, later in itertools.pairwise(lrs))
    # Lightning's own LearningRateMonitor sees the same values.
    logged = read_metrics(tmp_path)
    assert [logged[step]["lr-SGD"] for step in range(20)] == pytest.approx(lrs)


def test_step_schedule_drops_at_the_milestones() -> None:
    lrs = _record_lrs(steps=20, lr=0.5, lr_schedule="step", lr_milestones=[0.25, 0.6], lr_gamma=0.2)
    expected = [0.5] * 5 + [0.1] * 7 + [0.02] * 8  # drops at steps round(0.25 * 20) = 5 and round(0.6 * 20) = 12
    assert lrs == pytest.approx(expected)


def test_step_schedule_default_milestones() -> None:
    lrs = _record_lrs(steps=8, lr=0.1, lr_schedule="step")
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_constant_schedule() -> None:
    lrs = _record_lrs(steps=6, lr=0.05, lr_schedule="constant")
    assert lrs == pytest.approx([0.05] * 6)


def test_schedule_counts_optimizer_steps_not_batches() -> None:
    # 2 epochs of 8 batches with 2 batches per optimizer step: 8 optimizer steps in all.
    torch.manual_seed(0)
    module = ImageClassifier(lr=0.1, lr_schedule="cosine")
    recorder = LRRecorder()
    trainer = quiet_trainer(max_epochs=2, accumulate_grad_batches=2, callbacks=[recorder])
    trainer.fit(module, random_loader(8, batch_size=4, shape=(1, 8, 8)))
    assert trainer.global_step == 8
    assert [recorder.lrs[step] for step in range(8)] == pytest.approx(
        [0.05 * (1 + math.cos(math.pi * step / 8)) for step in range(8)]
    )


def test_endless_run_needs_a_length_for_cosine() -> None:
    trainer = quiet_trainer(max_epochs=-1, max_steps=-1)
    with pytest.raises(MisconfigurationException, match=r"`lr_schedule`='cosine' needs .* HINT: set `max_epochs`"):
        trainer.fit(ImageClassifier(), random_loader(2, batch_size=4, shape=(1, 8, 8)))


def test_train_loss_and_accuracy_are_logged_every_step(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(lr=0.05)
    quiet_trainer(tmp_path, max_steps=4).fit(module, random_loader(4, batch_size=8, shape=(1, 8, 8)))
    metrics = read_metrics(tmp_path)
    for step in range(4):
        assert metrics[step]["train_loss"] > 0
        assert 0 <= metrics[step]["train_acc"] <= 1
        assert metrics[step]["train_acc"] * 8 == pytest.approx(round(metrics[step]["train_acc"] * 8))


def _smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing written out: (1 - eps) * NLL of the target + eps * mean NLL over all classes."""
    log_probs = logits.log_softmax(dim=1)
    nll = -log_probs.gather(1, target[:, None]).squeeze(1)
    uniform = -log_probs.mean(dim=1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.4])
def test_validation_and_test_metrics_with_label_smoothing(smoothing: float) -> None:
    torch.manual_seed(0)
    module = ImageClassifier(label_smoothing=smoothing)
    # 3 batches of unequal size (8, 8, 4): epoch values are weighted by batch size.
    generator = torch.Generator().manual_seed(1)
    # Large inputs give confident logits, so that smoothing visibly changes the loss.
    x, y = 10 * torch.randn(20, 1, 8, 8, generator=generator), torch.randint(0, 10, (20,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    trainer = quiet_trainer()
    (validated,) = trainer.validate(module, loader, verbose=False)
    (tested,) = trainer.test(module, loader, verbose=False)

    module.eval()
    with torch.no_grad():
        logits = module(x)
    expected_loss = _smoothed_cross_entropy(logits, y, smoothing).item()
    assert expected_loss == pytest.approx(F.cross_entropy(logits, y, label_smoothing=smoothing).item(), rel=1e-5)
    expected_acc = (logits.argmax(1) == y).float().mean().item()
    assert validated["val_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert tested["test_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert validated["val_acc"] == tested["test_acc"] == pytest.approx(expected_acc)
    if smoothing > 0:
        plain = _smoothed_cross_entropy(logits, y, 0.0).item()
        assert validated["val_loss"] != pytest.approx(plain, rel=1e-3)


def test_predict_returns_logits() -> None:
    torch.manual_seed(0)
    module = ImageClassifier()
    loader = random_loader(2, batch_size=4, shape=(1, 8, 8))
    predictions = quiet_trainer().predict(module, loader)
    module.eval()
    with torch.no_grad():
        expected = torch.cat([module(x) for x, _ in loader])
    assert torch.allclose(torch.cat(predictions), expected, atol=1e-6)
    # A loader of images only works as well.
    images = DataLoader(torch.randn(5, 1, 8, 8), batch_size=5)
    (logits,) = quiet_trainer().predict(module, images)
    assert logits.shape == (5, 10)


def test_small_cnn_learns_digits() -> None:
    datasets = pytest.importorskip("sklearn.datasets")
    torch.manual_seed(0)
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train = DataLoader(TensorDataset(x[:1257], y[:1257]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x[1257:], y[1257:]), batch_size=256)
    module = ImageClassifier(lr=0.05)
    trainer = quiet_trainer(max_epochs=3)
    trainer.fit(module, train)
    (metrics,) = trainer.validate(module, val, verbose=False)
    assert metrics["val_acc"] > 0.9


# ------------------------------------------------------------------------------------------------ argument checking


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"lr": 0}, ValueError, r"`lr` must be in \(0, inf\), got 0"),
        ({"lr": -0.1}, ValueError, r"`lr` must be in \(0, inf\), got -0.1"),
        ({"lr": float("nan")}, ValueError, r"`lr` must be a finite number in \(0, inf\), got nan"),
        ({"lr": "0.1"}, TypeError, r"`lr` must be a number in \(0, inf\), got '0.1'"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"momentum": -0.5}, ValueError, r"`momentum` must be in \[0, 1\), got -0.5"),
        ({"weight_decay": -1e-4}, ValueError, r"`weight_decay` must be in \[0, inf\), got -0.0001"),
        ({"nesterov": 1}, TypeError, r"`nesterov` must be True or False, got 1"),
        ({"nesterov": True, "momentum": 0.0}, ValueError, r"`nesterov=True` needs `momentum` > 0"),
        ({"lr_schedule": "linear"}, ValueError, r"`lr_schedule` must be one of \('cosine', 'step', 'constant'\)"),
        ({"lr_gamma": 0}, ValueError, r"`lr_gamma` must be in \(0, 1\], got 0"),
        ({"lr_gamma": 10.0}, ValueError, r"`lr_gamma` must be in \(0, 1\], got 10.0"),
        (
            {"lr_milestones": [0.75, 0.5]},
            ValueError,
            r"`lr_milestones` must be a non-empty increasing list .*0.75, 0.5",
        ),
        ({"lr_milestones": [0.5, 0.5]}, ValueError, r"`lr_milestones` must be a non-empty increasing list"),
        ({"lr_milestones": [0.5, 1.0]}, ValueError, r"fractions of the run in \(0, 1\), got \[0.5, 1.0\]"),
        ({"lr_milestones": [0, 0.5]}, ValueError, r"fractions of the run in \(0, 1\), got \[0, 0.5\]"),
        ({"lr_milestones": [80, 120]}, ValueError, r"fractions of the run in \(0, 1\), got \[80, 120\]"),
        ({"lr_milestones": []}, TypeError, r"`lr_milestones` must be a non-empty increasing list"),
        ({"lr_milestones": 0.5}, TypeError, r"`lr_milestones` must be a non-empty increasing list"),
        ({"lr_milestones": ["0.5"]}, TypeError, r"`lr_milestones` must be a non-empty increasing list"),
        ({"label_smoothing": 1.0}, ValueError, r"`label_smoothing` must be in \[0, 1\), got 1.0"),
        ({"label_smoothing": -0.1}, ValueError, r"`label_smoothing` must be in \[0, 1\), got -0.1"),
        ({"num_classes": 1}, ValueError, r"`num_classes` must be an int >= 2, got 1"),
        ({"in_channels": 0}, ValueError, r"`in_channels` must be an int >= 1, got 0"),
        ({"image_size": 0}, ValueError, r"`image_size` must be an int >= 1, got 0"),
        ({"image_size": 8.0}, TypeError, r"`image_size` must be an int >= 1, got 8.0"),
    ],
)
def test_invalid_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ImageClassifier(**kwargs)


def test_milestones_without_step_schedule_warn() -> None:
    with pytest.warns(UserWarning, match=r"`lr_milestones`=\[0.3\] is ignored by `lr_schedule`='cosine'"):
        ImageClassifier(lr_milestones=[0.3])


def test_linear_warmup_then_cosine() -> None:
    factor = lr_factor_fn("cosine", 100, warmup_fraction=0.05)
    assert [factor(t) for t in range(5)] == pytest.approx(
        [0.2 * (t + 1) * 0.5 * (1 + math.cos(math.pi * t / 100)) for t in range(5)]
    )
    assert factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 100)))
    assert lr_factor_fn("constant", 100, warmup_fraction=0.0)(0) == 1.0
    with pytest.raises(ValueError, match=r"`warmup_fraction`"):
        ImageClassifier(warmup_fraction=1.0)


def test_weight_decay_only_on_weights_when_asked() -> None:
    module = ImageClassifier("resnet20", in_channels=3, image_size=32, decay_bias_and_norm=False, weight_decay=1e-4)
    module.trainer = pl.Trainer(max_steps=10, logger=False)  # for the schedule's length
    optimizer = module.configure_optimizers()["optimizer"]
    decayed, free = optimizer.param_groups
    assert decayed["weight_decay"] == 1e-4
    assert free["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert all(p.ndim == 1 for p in free["params"])  # biases and batch-norm scales and shifts
    assert len(decayed["params"]) + len(free["params"]) == len(list(module.parameters()))
    with pytest.raises(TypeError, match=r"`decay_bias_and_norm` must be True or False, got 'no'"):
        ImageClassifier(decay_bias_and_norm="no")


def test_shard_needs_the_model_parallel_strategy() -> None:
    module = ImageClassifier("small_cnn", shard=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=1)
    with pytest.raises(MisconfigurationException, match=r"shard=True.*ModelParallelStrategy\(data_parallel_size="):
        trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))))
