"""CUDA checks, skipped (with the reason printed) where no GPU is present."""

import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback

from lightning_stthree import ST3PruningCallback, effective_weight, global_threshold, register_st3_parametrization


@pytest.mark.gpu
@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_threshold_and_effective_weight_on_cuda_match_cpu(criterion: str) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, 3, 3, generator=generator), torch.randn(10, 512, generator=generator)]
    cpu = global_threshold(weights, 0.9, criterion)
    cuda = global_threshold([w.cuda() for w in weights], 0.9, criterion)
    assert cuda.device.type == "cuda"
    assert cuda.item() == cpu.item()
    for w in weights:
        torch.testing.assert_close(effective_weight(w.cuda(), cuda).cpu(), effective_weight(w, cpu))


@pytest.mark.gpu
def test_fit_on_cuda_reaches_target() -> None:
    devices: set[str] = set()

    class Where(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            parametrization = pl_module.fc.parametrizations.weight
            devices.update({parametrization.original.device.type, parametrization[0].threshold.device.type})

    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0, end=6)
    quiet_trainer(accelerator="gpu", max_steps=8, callbacks=[cb, Where()]).fit(model, random_loader(8))
    assert devices == {"cuda"}
    assert cb.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)


@pytest.mark.gpu
def test_flops_budget_on_cuda() -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.8, start=0, end=6, budget="flops")
    quiet_trainer(accelerator="gpu", max_steps=8, callbacks=[cb]).fit(model, random_loader(8))
    assert cb.measure_macs()["macs_ratio"] == pytest.approx(0.2, abs=0.005)


@pytest.mark.gpu
def test_compiled_kernels_on_cuda_match_cpu() -> None:
    # compile_kernels=True on a GPU builds Triton kernels: same threshold bitwise, same effective weight to rounding.
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(64, 32, 3, 3, generator=generator), torch.randn(10, 512, generator=generator)]
    cpu = global_threshold(weights, 0.9)
    pivot = cpu.item() * 1.0005
    cuda = global_threshold([w.cuda() for w in weights], 0.9, pivot=pivot, window=0.01, compile_kernels=True)
    assert cuda.item() == cpu.item()
    for w in weights:
        layer = torch.nn.Module()
        layer.weight = torch.nn.Parameter(w.cuda())
        register_st3_parametrization(layer, compile_kernels=True).threshold.copy_(cuda)
        torch.testing.assert_close(layer.weight.detach().cpu(), effective_weight(w, cpu))


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
def test_reused_memory_on_cuda_keeps_each_graphs_weight_and_allocates_once(fused: bool) -> None:
    # The caching allocator and Triton: the same rules as on a CPU (tests/methods/test_weight_memory.py).
    x1, x2 = (torch.randn(6, 64, device="cuda", requires_grad=True) for _ in range(2))
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)
        layer = torch.nn.Linear(64, 32).cuda()
        parametrization = register_st3_parametrization(layer, compile_kernels=fused)
        parametrization.reuse_memory = reuse
        parametrization.threshold.fill_(0.05)
        y1 = layer(x1)
        parametrization.threshold.fill_(0.1)
        y2 = layer(x2)
        (y1.square().sum() + y2.square().sum()).backward()
        results.append([x1.grad.clone(), x2.grad.clone(), layer.parametrizations.weight.original.grad.clone()])
        x1.grad = x2.grad = None
        if reuse:
            assert parametrization.memory.allocations == 2  # the held first value was not overwritten
            del y1, y2
            writes = parametrization.memory.writes
            parametrization.threshold.fill_(0.2)  # nobody holds the memory now: written where it is
            for _ in range(3):
                layer(x1).sum().backward()
            assert parametrization.memory.writes == writes + 1  # unchanged inputs: built once
            assert parametrization.memory.allocations == 2  # into memory nobody held
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want)
