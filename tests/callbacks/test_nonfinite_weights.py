"""A NaN or Inf in a prunable weight stops the threshold update with an error naming the layer and the step."""

from typing import Any

import numpy as np
import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_stthree import NonFiniteScoresError, ST3PruningCallback, global_threshold, weighted_global_threshold
from lightning_stthree.core import selection, tracking
from lightning_stthree.core.selection import nonfinite_counts
from lightning_stthree.methods.parametrization import raw_weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nonfinite_counts_match_numpy(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(50, 7, generator=generator).to(dtype) for _ in range(4)]
    weights[1][3, 2] = float("nan")
    weights[1][0, 0] = float("-inf")
    weights[3].view(-1)[::9] = float("inf")
    # +Inf and -Inf in one tensor sum to NaN; large finite values whose sum overflows are not reported.
    weights[2][0, :2] = torch.tensor([float("inf"), float("-inf")])
    weights.append(torch.full((10,), torch.finfo(dtype).max, dtype=dtype))
    expected = {}
    for index, weight in enumerate(weights):
        array = weight.double().numpy()
        nans, infs = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        if nans or infs:
            expected[index] = (nans, infs)
    assert expected == {1: (1, 1), 2: (0, 2), 3: (0, 39)}
    assert nonfinite_counts(weights) == expected
    assert nonfinite_counts(weights[:1]) == {}
    assert nonfinite_counts([]) == {}


def _finite_weights() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) * 0.05 for shape in [(64, 3, 7, 7), (128, 64, 3, 3), (10, 512)]]


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("pivot", [None, "previous"])
@pytest.mark.parametrize("sparsity", [0.0, 0.9])
def test_selection_checks_the_weights_are_finite_on_every_path(
    compile_kernels: bool, pivot: str | None, sparsity: float
) -> None:
    weights = _finite_weights()
    previous = global_threshold(weights, 0.9).item() * 1.0005 if pivot else None
    checked = global_threshold(weights, sparsity, "l1", previous, 0.01, compile_kernels, check_finite=True)
    assert checked == global_threshold(weights, sparsity)  # finite: the same threshold
    for bad, value in ((1, float("nan")), (2, float("-inf"))):
        poisoned = [w.clone() for w in weights]
        poisoned[bad].view(-1)[7] = value
        with pytest.raises(NonFiniteScoresError, match=rf"indices \[{bad}\]") as error:
            global_threshold(poisoned, sparsity, "l1", previous, 0.01, compile_kernels, check_finite=True)
        assert error.value.suspects == [bad]
        shares = [3.0, 1.0, 0.5]
        with pytest.raises(NonFiniteScoresError):
            weighted_global_threshold(poisoned, shares, sparsity, "l1_std", previous, 0.01, compile_kernels, True)


def test_fused_selection_checks_finiteness_without_another_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    # Near the previous threshold, the fused kernel's own sums say whether the scores are finite: no sum per tensor.
    weights = _finite_weights()
    previous = global_threshold(weights, 0.9).item() * 1.0005
    calls: list[int] = []
    original = selection._nonfinite_sums
    monkeypatch.setattr(selection, "_nonfinite_sums", lambda parts: calls.append(1) or original(parts))
    global_threshold(weights, 0.9, "l1", previous, 0.01, compile_kernels=True, check_finite=True)
    assert calls == []
    global_threshold(weights, 0.9, "l1", previous, 0.01, compile_kernels=False, check_finite=True)
    assert calls == [1]  # the eager pass sums separately


