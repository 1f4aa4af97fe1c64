"""Tied weights with `prune_tied=True` beyond Hugging Face's lm_head: two prunable layers sharing one weight, and a
holder that is an ancestor of the pruned layer."""

from typing import Any

import lightning.pytorch as pl
import torch
from helpers import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_stthree import ST3PruningCallback, make_permanent, sparsity_report
from lightning_stthree.callbacks.macs import macs_per_weight


class SharedLinears(pl.LightningModule):
    """`b` uses `a`'s weight; the module itself holds it too, as `self.weight` (an ancestor holder)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)
        self.b.weight = self.a.weight
        self.weight = self.a.weight
        self.example_input_array = torch.zeros(1, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(**kwargs: Any) -> tuple[SharedLinears, ST3PruningCallback]:
    torch.manual_seed(0)
    model = SharedLinears()
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,))), batch_size=2)
    callback = ST3PruningCallback(0.8, start=0, end=3, prune_tied=True, report=False, **kwargs)
    quiet_trainer(max_steps=4, callbacks=[callback]).fit(model, loader)
    return model, callback


def test_two_layers_sharing_a_weight_are_one_pruned_tensor_read_by_both() -> None:
    model, callback = _fit(input_shape=[1, 8])
    assert list(callback.layers) == ["a", "c"]
    assert callback._tied == {"a": ["", "b"]}  # the module itself (named ""), and `b`
    assert torch.equal(model.b.weight, model.a.weight)
    assert torch.equal(model.weight, model.a.weight)
    rows = {r["name"]: r for r in sparsity_report(model)}
    assert "b" not in rows  # one tensor, one row: a's
    assert rows["total"]["weights"] == 64 + 32
    # The FLOPs budget counts b's work on a's weights: a's weights carry both layers' MACs.
    shares = macs_per_weight(callback._layer_macs, callback.layers, [model.a.weight, model.c.weight], callback._tied)
    assert shares == [(callback._layer_macs["a"] + callback._layer_macs["b"]) / 64, callback._layer_macs["c"] / 32]


def test_make_permanent_unties_an_ancestor_holder_and_leaves_one_parameter() -> None:
    model, _ = _fit()
    effective = model.a.weight.detach().clone()
    make_permanent(model)
    assert model.a.weight is model.b.weight is model.weight
    assert torch.equal(model.a.weight, effective)
    assert type(model.a) is nn.Linear
    assert type(model.b) is nn.Linear


def test_a_second_fit_does_not_list_a_tied_user_twice() -> None:
    model, callback = _fit(make_permanent_at_end=True)
    loader = DataLoader(TensorDataset(torch.randn(8, 8), torch.randint(0, 4, (8,))), batch_size=2)
    quiet_trainer(max_steps=4, callbacks=[callback]).fit(model, loader)
    assert callback._tied == {"a": ["", "b"]}
    assert all(len(users) == len(set(users)) for users in callback._tied.values())
