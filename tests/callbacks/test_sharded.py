"""Sharded training (issue 10): the global threshold from shards, and ST-3 under FSDP2 and DDP on 2 CPU processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import SCRIPTS, free_port, run_script
from sharded_run import STEPS_PER_EPOCH

from lightning_stthree import load_sparse_weights
from lightning_stthree.core.distributed import LocalParts, count_per_tensor, local_parts, on_local_rows

RUN = SCRIPTS / "sharded_run.py"
SELECTION_RUN = SCRIPTS / "sharded_selection_run.py"
ROOT = Path(__file__).parents[2]
STRATEGIES = ("single", "ddp", "fsdp")


def _train(out_dir: Path, strategy: str, *args: str) -> list[dict[str, Any]]:
    out_dir.mkdir(parents=True, exist_ok=True)
    run_script(RUN, strategy, str(out_dir), *args)
    ranks = 1 if strategy == "single" else 2
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(ranks)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    """The same 16-step ST-3 run (ramp, then fine-tune phase) in one process, under DDP and under FSDP2."""
    found = {}
    for strategy in STRATEGIES:
        out_dir = tmp_path_factory.mktemp(strategy)
        found[strategy] = (out_dir, _train(out_dir, strategy, "--checkpoints"))
    return found


# ---------------------------------------------------------------------------------------------- functional core


def test_local_parts_of_plain_tensors_communicate_nothing() -> None:
    weights = [torch.randn(3, 4), torch.randn(5)]
    parts = local_parts(weights)
    assert parts.reduce is None
    assert all(p is w for p, w in zip(parts.tensors, weights, strict=True))
    counts = torch.tensor([1, 2])
    assert parts.total(counts) is counts
    assert count_per_tensor(weights, lambda _, part: (part > 0).sum()) == [int((w > 0).sum()) for w in weights]


def test_local_parts_reduce_is_applied_when_given() -> None:
    parts = LocalParts([torch.ones(2)], lambda counts: counts.mul_(2))
    assert parts.total(torch.tensor([3.0])).tolist() == [6.0]


def test_on_local_rows_passes_plain_tensors_through() -> None:
    w = torch.randn(4, 3)
    assert torch.equal(on_local_rows(lambda t: t * 2, w), w * 2)


@pytest.mark.slow
def test_sharded_threshold_is_bitwise_the_single_process_one(tmp_path: Path) -> None:
    """4 processes, FSDP-style (Shard(0) on 4 ranks) and HSDP-style ((Replicate, Shard(0)) on 2x2) meshes, uneven and
    empty shards, one layer left unsharded; random, tied, all-equal, zero-heavy and denormal weights in float32,
    float16 and bfloat16: the threshold every rank gets from its shards equals the single-process one and
    ``torch.kthvalue`` bitwise, and each update all-reduces exactly 1 MiB (two histograms of 65536 float64)."""
    run_script(SELECTION_RUN, str(tmp_path), str(free_port()))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(4)]
    cases = {key: value for key, value in ranks[0].items() if isinstance(value, tuple)}
    assert len(cases) == 2 * (2 * 3 + 3) * (2 * 3 + 1)
    for key, (got, reference, kth, sent) in cases.items():
        for rank in ranks[1:]:
            assert torch.equal(rank[key][0], got), key
        assert torch.equal(got, reference), key
        if kth is not None:
            assert torch.equal(got, kth), key
            assert sent == 2 * 65536 * 8, key
    for mesh in ("fsdp", "hsdp"):
        # NaN at [3, 5] of layer 0; Inf and NaN in two shards of layer 2.
        assert all(rank[f"{mesh}/nonfinite"] == {0: (1, 0), 2: (1, 1)} for rank in ranks)
        assert all(rank[f"{mesh}/positive"] == rank[f"{mesh}/positive_reference"] for rank in ranks)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_training_matches_the_single_process_run(
    runs: dict[str, tuple[Path, list[dict[str, Any]]]], strategy: str
) -> None:
    (_, (single,)), (_, ranks) = runs["single"], runs[strategy]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(all(r["sharded"].values()) == (strategy == "fsdp") for r in ranks)
    # A validation loop holds the effective weights for reuse, except with sharded weights (FSDP2).
    assert single["held_in_validation"] == [True] * STEPS_PER_EPOCH
    assert all(r["held_in_validation"] == [strategy == "ddp"] * STEPS_PER_EPOCH for r in ranks)
    # Every rank holds the same thresholds and (gathered) weights, bitwise.
    for other in ranks[1:]:
        assert other["thresholds"] == ranks[0]["thresholds"]
        assert other["sparsity"] == ranks[0]["sparsity"]
        for name, value in ranks[0]["effective"].items():
            assert torch.equal(other["effective"][name], value)
    run = ranks[0]
    # Up to the float rounding of averaging gradients over 2 ranks: same thresholds, masks and weights.
    assert run["thresholds"].keys() == single["thresholds"].keys() == set(range(16))
    for step, value in single["thresholds"].items():
        assert run["thresholds"][step] == pytest.approx(value, rel=1e-5, abs=0), step
    assert run["measured"] == single["measured"]
    assert run["sparsity"][0] == pytest.approx(0.8, abs=1e-4)
    assert run["frozen"]
    assert single["frozen"]
    for name, value in single["effective"].items():
        assert torch.equal(run["effective"][name] == 0, value == 0), name
        torch.testing.assert_close(run["effective"][name], value, rtol=0, atol=1e-6)
        torch.testing.assert_close(run["raw"][name], single["raw"][name], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp_flops_budget_matches_the_single_process_run(tmp_path: Path) -> None:
    (single,) = _train(tmp_path / "single", "single", "--budget", "flops")
    ranks = _train(tmp_path / "fsdp", "fsdp", "--budget", "flops")
    assert ranks[0]["thresholds"] == ranks[1]["thresholds"]
    for step, value in single["thresholds"].items():
        assert ranks[0]["thresholds"][step] == pytest.approx(value, rel=1e-5, abs=0)
    # MACs measured through the sharded model's forward pass, densities counted from the shards.
    assert ranks[0]["macs_ratio"] == pytest.approx(single["macs_ratio"], rel=1e-9)
    assert ranks[0]["macs_ratio"] == pytest.approx(0.2, abs=0.01)
    for name, value in single["effective"].items():
        assert torch.equal(ranks[0]["effective"][name] == 0, value == 0), name


@pytest.mark.slow
def test_fsdp_with_the_half_threshold_matches_the_single_process_run(tmp_path: Path) -> None:
    # The l1/2 threshold of the kept weights, thresholded shard by shard under FSDP2 (its own fit: ramp and freeze).
    (single,) = _train(tmp_path / "single", "single", "--shrinkage", "half")
    ranks = _train(tmp_path / "fsdp", "fsdp", "--shrinkage", "half")
    assert all(all(r["sharded"].values()) for r in ranks)
    for step, value in single["thresholds"].items():
        assert ranks[0]["thresholds"][step] == pytest.approx(value, rel=1e-5, abs=0)
    assert ranks[0]["sparsity"][0] == pytest.approx(0.8, abs=1e-4)
    for name, value in single["effective"].items():
        assert torch.equal(ranks[0]["effective"][name] == 0, value == 0), name
        torch.testing.assert_close(ranks[0]["effective"][name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "step"), [("fsdp", 4), ("fsdp", 12), ("ddp", 8)])
def test_resume_ends_equal_to_the_uninterrupted_run(
    runs: dict[str, tuple[Path, list[dict[str, Any]]]], tmp_path: Path, strategy: str, step: int
) -> None:
    """From a checkpoint in the ramp (step 4), before the freeze (8) and in the fine-tune phase (12); under FSDP2 the
    checkpoint is Lightning's distributed checkpoint (a directory of shards)."""
    out_dir, (full, _) = runs[strategy]
    checkpoint = out_dir / "checkpoints" / f"step={step}.ckpt"
    assert checkpoint.is_dir() == (strategy == "fsdp")
    resumed, _ = _train(tmp_path, strategy, "--resume", str(checkpoint))
    assert resumed["thresholds"] == {s: t for s, t in full["thresholds"].items() if s >= step}
    assert resumed["frozen"]
    for name, value in full["raw"].items():
        assert torch.equal(resumed["raw"][name], value), name
        assert torch.equal(resumed["effective"][name], full["effective"][name]), name


