"""The callback next to Lightning's own callbacks and tuner, and reused for a second `fit`."""

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import EvalNet, TinyNet, cubic_reference, quiet_trainer, random_loader, read_metrics
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    EarlyStopping,
    LearningRateFinder,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
    WeightAveraging,
)
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.optim.swa_utils import get_ema_multi_avg_fn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree import ST3PruningCallback, effective_weight, global_threshold, load_sparse_weights
from lightning_stthree.core.threshold import num_pruned
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.st3 import find_st3_parametrization


def _pruned_count(callback: ST3PruningCallback) -> tuple[int, int]:
    """Exactly-zero effective weights and all weights of the pruned layers."""
    with torch.no_grad():
        tensors = [m.weight for m in callback.layers.values()]
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


class MLP(TinyNet):
    """No BatchNorm: StochasticWeightAveraging copies its average in at `on_train_end`, after this package's hook."""

    def __init__(self) -> None:
        super().__init__()
        del self.conv, self.norm
        self.fc = nn.Linear(3 * 8 * 8, 10)
        self.hidden = nn.Linear(3 * 8 * 8, 3 * 8 * 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.hidden(x.flatten(1))))


class _ThresholdsMatchWeights(Callback):
    """At every batch (after the pruning callback's hook), the thresholds in use are those of the current weights."""

    def __init__(self, callback: ST3PruningCallback) -> None:
        self.callback = callback
        self.checked = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        layers = list(self.callback.layers.values())
        expected = global_threshold([raw_weight(m) for m in layers], self.callback.sparsity)
        assert find_st3_parametrization(layers[0]).threshold == expected
        self.checked += 1


@pytest.mark.parametrize("network", [TinyNet, MLP])
def test_stochastic_weight_averaging_hands_back_averaged_weights_at_the_target(network: type) -> None:
    torch.manual_seed(0)
    model = network()
    callback = ST3PruningCallback(0.9, start=0, end=8, report=False)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    checker = _ThresholdsMatchWeights(callback)
    # ST-3 first, so that SWA's copy of the model (taken in its `setup`) is parametrized too. With BatchNorm, SWA adds
    # an epoch that copies the average in and recomputes the BatchNorm statistics: with the average's thresholds.
    quiet_trainer(max_epochs=4, callbacks=[callback, swa, checker]).fit(model, random_loader(4))
    assert checker.checked == 4 * 4 + (4 if network is TinyNet else 0)
    if network is MLP:  # (with BatchNorm, SWA's extra BatchNorm epoch ends with an optimizer step after the copy)
        for name, layer in callback.layers.items():
            assert torch.equal(raw_weight(layer), raw_weight(swa._average_model.get_submodule(name)))
    # ... and the threshold was recomputed for it: exactly the target's number of weights is pruned.
    zeros, total = _pruned_count(callback)
    assert zeros == num_pruned(0.9, total)


def test_early_stopping_leaves_the_model_at_the_schedule_of_the_step_it_stopped() -> None:
    model = EvalNet()
    callback = ST3PruningCallback(0.9, start=0, end=40, report=False)
    stop = EarlyStopping(monitor="val_loss", patience=0, min_delta=100.0)  # no epoch improves enough: stop at once
    trainer = quiet_trainer(max_epochs=10, callbacks=[callback, stop])
    trainer.fit(model, random_loader(4), random_loader(2))
    assert trainer.global_step == 8  # two epochs of 4 steps: EarlyStopping stopped a 40-step run
    assert callback.last_update_step == 8
    zeros, total = _pruned_count(callback)
    assert zeros == num_pruned(cubic_reference(8, 0.9, 0, 40), total)


def test_weights_only_checkpoints_hold_consistent_sparse_weights(tmp_path: Path) -> None:
    model = EvalNet()
    callback = ST3PruningCallback(0.8, start=0, end=6, report=False)
    checkpoints = ModelCheckpoint(tmp_path, save_weights_only=True, save_last=True)
    trainer = quiet_trainer(max_epochs=2, callbacks=[callback, checkpoints], enable_checkpointing=True)
    trainer.fit(model, random_loader(4), random_loader(2))
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert "optimizer_states" not in checkpoint
    state = checkpoint["state_dict"]
    for name in ("conv", "fc"):
        raw = state[f"{name}.parametrizations.weight.original"]
        threshold = state[f"{name}.parametrizations.weight.0.threshold"]
        torch.testing.assert_close(state[f"{name}.weight"], effective_weight(raw, threshold), rtol=1e-6, atol=1e-7)
        assert torch.equal(state[f"{name}.weight"] == 0, raw.abs() <= threshold)
    # A plain model takes the effective weights and computes what the trained model computes.
    plain = load_sparse_weights(EvalNet(), tmp_path / "last.ckpt").eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x))
    assert float((plain.fc.weight == 0).float().mean()) > 0.5
    # `validate` with the callback loads the weights-only checkpoint into a fresh model.
    fresh = EvalNet()
    metrics = quiet_trainer(callbacks=[ST3PruningCallback(0.8)]).validate(
        fresh, random_loader(2), ckpt_path=tmp_path / "last.ckpt"
    )
    expected = quiet_trainer().validate(model, random_loader(2))
    assert metrics[0]["val_loss"] == pytest.approx(expected[0]["val_loss"], rel=1e-6)


