"""Checkpoints, resume, the fine-tune phase and the sparse model the user takes home (issue 3)."""

import copy
import io
import pickle
from pathlib import Path
from typing import ClassVar

import lightning.pytorch as pl
import pytest
import torch
from helpers import EvalNet, ImageClassifier, TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import ST3PruningCallback, load_sparse_weights, make_permanent, sparse_state_dict

# 5 epochs of 8 optimizer steps; ramp from step 10 to 20, fine-tune phase (frozen mask) from step 28.
SCHEDULE = {"target_sparsity": 0.9, "start": 10, "end": 20, "freeze_at": 28, "update_every": 3}
STEPS_PER_EPOCH, EPOCHS = 8, 5


def _train(dirpath: Path, ckpt_path: Path | None = None, **trainer_kwargs) -> tuple[TinyNet, ST3PruningCallback]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TinyNet()
    cb = ST3PruningCallback(**SCHEDULE)
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = quiet_trainer(
        max_epochs=EPOCHS, callbacks=[cb, checkpoint], enable_checkpointing=True, deterministic=True, **trainer_kwargs
    )
    trainer.fit(model, random_loader(STEPS_PER_EPOCH), ckpt_path=ckpt_path)
    return model, cb


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[TinyNet, ST3PruningCallback, Path]:
    dirpath = tmp_path_factory.mktemp("uninterrupted")
    model, cb = _train(dirpath)
    return model, cb, dirpath


@pytest.mark.parametrize(
    ("epoch", "phase"),
    [(0, "before the ramp"), (1, "during the ramp"), (2, "after the ramp"), (3, "fine-tune phase")],
)
def test_resume_ends_equal_to_the_uninterrupted_run(
    uninterrupted: tuple[TinyNet, ST3PruningCallback, Path], tmp_path: Path, epoch: int, phase: str
) -> None:
    full, full_cb, dirpath = uninterrupted
    ckpt = dirpath / f"epoch={epoch}.ckpt"
    step = (epoch + 1) * STEPS_PER_EPOCH  # 8, 16, 24, 32
    state = torch.load(ckpt, weights_only=True)  # plain data only: loads without unpickling code
    (cb_state,) = (v for k, v in state["callbacks"].items() if k.startswith("ST3PruningCallback"))
    assert cb_state["last_update_step"] == (28 if phase == "fine-tune phase" else step)
    held = cb_state.pop("held")  # the layers held at the density floor: {index: own threshold}
    assert all(type(i) is int and type(t) is float for i, t in held.items())
    assert all(type(v) in (int, float, bool) for v in cb_state.values())
    fc_threshold = state["state_dict"]["fc.parametrizations.weight.0.threshold"]
    if phase == "before the ramp":
        assert fc_threshold == 0
    elif phase == "fine-tune phase":
        assert fc_threshold == 0  # baked: raw weights hold zeros, the parametrization only masks
        assert (state["state_dict"]["fc.parametrizations.weight.original"] == 0).float().mean() > 0.85
    else:
        assert fc_threshold > 0

    resumed, resumed_cb = _train(tmp_path, ckpt_path=ckpt)
    assert resumed_cb.threshold == full_cb.threshold
    assert resumed_cb.frozen
    assert full_cb.frozen
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


