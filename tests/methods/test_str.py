"""STR (arXiv:2002.03231): values and gradients against hand computations, and short fits with the callback."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader, read_metrics
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stthree import (
    ST3PruningCallback,
    STRParametrization,
    STRPruningCallback,
    make_permanent,
    sparse_state_dict,
    str_effective_weight,
)
from lightning_stthree.methods.parametrization import raw_weight

W = [[0.5, -0.2, 0.1, -0.05], [-0.3, 0.16, -0.14, 0.0]]
TAU = 0.15
S = math.log(TAU / (1 - TAU))  # sigmoid(S) = 0.15


def test_str_effective_weight_matches_the_formula_by_hand() -> None:
    # sign(w) * relu(|w| - 0.15), worked out by hand.
    expected = torch.tensor([[0.35, -0.05, 0.0, 0.0], [-0.15, 0.01, 0.0, 0.0]])
    out = str_effective_weight(torch.tensor(W), torch.tensor(S))
    torch.testing.assert_close(out, expected)
    assert out[0, 2].item() == 0.0
    assert out[1, 3].item() == 0.0


def test_str_gradients_to_w_and_s_match_hand_computation() -> None:
    weight = torch.tensor(W, requires_grad=True)
    s = torch.tensor(S, requires_grad=True)
    upstream = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 2.0, 1.0]])
    (str_effective_weight(weight, s) * upstream).sum().backward()
    kept = np.abs(np.array(W)) > TAU
    # d w_eff / d w = 1 where kept (the slope of relu), 0 where pruned: no straight-through in STR.
    np.testing.assert_allclose(weight.grad.numpy(), upstream.numpy() * kept)
    # d w_eff / d s = -sign(w) * sigmoid'(s) where kept; sigmoid'(s) = tau * (1 - tau).
    by_hand = -np.sum(np.sign(W) * kept * upstream.numpy()) * TAU * (1 - TAU)
    # kept: w=0.5 (g=1), -0.2 (g=2), -0.3 (g=-1), 0.16 (g=0.5): -(1 - 2 + 1 + 0.5) * 0.1275 = -0.06375
    assert by_hand == pytest.approx(-0.06375)
    assert s.grad.item() == pytest.approx(by_hand, rel=1e-6)


def test_str_parametrization_state_pruned_mask_and_bfloat16() -> None:
    param = STRParametrization(s_init=S)
    assert [name for name, _ in param.named_parameters()] == ["s"]
    assert param.threshold.item() == pytest.approx(TAU)
    weight = torch.tensor(W)
    assert torch.equal(param.pruned(weight), param(weight) == 0)
    half = weight.bfloat16()
    out = param(half)
    assert out.dtype == torch.bfloat16
    assert torch.equal(param.pruned(half), out == 0)


def _fit_str(
    tmp_path: Path, steps: int = 30, s_init: float = -4.0, **kwargs: object
) -> tuple[TinyNet, STRPruningCallback]:
    model = TinyNet(lr=0.5)
    callback = STRPruningCallback(s_init=s_init, **kwargs)
    trainer = quiet_trainer(tmp_path, max_steps=steps, callbacks=[callback])
    trainer.fit(model, random_loader(steps))
    return model, callback


def test_short_str_fit_learns_thresholds_and_logs_the_measured_sparsity(tmp_path: Path) -> None:
    _model, callback = _fit_str(tmp_path)
    # Weight decay (from TinyNet's SGD, 1e-4) and the loss moved every layer's s away from s_init.
    s_values = {n: float(m.parametrizations.weight[0].s) for n, m in callback.layers.items()}
    assert all(value != -4.0 for value in s_values.values())
    thresholds = callback.thresholds()
    assert thresholds == pytest.approx({n: 1 / (1 + math.exp(-v)) for n, v in s_values.items()})
    # The logged sparsity is the fraction of exact zeros of the effective weights, counted independently here.
    zeros = sum(int((m.weight == 0).sum()) for m in callback.layers.values())
    total = sum(m.weight.numel() for m in callback.layers.values())
    measured, _ = callback.measure_sparsity()
    assert measured == zeros / total > 0
    metrics = read_metrics(tmp_path)
    assert {"str/sparsity", "str/threshold_mean", "str/macs_ratio", "str/layer/conv/threshold"} <= set(metrics[0])
    assert metrics[0]["str/threshold_mean"] == pytest.approx(1 / (1 + math.exp(4.0)))


def test_str_state_dict_carries_s_and_the_effective_weight_and_export_works(tmp_path: Path) -> None:
    model, _callback = _fit_str(tmp_path, steps=10)
    state = model.state_dict()
    assert "conv.parametrizations.weight.0.s" in state
    assert torch.equal(state["conv.weight"], model.conv.weight)
    plain = sparse_state_dict({"state_dict": state})
    assert not any(".parametrizations." in key for key in plain)
    fresh = TinyNet()
    fresh.load_state_dict(plain)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x))
    make_permanent(model)
    assert type(model.conv) is nn.Conv2d
    torch.testing.assert_close(model(x), fresh(x))


def test_str_thresholds_outside_the_optimizer_are_an_error(tmp_path: Path) -> None:
    class FrozenThresholds(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            weights = [p for n, p in self.named_parameters() if not n.endswith(".s")]
            return torch.optim.SGD(weights, lr=0.1)

    trainer = quiet_trainer(max_steps=2, callbacks=[STRPruningCallback(s_init=-3.0)])
    with pytest.raises(MisconfigurationException, match=r"threshold parameters `s` of 2 layers .* in no optimizer"):
        trainer.fit(FrozenThresholds(), random_loader(2))


def test_str_without_weight_decay_on_s_warns(tmp_path: Path) -> None:
    class NoDecay(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    trainer = quiet_trainer(max_steps=2, callbacks=[STRPruningCallback(s_init=-3.0)])
    with pytest.warns(UserWarning, match="weight_decay=0; STR's sparsity comes from weight decay"):
        trainer.fit(NoDecay(), random_loader(2))


@pytest.mark.parametrize(
    ("bad", "error"), [(float("nan"), ValueError), (float("inf"), ValueError), ("x", TypeError), (True, TypeError)]
)
def test_str_rejects_a_bad_s_init(bad: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"`s_init` must be a finite number \(the initial threshold is sigmoid\(s_init\)\)"):
        STRPruningCallback(s_init=bad)  # type: ignore[arg-type]


def test_str_and_st3_on_the_same_layer_are_an_error() -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback(0.5), STRPruningCallback(s_init=-3.0)])
    with pytest.raises(MisconfigurationException, match=r"prune the same layers"):
        trainer.fit(TinyNet(), random_loader(1))


def test_str_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    model = TinyNet(lr=0.5)
    trainer = quiet_trainer(
        max_steps=6, callbacks=[STRPruningCallback(s_init=-4.0), checkpoint], enable_checkpointing=True
    )
    trainer.fit(model, random_loader(12))
    saved_s = float(model.conv.parametrizations.weight[0].s)
    resumed = TinyNet(lr=0.5)
    seen: list[float] = []

    class Spy(STRPruningCallback):
        def on_train_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
            super().on_train_start(trainer, pl_module)
            seen.append(float(pl_module.conv.parametrizations.weight[0].s))

    quiet_trainer(max_steps=8, callbacks=[Spy(s_init=-4.0)]).fit(
        resumed, random_loader(12), ckpt_path=tmp_path / "last.ckpt"
    )
    assert seen == [saved_s]


def test_str_thresholds_keep_their_weight_decay_under_image_classifier_grouping() -> None:
    import warnings

    from lightning_stthree.recipes.models import ImageClassifier

    model = ImageClassifier("small_cnn", num_classes=10, in_channels=3, image_size=8, decay_bias_and_norm=False)
    callback = STRPruningCallback(s_init=-3.0, report=False)
    trainer = quiet_trainer(max_steps=2, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*weight_decay=0; STR's sparsity comes from weight decay")
        trainer.fit(model, random_loader(2))
    decay = {id(p): g["weight_decay"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    s_params = [m.parametrizations.weight[0].s for m in callback.layers.values()]
    assert [decay[id(s)] for s in s_params] == [model.hparams.weight_decay] * len(s_params)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias")]
    assert {decay[id(b)] for b in biases} == {0.0}  # the rest of the grouping is unchanged


def test_str_threshold_stays_float32_under_bf16_true_so_small_decay_steps_count() -> None:
    # At the authors' s = -3200, bf16's spacing is 16: a decay step of lr * wd * |s| = 0.1 * 5e-4 * 3200 = 0.16 would
    # round away every time.
    class Decayed(TinyNet):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1, weight_decay=5e-4)

    model = Decayed()
    start = -3199.84  # not a bf16 number: casting the model must not round it (a resume casts after the restore)
    callback = STRPruningCallback(s_init=start, report=False)
    quiet_trainer(max_steps=4, precision="bf16-true", callbacks=[callback]).fit(model, random_loader(4))
    s = model.fc.parametrizations.weight[0].s
    assert s.dtype == torch.float32
    assert raw_weight(model.fc).dtype == torch.bfloat16
    # At s = -3200 sigmoid'(s) is 0 in float32: only the weight decay moves s, as float32 SGD computes it.
    assert s.item() == pytest.approx(start * (1 - 0.1 * 5e-4) ** 4, rel=1e-6)
