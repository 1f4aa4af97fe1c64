"""The `stthree` command (LightningCLI), its embedded default and the shipped YAML recipes (issue 5)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_tiny_idx_dataset

from lightning_stthree import ST3PruningCallback
from lightning_stthree.cli import DEFAULT_CONFIG, main

ROOT = Path(__file__).parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.mark.slow
def test_stthree_fit_with_the_embedded_default(tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name("stthree")
    assert executable.exists(), "the `stthree` console script is installed by `pip install -e .`"
    result = subprocess.run(
        [str(executable), "fit", "--trainer.max_epochs=3"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "ST-3 run finished after 60 optimizer steps" in out  # 3 epochs x 20 batches of 64 of the 1257 digits
    accuracy = float(re.search(r"val_acc\s+([0-9.]+)", out).group(1))
    assert accuracy > 0.5
    assert re.search(r"sparsity\s+0\.9\d* \(target 0\.9, 4 layers\)", out)
    assert re.search(r"MACs per sample\s+[0-9.]+ M sparse of 1\.7885 M dense", out)
    run = tmp_path / "runs" / "digits" / "version_0"
    assert f"run directory          {Path('runs/digits/version_0')}" in out
    for name in ("metrics.csv", "config.yaml", "hparams.yaml", "checkpoints/last.ckpt", "st3_sparsity.png"):
        assert (run / name).is_file(), name
    header = (run / "metrics.csv").read_text().splitlines()[0]
    for column in ("st3/sparsity", "st3/target_sparsity", "st3/threshold", "st3/macs_ratio", "val_acc"):
        assert column in header


@pytest.mark.slow
def test_python_dash_m_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_stthree", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "{fit,validate,test,predict}" in result.stdout


@pytest.mark.parametrize("config", [DEFAULT_CONFIG, *CONFIGS], ids=lambda p: Path(str(p)).name)
def test_shipped_configs_parse_and_validate(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "class_path: lightning_stthree.ST3PruningCallback" in printed
    assert "target_sparsity:" in printed


def test_recipes_cover_the_paper_settings() -> None:
    names = {p.stem for p in CONFIGS}
    assert "cifar10_resnet20" in names
    assert "fashion_mnist" in names
    for method in ("st3", "st3_sigma"):
        for target in ("80", "90", "95", "96_5", "98", "99"):
            assert f"imagenet_resnet50_{method}_{target}" in names


def test_a_bad_value_in_a_config_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("target_sparsity: 0.9", "target_sparsity: 1.5"))
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert "`target_sparsity` must be in [0, 1), got 1.5" in str(info.value) + capsys.readouterr().err


def test_fashion_mnist_recipe_runs_on_tiny_local_idx_files(tmp_path: Path) -> None:
    make_tiny_idx_dataset(tmp_path / "fashion", num_train=40, num_test=10)
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "configs" / "fashion_mnist.yaml"),
            f"--data.init_args.data_dir={tmp_path / 'fashion'}",
            "--data.init_args.val_size=8",
            "--data.init_args.batch_size=16",
            "--trainer.max_steps=6",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
        ]
    )
    assert cli.trainer.global_step == 6
    assert cli.datamodule.num_classes == 10
    (pruning,) = (c for c in cli.trainer.callbacks if isinstance(c, ST3PruningCallback))
    assert pruning.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
    assert (tmp_path / "runs" / "fashion_mnist_st3_90" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_missing_dataset_error_reaches_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stthree import data

    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
    with pytest.raises(FileNotFoundError, match=r"(?s)Fashion-MNIST.*no-debian-package.*apt-get install"):
        main(
            [
                "fit",
                "--config",
                str(ROOT / "examples" / "configs" / "fashion_mnist.yaml"),
                f"--data.init_args.data_dir={tmp_path / 'empty'}",
                f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
                "--trainer.enable_progress_bar=false",
            ]
        )
