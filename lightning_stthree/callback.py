"""``ST3PruningCallback``: Lightning wiring of ST-3 (arXiv:2212.01076).

The maths lives in :mod:`~lightning_stthree.schedule`, :mod:`~lightning_stthree.threshold` and
:mod:`~lightning_stthree.parametrization`; this module only connects it to the Trainer's hooks.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_stthree._checks import check_bool
from lightning_stthree.export import make_permanent
from lightning_stthree.flops import measure_layer_macs, sparse_macs
from lightning_stthree.layers import PRUNABLE_TYPES, find_prunable_layers, validate_exclude, validate_include_types
from lightning_stthree.parametrization import (
    RAW_WEIGHT_KEY,
    SoftThresholdParametrization,
    find_st3_parametrization,
    raw_weight,
    register_st3_parametrization,
    remove_st3_parametrization,
)
from lightning_stthree.plots import INSTALL_HINT, layer_report_figure, save_figure, sparsity_history_figure
from lightning_stthree.report import format_report, report_cells, sparsity_report
from lightning_stthree.schedule import DEFAULT_POWER, cubic_sparsity, resolve_step
from lightning_stthree.selection import PIVOT_WINDOW
from lightning_stthree.threshold import (
    CRITERIA,
    Criterion,
    global_threshold,
    layer_score_factor,
    weighted_global_threshold,
)

log = logging.getLogger(__name__)

StepSpec = int | float
# Narrowest window searched around the previous threshold, relative to it.
MIN_PIVOT_WINDOW = 1e-3
BUDGETS: tuple[str, ...] = ("params", "flops")


def _check_step_spec(name: str, value: object) -> None:
    if name == "freeze_at" and value is None:
        return
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
    ``target_sparsity``. It is also brought up to date before each validation during fit, at the end of each training
    epoch and at the end of training, so what is evaluated, checkpointed and handed back has the scheduled sparsity.

    From ``freeze_at`` on (the paper's fine-tune phase) the threshold is computed one last time, the effective weights
    are baked into the raw weights and the mask is fixed: pruned weights stay exactly zero whatever the optimizer
    (momentum, weight decay) does, and only kept weights are trained.

    Presets: ST-3 is the default; ST-3 sigma is ``criterion="l1_std"``; plain gradual magnitude pruning (the paper's
    GMP baseline) is ``soft_threshold=False, straight_through=False, rescale=False``.

    Logged with ``pl_module.log`` once per optimizer step (so every Lightning logger gets them): ``st3/sparsity``
    (measured fraction of exactly-zero effective weights over all prunable weights, on the progress bar),
    ``st3/target_sparsity`` (the schedule at this step), ``st3/threshold`` (global threshold in use, in score units)
    and, unless ``log_layer_sparsity=False``, ``st3/layer/<module name>/sparsity``.

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
        freeze_at: Optimizer step (``int``) or fraction of the run (``float``) where the fine-tune phase starts
            (mask frozen); ``None`` (default) never freezes. Must be ``>= end``.
        make_permanent_at_end: At the end of ``fit``, remove the parametrizations (see
            :func:`~lightning_stthree.make_permanent`) so the model holds plain layers with sparse weights.
        budget: ``"params"`` (default): the schedule's sparsity is the fraction of prunable *weights* removed.
            ``"flops"``: it is the fraction of the prunable layers' *MACs* removed; each weight counts its layer's MACs
            divided by its layer's weight count, so weights of layers that are expensive per weight (early
            convolutions at high resolution) are pruned first. Needs MACs (see ``input_shape``).
        input_shape: Shape of an example input batch (batch dimension first, e.g. ``[1, 3, 224, 224]``) to measure
            each layer's dense MACs with at fit start; by default the LightningModule's ``example_input_array`` is
            used. With neither, MACs are not logged, and ``budget="flops"`` is an error.
        report: Print the per-layer sparsity and MACs table when ``fit`` ends (rank zero only).
        save_plots: When ``fit`` ends, save ``st3_sparsity.png`` and ``st3_layers.png`` in the Trainer's log
            directory, and log them as figures to a TensorBoard logger. Needs matplotlib (the ``plot`` extra).

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
        freeze_at: StepSpec | None = None,
        make_permanent_at_end: bool = False,
        budget: Literal["params", "flops"] = "params",
        input_shape: list[int] | None = None,
        report: bool = True,
        save_plots: bool = False,
    ) -> None:
        if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, (int, float)):
            raise TypeError(f"`target_sparsity` must be a float in [0, 1), got {target_sparsity!r}")
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"`target_sparsity` must be in [0, 1), got {target_sparsity}")
        for name, value in (("start", start), ("end", end), ("freeze_at", freeze_at)):
            _check_step_spec(name, value)
        if type(start) is type(end) and start > end:
            raise ValueError(f"`start` must be <= `end`, got start={start} and end={end}")
        if type(freeze_at) is type(end) and freeze_at < end:
            raise ValueError(
                f"`freeze_at` must be >= `end` (the mask is frozen once the ramp is done), got freeze_at={freeze_at} "
                f"and end={end}"
            )
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power <= 0:
            raise ValueError(f"`power` must be a finite number > 0, got {power!r}")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}")
        for name, flag in (
            ("soft_threshold", soft_threshold),
            ("straight_through", straight_through),
            ("rescale", rescale),
            ("log_layer_sparsity", log_layer_sparsity),
            ("make_permanent_at_end", make_permanent_at_end),
            ("report", report),
            ("save_plots", save_plots),
        ):
            check_bool(name, flag)
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"`update_every` must be an int >= 1 (optimizer steps), got {update_every!r}")
        if budget not in BUDGETS:
            raise ValueError(f"`budget` must be one of {BUDGETS}, got {budget!r}")
        if input_shape is not None and (
            isinstance(input_shape, str)
            or len(input_shape) == 0
            or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape)
        ):
            raise ValueError(
                f"`input_shape` must be a list of positive ints, batch dimension first (e.g. [1, 3, 224, 224]), "
                f"got {input_shape!r}"
            )
        if save_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError(f"`save_plots=True`: {INSTALL_HINT}") from err

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
        self.freeze_at = freeze_at
        self.make_permanent_at_end = make_permanent_at_end
        self.budget = budget
        self.input_shape = None if input_shape is None else list(input_shape)
        self.report = report
        self.save_plots = save_plots
        # One record per logged step of the current run in this process (not checkpointed): the sparsity plot's data.
        self.history: list[dict[str, float]] = []

        # Run state: plain Python, saved in checkpoints (see `state_dict`).
        self.sparsity = 0.0  # scheduled sparsity at the last threshold update
        self.threshold = 0.0  # global threshold at the last update, in score units
        self.last_update_step = -1
        # Derived at setup / train start, not saved.
        self._layers: dict[str, nn.Module] = {}
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._freeze_step: int | None = None
        self._checkpoint_frozen = False  # the restored checkpoint was taken inside the fine-tune phase
        self._last_logged_step = -1
        self._last_relative_move = PIVOT_WINDOW  # of the global threshold at the last update, relative
        self._plain_before_stage: list[nn.Module] = []  # see `setup`
        self._layer_macs: dict[str, float] = {}  # dense MACs per sample of every Linear/Conv layer, by name
        self._other_layers: dict[str, nn.Module] = {}  # Linear/Conv layers counted in MACs but not pruned here

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

    @property
    def frozen(self) -> bool:
        """Whether the fine-tune phase (fixed mask) has started."""
        return any(p.frozen for p in self._parametrizations())

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._check_run_length_known(trainer.max_steps == -1 and trainer.max_epochs in (-1, None))
        else:
            # validate/test/predict attach too, so that an ST-3 `ckpt_path` loads; layers that were plain before
            # (e.g. made permanent) are made plain again in `teardown`, holding the effective weights.
            self._plain_before_stage = [m for m in pl_module.modules() if find_st3_parametrization(m) is None]
        # Lightning runs the callbacks' `setup`, then the module's `setup`, then `configure_model`, then restores a
        # checkpoint and wraps the model (DDP). Attach to the layers that exist now (so callbacks after this one that
        # copy the model in their `setup`, like StochasticWeightAveraging, copy it parametrized), and again after the
        # last hook that may build layers, before the restore.
        self._attach(trainer, pl_module, final=False)
        hook = "configure_model" if is_overridden("configure_model", pl_module) else "setup"
        self._run_after(pl_module, hook, lambda: self._attach(trainer, pl_module, final=True))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_module(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Lightning skips `teardown` when a run fails or is interrupted: undo the module changes all the same.
        self._restore_module(pl_module)

    def _restore_module(self, pl_module: pl.LightningModule) -> None:
        """Remove the hook wrappers of `setup` and make layers that came into a non-fit stage plain again."""
        for hook in ("setup", "configure_model"):
            if getattr(vars(pl_module).get(hook), "_st3_wrapper", False):
                delattr(pl_module, hook)
        for module in self._plain_before_stage:
            remove_st3_parametrization(module)
        self._plain_before_stage = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_macs(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve_schedule(trainer.estimated_stepping_batches)
        step = trainer.global_step
        if step < self.last_update_step:
            self.last_update_step = -1  # the callback is reused for a new run that starts over
        if self.history and step <= self.history[-1]["step"]:
            self.history = []  # idem, for the history behind the plots
        self._last_logged_step = -1
        if self._checkpoint_frozen and not self.frozen:
            self._fix_masks()  # resumed inside the fine-tune phase: the checkpoint's pruned weights are zeros

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_logged_step:
            return  # a later micro-batch of the same optimizer step (gradient accumulation)
        if self._is_fine_tune_step(step) and not self.frozen:
            self._freeze(step)
        elif step % self.update_every == 0:
            self._bring_threshold_up_to_date(step)
        self._log(pl_module, step)
        self._last_logged_step = step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The forward pass applies the fixed mask anyway; zeroing the raw weights keeps checkpoints exact (and the
        # mask recoverable from them) whatever the optimizer did to pruned entries.
        self._zero_pruned_raw_weights()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bring_threshold_up_to_date(trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._bring_threshold_up_to_date(trainer.global_step)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last optimizer step moved the weights: recompute so the final model has the scheduled sparsity.
        self._bring_threshold_up_to_date(trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.log_dir` is a collective under DDP: every rank asks, only rank zero reports.
        directory = Path(trainer.log_dir or trainer.default_root_dir) if self.save_plots else None
        if trainer.is_global_zero and (self.report or self.save_plots):
            rows = sparsity_report(pl_module, layer_macs=self._layer_macs or None)
            if self.report:
                self._print_report(trainer, rows)
            if directory is not None:
                self._save_plots(trainer, rows, directory)
        if self.make_permanent_at_end:
            make_permanent(pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Runs before Lightning restores the optimizer, whose state is indexed by parameter position: a parametrized
        # layer's raw weight is not where the dense `weight` was, so a dense run's optimizer state cannot be resumed.
        if trainer.state.fn == "fit" and not any(key.endswith(RAW_WEIGHT_KEY) for key in checkpoint["state_dict"]):
            raise MisconfigurationException(
                "`ckpt_path` points to a checkpoint of a run without ST-3; its optimizer state cannot be resumed with "
                "ST3PruningCallback (the parametrizations change the order of the parameters). HINT: load its weights "
                "(`model.load_state_dict(torch.load(path)['state_dict'])` or `Model.load_from_checkpoint(path)`) and "
                "call `trainer.fit(model)` without `ckpt_path` to sparsify a pretrained model."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "threshold": self.threshold,
            "last_update_step": self.last_update_step,
            "frozen": self.frozen,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sparsity = float(state_dict["sparsity"])
        self.threshold = float(state_dict["threshold"])
        self.last_update_step = int(state_dict["last_update_step"])
        self._checkpoint_frozen = bool(state_dict["frozen"])

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
        weights = [raw_weight(m) for m in self._layers.values()]
        # The threshold moves little from step to step: search first around the last one, in a window twice as wide
        # as its last relative move (so that the few weights inside are cheap to sort).
        pivot = self.threshold if self.threshold > 0 else None
        window = min(max(2.0 * self._last_relative_move, MIN_PIVOT_WINDOW), PIVOT_WINDOW)
        if self.budget == "flops":
            shares = [self._layer_macs[name] / w.numel() for name, w in zip(self._layers, weights, strict=True)]
            threshold = weighted_global_threshold(weights, shares, sparsity, self.criterion, pivot, window)
        else:
            threshold = global_threshold(weights, sparsity, self.criterion, pivot, window)
        if pivot is not None:
            self._last_relative_move = abs(float(threshold) - pivot) / pivot
        for module in self._layers.values():
            factor = layer_score_factor(raw_weight(module).shape, self.criterion)
            find_st3_parametrization(module).threshold.copy_(threshold / factor)
        self.sparsity = sparsity
        self.threshold = float(threshold)
        self.last_update_step = step

    @torch.no_grad()
    def measure_sparsity(self) -> tuple[float, dict[str, float]]:
        """Measured fraction of exactly-zero effective weights: over all pruned layers, and per layer.

        Counted as ``|w| <= t_layer`` on the raw weight, without computing the effective weight: the soft and hard
        thresholds are exactly zero there and only there (the rescale multiplies by a factor >= 1, so no kept weight
        becomes zero), so this is the same count in one cheap pass. Layers in the fine-tune phase or made permanent
        are counted on their effective weight.
        """
        per_layer: dict[str, float] = {}
        zeros = total = 0
        for name, module in self._layers.items():
            parametrization = find_st3_parametrization(module)
            if parametrization is None or parametrization.frozen:
                weight = module.weight
                layer_zeros = weight.numel() - int(torch.count_nonzero(weight))
            else:
                weight = raw_weight(module)
                layer_zeros = int(torch.count_nonzero(weight.abs() <= parametrization.threshold.to(weight.dtype)))
            per_layer[name] = layer_zeros / weight.numel()
            zeros += layer_zeros
            total += weight.numel()
        return zeros / total, per_layer

    def _bring_threshold_up_to_date(self, step: int) -> None:
        if not self.frozen and self._start_step is not None and step != self.last_update_step:
            self.update_threshold(step)

    def _is_fine_tune_step(self, step: int) -> bool:
        return self._freeze_step is not None and step >= self._freeze_step

    @torch.no_grad()
    def _freeze(self, step: int) -> None:
        """Start the fine-tune phase: last threshold update, effective weights baked into the raw ones, mask fixed."""
        if step != self.last_update_step:
            self.update_threshold(step)
        for module in self._layers.values():
            raw_weight(module).copy_(module.weight)
        self._fix_masks()
        rank_zero_info(
            f"ST3PruningCallback: mask frozen at step {step} (fine-tune phase), sparsity {self.sparsity:.4f}"
        )

    @torch.no_grad()
    def _fix_masks(self) -> None:
        """Fine-tune mode: keep the weights whose raw value is non-zero now, under a fixed mask."""
        for module in self._layers.values():
            find_st3_parametrization(module).freeze(raw_weight(module) != 0)

    @torch.no_grad()
    def _zero_pruned_raw_weights(self) -> None:
        """Undo whatever the optimizer (momentum, weight decay) did to pruned weights in the fine-tune phase."""
        for module in self._layers.values():
            mask = find_st3_parametrization(module).mask
            if mask is not None:
                raw_weight(module).masked_fill_(~mask, 0.0)

    def _parametrizations(self) -> list[SoftThresholdParametrization]:
        found = (find_st3_parametrization(m) for m in self._layers.values())
        return [p for p in found if p is not None]

    @torch.no_grad()
    def measure_macs(self, per_layer_sparsity: dict[str, float] | None = None) -> dict[str, float]:
        """Dense and sparse MACs per sample over all Linear/Conv layers, and their ratio (empty if not measured).

        Layers this callback does not prune count with their own (usually full) density.
        """
        if not self._layer_macs:
            return {}
        sparsity = self.measure_sparsity()[1] if per_layer_sparsity is None else per_layer_sparsity
        densities = {name: 1.0 - value for name, value in sparsity.items()}
        for name, module in self._other_layers.items():
            densities[name] = int(torch.count_nonzero(module.weight)) / module.weight.numel()
        dense = sum(self._layer_macs.values())
        sparse = sparse_macs(self._layer_macs, densities)
        return {"macs_dense": dense, "macs_sparse": sparse, "macs_ratio": sparse / dense if dense else 1.0}

    def _log(self, pl_module: pl.LightningModule, step: int) -> None:
        sparsity, per_layer = self.measure_sparsity()
        target = self.scheduled_sparsity(step)
        macs = self.measure_macs(per_layer)
        pl_module.log("st3/sparsity", sparsity, on_step=True, on_epoch=False, prog_bar=True)
        pl_module.log("st3/target_sparsity", target, on_step=True, on_epoch=False)
        pl_module.log("st3/threshold", self.threshold, on_step=True, on_epoch=False)
        for key, value in macs.items():
            pl_module.log(f"st3/{key}", value, on_step=True, on_epoch=False, prog_bar=key == "macs_ratio")
        if self.log_layer_sparsity:
            for name, value in per_layer.items():
                pl_module.log(f"st3/layer/{name}/sparsity", value, on_step=True, on_epoch=False)
        self.history.append({"step": step, "target_sparsity": target, "sparsity": sparsity, **macs})

    def _measure_macs(self, pl_module: pl.LightningModule) -> None:
        """Measure every Linear/Conv layer's dense MACs, from ``input_shape`` or ``example_input_array``."""
        all_layers = find_prunable_layers(pl_module)
        self._other_layers = {n: m for n, m in all_layers.items() if n not in self._layers}
        self._layer_macs = {}
        example = pl_module.example_input_array if self.input_shape is None else torch.zeros(self.input_shape)
        if example is None:
            if self.budget == "flops":
                raise MisconfigurationException(
                    "ST3PruningCallback(budget='flops') needs each layer's MACs, measured from an example input, but "
                    f"{type(pl_module).__name__} has no `example_input_array`. HINT: set `self.example_input_array` "
                    "in the LightningModule or pass `input_shape=[1, 3, 224, 224]` (your input's shape) to the "
                    "callback."
                )
            rank_zero_info(
                "ST3PruningCallback: MACs are not logged because the model has no `example_input_array`; "
                "pass `input_shape` to the callback to log st3/macs_*."
            )
            return
        try:
            self._layer_macs = measure_layer_macs(pl_module, example, all_layers)
        except Exception as err:
            if self.budget == "flops":
                raise MisconfigurationException(
                    f"ST3PruningCallback(budget='flops') could not measure MACs: the forward pass on the example input "
                    f"failed with {type(err).__name__}: {err}. HINT: check `example_input_array` / `input_shape`."
                ) from err
            rank_zero_warn(
                f"ST3PruningCallback: MACs are not logged: the forward pass on the example input failed with "
                f"{type(err).__name__}: {err}"
            )
            return
        uncounted = [name for name in self._layers if self._layer_macs[name] == 0]
        if uncounted and len(uncounted) == len(self._layers) and self.budget == "flops":
            raise MisconfigurationException(
                "ST3PruningCallback(budget='flops'): the example input's forward pass called none of the pruned "
                "layers, so they have no MACs. HINT: check `example_input_array` / `input_shape`."
            )
        if uncounted:
            rank_zero_warn(
                f"ST3PruningCallback: {len(uncounted)} pruned layers were not called as modules in the example forward "
                f"pass (used functionally, or only in training mode) and count 0 MACs: {uncounted[:10]}"
                + (" With budget='flops' their weights are pruned as if free." if self.budget == "flops" else "")
            )

    def _print_report(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        if isinstance(trainer.progress_bar_callback, RichProgressBar):
            from rich.console import Console
            from rich.table import Table

            header, cells = report_cells(rows)
            table = Table(title="ST-3 sparsity report (MACs per sample)")
            for index, title in enumerate(header):
                table.add_column(title, justify="left" if index < 3 else "right", no_wrap=True)
            for index, line in enumerate(cells):
                table.add_row(*line, end_section=index == len(cells) - 2)
            # Never truncate layer names: widen the console to the table (rich assumes 80 columns without a tty).
            needed = sum(max(len(c[i]) for c in [header, *cells]) + 3 for i in range(len(header))) + 1
            console = Console()
            console.width = max(console.width, needed)
            console.print(table)
        else:
            rank_zero_info("ST-3 sparsity report (MACs per sample):\n" + format_report(rows))

    def _save_plots(self, trainer: pl.Trainer, rows: list[dict[str, Any]], directory: Path) -> None:
        figures = {"st3_sparsity": sparsity_history_figure(self.history), "st3_layers": layer_report_figure(rows)}
        for name, figure in figures.items():
            path = save_figure(figure, directory / f"{name}.png")
            rank_zero_info(f"ST3PruningCallback: saved {path}")
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"st3/{name}", figure, global_step=trainer.global_step)

    @staticmethod
    def _run_after(pl_module: pl.LightningModule, hook: str, then: Callable[[], None]) -> None:
        """Make ``pl_module.<hook>`` run ``then()`` after itself, for this run (undone in ``teardown``)."""
        original = getattr(pl_module, hook)

        @functools.wraps(original)
        def hook_then(*args: Any, **kwargs: Any) -> None:
            original(*args, **kwargs)
            then()

        hook_then._st3_wrapper = True  # type: ignore[attr-defined]
        setattr(pl_module, hook, hook_then)

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: bool) -> None:
        """Find the prunable layers and register the ST-3 parametrization on each (idempotent).

        ``final=False`` is an early pass over the layers that exist at the callback's ``setup``: an ``exclude``
        pattern or an empty model is only an error once all layers are built.
        """
        try:
            layers = find_prunable_layers(pl_module, self.include_types, self.exclude)
        except ValueError:
            if final:
                raise
            return
        if not layers and final:
            raise MisconfigurationException(
                f"ST3PruningCallback found no layer to prune in {type(pl_module).__name__}: it prunes the `weight` "
                f"of {list(self.include_types)} modules not matched by `exclude={list(self.exclude)}`. "
                "HINT: check `include_types` and `exclude`, or remove the callback."
            )
        self._check_no_overlap(trainer, layers)
        for name, module in layers.items():
            try:
                register_st3_parametrization(module, self.soft_threshold, self.straight_through, self.rescale)
            except ValueError as err:
                raise MisconfigurationException(f"Layer `{name}`: {err}. HINT: add '{name}' to `exclude`.") from err
        self._layers = layers
        log.debug("ST3PruningCallback prunes %d layers: %s", len(layers), list(layers))

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
        fractions = [name for name in ("start", "end", "freeze_at") if isinstance(getattr(self, name), float)]
        if fractions and unbounded:
            raise MisconfigurationException(
                f"ST3PruningCallback got {', '.join(f'`{n}={getattr(self, n)}`' for n in fractions)} as a fraction "
                "of the run, but the run has no known length. HINT: set `max_epochs` or `max_steps` on the Trainer "
                "(and give the train dataloader a length), or pass them as ints (optimizer steps)."
            )

    def _resolve_schedule(self, total_steps: float) -> None:
        # Lightning estimates `inf` for endless runs and `max_steps` (-1 when unset) for iterable datasets.
        self._check_run_length_known(not math.isfinite(total_steps) or total_steps < 0)
        self._start_step = resolve_step(self.start, total_steps, "start")
        self._end_step = resolve_step(self.end, total_steps, "end")
        self._freeze_step = None if self.freeze_at is None else resolve_step(self.freeze_at, total_steps, "freeze_at")
        steps = f"(of {total_steps} optimizer steps)"
        if self._start_step > self._end_step:
            raise MisconfigurationException(
                f"ST3PruningCallback's ramp starts after it ends: start={self.start} -> step {self._start_step}, "
                f"end={self.end} -> step {self._end_step} {steps}. HINT: choose `start` <= `end`."
            )
        if self._freeze_step is not None and self._freeze_step < self._end_step:
            raise MisconfigurationException(
                f"ST3PruningCallback would freeze the mask before the ramp ends: freeze_at={self.freeze_at} -> step "
                f"{self._freeze_step}, end={self.end} -> step {self._end_step} {steps}. HINT: choose `freeze_at` >= "
                "`end`."
            )
