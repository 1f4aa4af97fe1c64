"""The networks, by name: :class:`SmallCNN`, the CIFAR ResNets of He et al. 2016 and torchvision's classifiers.

:func:`build_model` turns a name into a network with random weights: ``"small_cnn"`` (:class:`SmallCNN`, for the
quick start on 8x8 digits), ``"resnet20"`` ... ``"resnet1202"`` (:func:`cifar_resnet`, the paper's CIFAR-10 setting)
or any torchvision classification model name (the ImageNet recipes, built with ``weights=None``; nothing is
downloaded). The constants name the CIFAR ResNets and their widths.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from typing_extensions import override

from lightning_stthree.core.checks import check_int

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
        TypeError: If an argument is not an int.
        ValueError: If an argument is not positive.

    Example::

        >>> SmallCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        check_int("in_channels", in_channels, minimum=1)
        check_int("num_classes", num_classes, minimum=1)
        check_int("width", width, minimum=1)
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


def _add_relu_modules(module: nn.Module, *names: str) -> None:
    """Give a network pickled while its ``forward`` called ``F.relu`` (0.1 and 0.2.0) the ``nn.ReLU`` modules its
    ``forward`` now calls (modules, so that ``ActivationSparsityCallback`` can replace them)."""
    for name in names:
        if name not in module._modules:
            module._modules[name] = nn.ReLU()


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
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _add_relu_modules(self, "relu1", "relu2")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


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
        self.relu = nn.ReLU()
        _kaiming_init(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        _add_relu_modules(self, "relu")

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
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
        TypeError: If an argument is not an int.
        ValueError: If ``depth`` is not of the form ``6n + 2`` or another argument is not positive.

    Example::

        >>> sum(p.numel() for p in cifar_resnet(20).parameters())
        269722
    """
    allowed = "6n + 2 for an int n >= 1 (8, 14, 20, 32, 44, 56, 110, ...)"
    if isinstance(depth, bool) or not isinstance(depth, int):
        raise TypeError(f"`depth` must be {allowed}, got {depth!r}")
    if depth < 8 or (depth - 2) % 6 != 0:
        raise ValueError(f"`depth` must be {allowed}, got {depth!r}")
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
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
        TypeError: If ``num_classes`` or ``in_channels`` is not an int.
        ValueError: If ``name`` is unknown, ``num_classes`` or ``in_channels`` is below 1, or a torchvision model is
            asked for with ``in_channels != 3``.
        ImportError: If ``name`` is not one of this package's models and torchvision is not installed.

    Example::

        >>> build_model("resnet20", num_classes=10, in_channels=3).fc
        Linear(in_features=64, out_features=10, bias=True)
    """
    return _build_model(name, num_classes, in_channels, argument="name")


def _build_model(name: str, num_classes: int, in_channels: int, argument: str) -> nn.Module:
    """:func:`build_model`, with errors that call the model name ``argument`` (``model`` in ImageClassifier)."""
    check_int("num_classes", num_classes, minimum=1)
    check_int("in_channels", in_channels, minimum=1)
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
