"""Effective weights written into memory reused from step to step (issue 26): never overwritten while a graph holds
them, rebuilt only when the raw weight or the threshold changed, and a training run that allocates none per step."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.checkpoint import checkpoint

from lightning_stthree import ST3PruningCallback, effective_weight, register_st3_parametrization
from lightning_stthree.methods.memory import ReusedWeightMemory
from lightning_stthree.methods.shrinkage import SHRINKAGES
from lightning_stthree.methods.st3 import SoftThresholdParametrization, write_effective_weight


def _layers(reuse: bool, fused: bool, seed: int = 0) -> tuple[nn.Sequential, list[SoftThresholdParametrization]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    found = []
    for layer in (model[0], model[2]):
        parametrization = register_st3_parametrization(layer, compile_kernels=fused)
        parametrization.reuse_memory = reuse
        parametrization.threshold.fill_(0.1)
        found.append(parametrization)
    return model, found


def test_the_memory_reuses_a_value_until_an_input_changes_and_never_overwrites_a_held_one() -> None:
    memory = ReusedWeightMemory()
    weight, threshold = torch.randn(5, 7), torch.tensor(0.5)

    def write(raw: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(raw * threshold)

    first = memory.value(weight, (threshold,), ("a",), write)
    assert torch.equal(first, weight * 0.5)
    assert (memory.writes, memory.allocations) == (1, 1)
    again = memory.value(weight, (threshold,), ("a",), write)
    assert memory.writes == 1
    assert again.data_ptr() == first.data_ptr()
    threshold.fill_(2.0)  # an input changed in place while `first` and `again` are held: new memory
    changed = memory.value(weight, (threshold,), ("a",), write)
    assert torch.equal(changed, weight * 2)
    assert torch.equal(first, weight * 0.5)
    assert (memory.writes, memory.allocations) == (2, 2)
    del first, again
    memory.value(weight, (threshold,), ("b",), write)  # another setting; `changed` still held
    assert memory.allocations == 3
    del changed
    with torch.no_grad():
        weight.mul_(3)  # the raw weight changed in place; nobody holds the memory: written where it is
    pointer = memory._memory.data_ptr()
    value = memory.value(weight, (threshold,), ("b",), write)
    assert value.data_ptr() == pointer
    assert memory.allocations == 3
    assert torch.equal(value, weight * 2)
    value.zero_()  # an in-place change of the value itself is seen too
    assert torch.equal(memory.value(weight, (threshold,), ("b",), write), weight * 2)
    memory.invalidate()  # e.g. after a change through `.data`
    memory.value(weight, (threshold,), ("b",), write)
    assert memory.writes == 6
    assert copy.deepcopy(memory).nbytes == 0
    assert memory.nbytes == weight.nbytes


@pytest.mark.parametrize("shrinkage", SHRINKAGES)
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("shape", [(30, 50), (8, 3, 3, 3), (700, 3000)])  # the last one is sliced (> 1M elements)
def test_the_sliced_eager_writer_gives_the_reference_effective_weight(
    shape: tuple[int, ...], shrinkage: str, rescale: bool
) -> None:
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.05
    for threshold in (torch.tensor(0.0), torch.tensor(0.04)):
        out = torch.full_like(weight, float("nan"))
        write_effective_weight(weight, threshold, shrinkage, rescale, out)
        expected = effective_weight(weight, threshold, rescale=rescale, shrinkage=shrinkage)
        assert torch.equal(out == 0, expected == 0)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)
        if threshold == 0:
            assert torch.equal(out, weight)  # a dense layer passes through bitwise
    transposed = weight.reshape(shape[0], -1).t()  # HF Conv1D's weight, output channels moved to dim 0: a view
    out = torch.empty(transposed.shape)
    write_effective_weight(transposed, torch.tensor(0.04), shrinkage, rescale, out)
    expected = effective_weight(transposed, torch.tensor(0.04), rescale=rescale, shrinkage=shrinkage)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_two_forwards_before_one_backward_with_a_threshold_change_between_them(fused: bool) -> None:
    # Each graph must keep the effective weight it was built with, although both come from one layer's memory.
    x1, x2 = (torch.randn(6, 12, generator=torch.Generator().manual_seed(s), requires_grad=True) for s in (1, 2))
    results = []
    for reuse in (True, False):
        model, found = _layers(reuse, fused)
        y1 = model(x1)
        for parametrization in found:
            parametrization.threshold.fill_(0.2)
        y2 = model(x2)
        (y1.square().sum() + y2.square().sum()).backward()
        results.append([x1.grad.clone(), x2.grad.clone(), *(p.grad.clone() for p in model.parameters())])
        x1.grad = x2.grad = None
        if reuse:
            assert all(p.memory.allocations == 2 for p in found)  # the second forward could not overwrite the first
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_accumulation_and_activation_checkpointing_build_each_effective_weight_once(fused: bool) -> None:
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(3))
    results = []
    for reuse in (True, False):
        model, found = _layers(reuse, fused)
        for p in found:
            p.memory.writes = 0
        for half in x.chunk(2):  # accumulation: two forwards and backwards, one optimizer step
            model(half).square().sum().backward()
        checkpointed = checkpoint(model, x, use_reentrant=False)  # the backward pass runs the forward again
        checkpointed.sum().backward()
        results.append([p.grad.clone() for p in model.parameters()] + [checkpointed.detach()])
        if reuse:
            assert all(p.memory.writes == 1 and p.memory.allocations == 1 for p in found)
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)


def test_a_compiled_model_with_reused_memory_gives_the_eager_gradients() -> None:
    x = torch.randn(8, 12, generator=torch.Generator().manual_seed(4))
    model, found = _layers(True, False)
    compiled = torch.compile(model, backend="aot_eager")
    for threshold in (0.1, 0.3):
        for p in found:
            p.threshold.fill_(threshold)
        model.zero_grad()
        compiled(x).square().sum().backward()
        got = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        model(x).square().sum().backward()
        for g, want in zip(got, (p.grad for p in model.parameters()), strict=True):
            torch.testing.assert_close(g, want)


class _Counts(Callback):
    """Per optimizer step: effective weights written and memory allocated, summed over the layers."""

    def __init__(self, reuse: bool = True) -> None:
        self.reuse = reuse
        self.writes: list[int] = []
        self.allocations: list[int] = []
        self.losses: list[float] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for p in self._parametrizations(pl_module):
            p.reuse_memory = self.reuse

    @staticmethod
    def _parametrizations(pl_module: LightningModule) -> list[SoftThresholdParametrization]:
        return [m for m in pl_module.modules() if isinstance(m, SoftThresholdParametrization)]

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, *args: Any) -> None:
        found = self._parametrizations(pl_module)
        self.writes.append(sum(p.memory.writes for p in found))
        self.allocations.append(sum(p.memory.allocations for p in found))
        self.losses.append(float(outputs["loss"]))


@pytest.mark.parametrize("compile_kernels", [False, None])
def test_a_fit_with_gradient_accumulation_allocates_no_effective_weight_per_step(compile_kernels: bool | None) -> None:
    runs = []
    for reuse in (True, False):
        torch.manual_seed(0)
        model = TinyNet()
        counts = _Counts(reuse)
        pruning = ST3PruningCallback(0.8, start=0, end=6, report=False, compile_kernels=compile_kernels)
        trainer = quiet_trainer(max_steps=8, accumulate_grad_batches=2, callbacks=[pruning, counts])
        trainer.fit(model, random_loader(16))
        runs.append((counts, model, pruning))
    (counts, model, pruning), (_, plain_model, plain) = runs
    # Two layers: after the first batch, no memory is allocated; each optimizer step writes each layer once (the
    # second micro-batch of a step reuses the first one's effective weights).
    assert counts.allocations[0] <= 4
    assert counts.allocations[-1] == counts.allocations[0]
    per_step = [b - a for a, b in zip(counts.writes[1::2], counts.writes[3::2], strict=False)]
    assert per_step
    assert all(n == 2 for n in per_step)
    # The same training as without the reuse: the thresholds bitwise, the weights to float rounding.
    assert [row["threshold"] for row in pruning.history] == [row["threshold"] for row in plain.history]
    for got, want in zip(model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(got, want)
    assert pruning.measure_sparsity()[0] == pytest.approx(0.8, abs=0.01)
