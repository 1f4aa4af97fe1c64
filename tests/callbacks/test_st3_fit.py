import copy
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import EvalNet, TinyNet, cubic_reference, quiet_trainer, random_loader, read_metrics
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import SoftThresholdParametrization, ST3PruningCallback, STRPruningCallback, make_permanent
from lightning_stthree.callbacks.base import SparseTrainingCallback


def _effective_sparsity(layers: list[nn.Module]) -> float:
    with torch.no_grad():
        zeros = sum(int((m.weight == 0).sum()) for m in layers)
    return zeros / sum(m.weight.numel() for m in layers)


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_logged_sparsity_follows_the_schedule(tmp_path: Path, criterion: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    cb = ST3PruningCallback(target_sparsity=0.9, start=3, end=15, criterion=criterion)
    quiet_trainer(tmp_path, max_steps=20, callbacks=[cb]).fit(model, random_loader(20))

    metrics = read_metrics(tmp_path)
    assert sorted(metrics) == list(range(20))  # one row per optimizer step (the step at which it was computed)
    for step in (0, 2, 3, 5, 8, 11, 14, 15, 19):
        expected = cubic_reference(step, 0.9, 3, 15)
        assert metrics[step]["st3/target_sparsity"] == pytest.approx(expected, abs=1e-6)
        assert metrics[step]["st3/sparsity"] == pytest.approx(expected, abs=0.005)
    assert metrics[19]["st3/sparsity"] == pytest.approx(0.9, abs=0.005)
    assert metrics[3]["st3/threshold"] == 0.0 < metrics[4]["st3/threshold"]  # s(3) = 0: dense until step 4
    # The per-layer values are logged and average (weighted by size) to the global one.
    conv, fc = model.conv.weight.numel(), model.fc.weight.numel()
    row = metrics[10]
    weighted = (row["st3/layer/conv/sparsity"] * conv + row["st3/layer/fc/sparsity"] * fc) / (conv + fc)
    assert weighted == pytest.approx(row["st3/sparsity"], abs=1e-6)
    # The model handed back after fit has the target sparsity in its effective weights.
    assert _effective_sparsity([model.conv, model.fc]) == pytest.approx(0.9, abs=0.005)


def test_only_linear_and_conv_weights_are_parametrized() -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.5, start=0, end=2)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(model, random_loader(3))
    assert list(cb.layers) == ["conv", "fc"]
    assert parametrize.is_parametrized(model.conv, "weight")
    assert parametrize.is_parametrized(model.fc, "weight")
    assert not parametrize.is_parametrized(model.conv, "bias")
    assert not parametrize.is_parametrized(model.norm)
    with torch.no_grad():
        assert (model.fc.bias != 0).all()
        assert (model.norm.weight != 0).all()


def test_dense_before_start_leaves_weights_unchanged() -> None:
    model = TinyNet()
    raw_before = {}

    class Check(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step < 5:
                for name in ("conv", "fc"):
                    layer = getattr(pl_module, name)
                    raw_before[(trainer.global_step, name)] = bool(
                        torch.equal(layer.weight, layer.parametrizations.weight.original)
                    )

    quiet_trainer(max_steps=8, callbacks=[ST3PruningCallback(0.9, start=5, end=7), Check()]).fit(
        model, random_loader(8)
    )
    assert len(raw_before) == 10
    assert all(raw_before.values())


def test_exclude_and_include_narrow_the_pruned_layers(tmp_path: Path) -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.8, start=0, end=4, exclude=["fc"], log_layer_sparsity=True)
    quiet_trainer(tmp_path, max_steps=6, callbacks=[cb]).fit(model, random_loader(6))
    assert list(cb.layers) == ["conv"]
    assert not parametrize.is_parametrized(model.fc)
    assert _effective_sparsity([model.conv]) == pytest.approx(0.8, abs=0.005)
    assert "st3/layer/fc/sparsity" not in read_metrics(tmp_path)[5]

    model = TinyNet()
    cb = ST3PruningCallback(0.8, start=0, end=4, include_types=["Linear"])
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, random_loader(6))
    assert list(cb.layers) == ["fc"]
    assert not parametrize.is_parametrized(model.conv)


