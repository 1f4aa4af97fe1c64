"""Image classifiers to sparsify with ST-3 (arXiv:2212.01076), by name, and a LightningModule that trains them.

Which model is for what:

* ``"small_cnn"`` (:class:`SmallCNN`): a three-convolution net of ~56k weights for the quick start on scikit-learn's
  8x8 digits (or 28x28 MNIST-like images); ten epochs on 1,257 digits take seconds on a laptop CPU.
* ``"resnet20"``, ``"resnet32"``, ``"resnet44"``, ``"resnet56"``, ``"resnet110"``, ``"resnet1202"``
  (:func:`cifar_resnet`): the CIFAR ResNets of He et al. 2016 (arXiv:1512.03385, Sec. 4.2), the paper's CIFAR-10
  setting (ST-3 reports ResNet-20/32/56 on CIFAR-10).
* Any torchvision classification model name (``"resnet50"``, ``"mobilenet_v3_small"``, ``"vit_b_16"`` ...): the
  ImageNet recipes, built with ``weights=None`` (random initialisation, nothing is downloaded).

:class:`CausalLanguageModel` (module ``language``) trains any Hugging Face causal-LM config (a small GPT-2 by
default) on next-token prediction.

:class:`ImageClassifier` wraps any of them with SGD, a per-step learning-rate schedule and cross-entropy; all its
arguments are plain values so it can be configured from YAML with ``LightningCLI``. The package's modules:
``networks`` (the networks and :func:`build_model`), ``schedules`` (:func:`lr_factor_fn`) and ``classifier``
(:class:`ImageClassifier`).
"""

from __future__ import annotations

from lightning_stthree.recipes.models.classifier import ImageClassifier
from lightning_stthree.recipes.models.language import CausalLanguageModel
from lightning_stthree.recipes.models.networks import _TORCHVISION_HINT as _TORCHVISION_HINT
from lightning_stthree.recipes.models.networks import _TORCHVISION_KWARGS as _TORCHVISION_KWARGS
from lightning_stthree.recipes.models.networks import (
    CIFAR_RESNET_WIDTHS,
    CIFAR_RESNETS,
    SMALL_CNN,
    CIFARResNet,
    SmallCNN,
    build_model,
    cifar_resnet,
    torchvision_model_names,
)
from lightning_stthree.recipes.models.networks import _BasicBlock as _BasicBlock
from lightning_stthree.recipes.models.networks import _ShortcutA as _ShortcutA
from lightning_stthree.recipes.models.schedules import DEFAULT_LR_MILESTONES, LR_SCHEDULES, LRSchedule, lr_factor_fn
from lightning_stthree.recipes.models.schedules import _constant_factor as _constant_factor
from lightning_stthree.recipes.models.schedules import _cosine_factor as _cosine_factor
from lightning_stthree.recipes.models.schedules import _step_factor as _step_factor
from lightning_stthree.recipes.models.schedules import _warmup_factor as _warmup_factor

# The underscore names imported above are no API: they stay attributes of this package because the single module it
# replaced defined them, and networks and LR schedulers pickled before the split name their classes and functions here.
__all__ = [
    "CIFAR_RESNETS",
    "CIFAR_RESNET_WIDTHS",
    "DEFAULT_LR_MILESTONES",
    "LR_SCHEDULES",
    "SMALL_CNN",
    "CIFARResNet",
    "CausalLanguageModel",
    "ImageClassifier",
    "LRSchedule",
    "SmallCNN",
    "build_model",
    "cifar_resnet",
    "lr_factor_fn",
    "torchvision_model_names",
]
