"""FLOPs (MACs) accounting, the FLOPs budget, the per-layer report and the plots (issue 4)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from helpers import TinyNet, quiet_trainer, random_loader
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_stthree import (
    ST3PruningCallback,
    find_prunable_layers,
    format_report,
    make_permanent,
    sparsity_report,
    weighted_global_threshold,
)
from lightning_stthree.core.flops import measure_layer_macs


def test_resnet50_dense_macs_match_the_paper_convention() -> None:
    model = torchvision.models.resnet50()
    macs = measure_layer_macs(model, torch.zeros(1, 3, 224, 224), find_prunable_layers(model))
    assert len(macs) == 54  # 53 convolutions and the classifier
    assert sum(macs.values()) / 1e6 == pytest.approx(4089.18, rel=1e-4)


def test_macs_are_per_sample_whatever_the_example_batch() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    layers = find_prunable_layers(net)
    # Hand count: conv 4 out x 2 in x 3x3 kernel x 4x4 outputs = 1152; linear 64 x 5 = 320.
    for batch in (1, 4):
        assert measure_layer_macs(net, torch.zeros(batch, 2, 6, 6), layers) == {"0": 1152.0, "2": 320.0}


def test_sparse_macs_by_hand_on_known_densities() -> None:
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 5))
    with torch.no_grad():
        net[0].weight.view(-1)[::2] = 0.0  # density 0.5
        net[2].weight.view(-1)[torch.arange(320) % 5 != 0] = 0.0  # density 0.2
    rows = sparsity_report(net, example_input=torch.zeros(3, 2, 6, 6))
    conv, linear, total = rows
    assert conv["density"] == 0.5
    assert linear["density"] == pytest.approx(0.2)
    assert conv["macs_sparse"] == 0.5 * 1152
    assert linear["macs_sparse"] == pytest.approx(0.2 * 320)
    assert total["macs_dense"] == 1152 + 320
    assert total["macs_sparse"] == pytest.approx(576 + 64)
    assert total["weights"] == 72 + 320
    assert total["zeros"] == 36 + 256


def test_counting_leaves_the_model_unchanged() -> None:
    model = TinyNet()
    model.train()
    model.norm.eval()  # a mixed train/eval state must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]
    macs = measure_layer_macs(model, torch.randn(4, 3, 8, 8), find_prunable_layers(model))
    assert macs == {"conv": 16 * 27 * 36.0, "fc": 5760.0}
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # batch-norm statistics included
    assert model.training
    assert not model.norm.training
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()] == hooks_before


def _numpy_weighted_threshold(weights: list[torch.Tensor], shares: list[float], fraction: float) -> np.float32:
    scores = np.concatenate([np.abs(w.numpy()).ravel() for w in weights]).astype(np.float32)
    per_weight = np.concatenate([np.full(w.numel(), share) for w, share in zip(weights, shares, strict=True)])
    order = np.argsort(scores, kind="stable")
    cumulative = np.cumsum(per_weight[order])
    index = min(int(np.searchsorted(cumulative, fraction * cumulative[-1], side="left")), len(scores) - 1)
    return scores[order][index]


@pytest.mark.parametrize("fraction", [1e-4, 0.3, 0.5, 0.9, 0.98, 1.0])
def test_weighted_threshold_matches_numpy(fraction: float) -> None:
    generator = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(64, 3, 3, 3, generator=generator),
        torch.randn(128, 64, 3, 3, generator=generator) * 0.1,
        torch.randn(10, 512, generator=generator),
    ]
    shares = [1024.0, 64.0, 1.0]
    t = weighted_global_threshold(weights, shares, fraction)
    assert t.item() == _numpy_weighted_threshold(weights, shares, fraction)
    # The pruned share reaches the goal and overshoots it by less than the share of the weights tied at t.
    pruned = sum(share * int((w.abs() <= t).sum()) for w, share in zip(weights, shares, strict=True))
    total = sum(share * w.numel() for w, share in zip(weights, shares, strict=True))
    at_t = sum(share * int((w.abs() == t).sum()) for w, share in zip(weights, shares, strict=True))
    assert fraction * total <= pruned < fraction * total + at_t


def test_weighted_threshold_edge_cases() -> None:
    w = [torch.tensor([0.5, -0.1, 0.0, 0.3])]
    assert weighted_global_threshold(w, [2.0], 0.0).item() == 0.0
    assert weighted_global_threshold(w, [2.0], 0.5).item() == pytest.approx(0.1)  # zero and 0.1 make half
    with pytest.raises(ValueError, match=r"`shares` must hold one non-negative number per weight tensor"):
        weighted_global_threshold(w, [1.0, 2.0], 0.5)
    with pytest.raises(ValueError, match=r"`fraction` must be in \[0, 1\], got 2"):
        weighted_global_threshold(w, [1.0], 2)


@pytest.mark.parametrize("criterion", ["l1", "l1_std"])
def test_flops_budget_removes_the_target_fraction_of_macs(criterion: str) -> None:
    # TinyNet's conv costs 36 MACs per weight (6x6 outputs), its classifier 1: unequal MACs per weight.
    ratios = {}
    for budget in ("flops", "params"):
        torch.manual_seed(0)  # same weights and data for both budgets (unseeded, l1_std's ratio ranged 0.07-0.18)
        model = TinyNet()
        cb = ST3PruningCallback(0.8, start=0, end=6, budget=budget, criterion=criterion)
        quiet_trainer(max_steps=8, callbacks=[cb]).fit(model, random_loader(8))
        ratios[budget] = cb.measure_macs()["macs_ratio"]
    assert ratios["flops"] == pytest.approx(0.2, abs=0.005)
    assert abs(ratios["params"] - 0.2) > 0.02  # (measured with seed 0: 0.17 with l1_std, 0.44 with l1)


def test_logged_macs_and_report_totals_agree(tmp_path: Path) -> None:
    checks = []

    class Compare(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
            if trainer.global_step in (3, 7):
                rows = sparsity_report(pl_module, example_input=pl_module.example_input_array)
                checks.append((dict(trainer.callback_metrics), rows[-1]))

    cb = ST3PruningCallback(0.9, start=0, end=6)
    quiet_trainer(max_steps=8, callbacks=[cb, Compare()]).fit(TinyNet(), random_loader(8))
    assert len(checks) == 2
    for metrics, total in checks:
        assert metrics["st3/macs_dense"].item() == pytest.approx(total["macs_dense"])
        assert metrics["st3/macs_sparse"].item() == pytest.approx(total["macs_sparse"], rel=1e-6)
        assert metrics["st3/macs_ratio"].item() == pytest.approx(total["macs_sparse"] / total["macs_dense"], rel=1e-6)
        assert metrics["st3/sparsity"].item() == pytest.approx(total["zeros"] / total["weights"], rel=1e-6)
    assert cb.history[-1]["macs_ratio"] == pytest.approx(checks[-1][0]["st3/macs_ratio"].item(), rel=1e-6)


def test_report_on_a_permanent_model_and_as_text() -> None:
    model = TinyNet()
    cb = ST3PruningCallback(0.9, start=0, end=4, input_shape=[1, 3, 8, 8])
    quiet_trainer(max_steps=6, callbacks=[cb]).fit(model, random_loader(6))
    parametrized = sparsity_report(model, example_input=torch.zeros(1, 3, 8, 8))
    make_permanent(model)
    permanent = sparsity_report(model, example_input=torch.zeros(1, 3, 8, 8))
    for a, b in zip(parametrized, permanent, strict=True):
        assert {k: v for k, v in a.items() if k != "pruned"} == {k: v for k, v in b.items() if k != "pruned"}
    assert [r["pruned"] for r in parametrized] == [True, True, None]
    assert [r["type"] for r in permanent[:-1]] == ["Conv2d", "Linear"]
    text = format_report(permanent)
    assert text.splitlines()[0].split()[:3] == ["layer", "type", "shape"]
    assert "16x3x3x3" in text
    assert text.splitlines()[-1].startswith("total")


def test_report_is_printed_at_fit_end(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    with caplog.at_level("INFO"):
        quiet_trainer(max_steps=3, callbacks=[ST3PruningCallback(0.5, start=0, end=2)]).fit(TinyNet(), random_loader(3))
    assert "ST-3 sparsity report" in caplog.text
    assert "total" in caplog.text
    # With Lightning's rich progress bar, the table goes to the rich console.
    trainer = quiet_trainer(
        max_steps=3, enable_progress_bar=True, callbacks=[ST3PruningCallback(0.5, start=0, end=2), RichProgressBar()]
    )
    trainer.fit(TinyNet(), random_loader(3))
    out = capsys.readouterr().out
    assert "ST-3 sparsity report" in out
    assert "fc" in out


def test_plots_are_saved_and_logged_to_tensorboard(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="tb", version=0)
    cb = ST3PruningCallback(0.9, start=0, end=6, save_plots=True)
    quiet_trainer(max_steps=8, logger=logger, callbacks=[cb]).fit(TinyNet(), random_loader(8))
    for name in ("st3_sparsity", "st3_layers"):
        path = tmp_path / "tb" / "version_0" / f"{name}.png"
        assert path.stat().st_size > 5000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logger.experiment.flush()
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb" / "version_0").glob("events.out.tfevents.*"))
    # Image summaries: the tag and an embedded PNG for each figure.
    assert b"st3/st3_sparsity" in events
    assert b"st3/st3_layers" in events
    assert events.count(b"\x89PNG") >= 2
    assert [h["step"] for h in cb.history] == list(range(8))


def test_flops_budget_needs_an_example_input() -> None:
    class NoExample(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = None

    trainer = quiet_trainer(max_steps=2, callbacks=[ST3PruningCallback(budget="flops")])
    with pytest.raises(
        MisconfigurationException, match=r"needs each layer's MACs.*HINT: set `self.example_input_array`"
    ):
        trainer.fit(NoExample(), random_loader(2))
    # The input shape can be given to the callback instead.
    cb = ST3PruningCallback(0.8, start=0, end=2, budget="flops", input_shape=[1, 3, 8, 8])
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(NoExample(), random_loader(3))
    assert cb.measure_macs()["macs_ratio"] == pytest.approx(0.2, abs=0.005)
    # Without FLOPs requested, no input just means no MACs metrics.
    cb = ST3PruningCallback(0.8, start=0, end=2)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(NoExample(), random_loader(3))
    assert cb.measure_macs() == {}
    assert "macs_ratio" not in cb.history[-1]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"budget": "macs"}, ValueError, r"`budget` must be one of \('params', 'flops'\), got 'macs'"),
        ({"input_shape": []}, ValueError, r"`input_shape` must be a list of positive ints, batch dimension first"),
        ({"input_shape": [1, 3, 0]}, ValueError, r"`input_shape` must be a list of positive ints.*got \[1, 3, 0\]"),
        ({"input_shape": "1x3x32x32"}, TypeError, r"`input_shape` must be a list of positive ints"),
        ({"input_shape": [1, 3.0]}, TypeError, r"`input_shape` must be a list of positive ints.*got \[1, 3.0\]"),
        ({"report": "yes"}, TypeError, r"`report` must be True or False, got 'yes'"),
        ({"save_plots": 1}, TypeError, r"`save_plots` must be True or False, got 1"),
    ],
)
def test_invalid_flops_arguments(kwargs: dict, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        ST3PruningCallback(**kwargs)


def test_resnet18_layer_macs_by_hand() -> None:
    net = torchvision.models.resnet18(num_classes=10)
    macs = measure_layer_macs(net, torch.zeros(2, 3, 64, 64), find_prunable_layers(net))
    # 64x64 input: conv1 (stride 2) gives 32x32, the max-pool 16x16 for layer1; layer2 halves it to 8x8.
    assert macs["conv1"] == 64 * 3 * 49 * 32 * 32
    assert macs["layer1.0.conv1"] == 64 * 64 * 9 * 16 * 16
    assert macs["layer2.0.downsample.0"] == 128 * 64 * 1 * 8 * 8
    assert macs["fc"] == 512 * 10


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


@pytest.mark.parametrize("kind", ["tuple", "list", "dict"])
def test_example_input_with_several_arguments(kind: str) -> None:
    x, y = torch.zeros(2, 4), torch.zeros(2, 6)
    example = {"tuple": (x, y), "list": [x, y], "dict": {"x": x, "y": y}}[kind]
    net = TwoInputs()
    assert measure_layer_macs(net, example, find_prunable_layers(net)) == {"a": 12.0, "b": 18.0}


def test_transformer_linear_layers_are_counted_and_uncounted_ones_reported() -> None:
    class Encoder(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.TransformerEncoderLayer(10, 2, 32, batch_first=True)
            self.example_input_array = torch.zeros(2, 3, 8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.encoder(super().forward(x).unsqueeze(1)).squeeze(1)

    model = Encoder()
    macs = measure_layer_macs(model, model.example_input_array, find_prunable_layers(model))
    # The fused eval-mode fast path is turned off while counting: linear1/linear2 run as modules.
    linears = {"encoder.linear1", "encoder.linear2"}
    assert macs["encoder.linear1"] == 10 * 32
    assert macs["encoder.linear2"] == 32 * 10
    # MultiheadAttention: its packed q/k/v projection (1 token x 3 x 10 x 10) and its out_proj (1 x 10 x 10), which
    # it calls functionally, counted from the shapes of its call; its attention products are no layer's weights.
    assert macs["encoder.self_attn"] == 3 * 10 * 10
    assert macs["encoder.self_attn.out_proj"] == 10 * 10
    callback = ST3PruningCallback(0.5, start=0, end=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*not called as modules.*")
        quiet_trainer(max_steps=1, callbacks=[callback]).fit(model, random_loader(1))
    assert set(callback.layers) == {"conv", "fc", "encoder.self_attn", "encoder.self_attn.out_proj", *linears}


def test_failed_macs_measurement_is_a_warning_unless_flops_are_needed() -> None:
    class WrongExample(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.example_input_array = torch.zeros(2, 5)  # not an image batch

    with pytest.warns(UserWarning, match=r"MACs are not logged: the forward pass on the example input failed"):
        quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback()]).fit(WrongExample(), random_loader(1))
    trainer = quiet_trainer(max_steps=1, callbacks=[ST3PruningCallback(budget="flops")])
    with pytest.raises(MisconfigurationException, match=r"could not measure MACs.*HINT: check `example_input_array`"):
        trainer.fit(WrongExample(), random_loader(1))


def test_weighted_threshold_with_inexact_shares_is_always_a_score() -> None:
    # Shares like 1/3 make the float64 running sums inexact; the answer must still be one of the scores, reach the
    # goal, and be the smallest score that does (up to rounding of the goal).
    for trial in range(300):
        generator = torch.Generator().manual_seed(trial)
        weights = [torch.randint(0, 4, (int(n),), generator=generator) / 10 for n in torch.randint(1, 20, (3,))]
        shares = [float(torch.rand(1, generator=generator)) / 3 for _ in weights]
        fraction = (1.0, 0.5, float(torch.rand(1, generator=generator)))[trial % 3]
        t = weighted_global_threshold(weights, shares, fraction).item()

        def pruned(value: float) -> float:
            return sum(share * float((w.abs() <= value).sum()) for w, share in zip(weights, shares, strict=True))  # noqa: B023

        scores = torch.cat(weights).abs().unique().tolist()
        goal = fraction * pruned(float("inf"))
        assert t in [torch.tensor(v).item() for v in scores]
        assert pruned(t) >= goal * (1 - 1e-12)
        smaller = [v for v in scores if v < t]
        assert not smaller or pruned(max(smaller)) < goal * (1 + 1e-12)


def test_second_fit_restarts_the_history() -> None:
    cb = ST3PruningCallback(0.5, start=0, end=2)
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(TinyNet(), random_loader(3))
    quiet_trainer(max_steps=3, callbacks=[cb]).fit(TinyNet(), random_loader(3))
    assert [h["step"] for h in cb.history] == [0, 1, 2]


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_macs_count_query_and_key_tokens_separately(batch_first: bool) -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

        def forward(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
            if not batch_first:  # the example batch is batch-first; this attention layer wants sequence-first
                query, memory = query.transpose(0, 1), memory.transpose(0, 1)
            return self.attn(query, key=memory, value=memory)[0]

    net = Cross()
    # Per sample: 3 query tokens and 5 memory tokens of width 8.
    example = (torch.zeros(2, 3, 8), torch.zeros(2, 5, 8))
    macs = measure_layer_macs(net, example, find_prunable_layers(net))
    assert macs == {"attn": 8 * 8 * (3 + 5 + 5), "attn.out_proj": 3 * 8 * 8}
