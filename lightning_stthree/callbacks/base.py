"""What every sparse-training callback of this package shares: attaching parametrizations, measuring, reporting.

:class:`SparseTrainingCallback` finds the prunable layers, registers a parametrization on each at the right moment of
Lightning's hook order (before a checkpoint restore and before DDP wraps the model), undoes that for non-fit stages,
measures sparsity and MACs, logs them, and prints/saves the report and plots when ``fit`` ends. A method
(:class:`~lightning_stthree.ST3PruningCallback`, :class:`~lightning_stthree.STRPruningCallback`) only says which
parametrization to register and what else to do during training.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_stthree.callbacks.layers import check_received_sparsity, choose_layers, tie_holders
from lightning_stthree.callbacks.macs import activation_input_density, measure_fit_macs
from lightning_stthree.core.checks import check_bool, check_shape
from lightning_stthree.core.distributed import follow_parametrization, is_dtensor
from lightning_stthree.core.layers import (
    find_prunable_layers,
    pruned_tensor_name,
    validate_exclude,
    validate_include_types,
)
from lightning_stthree.core.registry import LEGACY_TYPE_NAMES, register_layer_types, type_names
from lightning_stthree.methods.export import make_permanent
from lightning_stthree.methods.measure import emptied_layers, layer_sparsity, macs_summary, raw_or_plain
from lightning_stthree.methods.parametrization import RAW_KEY_PATTERN, raw_weight, remove_sparse_parametrization
from lightning_stthree.methods.st3 import SparseParametrization, find_sparse_parametrization
from lightning_stthree.plots import INSTALL_HINT, save_training_figures
from lightning_stthree.report import format_report, print_rich_report, sparsity_report

log = logging.getLogger(__name__)


class SparseTrainingCallback(Callback):
    """Base of the sparse-training callbacks (see the module docstring); not used on its own.

    Args:
        include_types: Layer types to prune, names of registered types: ``"Linear"``, ``"Conv1d"``, ``"Conv2d"``,
            ``"Conv3d"``, ``"MultiheadAttention"``, HF ``"Conv1D"`` and those of ``layer_types`` (default: all;
            subclasses included unless they override ``forward``; an attention layer's pruned tensor is its packed
            ``in_proj_weight``, its ``out_proj`` is a ``Linear``).
        exclude: ``fnmatch`` glob patterns on module names never to prune, e.g. ``["fc", "layer4.*"]``; a pattern
            that matches no prunable layer is an error.
        layer_types: More prunable types, by import path: ``{"mypkg.layers.MyLinear": {"tensor": "weight",
            "out_dim": 0}}`` (both keys optional; see :mod:`~lightning_stthree.core.registry`). Registered
            process-wide when the callback is built; a path that does not resolve is an error.
        log_layer_sparsity: Also log each layer's measured sparsity.
        make_permanent_at_end: At the end of ``fit``, remove the parametrizations (see
            :func:`~lightning_stthree.make_permanent`) so the model holds plain layers with sparse weights.
        input_shape: Shape of an example input batch (batch dimension first, e.g. ``[1, 3, 224, 224]``) to measure
            each layer's dense MACs with at fit start; by default the LightningModule's ``example_input_array`` is
            used. With neither, MACs are not logged.
        report: Print the per-layer sparsity and MACs table when ``fit`` ends (rank zero only).
        save_plots: When ``fit`` ends, save ``<prefix>_sparsity.png`` and ``<prefix>_layers.png`` in the Trainer's
            log directory, and log them as figures to a TensorBoard logger. Needs matplotlib (the ``plot`` extra).
        check_received: At the end of ``fit``, run the example input once (``example_input_array`` or
            ``input_shape``) and warn about pruned layers whose matrix products or convolutions receive fewer zeros
            than reported (their forward transforms the weight). ``False`` skips that forward pass.
        prune_tied: Prune a tensor other modules hold too (tied weights: a Hugging Face ``lm_head`` and its token
            embedding) for every one of them: the layer is pruned, and the other holders read its effective weight
            (one parameter, one matrix; the embedding lookup gets the same zeros). By default such layers are left
            dense, said once and in the report. Not under FSDP2.
    """

    #: Prefix of the logged metrics, the plots' file names and the report's title.
    log_prefix: ClassVar[str] = "sparse"
    #: The method's name in messages and titles.
    method_name: ClassVar[str] = "Sparse training"
    #: Whether the method works on weights sharded by FSDP2 (DTensors).
    supports_sharding: ClassVar[bool] = True

    def __init__(
        self,
        include_types: list[str] | None = None,
        exclude: list[str] | None = None,
        log_layer_sparsity: bool = True,
        make_permanent_at_end: bool = False,
        input_shape: list[int] | None = None,
        report: bool = True,
        save_plots: bool = False,
        layer_types: dict[str, dict[str, Any]] | None = None,
        check_received: bool = True,
        prune_tied: bool = False,
    ) -> None:
        for name, flag in (
            ("check_received", check_received),
            ("prune_tied", prune_tied),
            ("log_layer_sparsity", log_layer_sparsity),
            ("make_permanent_at_end", make_permanent_at_end),
            ("report", report),
            ("save_plots", save_plots),
        ):
            check_bool(name, flag)
        if save_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError as err:
                raise ImportError(f"`save_plots=True`: {INSTALL_HINT}") from err
        if layer_types is not None:
            register_layer_types(layer_types)  # process-wide, like `register_layer_type`
        self.layer_types = None if layer_types is None else {str(k): dict(v) for k, v in layer_types.items()}
        # None: every registered type, also those registered later (the state key keeps 0.1's names then).
        self._all_types = include_types is None
        self.include_types = type_names() if include_types is None else validate_include_types(include_types)
        self.exclude = validate_exclude([] if exclude is None else exclude)
        self.log_layer_sparsity = log_layer_sparsity
        self.make_permanent_at_end = make_permanent_at_end
        self.input_shape = None if input_shape is None else check_shape("input_shape", input_shape)
        self.report = report
        self.save_plots = save_plots
        self.check_received = check_received
        self.prune_tied = prune_tied
        # One record per logged step of the current run in this process (not checkpointed): the sparsity plot's data.
        self.history: list[dict[str, float]] = []
        # Derived at setup, not saved.
        self._layers: dict[str, nn.Module] = {}
        self._plain_before_stage: list[nn.Module] = []  # see `setup`
        self._layer_macs: dict[str, float] = {}  # dense MACs per sample of every Linear/Conv layer, by name
        self._other_layers: dict[str, nn.Module] = {}  # Linear/Conv layers counted in MACs but not pruned here
        self._last_logged_step = -1
        self._first_step = 0  # the first optimizer step of the current run (measured and logged whatever the step)
        self._warned_empty: set[str] = set()  # layers already reported as entirely pruned in this run
        self._warned_separate_attention: set[str] = set()  # attention layers reported as not pruned
        self._warned_shared: set[str] = set()  # layers with tied tensors reported as left dense
        self._tied: dict[str, list[str]] = {}  # prune_tied: pruned layer -> the other modules reading its weight

    @property
    def _name(self) -> str:
        return type(self).__name__

    @property
    def _state_key_types(self) -> tuple[str, ...]:
        """The ``include_types`` in the checkpoint state key: 0.1's default names when all types are pruned, so
        that checkpoints of 0.1 restore the callback's state."""
        return LEGACY_TYPE_NAMES if self._all_types else self.include_types

    def example_input(self, pl_module: pl.LightningModule) -> Any:
        """The example batch MACs and the end-of-fit check run on: zeros of ``input_shape`` if given, else the
        LightningModule's ``example_input_array`` (``None`` when there is neither)."""
        return pl_module.example_input_array if self.input_shape is None else torch.zeros(self.input_shape)

    @property
    def layers(self) -> dict[str, nn.Module]:
        """The modules this callback prunes, by module name (empty before setup)."""
        return dict(self._layers)

    # ------------------------------------------------------------------ what a method provides

    def _register(self, module: nn.Module) -> SparseParametrization:
        """Register (or update) this method's parametrization on ``module.weight``."""
        raise NotImplementedError

    def _check_fit_setup(self, trainer: pl.Trainer) -> None:
        """Checks of the run's configuration at the start of ``setup("fit")``."""

    def _prepare(self, trainer: pl.Trainer) -> None:
        """Work at the start of ``setup``, every stage, before the parametrizations are registered."""

    @property
    def _macs_required(self) -> bool:
        """Whether a run without measured MACs is an error (instead of only not logging them)."""
        return False

    def _on_optimizer_step_start(self, pl_module: pl.LightningModule, step: int) -> None:
        """Work at the first batch of each optimizer step, before the measurement (e.g. threshold updates)."""

    def _metrics(self, step: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """The method's own values to log at ``step``: model-wide (``<prefix>/<key>``) and per layer."""
        return {}, {}

    # ------------------------------------------------------------------ hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._prepare(trainer)
        if stage == "fit":
            self._check_fit_setup(trainer)
        else:
            # validate/test/predict attach too, so that a sparse `ckpt_path` loads; layers that were plain before
            # (e.g. made permanent) are made plain again in `teardown`, holding the effective weights.
            self._plain_before_stage = [m for m in pl_module.modules() if find_sparse_parametrization(m) is None]
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
        self._reuse_effective_weights(False)

    # Validation, test and predict loops do not change the weights between batches: each layer builds its effective
    # weight once per loop instead of once per batch (`SparseParametrization.reuse_outside_autograd`). Not for sharded
    # weights (FSDP2): the forward pass sees each layer's gathered weight, and holding all of them would undo the
    # sharding's memory savings (and in a test run, reusing them put the ranks' collectives out of step).

    def _start_reusing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reuse_effective_weights(True)

    def _stop_reusing(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reuse_effective_weights(False)

    on_validation_start = on_test_start = on_predict_start = _start_reusing
    on_validation_end = on_test_end = on_predict_end = _stop_reusing

    def _sharded(self) -> bool:
        return any(is_dtensor(raw_or_plain(layer)) for layer in self._layers.values())

    def _reuse_effective_weights(self, reuse: bool) -> None:
        if reuse and self._sharded():
            return
        for parametrization in self._parametrizations():
            if reuse:
                parametrization.reuse_outside_autograd = True
            else:
                parametrization.stop_reusing()

    def _restore_module(self, pl_module: pl.LightningModule) -> None:
        """Remove the hook wrappers of `setup` and make layers that came into a non-fit stage plain again."""
        for hook in ("setup", "configure_model"):
            if getattr(vars(pl_module).get(hook), "_st3_wrapper", False):
                delattr(pl_module, hook)
        for module in self._plain_before_stage:
            if find_sparse_parametrization(module) is not None and is_dtensor(raw_weight(module)):
                continue  # FSDP2 manages the raw weight where it is now: the layer stays parametrized
            remove_sparse_parametrization(module)
        self._plain_before_stage = []

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._measure_macs(pl_module)
        if self._sharded():  # after the strategy's wrapping; see `SparseParametrization.reuse_memory`
            for parametrization in self._parametrizations():
                parametrization.reuse_memory = False

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.history and trainer.global_step <= self.history[-1]["step"]:
            self.history = []  # the callback is reused for a new run that starts over: so is the plots' history
        self._last_logged_step = -1
        self._first_step = trainer.global_step
        self._warned_empty = set()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step == self._last_logged_step:
            return  # a later micro-batch of the same optimizer step (gradient accumulation)
        for parametrization in self._parametrizations():
            parametrization.forget_values()  # the optimizer step changed the raw weights, maybe through `.data`
        self._on_optimizer_step_start(pl_module, step)
        if self._is_measured_step(trainer, step):
            self._log(pl_module, step)
        self._last_logged_step = step

    def _is_measured_step(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether ``step``'s values reach the loggers: Lightning writes step metrics every ``log_every_n_steps``
        optimizer steps (the same rule as its logger connector); the run's first step is measured too (the plots'
        starting point). Measuring on the other steps would cost a pass over every weight (and on a GPU, a sync per
        layer) for values nobody sees."""
        every = trainer.log_every_n_steps
        return step == self._first_step or bool(trainer.fast_dev_run) or (every > 0 and (step + 1) % every == 0)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # `trainer.log_dir` is a collective under DDP: every rank asks, only rank zero reports.
        directory = Path(trainer.log_dir or trainer.default_root_dir) if self.save_plots else None
        if self.check_received:
            check_received_sparsity(self, trainer, pl_module)
        if self.report or self.save_plots:
            # Every rank counts its shards (sharded training), rank zero prints and plots.
            rows = sparsity_report(
                pl_module, layer_macs=self._layer_macs or None, input_density=activation_input_density(trainer)
            )
        if trainer.is_global_zero and (self.report or self.save_plots):
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
        # A distributed checkpoint (ModelParallelStrategy) loads the weights into the sharded model itself and has no
        # "state_dict" here; loading a dense one into the parametrized model fails there on the missing raw keys.
        state = checkpoint.get("state_dict")
        if trainer.state.fn == "fit" and state is not None and not any(RAW_KEY_PATTERN.match(key) for key in state):
            raise MisconfigurationException(
                f"`ckpt_path` points to a checkpoint of a run without {self.method_name}; its optimizer state "
                f"cannot be resumed with {self._name} (the parametrizations change the order of the parameters). "
                "HINT: load "
                "its weights (`model.load_state_dict(torch.load(path)['state_dict'])` or "
                "`Model.load_from_checkpoint(path)`) and call `trainer.fit(model)` without `ckpt_path` to sparsify a "
                "pretrained model."
            )

    # ------------------------------------------------------------------ measuring and logging

    def _parametrizations(self) -> list[SparseParametrization]:
        found = (find_sparse_parametrization(m) for m in self._layers.values())
        return [p for p in found if p is not None]

    def measure_sparsity(self) -> tuple[float, dict[str, float]]:
        """Measured fraction of exactly-zero effective weights: over all pruned layers, and per layer
        (:func:`~lightning_stthree.methods.measure.layer_sparsity`; every rank must call it when sharded)."""
        return layer_sparsity(self._layers)

    def measure_macs(
        self, per_layer_sparsity: dict[str, float] | None = None, input_density: dict[str, float] | None = None
    ) -> dict[str, float]:
        """Dense and sparse MACs per sample over all Linear/Conv layers, and their ratio (empty if not measured).

        Layers this callback does not prune count with their own (usually full) density; ``input_density`` (the
        layers' fraction of non-zero inputs) scales them too (:func:`~lightning_stthree.methods.measure.macs_summary`).
        """
        if not self._layer_macs:
            return {}
        sparsity = self.measure_sparsity()[1] if per_layer_sparsity is None else per_layer_sparsity
        return macs_summary(self._layer_macs, sparsity, self._other_layers, input_density)

    def _log(self, pl_module: pl.LightningModule, step: int) -> None:
        """Log ``<prefix>/sparsity``, the MACs, the method's :meth:`_metrics` and the per-layer values, append to
        :attr:`history`, and warn about layers that became entirely pruned."""
        prefix = self.log_prefix
        extra, layer_extra = self._metrics(step)
        sparsity, per_layer = self.measure_sparsity()
        self._warn_emptied_layers(step, per_layer)
        macs = self.measure_macs(per_layer, activation_input_density(pl_module.trainer))
        pl_module.log(f"{prefix}/sparsity", sparsity, on_step=True, on_epoch=False, prog_bar=True)
        for key, value in extra.items():
            pl_module.log(f"{prefix}/{key}", value, on_step=True, on_epoch=False)
        for key, value in macs.items():
            pl_module.log(f"{prefix}/{key}", value, on_step=True, on_epoch=False, prog_bar=key == "macs_ratio")
        if self.log_layer_sparsity:
            for name, value in per_layer.items():
                pl_module.log(f"{prefix}/layer/{name}/sparsity", value, on_step=True, on_epoch=False)
                for key, other in layer_extra.get(name, {}).items():
                    pl_module.log(f"{prefix}/layer/{name}/{key}", other, on_step=True, on_epoch=False)
        self.history.append({"step": step, **extra, "sparsity": sparsity, **macs})

    def _warn_emptied_layers(self, step: int, per_layer: dict[str, float]) -> None:
        """Warn (once per layer and run) when a layer has no weight left: its output no longer depends on its input,
        which is almost never intended and, with straight-through gradients, usually means training diverged. A layer
        whose raw weights are all zero (e.g. torchvision ViT's zero-initialised head) has lost nothing to pruning and is
        not reported."""
        unwarned = {name: value for name, value in per_layer.items() if name not in self._warned_empty}
        emptied = emptied_layers(self._layers, unwarned)
        if not emptied:
            return
        self._warned_empty.update(emptied)
        rank_zero_warn(
            f"{self._name}: at step {step}, every weight of {emptied} is pruned, so these layers' outputs no longer "
            "depend on their inputs. With straight-through gradients this usually follows exploding gradients in a "
            "nearly empty layer followed by BatchNorm (the raw weights and the threshold then blow up). HINT: clip "
            "gradients (`Trainer(gradient_clip_val=1.0)`), lower the learning rate or the target sparsity, or "
            "leave such layers out with `exclude`."
        )

    def _measure_macs(self, pl_module: pl.LightningModule) -> None:
        """Measure every Linear/Conv layer's dense MACs, from ``input_shape`` or ``example_input_array``."""
        all_layers = find_prunable_layers(pl_module)
        self._other_layers = {n: m for n, m in all_layers.items() if n not in self._layers}
        self._layer_macs = {}  # not the last run's, should the measurement fail
        self._layer_macs = measure_fit_macs(self, pl_module, all_layers)

    def _report_notes(self) -> list[str]:
        """Lines under the report: the tied weights pruned for all their users, and what the method adds (e.g. the
        layers ST-3's density floor held)."""
        return [f"Pruned for all their users (prune_tied=True): {self._tied}"] if self._tied else []

    def _print_report(self, trainer: pl.Trainer, rows: list[dict[str, Any]]) -> None:
        title = f"{self.method_name} sparsity report (MACs per sample)"
        notes = "".join(f"\n{note}" for note in self._report_notes())
        if isinstance(trainer.progress_bar_callback, RichProgressBar):
            print_rich_report(rows, title)
            if notes:
                rank_zero_info(notes.lstrip("\n"))
        else:
            rank_zero_info(f"{title}:\n" + format_report(rows) + notes)

    def _save_plots(self, trainer: pl.Trainer, rows: list[dict[str, Any]], directory: Path) -> None:
        title = f"{self.method_name} sparsity over training"
        for path in save_training_figures(self.history, rows, self.log_prefix, title, directory, trainer):
            rank_zero_info(f"{self._name}: saved {path}")

    # ------------------------------------------------------------------ attaching

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
        """Find the prunable layers and register this method's parametrization on each (idempotent).

        ``final=False`` is an early pass over the layers that exist at the callback's ``setup``: an ``exclude``
        pattern or an empty model is only an error once all layers are built.
        """
        layers = choose_layers(self, trainer, pl_module, final)
        if layers is None:
            return  # not all layers are built yet, or some are not ready: the final pass says why
        for name, module in layers.items():
            try:
                self._register(module)
                follow_parametrization(pl_module, module, pruned_tensor_name(module))
                if self.prune_tied:
                    tie_holders(self, pl_module, name, module)
            except ValueError as err:
                raise MisconfigurationException(f"Layer `{name}`: {err}. HINT: add '{name}' to `exclude`.") from err
        self._layers = layers
        log.debug("%s prunes %d layers: %s", self._name, len(layers), list(layers))