def test_finite_weights_whose_sums_overflow_still_get_a_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fused kernel sums float32 scores by column: finite scores near float32's maximum overflow it.
    huge = torch.full((16, 8), torch.finfo(torch.float32).max / 2)
    huge[:, ::2] = 1.0
    with pytest.raises(NonFiniteScoresError):
        global_threshold([huge], 0.25, pivot=1.0, compile_kernels=True, check_finite=True)
    assert nonfinite_counts([huge]) == {}  # the exact count clears it
    # The tracker (and so the callback) then selects without the check, as if the sums had been finite.
    original = tracking.floored_global_threshold

    def overflowing(*args: Any, **kwargs: Any) -> Any:
        if args[8]:  # check_finite
            raise NonFiniteScoresError([0])
        return original(*args, **kwargs)

    monkeypatch.setattr(tracking, "floored_global_threshold", overflowing)
    callback = ST3PruningCallback(0.8, start=0, end=8, report=False)
    quiet_trainer(max_steps=10, callbacks=[callback]).fit(TinyNet(), random_loader(10))
    assert callback.last_update_step == 10
    assert callback.sparsity == pytest.approx(0.8)


class _Poison(Callback):
    """Writes NaN and Inf into raw weights of ``fc`` after optimizer step ``at`` (like a diverged update); with
    ``repair``, puts the old values back at the next batch start, after the pruning callback saw them (so that the NaN
    never reaches the forward pass and the other weights)."""

    def __init__(self, at: int, repair: bool = False) -> None:
        self.at, self.repair = at, repair
        self.saved: torch.Tensor | None = None

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                self.saved = raw_weight(pl_module.fc)[:2, 0].clone()
                raw_weight(pl_module.fc)[:2, 0] = torch.tensor([float("nan"), float("inf")])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        if self.repair and self.saved is not None:
            with torch.no_grad():
                raw_weight(pl_module.fc)[:2, 0] = self.saved
            self.saved = None


@pytest.mark.parametrize("compile_kernels", [False, True])
def test_nan_weight_raises_naming_the_layer_and_the_step(compile_kernels: bool) -> None:
    model = TinyNet()
    callback = ST3PruningCallback(0.8, start=0, end=8, report=False, compile_kernels=compile_kernels)
    trainer = quiet_trainer(max_steps=10, callbacks=[callback, _Poison(at=3)])
    message = (
        r"at optimizer step 3, the raw weights of `fc` \(1 NaN and 1 Inf of 5760\) are not finite.*"
        r"gradient_clip_val.*detect_anomaly.*on_nonfinite='warn'"
    )
    with pytest.raises(FloatingPointError, match=message):
        trainer.fit(model, random_loader(10))
    assert callback.last_update_step == 2


def test_warn_keeps_the_last_threshold_until_the_weights_are_finite_again() -> None:
    model = TinyNet()
    callback = ST3PruningCallback(0.8, start=0, end=8, report=False, on_nonfinite="warn")
    trainer = quiet_trainer(max_steps=10, callbacks=[callback, _Poison(at=3, repair=True)])
    with pytest.warns(UserWarning, match=r"at optimizer step 3.*`fc`.*threshold stays at .*warned once per run") as rec:
        trainer.fit(model, random_loader(10))
    assert sum("are not finite" in str(w.message) for w in rec) == 1
    thresholds = {row["step"]: row["threshold"] for row in callback.history}
    assert thresholds[3] == thresholds[2] > 0  # the skipped update kept the step-2 threshold
    assert thresholds[4] > thresholds[3]  # finite again: updates resume on the schedule
    assert callback.last_update_step == 10
    assert callback.sparsity == pytest.approx(0.8)


def test_warn_mode_survives_a_run_that_stays_diverged() -> None:
    callback = ST3PruningCallback(0.8, start=0, end=8, report=False, on_nonfinite="warn")
    trainer = quiet_trainer(max_steps=10, callbacks=[callback, _Poison(at=3)])
    with pytest.warns(UserWarning, match="are not finite") as rec:
        trainer.fit(TinyNet(), random_loader(10))
    assert sum("are not finite" in str(w.message) for w in rec) == 1  # NaN everywhere from step 4 on: warned once
    thresholds = [row["threshold"] for row in callback.history]
    assert len(thresholds) == 10
    assert len(set(thresholds[2:])) == 1
    assert callback.last_update_step == 2
