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
