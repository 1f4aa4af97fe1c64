"""``ActivationSparsityCallback`` in a Trainer: replacement, schedule and logging, resume, functional activations,
undo, arguments, and next to ``ST3PruningCallback``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import cubic_reference, quiet_trainer, random_loader, read_metrics
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_stthree import ActivationSparsityCallback, ST3PruningCallback, sparsity_report
from lightning_stthree.methods.activations import SparseActivation


class MLP(pl.LightningModule):
    """3x8x8 inputs (as ``random_loader``), two hidden ReLU layers, 10 classes; ``functional`` adds a ``torch.relu``."""

    def __init__(self, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(192, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )
        self.example_input_array = torch.zeros(2, 3, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return torch.relu(out) if self.functional else out

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def test_relus_are_replaced_and_the_logged_sparsity_follows_the_schedule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MLP()
    callback = ActivationSparsityCallback(target_sparsity=0.8, activation="cst", start=2, end=10)
    quiet_trainer(tmp_path, max_steps=14, callbacks=[callback]).fit(model, random_loader(14))
    assert list(callback.layers) == ["net.2", "net.4"]
    assert all(isinstance(model.net[i], SparseActivation) for i in (2, 4))
    metrics = read_metrics(tmp_path)
    for step in (0, 2, 5, 9, 13):
        expected = cubic_reference(step, 0.8, 2, 10)
        assert metrics[step]["act/target_sparsity"] == pytest.approx(expected, abs=1e-6)  # logged as float32
        # Each batch's shift zeroes exactly the scheduled fraction of that batch, to the nearest of its 8 x 64 outputs
        # per layer; in the second layer a unit whose inputs are all zero for several samples gives ties at the shift.
        assert metrics[step]["act/layer/net.2/sparsity"] == pytest.approx(expected, abs=0.5 / 512)
        assert expected - 0.5 / 512 <= metrics[step]["act/sparsity"] <= expected + 0.01
    assert metrics[13]["act/layer/net.4/tau"] > 0


def test_resume_ends_equal_to_the_uninterrupted_run(tmp_path: Path) -> None:
    def train(dirpath: Path, ckpt_path: Path | None = None) -> MLP:
        torch.manual_seed(0)
        model = MLP()
        callback = ActivationSparsityCallback(target_sparsity=0.7, start=0, end=12)
        checkpoint = ModelCheckpoint(dirpath=dirpath, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = quiet_trainer(max_epochs=3, callbacks=[callback, checkpoint], enable_checkpointing=True)
        trainer.fit(model, random_loader(8), ckpt_path=ckpt_path)
        return model

    full = train(tmp_path / "full")
    state = torch.load(tmp_path / "full" / "epoch=0.ckpt", weights_only=True)["state_dict"]
    assert {"net.2.tau", "net.2.scale", "net.2.started"} <= set(state)  # the running estimates are checkpointed
    resumed = train(tmp_path / "resumed", tmp_path / "full" / "epoch=0.ckpt")
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_functional_relus_are_counted_and_named_in_a_warning() -> None:
    callback = ActivationSparsityCallback(target_sparsity=0.5, exclude=["net.4"])
    with pytest.warns(UserWarning, match=r"still runs 2 ReLU operation\(s\) that are not modules it replaced"):
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(MLP(functional=True), random_loader(1))
    assert list(callback.layers) == ["net.2"]


def test_undo_at_end_puts_the_original_modules_back() -> None:
    model = MLP()
    relus = [model.net[2], model.net[4]]
    callback = ActivationSparsityCallback(target_sparsity=0.5, undo_at_end=True)
    quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, random_loader(2))
    assert [model.net[2], model.net[4]] == relus
    assert callback.layers == {}


def test_every_relu_of_the_recipes_resnet8_is_replaced() -> None:
    """The benchmark's ResNet-8, whose 7 ReLUs are modules: all replaced, none left to warn about, the measured
    sparsity the target's."""
    import warnings

    from lightning_stthree.recipes.models import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier("resnet8", in_channels=3, image_size=8)
    callback = ActivationSparsityCallback(target_sparsity=0.85, activation="cst")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*ReLU operation.*")
        quiet_trainer(max_steps=2, callbacks=[callback]).fit(model, random_loader(2))
    assert len(callback.layers) == 7
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    model.train()
    layer = model.model.layer2[0].relu1
    layer(torch.randn(4, 32, 4, 4))
    zeros, elements = layer.take_measured()
    assert zeros / elements == pytest.approx(0.85, abs=0.5 / elements)


