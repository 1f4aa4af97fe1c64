"""Image classifiers to sparsify with ST-3 (arXiv:2212.01076), by name, and a LightningModule that trains them.

Which model is for what:

* ``"small_cnn"`` (:class:`SmallCNN`): a three-convolution net of ~56k weights for the quick start on scikit-learn's
  8x8 digits (or 28x28 MNIST-like images); ten epochs on 1,257 digits take seconds on a laptop CPU.
* ``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``, ``"resnet110"``, ``"resnet1202"``
  (:func:`cifar_resnet`): the CIFAR ResNets of He et al. 2016 (arXiv:1512.03385, Sec. 4.2), the paper's CIFAR-10
  setting (ST-3 reports ResNet-20/32/56 on CIFAR-10).
* Any torchvision classification model name (``"resnet50"``, ``"mobilenet_v3_small"``, ``"vit_b_16"`` ...): the
  ImageNet recipes, built with ``weights=None`` (random initialisation, nothing is downloaded).

:class:`ImageClassifier` wraps any of them with SGD, a per-step learning-rate schedule and cross-entropy; all its
arguments are plain values so it can be configured from YAML with ``LightningCLI``.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lightning_stthree.core.checks import check_bool

LRSchedule = Literal["cosine", "step", "constant"]
LR_SCHEDULES: tuple[str, ...] = ("cosine", "step", "constant")
# Step decay at 50% and 75% of training: the CIFAR recipe of He et al. 2016 (32k and 48k of 64k iterations).
DEFAULT_LR_MILESTONES: tuple[float, ...] = (0.5, 0.75)
# Channels of the three stages of the CIFAR ResNets (He et al. 2016, Sec. 4.2: "{16, 32, 64} filters").
CIFAR_RESNET_WIDTHS: tuple[int, int, int] = (16, 32, 64)
# The CIFAR ResNet depths of He et al. 2016, Table 6, by the names ``build_model`` accepts.
CIFAR_RESNETS: dict[str, int] = {f"resnet{depth}": depth for depth in (8, 14, 20, 32, 44, 56, 110, 1202)}
SMALL_CNN = "small_cnn"
# torchvision models with auxiliary heads return a tuple in training mode; ImageClassifier trains the main head only.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_TORCHVISION_HINT = "HINT: `pip install torchvision` (or `pip install lightning-stthree[dev]`)."


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float, closed: str) -> None:
    """Check ``value`` is a real number in the interval ``low``..``high``; ``closed`` is e.g. ``"[)"``."""
    interval = f"{closed[0]}{low:g}, {high:g}{closed[1]}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a float in {interval}, got {value!r}")
    above = value >= low if closed[0] == "[" else value > low
    below = value <= high if closed[1] == "]" else value < high
    if not math.isfinite(value) or not (above and below):
        raise ValueError(f"`{name}` must be in {interval}, got {value!r}")


class SmallCNN(nn.Module):
    """Three 3x3 convolutions with batch norm, a max-pool, global average pooling and a linear classifier.

    ``Conv3x3(width)-BN-ReLU -> Conv3x3(2 width)-BN-ReLU -> MaxPool2 -> Conv3x3(2 width)-BN-ReLU -> GAP -> Linear``.
    Padding keeps the spatial size, so any input of at least 2x2 works (8x8 digits, 28x28 MNIST, 32x32 CIFAR). With
    the defaults it has 55,584 convolution and 640 classifier weights.

    Args:
        in_channels: Channels of the input images (1 for grey-scale).
        num_classes: Number of output logits.
        width: Channels of the first convolution; the other two have ``2 * width``.

    Raises:
        ValueError: If an argument is not a positive int.

    Example::

        >>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        _check_int("in_channels", in_channels, 1)
        _check_int("num_classes", num_classes, 1)
        _check_int("width", width, 1)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, width),
            *_conv_bn_relu(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv_bn_relu(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(2 * width, num_classes)
        _kaiming_init(self)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


def _kaiming_init(model: nn.Module) -> None:
    """He et al. 2015 initialisation of convolutions and linear layers, unit/zero batch norm, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)) and module.bias is not None:
            nn.init.zeros_(module.bias)


class _ShortcutA(nn.Module):
    """Option-A shortcut of He et al. 2016: identity, subsampled by ``stride`` and zero-padded to more channels.

    It has no parameters, so ST-3 has nothing to prune here and the parameter counts match the paper's.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (He et al. 2016, Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        reshapes = stride != 1 or in_channels != out_channels
        self.shortcut = _ShortcutA(in_channels, out_channels, stride) if reshapes else nn.Identity()

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CIFARResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (Sec. 4.2); build it with :func:`cifar_resnet`."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        first = CIFAR_RESNET_WIDTHS[0]
        self.conv1 = nn.Conv2d(in_channels, first, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(first)
        stages: list[nn.Module] = []
        channels = first
        for index, width in enumerate(CIFAR_RESNET_WIDTHS):
            blocks = []
            for block in range(blocks_per_stage):
                stride = 2 if index > 0 and block == 0 else 1
                blocks.append(_BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _kaiming_init(self)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def cifar_resnet(depth: int, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """The CIFAR ResNet of He et al. 2016 with ``depth = 6n + 2`` layers (arXiv:1512.03385, Sec. 4.2).

    A 3x3 convolution with 16 channels, three stages of ``n`` basic blocks with 16, 32 and 64 channels (the 2nd
    and 3rd stage halve the resolution), global average pooling and a linear classifier. Shortcuts are option A
    (identity, subsampled and zero-padded where the shape changes), so the only parameters are those of the
    convolutions, batch norms and the classifier: 269,722 for ResNet-20, 464,154 for ResNet-32 and 853,018 for
    ResNet-56 with 10 classes. Convolutions and the classifier get Kaiming-normal initialisation.

    Args:
        depth: Number of weighted layers, ``6n + 2`` with ``n >= 1``: 8, 14, 20, 32, 44, 56, 110, 1202 ...
        num_classes: Number of output logits.
        in_channels: Channels of the input images (3 for CIFAR, 1 for grey-scale).

    Returns:
        The network; it works on any input of at least 4x4 pixels (32x32 for CIFAR).

    Raises:
        ValueError: If ``depth`` is not of the form ``6n + 2`` or another argument is not a positive int.

    Example::

        >>> sum(p.numel() for p in cifar_resnet(20).parameters())
        269722
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"`depth` must be 6n + 2 for an int n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {depth!r}")
    _check_int("num_classes", num_classes, 1)
    _check_int("in_channels", in_channels, 1)
    return CIFARResNet((depth - 2) // 6, num_classes=num_classes, in_channels=in_channels)


def torchvision_model_names() -> list[str]:
    """The torchvision classification model names :func:`build_model` accepts (empty without torchvision)."""
    try:
        import torchvision
    except ImportError:
        return []
    return torchvision.models.list_models(module=torchvision.models)


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """An image classifier with random weights, by name.

    Args:
        name: ``"small_cnn"`` (:class:`SmallCNN`, for digits), a CIFAR ResNet ``"resnet20"``, ``"resnet32"``,
            ``"resnet44"``, ``"resnet56"``, ``"resnet110"`` or ``"resnet1202"`` (:func:`cifar_resnet`), or a
            torchvision classification model name (``torchvision.models.list_models(module=torchvision.models)``),
            built with ``weights=None``. ``"resnet18"``/``"resnet50"`` are torchvision's ImageNet ResNets.
        num_classes: Number of output logits.
        in_channels: Channels of the input images; torchvision models need 3.

    Returns:
        The model, in training mode.

    Raises:
        ValueError: If ``name`` is unknown, or a torchvision model is asked for with ``in_channels != 3``.
        ImportError: If ``name`` is not one of this package's models and torchvision is not installed.

    Example::

        >>> build_model("resnet20", num_classes=10, in_channels=3).fc
        Linear(in_features=64, out_features=10, bias=True)
    """
    return _build_model(name, num_classes, in_channels, argument="name")


def _build_model(name: str, num_classes: int, in_channels: int, argument: str) -> nn.Module:
    """:func:`build_model`, with errors that call the model name ``argument`` (``model`` in ImageClassifier)."""
    _check_int("num_classes", num_classes, 1)
    _check_int("in_channels", in_channels, 1)
    if name == SMALL_CNN:
        return SmallCNN(in_channels=in_channels, num_classes=num_classes)
    if name in CIFAR_RESNETS:
        return cifar_resnet(CIFAR_RESNETS[name], num_classes=num_classes, in_channels=in_channels)
    ours = [SMALL_CNN, *CIFAR_RESNETS]
    try:
        import torchvision
    except ImportError as err:
        raise ImportError(
            f"`{argument}`={name!r} is not one of {ours}, and torchvision, which provides the other model names, "
            f"is not installed. {_TORCHVISION_HINT}"
        ) from err
    names = torchvision.models.list_models(module=torchvision.models)
    if not isinstance(name, str) or name not in names:
        raise ValueError(
            f"`{argument}` must be one of {ours} or a torchvision classification model name {names}, got {name!r}"
        )
    if in_channels != 3:
        raise ValueError(
            f"torchvision's `{argument}`={name!r} takes 3-channel images, got `in_channels`={in_channels}. "
            f"HINT: use '{SMALL_CNN}' or a CIFAR ResNet such as 'resnet20' (they take any `in_channels`), or convert "
            "the images to 3 channels (e.g. torchvision.transforms.Grayscale(num_output_channels=3))."
        )
    kwargs = _TORCHVISION_KWARGS.get(name, {})
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _cosine_factor(step: int, total_steps: int) -> float:
    """Cosine annealing from 1 at step 0 to 0 at ``total_steps`` (and after)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def _step_factor(step: int, milestones: tuple[int, ...], gamma: float) -> float:
    """``gamma`` to the number of milestones reached by ``step``."""
    return gamma ** sum(step >= milestone for milestone in milestones)


def _constant_factor(step: int) -> float:
    return 1.0


def _warmup_factor(step: int, warmup_steps: int, after: functools.partial[float]) -> float:
    """Linear warm-up from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, times ``after``."""
    return min(1.0, (step + 1) / warmup_steps) * after(step)


def lr_factor_fn(
    schedule: LRSchedule,
    total_steps: int,
    milestones: tuple[float, ...] = DEFAULT_LR_MILESTONES,
    gamma: float = 0.1,
    warmup_fraction: float = 0.0,
) -> functools.partial[float]:
    r"""The learning-rate multiplier as a function of the optimizer step, for ``torch.optim.lr_scheduler.LambdaLR``.

    .. math::

        \text{cosine: } \tfrac12\bigl(1 + \cos(\pi \min(t, T) / T)\bigr), \qquad
        \text{step: } \gamma^{\#\{i : t \ge \operatorname{round}(m_i T)\}}, \qquad \text{constant: } 1

    with ``t`` the optimizer step, ``T`` = ``total_steps`` and ``m_i`` the milestone fractions; with a warm-up of
    ``W = round(warmup_fraction * T)`` steps the factor is also multiplied by ``min(1, (t + 1) / W)``.

    Args:
        schedule: ``"cosine"``, ``"step"`` or ``"constant"``.
        total_steps: Optimizer steps of the whole run (``trainer.estimated_stepping_batches``), >= 1.
        milestones: Fractions of the run at which the step schedule multiplies the rate by ``gamma``.
        gamma: The step schedule's factor.
        warmup_fraction: Fraction of the run with a linear learning-rate warm-up (0: none).

    Returns:
        A picklable function of the step (a ``functools.partial`` of a module-level function).

    Example::

        >>> [lr_factor_fn("step", 8, (0.5,), 0.1)(t) for t in (3, 4)]
        [1.0, 0.1]
    """
    if schedule == "cosine":
        factor = functools.partial(_cosine_factor, total_steps=total_steps)
    elif schedule == "step":
        steps = tuple(round(fraction * total_steps) for fraction in milestones)
        factor = functools.partial(_step_factor, milestones=steps, gamma=gamma)
    else:
        factor = functools.partial(_constant_factor)
    warmup_steps = round(warmup_fraction * total_steps)
    if warmup_steps > 0:
        return functools.partial(_warmup_factor, warmup_steps=warmup_steps, after=factor)
    return factor


class ImageClassifier(pl.LightningModule):
    """Trains :func:`build_model`'s ``model`` with SGD, a per-step learning-rate schedule and cross-entropy.

    Logs ``train_loss`` (progress bar) and ``train_acc`` every step, ``val_loss``/``val_acc`` and
    ``test_loss``/``test_acc`` per epoch (averaged over all processes under DDP); ``predict_step`` returns logits.
    The network is ``self.model``, so ST-3's ``exclude`` patterns read e.g. ``["model.conv1", "model.fc"]``.

    Args:
        model: ``"small_cnn"``, a CIFAR ResNet (``"resnet20"`` ... ``"resnet110"``) or a torchvision model name,
            see :func:`build_model`.
        num_classes: Number of classes (>= 2).
        in_channels: Channels of the input images.
        image_size: Height and width of the input images; used for ``example_input_array`` (model summary, MACs).
        lr: Initial (peak) learning rate of SGD.
        momentum: SGD momentum, in [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: L2 weight decay of SGD, >= 0.
        lr_schedule: ``"cosine"`` anneals to 0 at the last optimizer step, ``"step"`` multiplies by ``lr_gamma`` at
            each of ``lr_milestones``, ``"constant"`` keeps ``lr``. The scheduler steps every optimizer step.
        lr_milestones: Fractions of the run, in (0, 1) and increasing, for the step schedule; ``None`` means
            ``[0.5, 0.75]``, the CIFAR recipe of He et al. 2016. Ignored (with a warning) by the other schedules.
        lr_gamma: Factor of the step schedule, in (0, 1].
        label_smoothing: Label smoothing of the cross-entropy loss, in [0, 1).
        warmup_fraction: Fraction of the run, in [0, 1), over which the learning rate rises linearly to ``lr``
            before the schedule applies (the authors' ImageNet recipe warms up for 5 of 100 epochs: 0.05).
        decay_bias_and_norm: Apply ``weight_decay`` to biases and normalisation parameters too (PyTorch's default).
            ``False`` decays only the weights of multi-dimensional parameters (conv and linear weights), as the
            authors' code does.
        shard: Shard the network with FSDP2 in ``configure_model``: ``fully_shard`` on every ``Linear``/``Conv``
            layer, then on the whole network, over the strategy's data-parallel mesh. Needs
            ``strategy=ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1)``.

    Raises:
        ValueError: If an argument is out of range or ``model`` is unknown.
        TypeError: If a number or flag has the wrong type.

    Example::

        >>> module = ImageClassifier("resnet20", in_channels=3, image_size=32, lr_schedule="step")
        >>> module(module.example_input_array).shape
        torch.Size([1, 10])
    """

    def __init__(
        self,
        model: str = SMALL_CNN,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 8,
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        lr_schedule: LRSchedule = "cosine",
        lr_milestones: list[float] | None = None,
        lr_gamma: float = 0.1,
        label_smoothing: float = 0.0,
        warmup_fraction: float = 0.0,
        decay_bias_and_norm: bool = True,
        shard: bool = False,
    ) -> None:
        super().__init__()
        self.lr_milestones = _check_optimizer_arguments(
            lr, momentum, nesterov, weight_decay, lr_schedule, lr_milestones, lr_gamma
        )
        _check_int("num_classes", num_classes, 2)
        _check_int("image_size", image_size, 1)
        _check_number("label_smoothing", label_smoothing, 0.0, 1.0, "[)")
        _check_number("warmup_fraction", warmup_fraction, 0.0, 1.0, "[)")
        check_bool("decay_bias_and_norm", decay_bias_and_norm)
        check_bool("shard", shard)
        self.save_hyperparameters()
        self.model = _build_model(model, num_classes, in_channels, argument="model")
        self.example_input_array = torch.zeros(1, in_channels, image_size, image_size)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    @override
    def configure_model(self) -> None:
        if not self.hparams.shard:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return  # sharded by an earlier stage of this Trainer
        if self.device_mesh is None or "data_parallel" not in (self.device_mesh.mesh_dim_names or ()):
            raise MisconfigurationException(
                "ImageClassifier(shard=True) shards the network with FSDP2 over the data-parallel mesh of "
                "Lightning's ModelParallelStrategy, but the Trainer's strategy is "
                f"{type(self.trainer.strategy).__name__}. HINT: pass `strategy=ModelParallelStrategy("
                "data_parallel_size=<number of processes>, tensor_parallel_size=1)` or `shard=False`."
            )
        mesh = self.device_mesh["data_parallel"]
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = self._loss(logits, y)
        self.train_accuracy(logits, y)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train_acc", self.train_accuracy, batch_size=len(y))
        return loss

    def _evaluate(self, batch: Any, stage: Literal["val", "test"], accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        # The accuracy metric syncs its counts itself; the loss is a per-process mean that needs `sync_dist`.
        self.log(f"{stage}_loss", self._loss(logits, y), batch_size=len(y), sync_dist=True)
        self.log(f"{stage}_acc", accuracy, batch_size=len(y), prog_bar=stage == "val")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        if hparams.decay_bias_and_norm:
            groups: Any = self.parameters()
        else:
            parameters = [p for p in self.parameters() if p.requires_grad]
            groups = [
                {"params": [p for p in parameters if p.ndim > 1]},
                {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
            ]
        optimizer = torch.optim.SGD(
            groups,
            lr=hparams.lr,
            momentum=hparams.momentum,
            nesterov=hparams.nesterov,
            weight_decay=hparams.weight_decay,
        )
        total_steps = self._total_steps()
        factor = lr_factor_fn(
            hparams.lr_schedule, total_steps, tuple(self.lr_milestones), hparams.lr_gamma, hparams.warmup_fraction
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def _total_steps(self) -> int:
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total):
            if self.hparams.lr_schedule == "constant":
                return 1
            raise MisconfigurationException(
                f"`lr_schedule`={self.hparams.lr_schedule!r} needs the number of optimizer steps of the run, but the "
                "Trainer has no end (`max_epochs=-1` and no `max_steps`). HINT: set `max_epochs` or `max_steps`, "
                "or use `lr_schedule='constant'`."
            )
        return max(int(total), 1)


def _check_optimizer_arguments(
    lr: float,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
    lr_schedule: str,
    lr_milestones: list[float] | None,
    lr_gamma: float,
) -> list[float]:
    """Validate ImageClassifier's optimizer and schedule arguments; return the milestones to use."""
    _check_number("lr", lr, 0.0, math.inf, "()")
    _check_number("momentum", momentum, 0.0, 1.0, "[)")
    _check_number("weight_decay", weight_decay, 0.0, math.inf, "[)")
    _check_number("lr_gamma", lr_gamma, 0.0, 1.0, "(]")
    check_bool("nesterov", nesterov)
    if nesterov and momentum == 0:
        raise ValueError("`nesterov=True` needs `momentum` > 0, got momentum=0")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"`lr_schedule` must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if lr_milestones is None:
        return list(DEFAULT_LR_MILESTONES)
    message = (
        f"`lr_milestones` must be a non-empty increasing list of fractions of the run in (0, 1), got {lr_milestones!r}"
    )
    if not isinstance(lr_milestones, (list, tuple)) or not lr_milestones:
        raise TypeError(message)
    for fraction in lr_milestones:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            raise TypeError(message)
        if not 0 < fraction < 1:
            raise ValueError(message)
    if any(later <= earlier for earlier, later in itertools.pairwise(lr_milestones)):
        raise ValueError(message)
    if lr_schedule != "step":
        rank_zero_warn(f"`lr_milestones`={list(lr_milestones)} is ignored by `lr_schedule`={lr_schedule!r}.")
    return [float(fraction) for fraction in lr_milestones]