def test_two_callbacks_with_disjoint_layers_keep_their_own_targets() -> None:
    model = TinyNet()
    conv_cb = ST3PruningCallback(0.5, start=0, end=4, include_types=["Conv2d"])
    fc_cb = ST3PruningCallback(0.95, start=0, end=4, include_types=["Linear"])
    assert conv_cb.state_key != fc_cb.state_key
    quiet_trainer(max_steps=6, callbacks=[conv_cb, fc_cb]).fit(model, random_loader(6))
    assert _effective_sparsity([model.conv]) == pytest.approx(0.5, abs=0.005)
    assert _effective_sparsity([model.fc]) == pytest.approx(0.95, abs=0.005)


def test_gradient_accumulation_follows_the_schedule_in_optimizer_steps(tmp_path: Path) -> None:
    # 48 batches, accumulate 4 -> 12 optimizer steps; start/end as fractions of them: steps 3 and 9.
    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0.25, end=0.75)
    trainer = quiet_trainer(tmp_path, max_epochs=1, accumulate_grad_batches=4, callbacks=[cb])
    trainer.fit(model, random_loader(48))
    assert trainer.global_step == 12
    metrics = read_metrics(tmp_path)
    for step in (2, 3, 5, 7, 9, 11):
        assert metrics[step]["st3/target_sparsity"] == pytest.approx(cubic_reference(step, 0.9, 3, 9), abs=1e-6)
        assert metrics[step]["st3/sparsity"] == pytest.approx(cubic_reference(step, 0.9, 3, 9), abs=0.005)
    assert _effective_sparsity([model.conv, model.fc]) == pytest.approx(0.9, abs=0.005)


def test_threshold_recomputed_once_per_optimizer_step_with_accumulation() -> None:
    seen: list[tuple[int, float]] = []

    class Spy(ST3PruningCallback):
        def update_threshold(self, step: int) -> None:
            super().update_threshold(step)
            seen.append((step, self.threshold))

    quiet_trainer(max_steps=5, accumulate_grad_batches=3, callbacks=[Spy(0.9, start=0, end=4)]).fit(
        TinyNet(), random_loader(15)
    )
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4, 5]  # the last one at the end of training


def test_update_every(tmp_path: Path) -> None:
    cb = ST3PruningCallback(0.9, start=0, end=8, update_every=3)
    quiet_trainer(tmp_path, max_steps=10, callbacks=[cb]).fit(TinyNet(), random_loader(10))
    metrics = read_metrics(tmp_path)
    thresholds = [metrics[step]["st3/threshold"] for step in range(10)]
    changed = [step for step in range(1, 10) if thresholds[step] != thresholds[step - 1]]
    assert changed == [3, 6, 9]
    # The target is the schedule at the logged step, the threshold (and so the measured sparsity) the last update's.
    assert metrics[4]["st3/target_sparsity"] == pytest.approx(cubic_reference(4, 0.9, 0, 8), abs=1e-6)
    assert metrics[3]["st3/sparsity"] == pytest.approx(cubic_reference(3, 0.9, 0, 8), abs=0.005)
    assert cb.last_update_step == 10  # brought up to date when training ends


