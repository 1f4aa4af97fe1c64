"""`compile_kernels=True`: fused torch.compile kernels give the eager results (issue 6)."""

from typing import Any

import pytest
import torch
import torchvision
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from lightning_stthree import ST3PruningCallback, effective_weight, global_threshold, register_st3_parametrization
from lightning_stthree.core import kernels as kernels_module
from lightning_stthree.core import selection
from lightning_stthree.methods import st3


def _graphs(function: Any) -> int:
    """How many graphs torch.compile holds for ``function`` (the compiled kernels that really ran)."""
    code = kernels_module.compiled(function)._torchdynamo_orig_callable.__code__
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code))


def _weights(dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 7, 7), (128, 64, 1, 1), (512, 512, 3, 3), (10, 512), (1, 40), (7, 5, 3)]
    return [(torch.randn(shape, generator=g) * 0.05).to(dtype) for shape in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("shrinkage", "rescale"),
    [("soft", True), ("hard", True), ("soft", False), ("hard", False), ("firm", True), ("half", True), ("half", False)],
)
def test_fused_effective_weight_is_the_eager_one(dtype: torch.dtype, shrinkage: str, rescale: bool) -> None:
    for weight in _weights(dtype):
        raw = nn.Parameter(weight)
        for threshold in (torch.tensor(0.0), torch.tensor(0.06)):
            layer = nn.Module()
            layer.weight = raw
            parametrization = register_st3_parametrization(
                layer, rescale=rescale, compile_kernels=True, shrinkage=shrinkage
            )
            parametrization.threshold.copy_(threshold)
            fused = layer.weight
            expected = effective_weight(weight, threshold, rescale=rescale, shrinkage=shrinkage)
            assert fused.dtype == dtype
            assert fused.shape == weight.shape
            # Exactly the same entries are zero; values agree to float rounding (sums reduce in another order).
            assert torch.equal(fused == 0, expected == 0)
            tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype in (torch.float32, torch.float64) else {}
            torch.testing.assert_close(fused, expected, **tolerance)
            if threshold == 0:
                assert torch.equal(fused, weight)  # a dense layer passes through bitwise
            # Straight-through: the gradient reaches every raw weight unchanged.
            upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
            raw.grad = None
            (fused * upstream).sum().backward()
            assert torch.equal(raw.grad, upstream)


def test_a_weight_of_each_kind_compiles_only_a_few_kernels() -> None:
    # Shapes are dynamic: the 21 layers of a ResNet-18 share a handful of compiled graphs (torch.compile falls back
    # to eager, with a warning, after 8 recompilations of one function; this keeps us far from it).
    torch._dynamo.reset()
    model = torchvision.models.resnet18(num_classes=10)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            register_st3_parametrization(module, compile_kernels=True).threshold.fill_(0.01)
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert 1 <= _graphs(st3.copy_effective_weight) <= 5  # the kernel that writes into the reused memory


@pytest.mark.parametrize("decode_block", [None, 7])  # 7: the marks are decoded in many small blocks
@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_fused_counting_is_used_and_exact_near_the_pivot(
    criterion: str, decode_block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if decode_block is not None:
        monkeypatch.setattr(selection, "_DECODE_BLOCK", decode_block)
    weights = _weights(torch.float32)
    previous = global_threshold(weights, 0.9, criterion)
    with torch.no_grad():
        for w in weights:
            w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * 1e-4)
    torch._dynamo.reset()
    fallbacks: list[int] = []
    original = selection._radix_select
    monkeypatch.setattr(selection, "_radix_select", lambda *a: fallbacks.append(1) or original(*a))
    fused = global_threshold(weights, 0.9, criterion, pivot=previous.item(), window=0.01, compile_kernels=True)
    eager = global_threshold(weights, 0.9, criterion, pivot=previous.item(), window=0.01)
    assert fallbacks == []  # both answered from the window
    assert _graphs(kernels_module.window_column_counts) >= 1  # by the compiled kernel
    monkeypatch.setattr(selection, "_radix_select", original)
    assert fused.view(torch.int32) == eager.view(torch.int32)
    assert fused == global_threshold(weights, 0.9, criterion)  # and the radix selection's (no pivot)


class _Thresholds(Callback):
    def __init__(self, pruning: ST3PruningCallback) -> None:
        self.pruning = pruning
        self.values: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self.values.append(self.pruning.threshold)


