"""``ActivationSparsityCallback``: sparse activations at a scheduled sparsity (Price et al., ICLR 2024,
arXiv:2402.16184), alone or next to ``ST3PruningCallback``."""

from __future__ import annotations

import fnmatch
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from typing_extensions import override

from lightning_stthree.callbacks.base import SparseTrainingCallback
from lightning_stthree.callbacks.settings import schedule_errors_as_misconfiguration
from lightning_stthree.core.checks import check_bool, check_strings
from lightning_stthree.core.flops import example_forward
from lightning_stthree.core.layers import find_prunable_layers
from lightning_stthree.core.schedule import DEFAULT_POWER, SparsitySchedule, StepSpec
from lightning_stthree.core.variance_map import SparseActivationName
from lightning_stthree.methods.activations import SparseActivation

_RELU_OPS = {torch.ops.aten.relu.default, torch.ops.aten.relu_.default}


class _CountReLU(TorchDispatchMode):
    """Counts the ReLU operations a forward pass runs (those not replaced: functional calls, excluded modules)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += func in _RELU_OPS
        return func(*args, **(kwargs or {}))


class ActivationSparsityCallback(pl.Callback):
    r"""Replace activation modules by CReLU or CST whose fraction of exact zeros follows a schedule.

    At setup every module of ``include_types`` (default ``nn.ReLU``) not matched by ``exclude`` is replaced by a
    :class:`~lightning_stthree.methods.activations.SparseActivation`: the clipped shifted ReLU
    ``min(max(x - tau, 0), m)`` (``"crelu"``) or the clipped soft threshold ``sign(x) min(max(|x| - tau, 0), m)``
    (``"cst"``). Each optimizer step sets the scheduled sparsity (the cubic ramp of ``ST3PruningCallback``, from
    ``start`` to ``end``); on each training batch every layer takes the exact shift that zeroes that fraction of its
    pre-activations, and keeps a running estimate of it for evaluation (like BatchNorm's statistics, saved in the
    model's ``state_dict``). The clip ``m`` is ``clip`` times the pre-activations' root mean square, by default the
    one :func:`~lightning_stthree.core.variance_map.prescribed_clip` derives from the edge-of-chaos variance map.

    Activations written as functions (``F.relu`` in a ``forward``) are not modules and cannot be replaced: at fit
    start one forward pass of ``example_input_array`` counts the ReLU operations left and warns with their number.

    Logged once per optimizer step: ``act/sparsity`` (measured exact zeros over all replaced layers' outputs in that
    step's training batches), ``act/target_sparsity`` and, unless ``log_layer_sparsity=False``,
    ``act/layer/<name>/sparsity`` and ``act/layer/<name>/tau``. With a ``ST3PruningCallback`` (any
    ``SparseTrainingCallback``) in the same Trainer, it also counts the zeros in the input of every Linear/Conv layer
    during fit (:attr:`input_density`, one pass over each input), and that callback scales each layer's MACs in
    ``st3/macs_*`` and its report by it (a zero input element skips its share of the work).

    Args:
        target_sparsity: Final fraction of exact zeros in each replaced layer's output, in ``[0, 1)``.
        activation: ``"crelu"`` or ``"cst"``.
        start: Optimizer step (``int``) or fraction of the run (``float``) where the ramp starts; default 0.
        end: Where it reaches ``target_sparsity``; default 0: the target from the first step, as in the paper.
        power: The ramp's exponent.
        clip: ``m`` in units of the pre-activations' root mean square; ``None``: the prescribed clip at
            ``target_sparsity``; ``math.inf``: unclipped (the shifted ReLU / soft threshold).
        include_types: Names of ``torch.nn`` activation classes to replace; default ``["ReLU"]``.
        exclude: ``fnmatch`` patterns on module names to leave unchanged.
        momentum: Weight of each batch in the running shift and scale.
        log_layer_sparsity: Also log each layer's sparsity and shift.
        undo_at_end: At the end of ``fit`` put the original modules back (the trained network then computes with
            them); by default the sparse activations stay, with their running shifts.

    Raises:
        ValueError: If an argument is out of range or names no ``torch.nn`` module class.
        TypeError: If an argument has the wrong type.
    """

    def __init__(
        self,
        target_sparsity: float = 0.8,
        activation: SparseActivationName = "crelu",
        start: StepSpec = 0,
        end: StepSpec = 0,
        power: float = DEFAULT_POWER,
        clip: float | None = None,
        include_types: list[str] | None = None,
        exclude: list[str] | None = None,
        momentum: float = 0.1,
        log_layer_sparsity: bool = True,
        undo_at_end: bool = False,
    ) -> None:
        self.schedule = SparsitySchedule(target_sparsity, start, end, power, None)
        # Checks the module's arguments, and resolves the prescribed clip once for every layer.
        self._layer_clip = SparseActivation(activation, target_sparsity, clip, momentum).clip
        self.activation, self.clip, self.momentum = activation, clip, momentum
        self.include_types = check_strings(
            "include_types", ["ReLU"] if include_types is None else include_types, "torch.nn class names"
        )
        unknown = [n for n in self.include_types if not isinstance(getattr(nn, n, None), type)]
        if unknown:
            raise ValueError(f"`include_types` names no torch.nn module class: {unknown} (e.g. 'ReLU', 'GELU')")
        self.exclude = check_strings("exclude", exclude or [], "fnmatch patterns")
        self.log_layer_sparsity = check_bool("log_layer_sparsity", log_layer_sparsity)
        self.undo_at_end = check_bool("undo_at_end", undo_at_end)
        self.layers: dict[str, SparseActivation] = {}
        self._originals: dict[str, nn.Module] = {}
        #: Each Linear/Conv layer's fraction of non-zero input elements in the last optimizer step's training batches
        #: (``ST3PruningCallback`` scales its ``st3/macs_*`` by it).
        self.input_density: dict[str, float] = {}
        self._input_counts: dict[str, list[Any]] = {}
        self._hooks: list[Any] = []

    @property
    def target_sparsity(self) -> float:
        """The schedule's final sparsity."""
        return self.schedule.target_sparsity

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.replace(pl_module)

    def replace(self, model: nn.Module) -> dict[str, SparseActivation]:
        """Replace the chosen activation modules of ``model`` (idempotent) and return the sparse ones by name."""
        types = tuple(getattr(nn, n) for n in self.include_types)
        for name, module in list(model.named_modules()):
            if name in self.layers or not isinstance(module, types) or isinstance(module, SparseActivation):
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
                continue
            parent_name, _, child = name.rpartition(".")
            sparse = SparseActivation(self.activation, self.target_sparsity, self._layer_clip, self.momentum)
            setattr(model.get_submodule(parent_name), child, sparse)
            self.layers[name], self._originals[name] = sparse, module
        return self.layers

    def undo(self, model: nn.Module) -> None:
        """Put the original activation modules back into ``model``."""
        for name, original in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, original)
        self.layers, self._originals = {}, {}

    def _count_inputs(self, model: nn.Module) -> None:
        """Count the zeros of every Linear/Conv layer's input in training forward passes (one pass over each input)."""
        for name, module in find_prunable_layers(model).items():
            counts = self._input_counts[name] = [torch.zeros((), dtype=torch.long), 0]

            def count(module: nn.Module, args: tuple[Any, ...], counts: list[Any] = counts) -> None:
                if module.training and args and isinstance(args[0], torch.Tensor):
                    counts[0] = counts[0].to(args[0].device) + (args[0] == 0).sum()
                    counts[1] += args[0].numel()

            self._hooks.append(module.register_forward_pre_hook(count))

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._input_counts = [], {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if any(isinstance(c, SparseTrainingCallback) for c in trainer.callbacks):  # their MACs read the counts
            self._count_inputs(pl_module)
        if not self.layers:
            rank_zero_warn(f"ActivationSparsityCallback: no {list(self.include_types)} module to replace was found")
        example = getattr(pl_module, "example_input_array", None)
        if example is None:
            return
        counter, calls = _CountReLU(), dict.fromkeys(self.layers, 0)
        hooks = [
            layer.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
            for name, layer in self.layers.items()
        ]
        try:
            example_forward(pl_module, example, counter)
        finally:
            for hook in hooks:
                hook.remove()
        shared = {name: n for name, n in calls.items() if n > 1}
        if shared:
            rank_zero_warn(
                f"ActivationSparsityCallback: these replaced modules run more than once per forward pass {shared} "
                "(one module shared by several activations, like torchvision's `BasicBlock.relu`): in training each "
                "call takes its own exact shift, but evaluation uses one running shift for all its calls, so their "
                "held-out sparsity can differ from the target. HINT: give every activation its own module."
            )
        if counter.count:
            rank_zero_warn(
                f"ActivationSparsityCallback: the forward pass still runs {counter.count} ReLU operation(s) that are "
                "not modules it replaced (`F.relu` / `torch.relu` calls, or excluded layers): their outputs are not "
                "made sparse. HINT: use `nn.ReLU` modules where the activations should be sparse."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        with schedule_errors_as_misconfiguration():
            self.schedule.resolve(trainer.estimated_stepping_batches)
        for layer in self.layers.values():
            layer.take_measured()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        sparsity = self.schedule.sparsity_at(trainer.global_step)
        for layer in self.layers.values():
            layer.sparsity = sparsity

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        zeros = elements = 0
        metrics: dict[str, float] = {}
        for name, layer in self.layers.items():
            layer_zeros, layer_elements = layer.take_measured()
            zeros, elements = zeros + layer_zeros, elements + layer_elements
            if self.log_layer_sparsity and layer_elements:
                metrics[f"act/layer/{name}/sparsity"] = layer_zeros / layer_elements
                metrics[f"act/layer/{name}/tau"] = float(layer.tau)
        if elements:
            metrics["act/sparsity"] = zeros / elements
        for name, counts in self._input_counts.items():
            if counts[1]:
                self.input_density[name] = 1.0 - int(counts[0]) / counts[1]
            counts[0], counts[1] = torch.zeros((), dtype=torch.long), 0
        metrics["act/target_sparsity"] = self.schedule.sparsity_at(trainer.global_step)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.undo_at_end:
            self.undo(pl_module)
