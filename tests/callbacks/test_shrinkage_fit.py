"""``ST3PruningCallback(shrinkage=...)`` through the paths a run takes: fit, ST-3 sigma, resume, freeze,
``make_permanent``, the sparse-inference export and bf16 (a Hugging Face GPT-2 in ``test_hf_and_timm_models.py``, FSDP2
in ``test_sharded.py``, the fused kernels in ``test_kernels.py``, YAML in ``test_yaml_callback_config.py``)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import ST3PruningCallback, effective_weight, make_permanent, to_sparse_inference
from lightning_stthree.core.layers import pruned_tensor
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.shrinkage import SHRINKAGES
from lightning_stthree.methods.st3 import find_st3_parametrization


def _fit(shrinkage: str, steps: int = 12, **kwargs) -> tuple[TinyNet, ST3PruningCallback]:  # type: ignore[no-untyped-def]
    """12 steps, the ramp from step 2 to 8 at 90%; the pure global threshold (no density floor): exactly
    ``round(0.9 * n)`` weights pruned."""
    torch.manual_seed(0)
    model = TinyNet()
    kwargs = {"min_density_ratio": 0.0, **kwargs}
    callback = ST3PruningCallback(target_sparsity=0.9, start=2, end=8, shrinkage=shrinkage, report=False, **kwargs)
    quiet_trainer(max_steps=steps, callbacks=[callback]).fit(model, random_loader(steps))
    return model, callback


def _zeros(callback: ST3PruningCallback) -> tuple[int, int]:
    with torch.no_grad():
        tensors = [pruned_tensor(m) for m in callback.layers.values()]
    return sum(int((t == 0).sum()) for t in tensors), sum(t.numel() for t in tensors)


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
@pytest.mark.parametrize("shrinkage", SHRINKAGES)
def test_a_short_fit_with_each_shrinkage_reaches_the_target_exactly(shrinkage: str, criterion: str) -> None:
    model, callback = _fit(shrinkage, criterion=criterion)
    assert callback.shrinkage == shrinkage
    zeros, total = _zeros(callback)
    assert zeros == round(0.9 * total)  # the exact selection, whatever the kept weights become
    assert callback.measure_sparsity()[0] == zeros / total
    for module in callback.layers.values():
        parametrization = find_st3_parametrization(module)
        assert parametrization.shrinkage == shrinkage
        raw = raw_weight(module).detach()
        expected = effective_weight(raw, parametrization.threshold, shrinkage=shrinkage)
        torch.testing.assert_close(module.weight.detach(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(module.weight == 0, raw.abs() <= parametrization.threshold)
    # Straight-through: every raw weight gets the effective weight's gradient, pruned ones included (so they can
    # come back: with the pure global threshold ST-3 sigma may empty the conv, whose zeros then stop fc's gradient).
    model.train()
    model.zero_grad(set_to_none=True)
    x, y = next(iter(random_loader(1)))
    with parametrize.cached():
        effective = model.fc.weight
        effective.retain_grad()
        nn.functional.cross_entropy(model(x), y).backward()
    assert torch.equal(raw_weight(model.fc).grad, effective.grad)
    if criterion == "l1":
        assert (effective.grad[effective.detach() == 0] != 0).any()


def test_the_shrinkages_differ_only_in_the_kept_weights() -> None:
    # One set of raw weights and thresholds, four shrinkages: the same zeros, kept values ordered as the operators are.
    model, _ = _fit("soft")
    fc = model.fc
    parametrization = find_st3_parametrization(fc)
    values = {}
    for shrinkage in SHRINKAGES:
        parametrization.shrinkage = shrinkage
        values[shrinkage] = fc.weight.detach().clone()
    assert all(torch.equal(v == 0, values["soft"] == 0) for v in values.values())
    kept = values["soft"] != 0
    magnitudes = {name: v[kept].abs() for name, v in values.items()}
    assert (magnitudes["soft"] < magnitudes["firm"]).any()
    assert torch.all(magnitudes["soft"] <= magnitudes["firm"] * (1 + 1e-6))
    assert torch.all(magnitudes["half"] <= magnitudes["hard"] * (1 + 1e-6))
    parametrization.soft_threshold = False  # the old flag still sets the hard threshold
    assert parametrization.shrinkage == "hard"
    assert torch.equal(fc.weight.detach(), values["hard"])


def test_resume_with_the_firm_threshold_ends_equal_to_the_uninterrupted_run(tmp_path: Path) -> None:
    def train(dirpath: Path, ckpt_path: Path | None = None) -> TinyNet:
        torch.manual_seed(0)
        model = TinyNet()
        callback = ST3PruningCallback(target_sparsity=0.9, start=4, end=16, shrinkage="firm", firm_ratio=3.0)
        checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = quiet_trainer(max_epochs=3, callbacks=[callback, checkpoint], enable_checkpointing=True)
        trainer.fit(model, random_loader(8), ckpt_path=ckpt_path)
        assert find_st3_parametrization(model.fc).firm_ratio == 3.0
        return model

    full = train(tmp_path / "full")
    resumed = train(tmp_path / "resumed", tmp_path / "full" / "epoch=0.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("shrinkage", ["firm", "half"])
def test_freeze_bakes_the_shrunk_weights_and_make_permanent_keeps_them(shrinkage: str) -> None:
    model, callback = _fit(shrinkage, steps=16, freeze_at=10)
    assert callback.frozen
    zeros, total = _zeros(callback)
    assert zeros >= round(0.9 * total)  # the frozen mask holds (kept weights may also train to exactly 0)
    x = torch.randn(4, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        # Baked at the freeze: the raw weights are the effective ones, pruned entries exactly zero.
        assert torch.equal(raw_weight(model.fc) == 0, model.fc.weight == 0)
    permanent = make_permanent(copy.deepcopy(model))
    assert not parametrize.is_parametrized(permanent.fc)
    with torch.no_grad():
        torch.testing.assert_close(permanent(x), expected)


@pytest.mark.parametrize("shrinkage", ["hard", "half"])
def test_make_permanent_and_the_sparse_inference_export_use_the_shrunk_weights(shrinkage: str) -> None:
    model, _ = _fit(shrinkage)
    net = nn.Sequential(nn.Flatten(), copy.deepcopy(model.fc)).eval()
    x = torch.randn(3, 16, 6, 6)
    with torch.no_grad():
        expected = net(x)
    sparse_model, report = to_sparse_inference(net, x, min_speedup=0, repeats=1)
    assert report.converted == ["1"]
    with torch.no_grad():
        torch.testing.assert_close(sparse_model(x), expected, rtol=1e-5, atol=1e-6)
    permanent = make_permanent(copy.deepcopy(model))
    assert torch.equal(permanent.fc.weight, model.fc.weight.detach())


@pytest.mark.parametrize("shrinkage", ["firm", "half"])
def test_bf16_weights_with_an_l0_like_shrinkage_are_thresholded_exactly(shrinkage: str) -> None:
    torch.manual_seed(0)
    model = TinyNet()
    callback = ST3PruningCallback(target_sparsity=0.9, start=2, end=8, shrinkage=shrinkage, report=False)
    quiet_trainer(max_steps=10, precision="bf16-true", callbacks=[callback]).fit(model, random_loader(10))
    zeros, total = _zeros(callback)
    assert zeros / total == pytest.approx(0.9, abs=0.005)  # bf16 magnitudes tie: a tied threshold prunes them all
    for module in callback.layers.values():
        parametrization = find_st3_parametrization(module)
        raw = raw_weight(module).detach()
        assert module.weight.dtype == torch.bfloat16
        assert torch.equal(module.weight == 0, raw.float().abs() <= parametrization.threshold)
        reference = effective_weight(raw.float(), parametrization.threshold, shrinkage=shrinkage).bfloat16()
        torch.testing.assert_close(module.weight.detach(), reference)
