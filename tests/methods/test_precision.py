"""Mixed and half precision: the threshold counts exactly what the stored weights hold; no dtype error anywhere."""

from typing import Any

import numpy as np
import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_stthree import ST3PruningCallback
from lightning_stthree.core.threshold import layer_score_factor
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.st3 import find_st3_parametrization


class _ForwardDtypes(Callback):
    """Records the dtype of the logits each training step computed (autocast makes them bf16/fp16)."""

    def __init__(self) -> None:
        self.dtypes: set[torch.dtype] = set()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == 0:
            pl_module.fc.register_forward_hook(lambda module, args, out: self.dtypes.add(out.dtype))


def _fit(precision: str, criterion: str, accelerator: str = "cpu") -> tuple[TinyNet, ST3PruningCallback, set]:
    torch.manual_seed(0)
    model = TinyNet()
    callback = ST3PruningCallback(0.9, start=0, end=6, criterion=criterion, report=False)
    dtypes = _ForwardDtypes()
    trainer = quiet_trainer(accelerator=accelerator, max_steps=8, precision=precision, callbacks=[callback, dtypes])
    trainer.fit(model, random_loader(8))
    return model, callback, dtypes.dtypes


def _check_exact(model: TinyNet, callback: ST3PruningCallback, criterion: str) -> None:
    """The zeros of the effective weights are exactly the weights whose float32 score is at most the global threshold
    (numpy reference), and that threshold is the k-th smallest score: fewer than k scores lie below it."""
    layers = [model.conv, model.fc]
    scores, zeros = [], 0
    for layer in layers:
        raw = raw_weight(layer).detach().float().cpu().numpy()
        factor = np.float32(layer_score_factor(raw.shape, criterion))
        layer_threshold = find_st3_parametrization(layer).threshold
        assert layer_threshold.dtype == torch.float32  # not cast with the model
        # The layer prunes |w| <= t / factor, with t / factor rounded to float32.
        expected = np.abs(raw) <= np.float32(callback.threshold / float(factor))
        assert np.array_equal(layer.weight.detach().float().cpu().numpy() == 0, expected)
        zeros += int(expected.sum())
        scores.append((np.abs(raw) * factor).ravel())
    scores_all = np.concatenate(scores)
    k = round(0.9 * scores_all.size)
    threshold = np.float32(callback.threshold)
    assert (scores_all < threshold).sum() < k <= (scores_all <= threshold).sum()
    if criterion == "l1":
        assert zeros == (scores_all <= threshold).sum()


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_bf16_mixed_on_cpu_reaches_the_target(criterion: str) -> None:
    model, callback, dtypes = _fit("bf16-mixed", criterion)
    assert dtypes == {torch.bfloat16}  # the forward really ran under autocast
    assert raw_weight(model.fc).dtype == torch.float32
    assert callback.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
    _check_exact(model, callback, criterion)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_half_precision_weights_are_thresholded_exactly(precision: str, criterion: str) -> None:
    model, callback, dtypes = _fit(precision, criterion)
    half = torch.bfloat16 if precision == "bf16-true" else torch.float16
    assert dtypes == {half}
    assert raw_weight(model.fc).dtype == half
    # Half-precision magnitudes tie often; every weight at the threshold is pruned, so the sparsity can exceed the
    # target by the tied share (exactly what `_check_exact` allows), here well under half a point.
    assert callback.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
    _check_exact(model, callback, criterion)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_cuda(precision: str) -> None:
    model, callback, dtypes = _fit(precision, "l1", accelerator="gpu")
    assert dtypes == {torch.float16 if precision == "16-mixed" else torch.bfloat16}
    assert callback.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
    _check_exact(model, callback, "l1")
