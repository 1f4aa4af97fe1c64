"""The benchmark scripts run (``--quick`` modes) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers import free_port, make_tiny_idx_dataset, run_script

from lightning_stthree.recipes.data import DEBIAN_FASHION_MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_accuracy_benchmark_quick_mode_trains_every_method(tmp_path: Path) -> None:
    accuracy = _load("accuracy")
    args = ["--quick", "--out", str(tmp_path)]
    if not DEBIAN_FASHION_MNIST_DIR.is_dir():
        # No Debian package here: the same code path on generated IDX files of the quick mode's size.
        make_tiny_idx_dataset(tmp_path / "fashion", num_train=2000, num_test=1000)
        args += ["--data-dir", str(tmp_path / "fashion")]
    result = accuracy.main(args)
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"dense", "gmp", "st3", "st3_sigma", "str"}
    assert rows["dense"]["sparsity_mean"] == 0.0
    assert rows["dense"]["macs_sparse_mean"] == rows["dense"]["macs_dense"]
    for method in ("gmp", "st3", "st3_sigma"):
        # All Conv/Linear weights are pruned, so the measured sparsity is the scheduled target.
        assert rows[method]["sparsity_mean"] == pytest.approx(0.9, abs=0.001)
        assert rows[method]["macs_sparse_mean"] < 0.3 * rows[method]["macs_dense"]
    assert 0.0 < rows["str"]["sparsity_mean"] < 1.0
    assert all(0.0 <= row["acc_mean"] <= 1.0 for row in rows.values())
    saved = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert len(saved["runs"]) == 5
    assert (tmp_path / "accuracy_quick.md").read_text().startswith("| target | method |")
    assert (tmp_path / "accuracy_quick.png").stat().st_size > 10_000


def test_accuracy_benchmark_compares_the_shrinkages_with_their_distortion(tmp_path: Path) -> None:
    accuracy = _load("accuracy")
    args = ["--quick", "--methods", "st3", "--shrinkages", "soft", "hard", "half", "--out", str(tmp_path)]
    if not DEBIAN_FASHION_MNIST_DIR.is_dir():
        make_tiny_idx_dataset(tmp_path / "fashion", num_train=2000, num_test=1000)
        args += ["--data-dir", str(tmp_path / "fashion")]
    result = accuracy.main([*args, "--train-subset", "500", "--test-subset", "200"])
    rows = {row["shrinkage"]: row for row in result["summary"]}
    assert set(rows) == {"soft", "hard", "half"}
    for row in rows.values():  # the same schedule and selection: the same sparsity whatever the shrinkage
        assert row["sparsity_mean"] == pytest.approx(0.9, abs=0.001)
    # The shrinkage alone moves soft-thresholded kept weights by t each, hard-thresholded ones not at all.
    assert rows["hard"]["shrinkage_distortion_mean"] == 0.0
    assert 0.0 < rows["half"]["shrinkage_distortion_mean"] < rows["soft"]["shrinkage_distortion_mean"]
    assert all(row["distortion_mean"] > 0 for row in rows.values())  # the rescale scales every kept weight
    table = (tmp_path / "accuracy_quick_shrinkage.md").read_text()
    assert "| 90% | st3 | half |" in table
    assert "kept-weight distortion" in table


def test_activation_sparsity_at_80_percent_keeps_the_dense_accuracy_on_the_digits_mlp(tmp_path: Path) -> None:
    # Issue 28's acceptance: >= 75% exact zeros in the inputs of the Linear layers after the first, on held-out
    # images, within 1.5 points of the same MLP trained dense (SGD, 20 epochs), for CReLU and CST.
    rows = _load("activation_sparsity").main(["--sparsities", "0.8", "--out", str(tmp_path)])
    dense, crelu, cst = rows
    assert [r["activation"] for r in rows] == ["relu (dense)", "crelu", "cst"]
    for row in (crelu, cst):
        assert row["hidden_input_zeros"] >= 0.75
        assert row["test_acc"] >= dense["test_acc"] - 0.015
    assert dense["hidden_input_zeros"] < 0.6
    assert "| cst | 80% |" in (tmp_path / "activation_sparsity.md").read_text()


def test_activation_fashion_benchmark_quick_mode_trains_every_configuration(tmp_path: Path) -> None:
    args = ["--quick", "--sparsities", "0.85", "--activations", "cst", "--out", str(tmp_path)]
    if not DEBIAN_FASHION_MNIST_DIR.is_dir():
        make_tiny_idx_dataset(tmp_path / "fashion", num_train=1024, num_test=1024)
        args += ["--data-dir", str(tmp_path / "fashion")]
    rows = _load("activation_fashion").main(args)
    configurations = [(r["model"], r["activation"], r["clip"], r["weight_target"]) for r in rows]
    clip = rows[1]["clip"]
    assert 1.0 < clip < 1.5  # the prescribed clip of CST at 85%
    per_model = [("relu", None, None), ("cst", clip, None), ("cst", math.inf, None), ("relu", None, 0.9)]
    per_model.append(("cst", clip, 0.9))
    assert configurations == [(m, *c) for m in ("mlp", "resnet8") for c in per_model]
    for r in rows:
        assert r["macs_effective"] <= r["macs_dense"]
        assert r["weight_sparsity"] == (pytest.approx(0.9, abs=0.001) if r["weight_target"] else 0.0)
        if r["model"] == "mlp" and r["activation"] == "cst" and not r["weight_target"]:  # held out: the running shift
            assert r["activation_sparsity"] == pytest.approx(0.85, abs=0.05)
    dense, sparse = rows[0], rows[1]
    assert sparse["macs_effective"] < 0.8 * dense["macs_effective"]  # the zero inputs are counted
    assert "| mlp | cst | 1.22 | 85% | dense |" in (tmp_path / "activation_fashion_quick.md").read_text()
    assert (tmp_path / "activation_fashion_quick.png").stat().st_size > 10_000


def test_inference_benchmark_converts_and_writes_its_table(tmp_path: Path) -> None:
    inference = _load("inference")
    out = tmp_path / "inference.json"
    args = ["--models", "transformer", "resnet20", "--sparsities", "0.98", "--batches", "2", "--rounds", "1"]
    result = inference.main([*args, "--repeats", "1", "--out", str(out)])
    rows = {row["model"]: row for row in result["rows"]}
    assert set(rows) == {"transformer", "resnet20"}
    for row in rows.values():
        assert row["measured_sparsity"] == pytest.approx(0.98, abs=1e-4)
        assert row["max_relative_error"] < 1e-4
        assert row["dense_ms"] > 0
        assert row["sparse_ms"] > 0
        assert row["prunable_layers"] == row["report"].count("(")  # one choice with its reason per layer
    assert rows["transformer"]["prunable_layers"] == 16
    assert json.loads(out.read_text())["rows"][0]["model"] == "transformer"
    assert out.with_suffix(".md").read_text().startswith("| model | sparsity | batch |")


@pytest.mark.slow
def test_sharded_threshold_benchmark_counts_the_bytes_and_checks_the_result(tmp_path: Path) -> None:
    out = tmp_path / "sharded.json"
    script = ROOT / "benchmarks" / "sharded_threshold.py"
    run_script(script, "--sizes", "0.27M", "--repeats", "2", "--out", str(out), "--port", str(free_port()), timeout=300)
    (row,) = json.loads(out.read_text())["rows"]
    # Two histograms of 65536 float64 counts, whatever the number of weights; the result is the single-process one.
    assert row["bytes_per_update"] == 2 * 65536 * 8
    assert row["bytes_constant"]
    assert row["bitwise_equal"]
    assert row["weights"] == 268_336
    assert out.with_suffix(".md").read_text().startswith("| weights | tensors | bytes all-reduced per update |")


def test_step_overhead_benchmark_times_and_measures_dense_default_and_copy(tmp_path: Path) -> None:
    step_overhead = _load("step_overhead")
    out = tmp_path / "step_overhead.json"
    argv = ["--rounds", "1", "--steps", "3", "--models", "resnet20", "--variants", "default", "--out", str(out)]
    (row,) = step_overhead.main(argv)
    assert row["prunable_weights"] == 268_336  # every Conv/Linear weight of the CIFAR ResNet-20
    assert row["prunable_bytes"] == 4 * 268_336
    assert set(row["variants"]) == {"default"}
    assert row["dense_peak_extra_bytes"] > row["prunable_bytes"]  # at least the gradients
    for variant in row["variants"].values():
        assert variant["step_s"] > 0
        assert variant["overhead_median_ratio"] == variant["ratios"][0] == variant["step_s"] / row["dense_step_s"]
        assert variant["peak_extra_bytes"] > 0
        expected = (variant["peak_extra_bytes"] - row["dense_peak_extra_bytes"]) / row["prunable_bytes"]
        assert variant["peak_over_dense_in_weights"] == expected
    assert json.loads(out.read_text())["results"] == json.loads(json.dumps([row]))
    assert out.with_suffix(".md").read_text().count("| resnet20 |") == 1


def test_step_overhead_models_build_and_take_one_training_step() -> None:
    # The weight-heavy rows (a 134M MLP, a Hugging Face LLaMA) at their real sizes: one forward and backward each.
    step_overhead = _load("step_overhead")
    for name, weights in (("mlp134m", 8 * 4096 * 4096), ("llama", 4 * (4 + 3 * 2) * 1024 * 1024 + 4096 * 1024)):
        module = step_overhead._module(name, "copy")
        assert sum(m.weight.numel() for m in step_overhead.prunable(module.net)) == weights
        (batch,) = list(step_overhead._loader(name, 1))
        module.training_step(batch, 0).backward()
        assert all(m.parametrizations.weight.original.grad is not None for m in step_overhead.prunable(module.net))


def test_step_breakdown_splits_the_step_and_times_the_effective_weights() -> None:
    step_breakdown = _load("step_breakdown")
    result = step_breakdown.main(["--model", "resnet20", "--steps", "4"])
    assert set(result["phases_ms"]) == {"selection", "forward", "backward", "optimizer"}
    selection = result["phases_ms"]["selection"]
    assert selection["dense"] < 0.1 < selection["st3"]  # the dense model selects nothing
    # The effective weights are built inside the ST-3 forward pass: timed, and a part of it.
    assert 0 < result["effective_weights_ms"] < result["phases_ms"]["forward"]["st3"]
    assert set(result["page_faults"]) == {"dense", "st3"}
    assert result["step_ratio"] > 0
    assert result["window"] > 0
    assert set(result["evaluation_ms"]) == {"dense", "st3_rebuilding", "st3_reusing"}
    assert all(ms > 0 for ms in result["evaluation_ms"].values())


def test_language_model_benchmark_quick_mode_trains_every_method(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    language_model = _load("language_model")
    result = language_model.main(["--quick", "--out", str(tmp_path), "--export-batches", "1"])
    rows = {row["method"]: row for row in result["summary"]}
    assert set(rows) == {"dense", "gmp", "st3", "st3_sigma"}
    for method in ("gmp", "st3", "st3_sigma"):
        assert rows[method]["sparsity_mean"] == pytest.approx(0.8, abs=1e-3)
        assert set(rows[method]["densities"]) == {"attention", "mlp", "lm_head"}
    assert all(row["ppl_mean"] > 1.0 for row in rows.values())
    assert result["unigram_loss"] > 0
    assert [e["batch"] for e in result["export"]] == [1]
    assert (tmp_path / "language_model_quick.md").read_text().startswith("| target | method |")
    assert (tmp_path / "language_model_quick.png").stat().st_size > 10_000