@pytest.mark.slow
def test_str_refuses_sharded_weights(tmp_path: Path) -> None:
    output = run_script(RUN, "fsdp", str(tmp_path), "--method", "str", expect_failure=True)
    assert "STRPruningCallback cannot prune `net.0`: its weight is sharded" in output


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_fsdp", "digits_ddp"])
def test_shipped_multi_process_configs_train_to_the_target(tmp_path: Path, config: str) -> None:
    """The README's multi-process recipes, as a user runs them (2 CPU processes), 2 epochs instead of 15."""
    path = ROOT / "examples" / "configs" / f"{config}.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "lightning_stthree", "fit", "--config", str(path), "--trainer.max_epochs=2"]
    command += ["--trainer.enable_progress_bar=false"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    output = result.stdout + result.stderr[-4000:]
    assert result.returncode == 0, output
    assert re.search(r"sparsity\s+0\.9000 \(target 0\.9, 4 layers\)", result.stdout), output
    # The report names the layers' own types under FSDP2's and the parametrizations' generated classes.
    assert re.search(r"model\.features\.3\s+Conv2d\s+64x32x3x3", result.stdout + result.stderr), output
    last = tmp_path / "runs" / config / "version_0" / "checkpoints" / "last.ckpt"
    assert last.is_dir() == (config == "digits_fsdp")


@pytest.mark.slow
def test_full_fsdp_checkpoint_gives_the_sparse_weights_to_a_plain_network(tmp_path: Path) -> None:
    """``save_distributed_checkpoint=False``: one checkpoint file whose effective weights load into an unsharded,
    unparametrized network (what the README tells users to do instead of ``make_permanent_at_end`` under FSDP2)."""
    run, _ = _train(tmp_path, "fsdp", "--checkpoints", "--full-checkpoint")
    checkpoint = tmp_path / "checkpoints" / "step=16.ckpt"
    assert checkpoint.is_file()
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 37),
        torch.nn.ReLU(),
        torch.nn.Linear(37, 10),
    )
    load_sparse_weights(net, checkpoint, prefix="net.")
    for name, value in run["effective"].items():
        assert torch.equal(net.get_submodule(name.removeprefix("net.")).weight, value), name
    assert sum(int((net[i].weight == 0).sum()) for i in (0, 3, 5, 7)) == round(0.8 * 35722)


@pytest.mark.slow
def test_make_permanent_at_end_is_refused_before_training_under_fsdp(tmp_path: Path) -> None:
    output = run_script(RUN, "fsdp", str(tmp_path), "--make-permanent", expect_failure=True)
    assert "make_permanent_at_end=True) cannot make `net.0` permanent: its weight is sharded" in output
