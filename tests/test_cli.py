"""The callback configured from a LightningCLI YAML under ``trainer.callbacks``, like any Lightning callback."""

from pathlib import Path

import pytest
from helpers import TinyNet, random_loader
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_stthree import ST3PruningCallback

CONFIG = """
trainer:
  max_steps: 6
  accelerator: cpu
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: lightning_stthree.ST3PruningCallback
      init_args:
        target_sparsity: 0.8
        start: 1
        end: 0.5
        criterion: l1_std
        exclude: ["fc"]
        include_types: [Conv2d, Linear]
"""


class RandomData(LightningDataModule):
    def train_dataloader(self):  # type: ignore[no-untyped-def]
        return random_loader(6)


def test_callback_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    cli = LightningCLI(TinyNet, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = (c for c in cli.trainer.callbacks if isinstance(c, ST3PruningCallback))
    assert (cb.target_sparsity, cb.start, cb.end, cb.criterion) == (0.8, 1, 0.5, "l1_std")
    assert isinstance(cb.start, int)
    assert isinstance(cb.end, float)
    assert cb.exclude == ("fc",)
    assert list(cb.layers) == ["conv"]
    assert cb.measure_sparsity()[0] == pytest.approx(0.8, abs=0.005)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("criterion: l1_std", "criterion: l2", "Expected a typing.Literal['l1', 'l1_std']. Got value: l2"),
        ("target_sparsity: 0.8", "target_sparsity: 1.5", "`target_sparsity` must be in [0, 1), got 1.5"),
    ],
)
def test_bad_yaml_value_reports_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, message: str
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace(old, new))
    # jsonargparse rejects a bad choice while parsing (exit, message on stderr); a value the callback rejects fails
    # at instantiation with the callback's own message.
    with pytest.raises((SystemExit, ValueError)) as info:
        LightningCLI(TinyNet, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    assert message in str(info.value) + capsys.readouterr().err