def _fit(compile_kernels: bool) -> tuple[list[float], TinyNet, ST3PruningCallback]:
    torch.manual_seed(0)
    model = TinyNet()
    pruning = ST3PruningCallback(0.8, start=0, end=5, report=False, compile_kernels=compile_kernels)
    recorder = _Thresholds(pruning)
    quiet_trainer(max_steps=10, callbacks=[pruning, recorder]).fit(model, random_loader(10))
    return recorder.values, model, pruning


def test_callback_with_compiled_kernels_trains_like_the_eager_one() -> None:
    eager_thresholds, eager_model, eager = _fit(False)
    fused_thresholds, fused_model, fused = _fit(True)
    assert all(p.compile_kernels for p in fused._parametrizations())
    assert not any(p.compile_kernels for p in eager._parametrizations())
    # Same thresholds and sparsity; the weights drift apart only by the effective weights' float rounding.
    assert fused_thresholds == pytest.approx(eager_thresholds, rel=1e-5)
    assert fused.measure_sparsity()[0] == eager.measure_sparsity()[0] == pytest.approx(0.8, abs=0.01)
    for got, want in zip(fused_model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def broken_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.compile`` as on a machine without a C++ compiler, with nothing compiled or probed yet."""

    def broken(function: Any, **kwargs: Any) -> Any:
        def fail(*args: Any) -> Any:
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

        return fail

    monkeypatch.setattr(kernels_module, "_COMPILED", {})
    monkeypatch.setattr(kernels_module, "_PROBED", {})
    monkeypatch.setattr(kernels_module.torch, "compile", broken)


@pytest.mark.usefixtures("broken_compiler")
def test_a_compiler_that_fails_is_a_clear_error_at_setup() -> None:
    pruning = ST3PruningCallback(0.8, start=0, end=5, report=False, compile_kernels=True)
    with pytest.raises(RuntimeError, match=r"`compile_kernels=True` needs torch.compile .* C\+\+ compiler.*HINT"):
        quiet_trainer(max_steps=2, callbacks=[pruning]).fit(TinyNet(), random_loader(2))


@pytest.mark.usefixtures("broken_compiler")
def test_by_default_a_compiler_that_fails_means_eager_kernels_and_one_line(caplog: pytest.LogCaptureFixture) -> None:
    runs = []
    for _ in range(2):
        pruning = ST3PruningCallback(0.8, start=0, end=5, report=False)
        with caplog.at_level("INFO"):
            quiet_trainer(max_steps=3, callbacks=[pruning]).fit(TinyNet(), random_loader(3))
        runs.append(pruning)
        assert pruning.compile_kernels is None
        assert pruning.kernels_fused is False
        assert not any(p.compile_kernels for p in pruning._parametrizations())
        assert pruning.measure_sparsity()[0] == pytest.approx(pruning.sparsity, abs=0.02)
        assert pruning.sparsity > 0.5
    lines = [r.getMessage() for r in caplog.records if "fused kernels cannot be built" in r.getMessage()]
    assert len(lines) == 1  # once per process, not per run
    assert "InvalidCxxCompiler" in lines[0]
    assert "HINT: install a C++ compiler (g++)" in lines[0]
    assert "compile_kernels=False" in lines[0]


def test_by_default_the_fused_kernels_are_used_where_they_build() -> None:
    pruning = ST3PruningCallback(0.8, start=0, end=5, report=False)
    quiet_trainer(max_steps=3, callbacks=[pruning]).fit(TinyNet(), random_loader(3))
    builds = kernels_module.build_failure(torch.device("cpu")) == ""
    assert pruning.kernels_fused is builds
    assert all(p.compile_kernels is builds for p in pruning._parametrizations())
    if builds:
        assert _graphs(st3.copy_effective_weight) >= 1
        assert _graphs(kernels_module.window_column_counts) >= 1


def test_a_compiled_model_traces_the_eager_operations_without_graph_breaks() -> None:
    # Under the user's own torch.compile the fused kernel is not called (Dynamo fuses the traced operations itself).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    for layer in (model[0], model[3]):
        register_st3_parametrization(layer, compile_kernels=True).threshold.fill_(0.05)
    x = torch.randn(4, 3, 8, 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x))
