import itertools
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, cubic_reference, quiet_trainer, random_loader, read_metrics
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import SoftThresholdParametrization, ST3PruningCallback


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
    assert metrics[4]["st3/target_sparsity"] == pytest.approx(cubic_reference(3, 0.9, 0, 8), abs=1e-6)
    assert cb.last_update_step == 10  # final recompute when training ends


def test_pruned_weights_can_come_back_with_straight_through() -> None:
    # With straight-through gradients a pruned weight still gets the loss gradient, so after the ramp (fixed target
    # sparsity) some pruned weights grow back above the threshold and the mask keeps changing.
    def mask_changes(straight_through: bool) -> int:
        torch.manual_seed(0)
        model = TinyNet(lr=0.5)
        masks = []

        class Record(Callback):
            def on_train_batch_end(self, trainer, pl_module, *args):  # type: ignore[no-untyped-def]
                if trainer.global_step > 6:
                    masks.append((pl_module.fc.weight != 0).clone())

        cb = ST3PruningCallback(0.9, start=0, end=5, straight_through=straight_through, soft_threshold=False)
        quiet_trainer(max_steps=20, callbacks=[cb, Record()]).fit(model, random_loader(20))
        return sum(int((a & ~b).sum()) for a, b in itertools.pairwise(masks))

    assert mask_changes(straight_through=True) > 0


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


def test_resume_continues_the_run_exactly(tmp_path: Path) -> None:
    # Uninterrupted: 4 epochs of 10 steps, checkpoints after every epoch. Interrupted: resume from epoch 2 (step 20,
    # mid-ramp) and train to the same end. Both must end with the same raw weights and threshold.
    def run(ckpt_path: Path | None, dirpath: Path) -> tuple[TinyNet, ST3PruningCallback]:
        torch.manual_seed(0)
        model = TinyNet()
        cb = ST3PruningCallback(0.9, start=5, end=30)
        checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = quiet_trainer(max_epochs=4, callbacks=[cb, checkpoint], enable_checkpointing=True, deterministic=True)
        trainer.fit(model, random_loader(10), ckpt_path=ckpt_path)
        return model, cb

    full, full_cb = run(None, tmp_path / "full")
    ckpt = tmp_path / "full" / "epoch=1.ckpt"
    state = torch.load(ckpt, weights_only=True)
    (cb_state,) = (v for k, v in state["callbacks"].items() if k.startswith("ST3PruningCallback"))
    assert cb_state["last_update_step"] == 19
    assert 0 < cb_state["sparsity"] < 0.9

    resumed, resumed_cb = run(ckpt, tmp_path / "resumed")
    assert resumed_cb.threshold == pytest.approx(full_cb.threshold, rel=1e-5)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(full.fc.weight, resumed.fc.weight)


def test_fit_twice_with_the_same_callback_does_not_register_twice() -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0, end=4)
    quiet_trainer(max_steps=5, callbacks=[cb]).fit(model, random_loader(5))
    quiet_trainer(max_steps=8, callbacks=[cb]).fit(model, random_loader(8))
    assert len(model.fc.parametrizations.weight) == 1
    assert isinstance(model.fc.parametrizations.weight[0], SoftThresholdParametrization)
    assert cb.last_update_step == 8
