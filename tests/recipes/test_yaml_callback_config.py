"""The callback configured from a LightningCLI YAML under ``trainer.callbacks``, like any Lightning callback."""

from pathlib import Path

import pytest
from helpers import TinyNet, random_loader
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_stthree import ActivationSparsityCallback, ST3PruningCallback
from lightning_stthree.methods.st3 import find_st3_parametrization

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


def test_the_shrinkage_from_yaml(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        CONFIG.replace("criterion: l1_std", "criterion: l1_std\n        shrinkage: firm\n        firm_ratio: 3")
    )
    cli = LightningCLI(TinyNet, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = (c for c in cli.trainer.callbacks if isinstance(c, ST3PruningCallback))
    assert (cb.shrinkage, cb.firm_ratio, cb.soft_threshold) == ("firm", 3.0, False)
    parametrization = find_st3_parametrization(cli.model.conv)
    assert (parametrization.shrinkage, parametrization.firm_ratio) == ("firm", 3.0)


def test_the_activation_callback_from_yaml_next_to_the_weights_one(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    extra = (
        "    - class_path: lightning_stthree.ActivationSparsityCallback\n"
        "      init_args:\n        target_sparsity: 0.6\n        activation: cst\n        clip: 2.0\n"
    )
    config.write_text(CONFIG + extra)
    with pytest.warns(UserWarning, match=r"no \['ReLU'\] module to replace"):  # TinyNet calls torch.relu
        cli = LightningCLI(TinyNet, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = (c for c in cli.trainer.callbacks if isinstance(c, ActivationSparsityCallback))
    assert (cb.target_sparsity, cb.activation, cb.clip) == (0.6, "cst", 2.0)
    assert any(isinstance(c, ST3PruningCallback) for c in cli.trainer.callbacks)


ADD = "criterion: l1_std"  # a line of CONFIG after which a case adds an argument


@pytest.mark.parametrize(
    ("old", "new", "messages"),
    [
        # Typos in names: jsonargparse names the unknown option or class.
        ("target_sparsity: 0.8", "target_sparsty: 0.8", ["Option 'target_sparsty' is not accepted"]),
        ("ST3PruningCallback", "ST3PrunningCallback", ["no attribute 'ST3PrunningCallback'"]),
        # Values of the wrong type or outside a choice: jsonargparse names the key and the value.
        (ADD, "criterion: l2", ["Expected a typing.Literal['l1', 'l1_std']. Got value: l2"]),
        (ADD, f"{ADD}\n        budget: macs", ["Expected a typing.Literal['params', 'flops']. Got value: macs"]),
        (
            ADD,
            f"{ADD}\n        on_nonfinite: ignore",
            ["Expected a typing.Literal['raise', 'warn']. Got value: ignore"],
        ),
        ("start: 1", "start: two", ['Parser key "start"', "Given value: two"]),
        ('exclude: ["fc"]', "exclude: fc", ['Parser key "exclude"', "Expected a <class 'list'>", "Given value: fc"]),
        (ADD, f"{ADD}\n        soft_threshold: maybe", ['Parser key "soft_threshold"', "Given value: maybe"]),
        (
            ADD,
            f"{ADD}\n        shrinkage: l0",
            ["Expected a typing.Literal['soft', 'hard', 'firm', 'half']", "Given value: l0"],
        ),
        # Well-typed values the callback rejects: its own message, word for word.
        ("target_sparsity: 0.8", "target_sparsity: 1.5", ["`target_sparsity` must be in [0, 1), got 1.5"]),
        ("start: 1", "start: -1", ["`start` must be >= 0 optimizer steps, got -1"]),
        ("end: 0.5", "end: 1.5", ["`end` as a float is a fraction of the run and must be in [0, 1], got 1.5"]),
        (ADD, f"{ADD}\n        power: 0", ["`power` must be in (0, inf), got 0.0"]),
        (ADD, f"{ADD}\n        update_every: 0", ["`update_every` must be an int >= 1 (optimizer steps), got 0"]),
        (ADD, f"{ADD}\n        firm_ratio: 1", ["`firm_ratio` must be in (1, inf), got 1"]),
        (
            ADD,
            f"{ADD}\n        shrinkage: half\n        soft_threshold: false",
            ["`soft_threshold=False` contradicts `shrinkage='half'`"],
        ),
        ("Conv2d, Linear]", "Conv2d, LSTM]", ["`include_types` has unknown layer types ['LSTM']"]),
        (ADD, f"{ADD}\n        input_shape: [1, 3, 0]", ["`input_shape` must be a list of positive ints"]),
    ],
)
def test_bad_yaml_value_reports_the_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], old: str, new: str, messages: list[str]
) -> None:
    assert old in CONFIG
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.replace(old, new))
    # jsonargparse rejects unknown names and badly typed values while parsing (exit, message on stderr); a value the
    # callback rejects fails at instantiation with the callback's own message.
    with pytest.raises((SystemExit, ValueError)) as info:
        LightningCLI(TinyNet, RandomData, args=["fit", "--config", str(config)], save_config_callback=None)
    shown = str(info.value) + capsys.readouterr().err
    for message in messages:
        assert message in shown
