"""Real models nobody here wrote: torchvision's ResNet-18 and MobileNetV3-Small on small random images."""

from pathlib import Path

import pytest
import torch
import torchvision
from helpers import ImageClassifier, cubic_reference, quiet_trainer, random_loader, read_metrics
from torch import nn
from torch.nn.utils import parametrize

from lightning_stthree import ST3PruningCallback


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "criterion"),
    [("resnet18", "l1"), ("mobilenet_v3_small", "l1"), ("resnet18", "l1_std")],
)
def test_torchvision_model_reaches_target(tmp_path: Path, name: str, criterion: str) -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=10)
    expected_layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    model = ImageClassifier(net)
    cb = ST3PruningCallback(0.9, start=1, end=6, criterion=criterion, log_layer_sparsity=False)
    quiet_trainer(tmp_path, max_steps=8, callbacks=[cb]).fit(model, random_loader(8, batch_size=4, shape=(3, 32, 32)))

    # Every Linear/Conv weight (first conv and classifier included) and nothing else is pruned.
    assert list(cb.layers) == [f"model.{n}" for n in expected_layers]
    assert all(parametrize.is_parametrized(m, "weight") for m in cb.layers.values())
    assert not any(
        parametrize.is_parametrized(m) for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.Hardswish))
    )
    metrics = read_metrics(tmp_path)
    for step in (1, 3, 5, 7):
        assert metrics[step]["st3/sparsity"] == pytest.approx(cubic_reference(step, 0.9, 1, 6), abs=0.005)
    sparsity, per_layer = cb.measure_sparsity()
    assert sparsity == pytest.approx(0.9, abs=0.005)
    if criterion == "l1_std":
        # ST-3 sigma spreads sparsity over layers: no layer is left (almost) dense.
        assert min(per_layer.values()) > 0.3
    # The trained network still runs and produces finite outputs.
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()
