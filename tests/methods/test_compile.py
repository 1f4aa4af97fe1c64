"""The parametrization is compile-friendly: no graph break, no recompilation when the threshold changes."""

from typing import Any

import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from torch.nn.utils import parametrize

from lightning_stthree import ST3PruningCallback, register_st3_parametrization


@pytest.mark.parametrize("straight_through", [True, False])
def test_compiled_forward_and_backward_match_eager_without_recompiling(straight_through: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    parametrizations = [
        register_st3_parametrization(m, straight_through=straight_through) for m in (model[0], model[3])
    ]
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    # fullgraph=True raises on any graph break; error_on_recompile raises if a new threshold value recompiles.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for threshold in (0.0, 0.05, 0.1, 0.2):
            for p in parametrizations:
                p.threshold.fill_(threshold)
            model.zero_grad()
            compiled(x).square().sum().backward()
            compiled_grads = [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
            expected = model(x)
            expected.square().sum().backward()
            torch.testing.assert_close(compiled(x), expected)
            for got, want in zip(compiled_grads, (p.grad for p in model.parameters()), strict=True):
                torch.testing.assert_close(got, want)


class _LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_tiny_net(compile_backend: str | CompileCounterWithBackend | None) -> tuple[list[float], list[float], TinyNet]:
    """Losses and thresholds of 8 steps of TinyNet under ST-3 (ramp over steps 0..5), optionally compiled."""
    torch.manual_seed(0)
    model = TinyNet()
    recorder = _LossRecorder()
    callback = ST3PruningCallback(target_sparsity=0.8, start=0, end=5, report=False)
    trainer = quiet_trainer(max_steps=8, callbacks=[callback, recorder])
    # Lightning's compile path: `fit` takes the OptimizedModule and compiles the LightningModule's `forward`.
    trainer.fit(model if compile_backend is None else torch.compile(model, backend=compile_backend), random_loader(8))
    return recorder.losses, [row["threshold"] for row in callback.history], model


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_lightning_module_trains_with_one_graph_and_no_graph_break(backend: str) -> None:
    eager_losses, eager_thresholds, _ = _fit_tiny_net(None)
    torch._dynamo.reset()
    counters.clear()
    counted = CompileCounterWithBackend(backend)  # counts the model's graphs, not the callback's fused kernels
    losses, thresholds, model = _fit_tiny_net(counted)
    # The threshold changed at every step of the ramp ...
    assert len(set(thresholds[:6])) == 6
    assert thresholds[0] == 0.0
    # ... yet Dynamo compiled the forward once, with no graph break (the threshold is a tensor, not a Python float).
    assert counted.frame_count == 1
    assert dict(counters["graph_break"]) == {}
    assert counted.op_count > 0
    assert counters["stats"]["calls_captured"] > 0
    torch.testing.assert_close(losses, eager_losses, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(thresholds, eager_thresholds, rtol=1e-5, atol=1e-7)
    assert parametrize.is_parametrized(model.conv, "weight")