def test_resume_restores_threshold_and_callback_state(
    uninterrupted: tuple[TinyNet, ST3PruningCallback, Path], tmp_path: Path
) -> None:
    # Mid-ramp checkpoint at step 16, which is not an update step (update_every=3): the resumed run must use the
    # threshold stored in the checkpoint, not recompute one. A tampered threshold makes that visible.
    _, _, dirpath = uninterrupted
    saved = torch.load(dirpath / "epoch=1.ckpt", weights_only=True)
    tampered = 1.5 * saved["state_dict"]["fc.parametrizations.weight.0.threshold"]
    saved["state_dict"]["fc.parametrizations.weight.0.threshold"] = tampered
    torch.save(saved, tmp_path / "tampered.ckpt")
    seen = {}

    class Spy(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            (cb,) = (c for c in trainer.callbacks if isinstance(c, ST3PruningCallback))
            seen[trainer.global_step] = (cb.state_dict(), pl_module.fc.parametrizations.weight[0].threshold.clone())

    torch.manual_seed(0)
    trainer = quiet_trainer(max_steps=19, callbacks=[ST3PruningCallback(**SCHEDULE), Spy()])
    trainer.fit(TinyNet(), random_loader(STEPS_PER_EPOCH), ckpt_path=tmp_path / "tampered.ckpt")
    (cb_state,) = (v for k, v in saved["callbacks"].items() if k.startswith("ST3PruningCallback"))
    assert seen[16][0] == cb_state
    assert seen[16][1] == tampered  # the first resumed step uses the checkpoint's threshold
    assert seen[18][1] != tampered  # later ones are recomputed from the weights


def test_resume_from_a_checkpoint_taken_at_the_freeze_step(tmp_path: Path) -> None:
    # The epoch=1 checkpoint is written at step 16 = freeze_at, before the freeze happened at the next batch start.
    global SCHEDULE
    schedule = SCHEDULE
    SCHEDULE = {**schedule, "end": 16, "freeze_at": 16}
    try:
        full, _ = _train(tmp_path / "full")
        state = torch.load(tmp_path / "full" / "epoch=1.ckpt", weights_only=True)
        (cb_state,) = (v for k, v in state["callbacks"].items() if k.startswith("ST3PruningCallback"))
        assert cb_state["frozen"] is False
        resumed, resumed_cb = _train(tmp_path / "resumed", ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    finally:
        SCHEDULE = schedule
    assert resumed_cb.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_two_callbacks_keep_separate_state(tmp_path: Path) -> None:
    conv_cb = ST3PruningCallback(0.5, start=0, end=4, include_types=["Conv2d"])
    fc_cb = ST3PruningCallback(0.95, start=0, end=8, include_types=["Linear"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(max_steps=6, callbacks=[conv_cb, fc_cb, checkpoint], enable_checkpointing=True)
    trainer.fit(TinyNet(), random_loader(6))
    states = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    assert states[conv_cb.state_key]["sparsity"] == 0.5
    assert 0 < states[fc_cb.state_key]["sparsity"] < 0.95  # still ramping at step 6 of 8
    assert states[conv_cb.state_key]["threshold"] != states[fc_cb.state_key]["threshold"]

    restored = [
        ST3PruningCallback(0.5, start=0, end=4, include_types=["Conv2d"]),
        ST3PruningCallback(0.95, start=0, end=8, include_types=["Linear"]),
    ]
    trainer = quiet_trainer(max_steps=6, callbacks=restored)
    trainer.fit(TinyNet(), random_loader(6), ckpt_path=tmp_path / "last.ckpt")  # already done: restores, no step
    assert restored[0].state_dict() == states[conv_cb.state_key]
    assert restored[1].state_dict() == states[fc_cb.state_key]


def _fit_saving_last(model: nn.Module, dirpath: Path, steps: int = 8, **loader_kwargs) -> pl.Trainer:  # type: ignore[no-untyped-def]
    """Fit ``model`` with ST-3 (90% reached at step ``steps - 2``), saving ``dirpath / "last.ckpt"``."""
    checkpoint = ModelCheckpoint(dirpath=dirpath, save_last=True)
    pruning = ST3PruningCallback(0.9, start=0, end=steps - 2)
    trainer = quiet_trainer(max_steps=steps, callbacks=[pruning, checkpoint], enable_checkpointing=True)
    trainer.fit(model, random_loader(steps, **loader_kwargs))
    return trainer


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def test_plain_pytorch_loads_the_effective_weights(tmp_path: Path) -> None:
    model = TinyNet()
    _fit_saving_last(model, tmp_path)
    x = torch.randn(16, 3, 8, 8)
    expected = _outputs(model, x)

    # Plain PyTorch: the effective weights are stored under the original names; drop the parametrization entries.
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    plain = TinyNet()
    plain.load_state_dict({k: v for k, v in state.items() if ".parametrizations." not in k})
    assert not parametrize.is_parametrized(plain.fc)
    assert (plain.fc.weight == 0).float().mean() > 0.85
    assert torch.equal(_outputs(plain, x), expected)

    # With this package, one call; and Lightning's own loader with strict=False.
    assert torch.equal(_outputs(load_sparse_weights(TinyNet(), tmp_path / "last.ckpt"), x), expected)
    lightning_loaded = TinyNet.load_from_checkpoint(tmp_path / "last.ckpt", strict=False)
    assert torch.equal(_outputs(lightning_loaded, x), expected)


@pytest.mark.slow
def test_sparse_weights_of_a_wrapped_torchvision_model(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    model = ImageClassifier(torchvision.models.resnet18(num_classes=10))
    _fit_saving_last(model, tmp_path, steps=4, batch_size=4, shape=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    net = load_sparse_weights(torchvision.models.resnet18(num_classes=10), tmp_path / "last.ckpt", prefix="model.")
    assert torch.equal(_outputs(net, x), _outputs(model, x))
    state = sparse_state_dict(tmp_path / "last.ckpt", prefix="model.")
    assert set(state) == set(torchvision.models.resnet18(num_classes=10).state_dict())


def test_sparse_state_dict_rejects_raw_weights_without_effective_ones() -> None:
    with pytest.raises(KeyError, match=r"raw ST-3 weight 'fc.parametrizations.weight.original' but not .*'fc.weight'"):
        sparse_state_dict({"fc.parametrizations.weight.original": torch.zeros(2, 2)})


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_zeros_stay_zero_with_momentum_and_weight_decay(optimizer: str) -> None:
    class StrongDecay(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            if optimizer == "adamw":
                return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.05)
            return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=0.05)

    log: list[dict] = []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            raw = pl_module.fc.parametrizations.weight.original.detach()
            log.append({"step": trainer.global_step, "mask": pl_module.fc.weight.detach() != 0, "raw": raw.clone()})

    class Spy(ST3PruningCallback):
        updates: ClassVar[list[int]] = []

        def update_threshold(self, step: int) -> None:
            super().update_threshold(step)
            self.updates.append(step)

    cb = Spy(0.9, start=0, end=10, freeze_at=15)
    quiet_trainer(max_steps=60, callbacks=[cb, Watch()]).fit(StrongDecay(), random_loader(60))
    assert max(cb.updates) == 15  # no threshold update in the fine-tune phase
    frozen = [entry for entry in log if entry["step"] >= 15]
    assert len(frozen) == 45
    mask = frozen[0]["mask"]
    assert 1 - mask.float().mean() > 0.85
    assert cb.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)  # over conv and fc
    for entry in frozen:
        assert torch.equal(entry["mask"], mask)  # same mask for 45 steps of SGD with momentum and weight decay
        assert (entry["raw"][~mask] == 0).all()  # pruned raw weights are exactly zero, not only masked
    assert not torch.equal(frozen[0]["raw"], frozen[-1]["raw"])  # kept weights still train
    # Control: without freezing, the same run keeps changing the mask after the ramp.
    control: list[torch.Tensor] = []

    class Masks(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step >= 15:
                control.append(pl_module.fc.weight.detach() != 0)

    quiet_trainer(max_steps=60, callbacks=[ST3PruningCallback(0.9, start=0, end=10), Masks()]).fit(
        StrongDecay(), random_loader(60)
    )
    assert not all(torch.equal(control[0], m) for m in control)


def test_frozen_mask_holds_with_several_optimizer_steps_per_batch() -> None:
    # Manual optimization, two optimizer steps per batch: the second forward of a batch must still see the mask,
    # although the raw weights are only re-zeroed when the batch ends.
    sparsity_seen: list[tuple[int, float]] = []

    class TwoSteps(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            optimizer = self.optimizers()
            for _ in range(2):
                sparsity_seen.append((self.global_step, float((self.fc.weight == 0).float().mean())))
                loss = super().training_step(batch, batch_idx)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()

    # global_step counts both optimizer steps: freeze at step 20 is batch 10.
    cb = ST3PruningCallback(0.9, start=0, end=10, freeze_at=20)
    quiet_trainer(max_steps=40, callbacks=[cb]).fit(TwoSteps(), random_loader(20))
    frozen = [value for step, value in sparsity_seen if step >= 20]
    assert len(frozen) == 20
    assert min(frozen) == max(frozen) > 0.85


def test_freeze_at_as_a_fraction(tmp_path: Path) -> None:
    cb = ST3PruningCallback(0.8, start=0.0, end=0.5, freeze_at=0.75)
    quiet_trainer(max_epochs=1, callbacks=[cb]).fit(TinyNet(), random_loader(20))
    assert cb.frozen
    assert cb.last_update_step == 15
    assert cb.measure_sparsity()[0] == pytest.approx(0.8, abs=0.005)


def test_freeze_before_end_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`freeze_at` must be >= `end` .*got freeze_at=10 and end=20"):
        ST3PruningCallback(start=0, end=20, freeze_at=10)
    with pytest.raises(TypeError, match=r"`freeze_at` must be an int \(optimizer steps\) or a float"):
        ST3PruningCallback(freeze_at="late")  # type: ignore[arg-type]
    trainer = quiet_trainer(max_steps=40, callbacks=[ST3PruningCallback(start=0, end=30, freeze_at=0.5)])
    with pytest.raises(Exception, match=r"freeze the mask before the ramp ends: freeze_at=0.5 -> step 20, end=30"):
        trainer.fit(TinyNet(), random_loader(40))


def test_make_permanent_gives_plain_layers_with_the_same_outputs() -> None:
    model = EvalNet()
    quiet_trainer(max_steps=8, callbacks=[ST3PruningCallback(0.9, start=0, end=6)]).fit(model, random_loader(8))
    x = torch.randn(16, 3, 8, 8)
    expected = _outputs(model, x)
    keys_before = {k for k in model.state_dict() if ".parametrizations." not in k}

    assert make_permanent(model) is model
    assert type(model.conv) is nn.Conv2d
    assert type(model.fc) is nn.Linear
    assert set(model.state_dict()) == keys_before == set(EvalNet().state_dict())
    assert torch.equal(_outputs(model, x), expected)
    assert (model.fc.weight == 0).float().mean() > 0.85
    assert not model.fc._state_dict_hooks
    assert not model.fc._load_state_dict_pre_hooks

    copied = copy.deepcopy(model)
    assert torch.equal(_outputs(copied, x), expected)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    assert torch.equal(_outputs(unpickled, x), expected)
    assert torch.equal(_outputs(pickle.loads(pickle.dumps(model.fc)), x.new_ones(1, 576)), model.fc(x.new_ones(1, 576)))


def test_make_permanent_on_a_deep_copy_leaves_the_original_parametrized() -> None:
    # torch's deepcopy shares the generated ParametrizedLinear class between the copies; removing the parametrization
    # from one must not delete the `weight` property the other one still uses.
    model = EvalNet()
    quiet_trainer(max_steps=4, callbacks=[ST3PruningCallback(0.9, start=0, end=3)]).fit(model, random_loader(4))
    x = torch.randn(4, 3, 8, 8)
    expected = _outputs(model, x)
    permanent = make_permanent(copy.deepcopy(model))
    assert type(permanent.fc) is nn.Linear
    assert parametrize.is_parametrized(model.fc, "weight")
    assert torch.equal(_outputs(model, x), expected)
    assert torch.equal(_outputs(permanent, x), expected)
    make_permanent(model)  # and the other way round
    assert torch.equal(_outputs(model, x), expected)


def test_make_permanent_at_end_and_test_accuracy_unchanged() -> None:
    def fit(make_permanent_at_end: bool) -> tuple[EvalNet, dict]:  # type: ignore[type-arg]
        torch.manual_seed(0)
        model = EvalNet()
        cb = ST3PruningCallback(0.9, start=0, end=6, make_permanent_at_end=make_permanent_at_end)
        trainer = quiet_trainer(max_steps=8, callbacks=[cb], deterministic=True)
        trainer.fit(model, random_loader(8))
        (result,) = trainer.test(model, random_loader(4, seed=1), verbose=False)
        return model, result

    permanent, permanent_result = fit(True)
    parametrized, parametrized_result = fit(False)
    assert type(permanent.fc) is nn.Linear  # testing with the callback in the Trainer leaves the model plain
    assert parametrize.is_parametrized(parametrized.fc)
    assert (permanent.fc.weight == 0).float().mean() > 0.85
    assert permanent_result == parametrized_result


def test_failed_stage_leaves_a_plain_model_plain() -> None:
    class Broken(EvalNet):
        def test_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            raise RuntimeError("boom")

    model = Broken()
    with pytest.raises(RuntimeError, match="boom"):
        quiet_trainer(callbacks=[ST3PruningCallback()]).test(model, random_loader(2), verbose=False)
    assert type(model.fc) is nn.Linear
    assert "setup" not in vars(model)


def test_plain_checkpoint_can_be_tested_with_the_callback_in_the_trainer(tmp_path: Path) -> None:
    model = EvalNet()
    trainer = quiet_trainer(callbacks=[ST3PruningCallback(0.9, start=0, end=4, make_permanent_at_end=True)])
    quiet_trainer(max_steps=6, callbacks=[ST3PruningCallback(0.9, start=0, end=4, make_permanent_at_end=True)]).fit(
        model, random_loader(6)
    )
    torch.save({"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0"}, tmp_path / "plain.ckpt")
    (expected,) = quiet_trainer().test(model, random_loader(4, seed=1), verbose=False)
    (result,) = trainer.test(EvalNet(), random_loader(4, seed=1), ckpt_path=tmp_path / "plain.ckpt", verbose=False)
    assert result == expected


def test_validate_test_predict_use_the_sparse_weights_after_fit_and_after_restore(tmp_path: Path) -> None:
    model = EvalNet()
    trainer = _fit_saving_last(model, tmp_path)
    data = random_loader(4, seed=1)
    # Reference: a plain model holding only the effective (sparse) weights.
    plain = load_sparse_weights(EvalNet(), tmp_path / "last.ckpt")
    (expected,) = quiet_trainer().test(plain, data, verbose=False)
    # The raw weights would give another result: the test below can tell sparse from raw.
    state = model.state_dict()
    raw_state = {key: value for key, value in state.items() if ".parametrizations." not in key}
    for layer in ("conv", "fc"):
        raw_state[f"{layer}.weight"] = state[f"{layer}.parametrizations.weight.original"]
    dense_twin = EvalNet()
    dense_twin.load_state_dict(raw_state)
    (dense,) = quiet_trainer().test(dense_twin, data, verbose=False)
    assert dense["test_loss"] != pytest.approx(expected["test_loss"], rel=1e-3)

    (after_fit,) = trainer.test(model, data, verbose=False)
    (validated,) = trainer.validate(model, data, verbose=False)
    assert after_fit["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)
    assert validated["val_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)
    predictions = torch.cat(trainer.predict(model, data))
    torch.testing.assert_close(predictions, torch.cat(quiet_trainer().predict(plain, data)))

    # Restored from the checkpoint into a fresh model, with the callback in the Trainer.
    restorer = quiet_trainer(callbacks=[ST3PruningCallback(0.9, start=0, end=6)])
    fresh = EvalNet()
    (restored,) = restorer.test(fresh, data, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert restored["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)
    # A plain model that came in plain leaves plain, holding the checkpoint's effective weights.
    assert type(fresh.fc) is nn.Linear
    assert torch.equal(fresh.fc.weight, plain.fc.weight)
    # ... and without it (plain model, Lightning's non-strict loading).
    fresh = EvalNet()
    fresh.strict_loading = False
    (plain_restored,) = quiet_trainer().test(fresh, data, ckpt_path=tmp_path / "last.ckpt", verbose=False)
    assert plain_restored["test_loss"] == pytest.approx(expected["test_loss"], rel=1e-6)


def test_sparsify_a_pretrained_dense_model(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    dense = TinyNet()
    quiet_trainer(max_steps=4, callbacks=[checkpoint], enable_checkpointing=True).fit(dense, random_loader(4))

    # Resuming a dense run's optimizer state is refused with a hint ...
    trainer = quiet_trainer(max_steps=10, callbacks=[ST3PruningCallback(0.9, start=4, end=8)])
    with pytest.raises(Exception, match=r"checkpoint of a run without ST-3.*HINT: load its weights"):
        trainer.fit(TinyNet(), random_loader(10), ckpt_path=tmp_path / "last.ckpt")
    # ... and the hinted way works: load the dense weights, then fit.
    model = TinyNet.load_from_checkpoint(tmp_path / "last.ckpt")
    cb = ST3PruningCallback(0.9, start=2, end=6)
    quiet_trainer(max_steps=8, callbacks=[cb]).fit(model, random_loader(8))
    assert cb.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)


def test_dense_state_dict_loads_into_a_parametrized_model() -> None:
    dense = TinyNet()
    model = TinyNet()
    quiet_trainer(max_steps=3, callbacks=[ST3PruningCallback(0.9, start=0, end=2)]).fit(model, random_loader(3))
    model.load_state_dict(dense.state_dict())  # plain `weight` keys become the raw weights, threshold 0
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(_outputs(model, x), _outputs(dense, x))


def test_deepcopy_during_training_with_stochastic_weight_averaging() -> None:
    copies: list[nn.Module] = []

    class CopyEachEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            copies.append(copy.deepcopy(pl_module))

    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0, end=8)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    quiet_trainer(max_epochs=4, callbacks=[cb, swa, CopyEachEpoch()]).fit(model, random_loader(4))
    assert cb.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)  # on the averaged weights
    x = torch.randn(4, 3, 8, 8)
    copied = copies[-1]
    assert parametrize.is_parametrized(copied.fc, "weight")
    assert copied.fc.parametrizations.weight.original is not model.fc.parametrizations.weight.original
    assert torch.isfinite(_outputs(copied, x)).all()
