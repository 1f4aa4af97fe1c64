import sys
from pathlib import Path

import pytest
import torch

# The subprocess scripts live in tests/scripts; tests import their shared settings from there.
sys.path.insert(0, str(Path(__file__).parent / "scripts"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
