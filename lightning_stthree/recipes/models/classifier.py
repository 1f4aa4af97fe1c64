"""The LightningModule that trains the networks: :class:`ImageClassifier`, and the checks of its arguments.

:class:`ImageClassifier` wraps a network of :func:`~lightning_stthree.recipes.models.build_model` with SGD, a
per-step learning-rate schedule of :mod:`~lightning_stthree.recipes.models.schedules` and cross-entropy; all its
arguments are plain values so it can be configured from YAML with ``LightningCLI``. It can shard the network with
FSDP2 under Lightning's ``ModelParallelStrategy``.
"""

from __future__ import annotations

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

from lightning_stthree.core.checks import check_bool, check_choice, check_int, check_number
from lightning_stthree.methods.str import S_NAME as STR_S_NAME
from lightning_stthree.recipes.models.networks import SMALL_CNN, _build_model
from lightning_stthree.recipes.models.schedules import DEFAULT_LR_MILESTONES, LR_SCHEDULES, LRSchedule, lr_factor_fn


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
            authors' code does, and STR's per-layer thresholds ``s`` (their weight decay is what makes STR prune).
        shard: Shard the network with FSDP2 in ``configure_model``: ``fully_shard`` on every ``Linear``/``Conv``
            layer, then on the whole network, over the strategy's data-parallel mesh. Needs
            ``strategy=ModelParallelStrategy(data_parallel_size=<number of processes>, tensor_parallel_size=1)``.

    Raises:
        TypeError: If a number, flag or ``lr_milestones`` has the wrong type.
        ValueError: If an argument is out of range or ``model`` is unknown.

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
        check_int("num_classes", num_classes, minimum=2)
        check_int("image_size", image_size, minimum=1)
        check_number("label_smoothing", label_smoothing, 0.0, 1.0, "[)")
        check_number("warmup_fraction", warmup_fraction, 0.0, 1.0, "[)")
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
            # STR's thresholds `s` are 0-dim, but what makes STR prune is their weight decay: they stay decayed.
            named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            decayed = [p for n, p in named if p.ndim > 1 or n.endswith(f".0.{STR_S_NAME}")]
            groups = [
                {"params": decayed},
                {"params": [p for n, p in named if not any(p is d for d in decayed)], "weight_decay": 0.0},
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
    """Validate ImageClassifier's optimizer and schedule arguments; return the milestones to use.

    Returns:
        ``lr_milestones`` as floats, or :data:`DEFAULT_LR_MILESTONES` when it is ``None``.

    Raises:
        TypeError: If a number or flag has the wrong type, or ``lr_milestones`` is not a non-empty list of numbers.
        ValueError: If a number is out of range, ``nesterov`` is asked for without momentum, ``lr_schedule`` is
            unknown or ``lr_milestones`` is not increasing in (0, 1).
    """
    check_number("lr", lr, 0.0, math.inf, "()")
    check_number("momentum", momentum, 0.0, 1.0, "[)")
    check_number("weight_decay", weight_decay, 0.0, math.inf, "[)")
    check_number("lr_gamma", lr_gamma, 0.0, 1.0, "(]")
    check_bool("nesterov", nesterov)
    if nesterov and momentum == 0:
        raise ValueError("`nesterov=True` needs `momentum` > 0, got momentum=0")
    check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
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