def test_torchvision_resnet18_shares_a_relu_per_block_which_is_named_in_a_warning(tmp_path: Path) -> None:
    """torchvision's BasicBlock calls one ``self.relu`` twice: both calls are made sparse (each its own exact shift in
    training), and the warning names the shared modules, whose evaluation uses one running shift."""
    import torchvision

    torch.manual_seed(0)
    model = MLP()
    model.net = torchvision.models.resnet18(num_classes=10)
    model.example_input_array = torch.zeros(2, 3, 32, 32)
    callback = ActivationSparsityCallback(target_sparsity=0.8, activation="crelu")
    shared = (
        r"run more than once per forward pass \{'net.layer1.0.relu': 2, 'net.layer1.1.relu': 2, 'net.layer2.0.relu'"
    )
    with pytest.warns(UserWarning, match=shared):
        quiet_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(model, random_loader(2, shape=(3, 32, 32)))
    assert len(callback.layers) == 9  # the stem's and one per block
    for step in read_metrics(tmp_path).values():
        assert step["act/sparsity"] == pytest.approx(0.8, abs=1e-3)  # every call, both of a shared module's


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, ST3PruningCallback, ActivationSparsityCallback, Path]:
    """One fit with sparse weights (90%) and sparse activations (80%) together, its CSV logs in the returned folder."""
    torch.manual_seed(0)
    model, log_dir = MLP(), tmp_path_factory.mktemp("both")
    weights = ST3PruningCallback(target_sparsity=0.9, start=0, end=4, report=False, log_layer_sparsity=False)
    activations = ActivationSparsityCallback(target_sparsity=0.8)
    quiet_trainer(log_dir, max_steps=6, callbacks=[weights, activations]).fit(model, random_loader(6))
    return model, weights, activations, log_dir


def test_weights_and_activations_sparse_together(
    both: tuple[MLP, ST3PruningCallback, ActivationSparsityCallback, Path],
) -> None:
    model, weights, _, _ = both
    model = copy.deepcopy(model)  # its training forward below moves the running shifts
    assert weights.measure_sparsity()[0] == pytest.approx(0.9, abs=0.01)
    received = []
    hooks = [model.net[i].register_forward_pre_hook(lambda m, a: received.append(a[0])) for i in (3, 5)]
    model.train()
    model(torch.randn(64, 3, 8, 8))
    for hook in hooks:
        hook.remove()
    for inputs in received:  # the Linear layers after the first receive the sparse activations
        # At least the target: units whose weights are all pruned give ties at the shift, which add zeros.
        assert 0.8 - 1 / inputs.numel() <= float((inputs == 0).float().mean()) < 0.85


def test_the_macs_count_both_the_zero_weights_and_the_zero_inputs(
    both: tuple[MLP, ST3PruningCallback, ActivationSparsityCallback, Path],
) -> None:
    model, weights, activations, log_dir = both
    density = activations.input_density
    assert density["net.1"] == 1.0  # the random images have no zeros
    for name in ("net.3", "net.5"):  # the inputs the sparse activations feed
        assert density[name] == pytest.approx(0.2, abs=0.02)
    # By hand: each layer's dense MACs (in x out per sample) times its weight density times its input density.
    per_layer = weights.measure_sparsity()[1]
    dense = {"net.1": 192 * 64, "net.3": 64 * 64, "net.5": 64 * 10}
    sparse = sum(macs * (1 - per_layer[name]) * density[name] for name, macs in dense.items())
    macs = weights.measure_macs(input_density=density)
    assert macs["macs_dense"] == sum(dense.values())
    assert macs["macs_sparse"] == pytest.approx(sparse, rel=1e-9)
    assert macs["macs_ratio"] < weights.measure_macs()["macs_ratio"]  # the zero inputs are counted too
    logged = read_metrics(log_dir)[5]["st3/macs_ratio"]  # the logged value uses the previous step's inputs
    assert logged < weights.measure_macs()["macs_ratio"] * 0.5
    # The end-of-fit report counts them too.
    rows = {r["name"]: r for r in sparsity_report(model, layer_macs=weights._layer_macs, input_density=density)}
    assert rows["net.3"]["macs_sparse"] == pytest.approx(dense["net.3"] * (1 - per_layer["net.3"]) * density["net.3"])
    assert rows["total"]["macs_sparse"] == pytest.approx(sparse, rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"target_sparsity": 1.0}, ValueError, r"`target_sparsity` must be in \[0, 1\), got 1.0"),
        ({"activation": "relu"}, ValueError, r"`activation` must be one of \('crelu', 'cst'\), got 'relu'"),
        ({"clip": -1.0}, ValueError, r"`clip` must be in \(0, inf\], got -1.0"),
        ({"include_types": ["Relu"]}, ValueError, r"`include_types` names no torch.nn module class: \['Relu'\]"),
        ({"include_types": "ReLU"}, TypeError, r"`include_types` must be a list of torch.nn class names"),
        ({"momentum": 1.5}, ValueError, r"`momentum` must be in \(0, 1\], got 1.5"),
        ({"undo_at_end": 1}, TypeError, r"`undo_at_end` must be True or False, got 1"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ActivationSparsityCallback(**kwargs)
