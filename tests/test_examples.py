import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parents[1] / "examples"


@pytest.mark.slow
def test_minimal_example_runs_and_reaches_target(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "minimal.py"), "--epochs", "3", "--log-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"test accuracy ([0-9.]+), sparsity ([0-9.]+) \(target 0.9\)", result.stdout)
    assert match, result.stdout[-2000:]
    assert float(match.group(2)) == pytest.approx(0.9, abs=0.005)
    assert float(match.group(1)) > 0.2  # well above chance (0.1) on the 10-class problem
    assert (tmp_path / "minimal" / "version_0" / "metrics.csv").exists()