@pytest.mark.parametrize("straight_through", [True, False])
def test_pruned_weights_get_gradient_only_with_straight_through(straight_through: bool) -> None:
    # In a real training step: with straight-through gradients every pruned raw weight receives the loss gradient,
    # so it can grow back; without (GMP), pruned raw weights receive exactly zero gradient.
    seen: list[tuple[int, int]] = []

    class Record(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            weight = pl_module.fc.parametrizations.weight
            pruned = pl_module.fc.weight.detach() == 0
            if trainer.global_step >= 4:
                seen.append((int(pruned.sum()), int((weight.original.grad[pruned] != 0).sum())))

    cb = ST3PruningCallback(0.9, start=0, end=4, straight_through=straight_through)
    quiet_trainer(max_steps=8, callbacks=[cb, Record()]).fit(TinyNet(), random_loader(8))
    assert len(seen) == 4
    for pruned, with_gradient in seen:
        assert pruned > 0.8 * 1440
        if straight_through:  # (a few entries of the loss gradient itself are zero: inputs zeroed by the ReLU)
            assert with_gradient > 0.95 * pruned
        else:
            assert with_gradient == 0


def test_layers_built_in_setup_are_pruned() -> None:
    class SetupNet(TinyNet):
        def setup(self, stage: str) -> None:
            self.extra = nn.Linear(10, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.extra(super().forward(x))

    model = SetupNet()
    cb = ST3PruningCallback(0.9, start=0, end=4)
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, random_loader(6))
    assert list(cb.layers) == ["conv", "fc", "extra"]
    assert parametrize.is_parametrized(model.extra, "weight")
    assert "setup" not in vars(model)  # the callback's wrapper is removed at teardown


def test_validate_only_run_does_not_need_a_training_length() -> None:
    class ValNet(TinyNet):
        def validation_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            self.log("val_loss", self.training_step(batch, batch_idx))

    trainer = quiet_trainer(max_epochs=-1, callbacks=[ST3PruningCallback(start=0.1, end=0.5)])
    (result,) = trainer.validate(ValNet(), random_loader(2), verbose=False)
    assert "val_loss" in result


def test_configure_model_layers_are_pruned_and_resumable(tmp_path: Path) -> None:
    class LazyNet(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            del self.conv, self.fc
            self.conv: nn.Module | None = None

        def configure_model(self) -> None:
            if self.conv is None:
                self.conv = nn.Conv2d(3, 16, 3)
                self.fc = nn.Linear(16 * 6 * 6, 10)

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    cb = ST3PruningCallback(0.9, start=0, end=4)
    quiet_trainer(max_steps=6, callbacks=[cb, checkpoint], enable_checkpointing=True).fit(LazyNet(), random_loader(6))
    assert list(cb.layers) == ["conv", "fc"]

    resumed = LazyNet()
    cb2 = ST3PruningCallback(0.9, start=0, end=4)
    quiet_trainer(max_steps=8, callbacks=[cb2]).fit(resumed, random_loader(8), ckpt_path=tmp_path / "last.ckpt")
    assert cb2.last_update_step == 8
    assert _effective_sparsity([resumed.conv, resumed.fc]) == pytest.approx(0.9, abs=0.005)
    assert "configure_model" not in vars(resumed)  # the callback's wrapper is removed at teardown


def test_fit_twice_with_the_same_callback_does_not_register_twice() -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0, end=4)
    quiet_trainer(max_steps=5, callbacks=[cb]).fit(model, random_loader(5))
    quiet_trainer(max_steps=8, callbacks=[cb]).fit(model, random_loader(8))
    assert len(model.fc.parametrizations.weight) == 1
    assert isinstance(model.fc.parametrizations.weight[0], SoftThresholdParametrization)
    assert cb.last_update_step == 8


def test_measured_sparsity_counts_the_zeros_of_the_effective_weights() -> None:
    seen: list[tuple[float, float]] = []

    class Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
            (cb,) = (c for c in trainer.callbacks if isinstance(c, ST3PruningCallback))
            with torch.no_grad():
                zeros = sum(int((m.weight == 0).sum()) for m in cb.layers.values())
            seen.append((cb.measure_sparsity()[0], zeros / sum(m.weight.numel() for m in cb.layers.values())))

    for soft_threshold in (True, False):
        seen.clear()
        cb = ST3PruningCallback(0.9, start=0, end=4, soft_threshold=soft_threshold)
        quiet_trainer(max_steps=6, callbacks=[cb, Check()]).fit(TinyNet(), random_loader(6))
        assert len(seen) == 6
        for measured, counted in seen:
            assert measured == counted


def test_sparsity_is_measured_on_the_steps_the_loggers_write(tmp_path: Path) -> None:
    """With `log_every_n_steps=3`, Lightning writes steps 2, 5, 8: those are measured (and the run's first step, for
    the plots), each with the zeros of that step's effective weights; the threshold still moves every step."""
    thresholds: list[float] = []

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
            thresholds.append(cb.threshold)

    cb = ST3PruningCallback(0.9, start=0, end=6, report=False)
    model = TinyNet()
    quiet_trainer(tmp_path, max_steps=10, log_every_n_steps=3, callbacks=[cb, Spy()]).fit(model, random_loader(10))

    assert [h["step"] for h in cb.history] == [0, 2, 5, 8]
    metrics = read_metrics(tmp_path)
    assert [step for step, row in sorted(metrics.items()) if "st3/sparsity" in row] == [2, 5, 8]
    for row in cb.history[1:]:
        assert metrics[row["step"]]["st3/sparsity"] == pytest.approx(row["sparsity"], abs=1e-7)
        assert metrics[row["step"]]["st3/target_sparsity"] == pytest.approx(cubic_reference(row["step"], 0.9, 0, 6))
    assert len(set(thresholds[:7])) == 7  # a new threshold at every step of the ramp, measured or not


def test_a_layer_that_loses_every_weight_is_reported_once() -> None:
    """A layer whose weights are all below the global threshold is entirely pruned: its output is a constant."""
    torch.manual_seed(0)
    model = TinyNet(lr=0.0)  # nothing moves: the layer stays empty
    with torch.no_grad():
        model.fc.weight.mul_(1e-6)  # every fc weight is smaller than every conv weight
    fc_share = model.fc.weight.numel() / (model.fc.weight.numel() + model.conv.weight.numel())
    cb = ST3PruningCallback(min(fc_share + 0.01, 0.99), start=0, end=0, report=False, min_density_ratio=0.0)
    with pytest.warns(UserWarning, match=r"at step 0, every weight of \['fc'\] is pruned") as record:
        quiet_trainer(max_steps=4, callbacks=[cb]).fit(model, random_loader(4))
    assert sum("every weight of" in str(w.message) for w in record) == 1
    assert cb.measure_sparsity()[1]["fc"] == 1.0


def test_by_default_the_density_floor_holds_the_layer_the_global_threshold_would_empty(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = TinyNet(lr=0.0)
    with torch.no_grad():
        model.fc.weight.mul_(1e-6)  # the case above: the pure global threshold takes every fc weight first
    sizes = {"conv": model.conv.weight.numel(), "fc": model.fc.weight.numel()}
    target = round(sizes["fc"] / sum(sizes.values()) + 0.01, 2)  # 0.94: without a floor, fc would lose every weight
    cb = ST3PruningCallback(target, start=0, end=0)
    with warnings.catch_warnings(), caplog.at_level("INFO"):
        warnings.filterwarnings("error", message=".*every weight of.*")
        quiet_trainer(tmp_path, max_steps=4, callbacks=[cb]).fit(model, random_loader(4))
    kept_fc = math.ceil(0.05 * (1 - target) * sizes["fc"])  # the default min_density_ratio=0.05 of the density
    total, per_layer = cb.measure_sparsity()
    assert per_layer["fc"] == 1 - kept_fc / sizes["fc"]
    assert round(total * sum(sizes.values())) == round(target * sum(sizes.values()))  # still exactly the target
    assert cb.held_layers == ["fc"]
    assert next(m for m in caplog.messages if "min_density_ratio=0.05 of the model's density" in m).count("'fc'") == 1
    assert sum("min_density_ratio=0.05 of the model's density" in m for m in caplog.messages) == 1  # said once
    assert "Held at the density floor (min_density_ratio=0.05: at least 0.3000% of their" in caplog.text
    assert read_metrics(tmp_path)[3]["st3/held_layers"] == 1.0


def test_a_zero_initialised_layer_is_not_reported_as_emptied() -> None:
    # torchvision's ViT starts its head at zero: all "pruned" at step 0, yet pruning took nothing from it.
    model = TinyNet(lr=0.0)
    with torch.no_grad():
        model.fc.weight.zero_()
    cb = ST3PruningCallback(0.5, start=0, end=2, report=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*every weight of.*")
        quiet_trainer(max_steps=3, callbacks=[cb]).fit(model, random_loader(3))
    assert cb.measure_sparsity()[1]["fc"] == 1.0


class _HeldWeights(Callback):
    """Records, after every evaluation batch, which effective weights the callback's layers hold for reuse."""

    def __init__(self, callback: SparseTrainingCallback) -> None:
        self.callback = callback
        self.loops: list[list[tuple[int, ...]]] = []

    def _start(self, *_: Any) -> None:
        self.loops.append([])

    def _record(self, *_: Any) -> None:
        held = [p._reused for p in self.callback._parametrizations()]
        self.loops[-1].append(tuple(id(h[1]) if h is not None else 0 for h in held))

    on_validation_start = on_test_start = on_predict_start = _start
    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _record


@pytest.mark.parametrize("method", ["st3", "str"])
def test_evaluation_loops_build_each_effective_weight_once_and_let_it_go(method: str) -> None:
    torch.manual_seed(0)
    model = EvalNet()
    callback = (
        ST3PruningCallback(0.6, start=0, end=4, report=False)
        if method == "st3"
        else STRPruningCallback(s_init=-2.0, report=False)
    )
    held = _HeldWeights(callback)
    trainer = quiet_trainer(max_steps=6, val_check_interval=3, limit_val_batches=3, callbacks=[callback, held])
    trainer.fit(model, random_loader(6), random_loader(3, seed=1))
    trainer.test(model, random_loader(3, seed=2))
    predictions = trainer.predict(model, random_loader(3, seed=3))
    # Sanity check (2 batches), validation after steps 3 and 6, test, predict: in each loop, every batch used the
    # same held effective weights, one per layer; each loop built its own (the weights moved in between).
    assert [len(loop) for loop in held.loops] == [2, 3, 3, 3, 3]
    for loop in held.loops:
        assert all(ids == loop[0] for ids in loop)
        assert 0 not in loop[0]
    assert len({loop[0] for loop in held.loops[:3]}) == 3
    # Nothing is held once the loops end, and training builds the effective weights every time again.
    for parametrization in callback._parametrizations():
        assert not parametrization.reuse_outside_autograd
        assert parametrization._reused is None
    # The held effective weights are the current ones: predictions equal those of the model made permanent.
    permanent = make_permanent(copy.deepcopy(model)).eval()
    with torch.no_grad():
        expected = [permanent(x) for x, _ in random_loader(3, seed=3)]
    for got, want in zip(predictions, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_a_failing_evaluation_loop_lets_the_held_weights_go() -> None:
    class FailingNet(EvalNet):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(batch[0])
            raise RuntimeError("boom")

    callback = ST3PruningCallback(0.6, start=0, end=4, report=False)
    model = FailingNet()
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, random_loader(2), random_loader(2))
    for parametrization in callback._parametrizations():
        assert not parametrization.reuse_outside_autograd
        assert parametrization._reused is None


def test_the_end_of_fit_check_of_what_the_ops_receive_can_be_turned_off() -> None:
    forwards = {}
    for check_received in (True, False):
        model = TinyNet()
        calls: list[int] = []
        model.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        cb = ST3PruningCallback(0.5, start=0, end=1, report=False, check_received=check_received)
        quiet_trainer(max_steps=2, callbacks=[cb]).fit(model, random_loader(2))
        forwards[check_received] = len(calls)
    assert forwards[True] == forwards[False] + 1  # the check is one forward pass on the example input
    with pytest.raises(TypeError, match="`check_received` must be True or False, got 'no'"):
        ST3PruningCallback(check_received="no")  # type: ignore[arg-type]