def test_learning_rate_monitor_logs_next_to_the_sparsity(tmp_path: Path) -> None:
    model = TinyNet()
    callbacks = [ST3PruningCallback(0.5, start=0, end=4, report=False), LearningRateMonitor(logging_interval="step")]
    quiet_trainer(tmp_path, max_steps=5, callbacks=callbacks).fit(model, random_loader(5))
    metrics = read_metrics(tmp_path)
    for step in range(5):
        assert metrics[step]["lr-SGD"] == pytest.approx(0.1)
        assert "st3/sparsity" in metrics[step]


class _TunableNet(TinyNet):
    """TinyNet with its own data and a `batch_size` attribute, as Lightning's tuners need."""

    def __init__(self, lr: float = 0.05, batch_size: int = 4) -> None:
        super().__init__(lr=lr)
        self.batch_size = batch_size
        generator = torch.Generator().manual_seed(0)
        self.data = TensorDataset(torch.randn(64, 3, 8, 8, generator=generator), torch.randint(0, 10, (64,)))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size)


def _fit_tunable(model: _TunableNet, *extra: object, tune: str | None = None) -> tuple[list[float], _TunableNet]:
    torch.manual_seed(0)
    callback = ST3PruningCallback(0.8, start=0, end=10, report=False)
    trainer = quiet_trainer(max_steps=16, callbacks=[callback, *extra])
    if tune == "lr":
        Tuner(trainer).lr_find(model, num_training=20, update_attr=False)
    elif tune == "batch_size":
        Tuner(trainer).scale_batch_size(model, max_trials=3, steps_per_trial=2)
    trainer.fit(model)
    return [row["threshold"] for row in callback.history], model


@pytest.mark.parametrize(
    ("tune", "finder"),
    [
        ("lr", None),
        ("batch_size", None),
        (None, lambda: BatchSizeFinder(max_trials=3, steps_per_trial=2)),
        (None, lambda: LearningRateFinder(num_training_steps=20)),
    ],
)
def test_tuning_before_fit_leaves_a_fresh_schedule(tune: str | None, finder: object) -> None:
    """The tuners train for a few steps (with the callback) and then restore the model: the real run must be exactly
    the run that the tuned settings give without tuning."""
    torch.manual_seed(0)
    tuned_thresholds, tuned = _fit_tunable(_TunableNet(), *([finder()] if finder else []), tune=tune)
    assert (tuned.batch_size, tuned.lr) != (4, 0.05) or tune == "lr"  # the tuner did change something (lr_find: no)
    torch.manual_seed(0)
    thresholds, plain = _fit_tunable(_TunableNet(lr=tuned.lr, batch_size=tuned.batch_size))
    assert tuned_thresholds[0] == 0.0
    assert tuned_thresholds == thresholds
    assert torch.equal(raw_weight(tuned.fc), raw_weight(plain.fc))


def test_a_second_fit_with_the_same_callback_restarts_the_schedule() -> None:
    model = TinyNet()
    callback = ST3PruningCallback(0.8, start=2, end=6, report=False)
    quiet_trainer(max_steps=8, callbacks=[callback]).fit(model, random_loader(8))
    first = copy.deepcopy(callback.history)
    parametrization = find_st3_parametrization(model.fc)
    # A new Trainer starts at step 0: the schedule restarts (dense until `start`), on the weights the first fit left.
    quiet_trainer(max_steps=8, callbacks=[callback]).fit(model, random_loader(8))
    assert find_st3_parametrization(model.fc) is parametrization  # not registered twice
    assert len(model.fc.parametrizations.weight) == 1
    assert [row["step"] for row in callback.history] == [row["step"] for row in first] == list(range(8))
    assert [row["target_sparsity"] for row in callback.history] == [row["target_sparsity"] for row in first]
    assert callback.history[0]["threshold"] == 0.0  # dense again at step 0
    assert callback.measure_sparsity()[0] == pytest.approx(0.8, abs=0.002)


class _HeldWeightsAreCurrent(Callback):
    """After every validation batch: the effective weights held for reuse are those of the current raw weights."""

    def __init__(self, callback: ST3PruningCallback) -> None:
        self.callback = callback
        self.checked = 0

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *_: Any) -> None:
        for layer in self.callback.layers.values():
            parametrization = find_st3_parametrization(layer)
            assert parametrization._reused is not None
            assert torch.equal(parametrization._reused[1], parametrization.effective(raw_weight(layer)))
            self.checked += 1


def test_weight_averaging_validates_with_the_averaged_effective_weights() -> None:
    # Lightning's WeightAveraging (EMA here) swaps the averaged values in through `.data`, which version counters do
    # not see, at the start of each validation epoch, and back at its end: the effective weights reused across the
    # validation batches are built after the swap, from the averaged values.
    torch.manual_seed(0)
    callback = ST3PruningCallback(0.6, start=0, end=4, report=False)
    averaging = WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))
    checker = _HeldWeightsAreCurrent(callback)
    trainer = quiet_trainer(
        max_steps=6, val_check_interval=3, limit_val_batches=3, callbacks=[callback, averaging, checker]
    )
    trainer.fit(EvalNet(), random_loader(6), random_loader(3, seed=1))
    assert checker.checked == (2 + 3 + 3) * 2  # sanity check and two validations, two layers
