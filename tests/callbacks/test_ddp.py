from pathlib import Path

import pytest
import torch
from helpers import SCRIPTS, run_script

SCRIPT = SCRIPTS / "ddp_run.py"


def _run(strategy: str, out_dir: Path) -> None:
    run_script(SCRIPT, strategy, str(out_dir), timeout=300)


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_masks(tmp_path: Path) -> None:
    _run("ddp", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["threshold"] == ranks[1]["threshold"] > 0
    for r in ranks:
        assert r["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() == {"conv", "fc"}
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])
        assert torch.equal(ranks[0]["raw"][name], ranks[1]["raw"][name])


@pytest.mark.slow
def test_ddp_spawn_hands_the_sparse_weights_back_to_the_main_process(tmp_path: Path) -> None:
    # ddp_spawn trains in child processes and reloads their weights into the main process's (unparametrized) model
    # with strict=False: the effective weights saved under the plain `weight` keys are what it must pick up.
    _run("ddp_spawn", tmp_path)
    main = torch.load(tmp_path / "main.pt", weights_only=True)
    assert not torch.equal(main["fc"], main["initial_fc"])
    assert main["sparsity"] > 0.85
