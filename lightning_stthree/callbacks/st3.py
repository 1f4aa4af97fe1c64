"""``ST3PruningCallback``: Lightning wiring of ST-3 (arXiv:2212.01076).

The maths lives in the functional core and the method: the schedule (:class:`~lightning_stthree.core.schedule.
SparsitySchedule`), the threshold from step to step (:class:`~lightning_stthree.core.tracking.ThresholdTracker`) and
the effective weight (:mod:`~lightning_stthree.methods.st3`). What every method shares with Lightning is in
:mod:`~lightning_stthree.callbacks.base`. This module says when each of them runs.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

import lightning_stthree.callbacks.notices as notices
import lightning_stthree.methods.shrinkage as shrinkages
from lightning_stthree.callbacks.base import SparseTrainingCallback
from lightning_stthree.callbacks.macs import macs_per_weight
from lightning_stthree.callbacks.settings import (
    optional_bool_setting,
    schedule_errors_as_misconfiguration,
    schedule_setting,
    tracker_setting,
)
from lightning_stthree.core.checks import check_bool, check_choice, check_int
from lightning_stthree.core.distributed import local_tensor
from lightning_stthree.core.kernels import decide_fused, try_selection_kernel
from lightning_stthree.core.layers import pruned_tensor
from lightning_stthree.core.schedule import DEFAULT_POWER, SparsitySchedule, StepSpec
from lightning_stthree.core.threshold import layer_thresholds
from lightning_stthree.core.tracking import NonFiniteWeightsError, ThresholdTracker
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.st3 import (
    SoftThresholdParametrization,
    find_st3_parametrization,
    fix_masks,
    register_st3_parametrization,
    try_effective_weight_kernel,
    zero_masked_raw_weights,
)

NONFINITE_ACTIONS: tuple[str, ...] = ("raise", "warn")
#: ``min_density_ratio``'s default: a floor that only holds a layer the global threshold would all but empty (one
#: whose density would fall below a twentieth of the model's).
DEFAULT_MIN_DENSITY_RATIO = 0.05


class ST3PruningCallback(SparseTrainingCallback):
    r"""Sparse training with ST-3: soft threshold, straight-through gradients, one global threshold per step.

    From ``arXiv:2212.01076`` (Vanderschueren & De Vleeschouwer, WACV 2023). At setup, the ``weight`` of every
    prunable layer (``nn.Linear``, ``nn.Conv1d/2d/3d`` by default, first conv and classifier included, and the
    ``in_proj_weight`` of ``nn.MultiheadAttention``) gets a
    :class:`~lightning_stthree.methods.st3.SoftThresholdParametrization`. At the start of every optimizer step
    (every ``update_every`` steps) one global threshold ``t`` is recomputed from all raw weights so that the pruned
    fraction equals the scheduled sparsity

    .. math::

        s(\mathrm{step}) = s_{\mathrm{target}}\left(1 - (1 - p)^{\mathrm{power}}\right),\quad
        p = \mathrm{clamp}\left(\frac{\mathrm{step} - \mathrm{start}}{\mathrm{end} - \mathrm{start}}, 0, 1\right).

    The forward pass uses ``scale * sign(w) * max(|w| - t_layer, 0)`` (or another ``shrinkage`` of kept weights);
    gradients go straight through to the raw weights, so pruned weights can come back. After ``end`` the threshold
    keeps being recomputed at ``target_sparsity``. It is also brought up to date before each validation during fit,
    at the end of each training epoch and at the end of training, so what is evaluated, checkpointed and handed back
    has the scheduled sparsity.

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
        soft_threshold: The older name of ``shrinkage``: ``True`` is ``"soft"``, ``False`` is ``"hard"``.
        straight_through: Gradients reach all raw weights, pruned ones included (ST-3); ``False`` lets them through
            kept weights only.
        rescale: Per-output-channel rescale that restores the magnitude removed by pruning (ST-3).
        update_every: Recompute the threshold every this many optimizer steps (``>= 1``).
        include_types: Layer types to prune: names of registered types (``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
            ``"Conv3d"``, ``"MultiheadAttention"``, HF ``"Conv1D"``, and those of ``layer_types``); default: all.
            Subclasses are included unless they override ``forward`` (refused at setup: they may transform the
            weight). An attention layer's pruned tensor is its packed ``in_proj_weight``, its ``out_proj`` a ``Linear``.
        exclude: ``fnmatch`` glob patterns on module names never to prune, e.g. ``["fc", "layer4.*"]``; a pattern
            that matches no prunable layer is an error.
        layer_types: More prunable types by import path, ``{"mypkg.layers.MyLinear": {"tensor": "weight",
            "out_dim": 0}}`` (both keys optional), registered process-wide (see
            :mod:`~lightning_stthree.core.registry`). Tied weights (a parameter other modules hold too) are left dense.
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
        on_nonfinite: What a threshold update does when a prunable raw weight holds NaN or Inf (training has
            diverged, and a threshold over such weights means nothing): ``"raise"`` (default) a
            ``FloatingPointError`` that names the layers and the step; ``"warn"`` keep the last threshold and skip
            the update for as long as it lasts (warned once per run). The selection checks as it reads the weights:
            free with ``compile_kernels`` (its counting kernel sums as it counts), one sum per layer per update
            otherwise.
        compile_kernels: Fuse the two passes ST-3 makes over every weight per step (the effective weight in the
            forward pass, the count around the last threshold in the selection) into one ``torch.compile``d kernel
            each (:mod:`~lightning_stthree.core.kernels`): several times less time per pass. ``None`` (default): where
            they build (a C++ compiler on a CPU, Triton on a GPU; tried once per process at setup, a few seconds, then
            cached on disk by Inductor), else the eager kernels with one log line saying why. ``True`` requires them
            (an error at setup), ``False`` never uses them. The threshold is bitwise the same either way; the
            effective weights are the same up to float rounding. Applies to the straight-through gradient
            (``straight_through=True``, ST-3's); :attr:`kernels_fused` says what the run uses. Either way effective
            weights go into memory reused from step to step (:mod:`~lightning_stthree.methods.memory`).
        min_density_ratio: A floor on every layer's density, relative to the model's, applied inside the exact
            selection (:func:`~lightning_stthree.core.threshold.floored_global_threshold`): at scheduled sparsity
            ``s``, a layer the global threshold would take below ``min_density_ratio * (1 - s)`` of its weights keeps
            its largest ``ceil(min_density_ratio * (1 - s) * n)``, and the global threshold is taken over the other
            layers so that the total sparsity is still exactly the schedule's. The default, 0.05, only acts on a layer
            left 20 times sparser than the model (a head initialised at zero or with a tiny std, which a global
            magnitude threshold takes first); ``0`` is the paper's pure global threshold, ``1`` the same sparsity in
            every layer. Relative, so that it means the same at 80% as at 99.8%. Held layers are logged
            (``st3/held_layers``, and one line naming them when the set grows) and listed under the report.
        check_received: At the end of ``fit``, run the example input once (``example_input_array`` or
            ``input_shape``) and warn about pruned layers whose matrix products or convolutions receive fewer zeros
            than their weights hold (a layer type whose forward transforms the weight;
            :func:`~lightning_stthree.sparsity_report` ``check_received=True`` gives the figures). ``False`` skips
            that forward pass.
        prune_tied: Prune a tied tensor (an ``lm_head`` tied to the embedding) for all its users (see *Models*).
        shrinkage: What a kept weight becomes (:mod:`~lightning_stthree.methods.shrinkage`): ``"soft"`` (ST-3,
            default) ``sign(w)(|w| - t)``, ``"hard"`` ``w``, ``"firm"`` linear from 0 at ``t`` to ``w`` at
            ``firm_ratio * t``, ``"half"`` the l1/2 threshold. The pruned set is the same for all; the rescale suits
            the soft threshold (with ``"hard"`` / ``"half"`` try ``rescale=False``: README, *Shrinkage functions*).
        firm_ratio: ``mu / t`` of ``shrinkage="firm"``, ``> 1`` (default 2).

    Raises:
        ValueError: If an argument is out of range (e.g. ``target_sparsity=1.5``, ``start > end``).
        TypeError: If an argument has the wrong type.

    Example::

        from lightning.pytorch import Trainer
        from lightning_stthree import ST3PruningCallback

        trainer = Trainer(max_epochs=10, callbacks=[ST3PruningCallback(target_sparsity=0.9, start=0.05, end=0.5)])
        trainer.fit(model)
    """

    log_prefix = "st3"
    method_name = "ST-3"

    def __init__(
        self,
        target_sparsity: float = 0.9,
        start: StepSpec = 0.05,
        end: StepSpec = 0.5,
        power: float = DEFAULT_POWER,
        criterion: Literal["l1", "l1_std"] = "l1",
        soft_threshold: bool | None = None,
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
        on_nonfinite: Literal["raise", "warn"] = "raise",
        compile_kernels: bool | None = None,
        layer_types: dict[str, dict[str, Any]] | None = None,
        min_density_ratio: float = DEFAULT_MIN_DENSITY_RATIO,
        check_received: bool = True,
        prune_tied: bool = False,
        shrinkage: shrinkages.Shrinkage | None = None,
        firm_ratio: float = shrinkages.DEFAULT_FIRM_RATIO,
    ) -> None:
        self.schedule = SparsitySchedule(target_sparsity, start, end, power, freeze_at)
        self.tracker = ThresholdTracker(criterion, budget, False, min_density_ratio)  # fused or not: decided in setup
        self.compile_kernels = compile_kernels
        super().__init__(
            include_types=include_types,
            exclude=exclude,
            layer_types=layer_types,
            check_received=check_received,
            prune_tied=prune_tied,
            log_layer_sparsity=log_layer_sparsity,
            make_permanent_at_end=make_permanent_at_end,
            input_shape=input_shape,
            report=report,
            save_plots=save_plots,
        )
        self.shrinkage = shrinkages.resolve_shrinkage(shrinkage, soft_threshold)
        self.firm_ratio = shrinkages.check_firm_ratio(firm_ratio)
        self.straight_through = check_bool("straight_through", straight_through)
        self.rescale = check_bool("rescale", rescale)
        self.update_every = check_int("update_every", update_every, minimum=1, unit="optimizer steps")
        self.on_nonfinite = check_choice("on_nonfinite", on_nonfinite, NONFINITE_ACTIONS)
        # Run state beyond the tracker's (which checkpoints save): derived when training starts, not saved.
        self._checkpoint_frozen = False  # the restored checkpoint was taken inside the fine-tune phase
        self._warned_nonfinite = False  # in this run (`on_nonfinite="warn"`)
        # The raw weights' in-place version counters at the last update: another callback may replace the weights
        # without an optimizer step (StochasticWeightAveraging copies its averaged weights in).
        self._versions: list[int] = []
        self._announced_held: set[str] = set()  # layers said to be held at the density floor, in this run

    # ------------------------------------------------------------------ the settings and the state, by their names

    # The settings live in the schedule and the tracker, the run state in the tracker: the callback shows them under
    # their argument names, and assigning one goes through the same checks as the constructor.
    target_sparsity = schedule_setting("target_sparsity", "The schedule's final sparsity.")
    start = schedule_setting("start", "Where the ramp starts (int step or float fraction of the run).")
    end = schedule_setting("end", "Where the ramp reaches the target (int step or float fraction).")
    power = schedule_setting("power", "The ramp's exponent.")
    freeze_at = schedule_setting("freeze_at", "Where the fine-tune phase starts (int or float), or None.")
    criterion = tracker_setting("criterion", "``'l1'`` (ST-3) or ``'l1_std'`` (ST-3 sigma).")
    budget = tracker_setting("budget", "``'params'`` or ``'flops'``.")
    compile_kernels = optional_bool_setting("compile_kernels", "Fused kernels: on, off, or ``None`` where they build.")
    kernels_fused = tracker_setting("compile_kernels", "Whether this run's effective weights and selection are fused.")
    min_density_ratio = tracker_setting("min_density_ratio", "Each layer's density floor, relative to the model's.")
    threshold = tracker_setting("threshold", "The global threshold of the last update, in score units.")
    sparsity = tracker_setting("sparsity", "The scheduled sparsity at the last threshold update.")
    last_update_step = tracker_setting("step", "The optimizer step of the last threshold update (-1 before any).")
    soft_threshold = shrinkages.soft_threshold_alias()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            target_sparsity=self.target_sparsity,
            criterion=self.criterion,
            include_types=self._state_key_types,
            exclude=self.exclude,
        )

    @property
    def frozen(self) -> bool:
        """Whether the fine-tune phase (fixed mask) has started."""
        return any(p.frozen for p in self._parametrizations())

    @override
    def _register(self, module: nn.Module) -> SoftThresholdParametrization:
        return register_st3_parametrization(
            module, None, self.straight_through, self.rescale, self.kernels_fused, self.shrinkage, self.firm_ratio
        )

    @override
    def _check_fit_setup(self, trainer: pl.Trainer) -> None:
        with self._as_misconfiguration():
            self.schedule.check_run_length_known(trainer.max_steps == -1 and trainer.max_epochs in (-1, None))

    @override
    def _prepare(self, trainer: pl.Trainer) -> None:
        # Every stage: a checkpoint restored for validate/test holds the effective weights the fit's kernels built.
        trials = (try_selection_kernel, try_effective_weight_kernel)
        fused, note = decide_fused(self.compile_kernels, trainer.strategy.root_device, trials)
        self.tracker.compile_kernels = fused
        if note:
            rank_zero_info(f"ST3PruningCallback: {note}")

    @property
    @override
    def _macs_required(self) -> bool:
        return self.budget == "flops"

    # ------------------------------------------------------------------ hooks

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._warned_nonfinite = False
        self._announced_held = set()
        # The thresholds in place (zero, or restored from a checkpoint) go with the weights as they are now.
        self._versions = self._raw_versions()
        with self._as_misconfiguration():
            self.schedule.resolve(trainer.estimated_stepping_batches)
        if trainer.global_step < self.tracker.step:
            self.tracker.step = -1  # the callback is reused for a new run that starts over
        if self._checkpoint_frozen and not self.frozen:
            self._fix_masks()  # resumed inside the fine-tune phase: the checkpoint's pruned weights are zeros

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # E.g. StochasticWeightAveraging's BatchNorm epoch: averaged weights copied in, batches without optimizer steps.
        self._update_if_weights_replaced(trainer.global_step)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def _on_optimizer_step_start(self, pl_module: pl.LightningModule, step: int) -> None:
        if self.schedule.is_fine_tune(step) and not self.frozen:
            self._freeze(step)
        elif step % self.update_every == 0:
            self._bring_threshold_up_to_date(step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The forward pass applies the fixed mask anyway; zeroing the raw weights keeps checkpoints exact (and the
        # mask recoverable from them) whatever the optimizer did to pruned entries.
        zero_masked_raw_weights(self._layers.values())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bring_threshold_up_to_date(trainer.global_step)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._bring_threshold_up_to_date(trainer.global_step)
        super().on_validation_start(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The last optimizer step moved the weights: recompute so the final model has the scheduled sparsity.
        self._bring_threshold_up_to_date(trainer.global_step)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Callbacks listed after this one may replace the weights in their `on_train_end` (StochasticWeightAveraging
        # copies the averaged weights in): recompute for the weights `fit` hands back, then report.
        self._update_if_weights_replaced(trainer.global_step)
        super().on_fit_end(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**self.tracker.state_dict(), "frozen": self.frozen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict)
        self._checkpoint_frozen = bool(state_dict["frozen"])

    # ------------------------------------------------------------------ helpers

    def scheduled_sparsity(self, step: int) -> float:
        """The sparsity the schedule asks for at optimizer ``step`` (available from ``on_train_start`` on)."""
        return self.schedule.sparsity_at(step)

    @torch.no_grad()
    def update_threshold(self, step: int) -> None:
        """Recompute the global threshold for optimizer ``step`` and write each layer's share into its buffer."""
        sparsity = self.schedule.sparsity_at(step)
        weights = [raw_weight(m) for m in self._layers.values()]
        shares = None
        if self.budget == "flops":
            shares = macs_per_weight(self._layer_macs, self._layers, weights, self._tied)
        try:
            threshold = self.tracker.update(weights, sparsity, step, shares)
        except NonFiniteWeightsError as error:  # raise, or warn once and keep the last threshold (`on_nonfinite`)
            notices.handle_nonfinite_weights(self, step, list(self._layers), weights, error.counts)
            return
        per_layer = layer_thresholds(threshold, [w.shape for w in weights], self.criterion, self.tracker.held)
        for module, layer_threshold in zip(self._layers.values(), per_layer, strict=True):
            find_st3_parametrization(module).threshold.copy_(layer_threshold)
        self._versions = self._raw_versions()
        self._announce_held(step)

    @property
    def held_layers(self) -> list[str]:
        """The layers the last threshold update held at the floor (``min_density_ratio``; they keep their largest
        weights)."""
        names = list(self._layers)
        return [names[i] for i in sorted(self.tracker.held)]

    def _announce_held(self, step: int) -> None:
        """Say once per run which layers the floor holds, as the set grows."""
        new = [name for name in self.held_layers if name not in self._announced_held]
        if new:
            self._announced_held.update(new)
            rank_zero_info(notices.newly_held(step, self.sparsity, new, self.min_density_ratio))

    @override
    def _report_notes(self) -> list[str]:
        return super()._report_notes() + notices.held_note(self.held_layers, self.sparsity, self.min_density_ratio)

    def _update_if_weights_replaced(self, step: int) -> None:
        """Recompute at ``step`` if it was this step's threshold and the raw weights changed in place since (without an
        optimizer step: those advance the step and are handled by the step schedule)."""
        if (
            step == self.last_update_step
            and not self.frozen
            and self.schedule.resolved
            and self._raw_versions() != self._versions
        ):
            self.update_threshold(step)

    def _raw_versions(self) -> list[int]:
        """The in-place version counters of the raw weights (of this rank's shards, when sharded)."""
        return [local_tensor(raw_weight(m))._version for m in self._layers.values()]

    def _bring_threshold_up_to_date(self, step: int) -> None:
        if not self.frozen and self.schedule.resolved and step != self.last_update_step:
            self.update_threshold(step)

    @torch.no_grad()
    def _freeze(self, step: int) -> None:
        """Start the fine-tune phase: last threshold update, effective weights baked into the raw ones, mask fixed."""
        if step != self.last_update_step:
            self.update_threshold(step)
        for module in self._layers.values():
            raw_weight(module).copy_(pruned_tensor(module))
        self._fix_masks()
        rank_zero_info(
            f"ST3PruningCallback: mask frozen at step {step} (fine-tune phase), sparsity {self.sparsity:.4f}"
        )

    def _fix_masks(self) -> None:
        """Fine-tune mode: keep the weights whose raw value is non-zero now, under a fixed mask."""
        fix_masks(self._layers.values())

    @override
    def _metrics(self, step: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        held = float(len(self.tracker.held))
        return {"target_sparsity": self.scheduled_sparsity(step), "threshold": self.threshold, "held_layers": held}, {}

    _as_misconfiguration = staticmethod(schedule_errors_as_misconfiguration)
