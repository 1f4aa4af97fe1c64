"""``STRPruningCallback``: Lightning wiring of STR (Kusupati et al., ICML 2020, arXiv:2002.03231), to compare.

The maths lives in :mod:`~lightning_stthree.methods.str`; what STR shares with ST-3 (layer selection, checkpoints,
logging, MACs, report, plots) is in :mod:`~lightning_stthree.callbacks.base`.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_stthree.callbacks.base import SparseTrainingCallback
from lightning_stthree.methods.parametrization import find_sparse_parametrization
from lightning_stthree.methods.str import STRParametrization, register_str_parametrization


class STRPruningCallback(SparseTrainingCallback):
    r"""Sparse training with STR, a learnable threshold per layer (Kusupati et al., ICML 2020, arXiv:2002.03231).

    The method ST-3 was built against, on the same machinery as :class:`ST3PruningCallback` (layer selection,
    checkpoints, logging, MACs, report, plots, :func:`~lightning_stthree.make_permanent`). At setup, the ``weight`` of
    every prunable layer gets a :class:`~lightning_stthree.methods.str.STRParametrization`:
    ``w_eff = sign(w) * relu(|w| - sigmoid(s_l))`` with one learnable scalar ``s_l`` per layer, initialised to
    ``s_init``. The ``s_l`` are parameters of the model (``<layer>.parametrizations.weight.0.s``), registered before
    ``configure_optimizers``, so an optimizer built from ``self.parameters()`` trains them and applies its weight
    decay to them, as the authors' code does.

    The sparsity is not scheduled: weight decay pulls each ``s_l`` toward 0 (raising the threshold toward 0.5) and the
    task loss pushes it back, so the final sparsity emerges from ``s_init``, the weight decay, the learning rate and
    the run's length. The authors' ImageNet recipes use ``s_init=-3200`` for 100 epochs and choose the weight decay per
    target; for short runs ``s_init`` must be much closer to 0 (the Fashion-MNIST values in ``benchmarks/accuracy.py``
    were found by a sweep there). At fit start the callback checks that every ``s_l`` is in an optimizer (an error
    otherwise) and warns when its parameter group has no weight decay (STR then barely prunes).

    Logged once per optimizer step with ``pl_module.log``: ``str/sparsity`` (measured, on the progress bar),
    ``str/threshold_mean`` (mean of the layers' ``sigmoid(s_l)``), the ``str/macs_*`` when MACs are known and, unless
    ``log_layer_sparsity=False``, ``str/layer/<name>/sparsity`` and ``str/layer/<name>/threshold``.

    Args:
        s_init: Initial value of every layer's ``s`` (the initial threshold on ``|w|`` is ``sigmoid(s_init)``); a
            finite number. No default: the right value depends on the run's length (see above).
        include_types: See :class:`ST3PruningCallback`.
        exclude: See :class:`ST3PruningCallback`.
        layer_types: See :class:`ST3PruningCallback`.
        log_layer_sparsity: Also log each layer's measured sparsity and threshold.
        make_permanent_at_end: See :class:`ST3PruningCallback`.
        input_shape: See :class:`ST3PruningCallback`.
        report: See :class:`ST3PruningCallback`.
        save_plots: Save ``str_sparsity.png`` and ``str_layers.png``; see :class:`ST3PruningCallback`.
        check_received: See :class:`ST3PruningCallback`.
        prune_tied: See :class:`ST3PruningCallback`.

    Raises:
        ValueError: If ``s_init`` is not a finite number, or another argument is out of range.

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[STRPruningCallback(s_init=-3.0)])
        trainer.fit(model)  # model.configure_optimizers uses self.parameters() with weight_decay > 0
    """

    log_prefix = "str"
    method_name = "STR"
    supports_sharding = False

    def __init__(
        self,
        s_init: float,
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
        rule = "a finite number (the initial threshold is sigmoid(s_init))"
        if isinstance(s_init, bool) or not isinstance(s_init, (int, float)):
            raise TypeError(f"`s_init` must be {rule}, got {s_init!r}")
        if not math.isfinite(s_init):
            raise ValueError(f"`s_init` must be {rule}, got {s_init!r}")
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
        self.s_init = float(s_init)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(include_types=self._state_key_types, exclude=self.exclude)

    @override
    def _register(self, module: nn.Module) -> STRParametrization:
        return register_str_parametrization(module, self.s_init)

    def _str_parametrizations(self) -> dict[str, STRParametrization]:
        found = {name: find_sparse_parametrization(m) for name, m in self._layers.items()}
        return {name: p for name, p in found.items() if isinstance(p, STRParametrization)}

    def thresholds(self) -> dict[str, float]:
        """Each pruned layer's current threshold on ``|w|``, ``sigmoid(s_l)``, by module name."""
        return {name: float(p.threshold) for name, p in self._str_parametrizations().items()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._check_optimized(trainer)

    @override
    def _metrics(self, step: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        thresholds = self.thresholds()
        mean = sum(thresholds.values()) / len(thresholds) if thresholds else 0.0
        return {"threshold_mean": mean}, {name: {"threshold": value} for name, value in thresholds.items()}

    def _check_optimized(self, trainer: pl.Trainer) -> None:
        """Every ``s_l`` must be trained by an optimizer; warn where nothing decays it."""
        decay: dict[int, float] = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    decay[id(parameter)] = float(group.get("weight_decay", 0.0))
        s_params = {name: p.s for name, p in self._str_parametrizations().items()}
        missing = [name for name, s in s_params.items() if id(s) not in decay]
        if missing:
            raise MisconfigurationException(
                f"STRPruningCallback: the threshold parameters `s` of {len(missing)} layers (e.g. {missing[:3]}) are "
                "in no optimizer, so STR would never prune them. HINT: build the optimizer in `configure_optimizers` "
                "from `self.parameters()` (the callback adds the parameters named "
                "'<layer>.parametrizations.weight.0.s' before `configure_optimizers` runs)."
            )
        undecayed = [name for name, s in s_params.items() if decay[id(s)] == 0.0]
        if undecayed:
            rank_zero_warn(
                f"STRPruningCallback: the threshold parameters `s` of {len(undecayed)} layers (e.g. {undecayed[:3]}) "
                "are in a parameter group with weight_decay=0; STR's sparsity comes from weight decay on `s`, so "
                "these layers will barely be pruned. HINT: put them in a group with weight_decay > 0."
            )
