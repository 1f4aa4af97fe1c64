"""``ST3PruningCallback``: Lightning wiring of ST-3 (arXiv:2212.01076).

The maths lives in :mod:`~lightning_stthree.schedule`, :mod:`~lightning_stthree.threshold` and
:mod:`~lightning_stthree.parametrization`; this module only connects it to the Trainer's hooks.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.utils import parametrize
from typing_extensions import override

from lightning_stthree.layers import PRUNABLE_TYPES, find_prunable_layers, validate_exclude, validate_include_types
from lightning_stthree.parametrization import SoftThresholdParametrization
from lightning_stthree.schedule import DEFAULT_POWER, cubic_sparsity, resolve_step
from lightning_stthree.threshold import CRITERIA, Criterion, global_threshold, layer_score_factor

log = logging.getLogger(__name__)

StepSpec = int | float


def _check_step_spec(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"`{name}` must be an int (optimizer steps) or a float in [0, 1] (fraction of the run), got {value!r}"
        )
    if isinstance(value, int) and value < 0:
        raise ValueError(f"`{name}` must be >= 0 optimizer steps, got {value}")
    if isinstance(value, float) and not 0.0 <= value <= 1.0:
        raise ValueError(
            f"`{name}` as a float is a fraction of the run and must be in [0, 1], got {value}; "
            "pass an int for a number of optimizer steps"
        )


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be True or False, got {value!r}")


def _st3_parametrization(module: nn.Module) -> SoftThresholdParametrization | None:
    """The ST-3 parametrization on ``module.weight``, if there is one."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, SoftThresholdParametrization)]
    return found[0] if found else None


def _raw_weight(module: nn.Module) -> Tensor:
    """The raw (unthresholded) weight of a module carrying the ST-3 parametrization."""
    return module.parametrizations.weight.original


