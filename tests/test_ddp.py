import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_masks(tmp_path: Path) -> None:
    script = Path(__file__).with_name("ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["threshold"] == ranks[1]["threshold"] > 0
    for r in ranks:
        assert r["sparsity"] == pytest.approx(0.9, abs=0.005)
    assert ranks[0]["masks"].keys() == ranks[1]["masks"].keys() == {"conv", "fc"}
    for name in ranks[0]["masks"]:
        assert torch.equal(ranks[0]["masks"][name], ranks[1]["masks"][name])
        assert torch.equal(ranks[0]["raw"][name], ranks[1]["raw"][name])