class ST3PruningCallback(Callback):
    r"""Sparse training with ST-3: soft threshold, straight-through gradients, one global threshold per step.

    From ``arXiv:2212.01076`` (Vanderschueren & De Vleeschouwer, WACV 2023). At setup, the ``weight`` of every
    prunable layer (``nn.Linear``, ``nn.Conv1d/2d/3d`` by default, first conv and classifier included) gets a
    :class:`~lightning_stthree.parametrization.SoftThresholdParametrization`. At the start of every optimizer step
    (every ``update_every`` steps) one global threshold ``t`` is recomputed from all raw weights so that the pruned
    fraction equals the scheduled sparsity

    .. math::

        s(\mathrm{step}) = s_{\mathrm{target}}\left(1 - (1 - p)^{\mathrm{power}}\right),\quad
        p = \mathrm{clamp}\left(\frac{\mathrm{step} - \mathrm{start}}{\mathrm{end} - \mathrm{start}}, 0, 1\right).

    The forward pass uses ``scale * sign(w) * max(|w| - t_layer, 0)``; gradients go straight through to the raw
    weights, so pruned weights can come back. After ``end`` the threshold keeps being recomputed at
    ``target_sparsity``; once more when training ends, so the model you take home has exactly that sparsity.

    Presets: ST-3 is the default; ST-3 sigma is ``criterion="l1_std"``; plain gradual magnitude pruning (the paper's
    GMP baseline) is ``soft_threshold=False, straight_through=False, rescale=False``.

    Logged with ``pl_module.log`` once per optimizer step (so every Lightning logger gets them): ``st3/sparsity``
    (measured fraction of exactly-zero effective weights over all prunable weights, on the progress bar),
    ``st3/target_sparsity`` (scheduled), ``st3/threshold`` (global, in score units) and, unless
    ``log_layer_sparsity=False``, ``st3/layer/<module name>/sparsity``.

    Args:
        target_sparsity: Final fraction of pruned weights over all prunable weights, in ``[0, 1)``.
        start: Optimizer step where pruning starts (``int``), or a fraction of
            ``trainer.estimated_stepping_batches`` (``float`` in ``[0, 1]``, rounded to the nearest step). Before it
            the network is dense. The paper's CIFAR recipe ramps from epoch 5 to 80 of 160: ``start=0.03125``.
        end: Optimizer step (``int``) or fraction of the run (``float``) where the ramp reaches
            ``target_sparsity``; ``end >= start``, and ``end == start`` prunes in one shot.
        power: Exponent of the ramp, ``> 0``; 3 is the paper's cubic schedule.
        criterion: ``"l1"`` ranks weights by ``|w|`` (ST-3); ``"l1_std"`` by ``|w| * sqrt(sum(w.shape))`` (ST-3
            sigma, more uniform sparsity across layers and fewer FLOPs).
        soft_threshold: Shrink kept weights by the threshold (ST-3); ``False`` applies a hard mask.
        straight_through: Gradients reach all raw weights, pruned ones included (ST-3); ``False`` lets them through
            kept weights only.
        rescale: Per-output-channel rescale that restores the magnitude removed by pruning (ST-3).
        update_every: Recompute the threshold every this many optimizer steps (``>= 1``).
        include_types: Layer types to prune, a subset of ``["Linear", "Conv1d", "Conv2d", "Conv3d"]`` (default:
            all four; subclasses included).
        exclude: ``fnmatch`` glob patterns on module names never to prune, e.g. ``["fc", "layer4.*"]``; a pattern
            that matches no prunable layer is an error.
        log_layer_sparsity: Also log each layer's measured sparsity.

    Raises:
        ValueError: If an argument is out of range (e.g. ``target_sparsity=1.5``, ``start > end``).
        TypeError: If an argument has the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_stthree import ST3PruningCallback

        trainer = Trainer(max_epochs=10, callbacks=[ST3PruningCallback(target_sparsity=0.9, start=0.05, end=0.5)])
        trainer.fit(model)
    """

    def __init__(
        self,
        target_sparsity: float = 0.9,
        start: StepSpec = 0.05,
        end: StepSpec = 0.5,
        power: float = DEFAULT_POWER,
        criterion: Literal["l1", "l1_std"] = "l1",
        soft_threshold: bool = True,
        straight_through: bool = True,
        rescale: bool = True,
        update_every: int = 1,
        include_types: list[str] | None = None,
        exclude: list[str] | None = None,
        log_layer_sparsity: bool = True,
    ) -> None:
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
            raise TypeError(f"`target_sparsity` must be a float in [0, 1), got {target_sparsity!r}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"`target_sparsity` must be in [0, 1), got {target_sparsity}")
        _check_step_spec("start", start)
        _check_step_spec("end", end)
        if type(start) is type(end) and start > end:
            raise ValueError(f"`start` must be <= `end`, got start={start} and end={end}")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
            raise ValueError(f"`power` must be a finite number > 0, got {power!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}")
        for name, flag in (
            ("soft_threshold", soft_threshold),
            ("straight_through", straight_through),
            ("rescale", rescale),
            ("log_layer_sparsity", log_layer_sparsity),
        ):
            _check_bool(name, flag)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an int >= 1 (optimizer steps), got {update_every!r}")

        self.target_sparsity = float(target_sparsity)
        self.start = start
        self.end = end
        self.power = float(power)
        self.criterion: Criterion = criterion
        self.soft_threshold = soft_threshold
        self.straight_through = straight_through
        self.rescale = rescale
        self.update_every = update_every
        self.include_types = validate_include_types(list(PRUNABLE_TYPES) if include_types is None else include_types)
        self.exclude = validate_exclude([] if exclude is None else exclude)
        self.log_layer_sparsity = log_layer_sparsity

        # Run state: plain Python, saved in checkpoints (see `state_dict`).
        self.sparsity = 0.0  # scheduled sparsity at the last update
        self.threshold = 0.0  # global threshold at the last update, in score units
        self.last_update_step = -1
        # Derived at setup / train start, not saved.
        self._layers: dict[str, nn.Module] = {}
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._last_logged_step = -1

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            target_sparsity=self.target_sparsity,
            criterion=self.criterion,
            include_types=self.include_types,
            exclude=self.exclude,
        )

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The modules this callback prunes, by module name (empty before setup)."""
        return dict(self._layers)

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._check_run_length_known(trainer.max_steps == -1 and trainer.max_epochs in (-1, None))
        if is_overridden("configure_model", pl_module):
            # Layers built in `configure_model` exist only after it; attach before the checkpoint restore.
            self._attach_after_configure_model(trainer, pl_module)
        else:
            self._attach(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if "configure_model" in vars(pl_module):
            del pl_module.configure_model

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_schedule(trainer.estimated_stepping_batches)
        if trainer.global_step < self.last_update_step:
            self.last_update_step = -1  # the callback is reused for a new run that starts over
        self._last_logged_step = -1

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_logged_step:
            return  # a later micro-batch of the same optimizer step (gradient accumulation)
        if step % self.update_every == 0 and step != self.last_update_step:
            self.update_threshold(step)
        self._log(pl_module)
        self._last_logged_step = step

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last optimizer step moved the weights: recompute so the final model has the scheduled sparsity.
        if trainer.global_step != self.last_update_step:
            self.update_threshold(trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"sparsity": self.sparsity, "threshold": self.threshold, "last_update_step": self.last_update_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self.threshold = float(state_dict["threshold"])
        self.last_update_step = int(state_dict["last_update_step"])

    # ------------------------------------------------------------------ helpers

    def scheduled_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for at optimizer ``step`` (available from ``on_train_start`` on)."""
        if self._start_step is None or self._end_step is None:
            raise RuntimeError("The schedule is resolved when training starts; call this from `on_train_start` on.")
        return cubic_sparsity(step, self.target_sparsity, self._start_step, self._end_step, self.power)

    @torch.no_grad()
    def update_threshold(self, step: int) -> None:
        """Recompute the global threshold for optimizer ``step`` and write each layer's share into its buffer."""
        sparsity = self.scheduled_sparsity(step)
        threshold = global_threshold([_raw_weight(m) for m in self._layers.values()], sparsity, self.criterion)
        for module in self._layers.values():
            factor = layer_score_factor(_raw_weight(module).shape, self.criterion)
            parametrization = _st3_parametrization(module)
            parametrization.threshold.copy_(threshold / factor)
        self.sparsity = sparsity
        self.threshold = float(threshold)
        self.last_update_step = step

    @torch.no_grad()
    def measure_sparsity(self) -> tuple[float, dict[str, float]]:
        """Measured fraction of exactly-zero effective weights: over all pruned layers, and per layer."""
        per_layer: dict[str, float] = {}
        zeros = total = 0
        for name, module in self._layers.items():
            weight = module.weight
            layer_zeros = weight.numel() - int(torch.count_nonzero(weight))
            per_layer[name] = layer_zeros / weight.numel()
            zeros += layer_zeros
            total += weight.numel()
        return zeros / total, per_layer

    def _log(self, pl_module: pl.LightningModule) -> None:
        sparsity, per_layer = self.measure_sparsity()
        pl_module.log("st3/sparsity", sparsity, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log("st3/target_sparsity", self.sparsity, on_step=True, on_epoch=False)
        pl_module.log("st3/threshold", self.threshold, on_step=True, on_epoch=False)
        if self.log_layer_sparsity:
            for name, value in per_layer.items():
                pl_module.log(f"st3/layer/{name}/sparsity", value, on_step=True, on_epoch=False)

    def _attach_after_configure_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        configure_model = pl_module.configure_model

        @functools.wraps(configure_model)
        def configure_model_then_attach() -> None:
            configure_model()
            self._attach(trainer, pl_module)

        pl_module.configure_model = configure_model_then_attach

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Find the prunable layers and register the ST-3 parametrization on each (idempotent)."""
        layers = find_prunable_layers(pl_module, self.include_types, self.exclude)
        if not layers:
            raise MisconfigurationException(
                f"ST3PruningCallback found no layer to prune in {type(pl_module).__name__}: it prunes the `weight` "
                f"of {list(self.include_types)} modules not matched by `exclude={list(self.exclude)}`. "
                "HINT: check `include_types` and `exclude`, or remove the callback."
            )
        self._check_no_overlap(trainer, layers)
        for name, module in layers.items():
            self._register(name, module)
        self._layers = layers
        log.debug("ST3PruningCallback prunes %d layers: %s", len(layers), list(layers))

    def _register(self, name: str, module: nn.Module) -> None:
        existing = _st3_parametrization(module)
        if existing is None and parametrize.is_parametrized(module, "weight"):
            raise MisconfigurationException(
                f"Layer `{name}` already has a parametrization on `weight` "
                f"({[type(p).__name__ for p in module.parametrizations.weight]}) that ST-3 cannot combine with. "
                f"HINT: add '{name}' to `exclude`."
            )
        if existing is None:
            existing = SoftThresholdParametrization().to(module.weight.device)
            parametrize.register_parametrization(module, "weight", existing)
        existing.soft_threshold = self.soft_threshold
        existing.straight_through = self.straight_through
        existing.rescale = self.rescale

    def _check_no_overlap(self, trainer: pl.Trainer, layers: dict[str, nn.Module]) -> None:
        for other in trainer.callbacks:
            if other is self or not isinstance(other, ST3PruningCallback):
                continue
            shared = sorted(set(layers) & set(other.layers))
            if shared:
                raise MisconfigurationException(
                    f"Two ST3PruningCallback instances prune the same layers {shared[:10]}. HINT: give each callback "
                    "its own layers with `include_types` and `exclude`."
                )

    def _check_run_length_known(self, unbounded: bool) -> None:
        fractions = [name for name in ("start", "end") if isinstance(getattr(self, name), float)]
        if fractions and unbounded:
            raise MisconfigurationException(
                f"ST3PruningCallback got {', '.join(f'`{n}={getattr(self, n)}`' for n in fractions)} as a fraction "
                "of the run, but the run has no known length. HINT: set `max_epochs` or `max_steps` on the Trainer "
                "(and give the train dataloader a length), or pass `start`/`end` as ints (optimizer steps)."
            )

    def _resolve_schedule(self, total_steps: float) -> None:
        # Lightning estimates `inf` for endless runs and `max_steps` (-1 when unset) for iterable datasets.
        self._check_run_length_known(not math.isfinite(total_steps) or total_steps < 0)
        self._start_step = resolve_step(self.start, total_steps, "start")
        self._end_step = resolve_step(self.end, total_steps, "end")
        if self._start_step > self._end_step:
            raise MisconfigurationException(
                f"ST3PruningCallback's ramp starts after it ends: start={self.start} -> step {self._start_step}, "
                f"end={self.end} -> step {self._end_step} (of {total_steps} optimizer steps). "
                "HINT: choose `start` <= `end`."
            )
