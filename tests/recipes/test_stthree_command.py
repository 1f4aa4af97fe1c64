"""The `stthree` command (LightningCLI), its embedded default and the shipped YAML recipes (issue 5)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import make_tiny_idx_dataset

from lightning_stthree import SparseTrainingCallback, ST3PruningCallback, STRPruningCallback
from lightning_stthree.recipes.cli import DEFAULT_CONFIG, main
from lightning_stthree.recipes.models import CausalLanguageModel, ImageClassifier

ROOT = Path(__file__).parents[2]
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


def _subset(printed: object, written: object) -> bool:
    """Whether everything ``written`` says is in ``printed`` (which also lists every default)."""
    if isinstance(written, dict):
        return isinstance(printed, dict) and all(_subset(printed.get(k), v) for k, v in written.items())
    if isinstance(written, list) and written and isinstance(written[0], dict):
        return isinstance(printed, list) and len(printed) == len(written) and all(map(_subset, printed, written))
    return printed == written


@pytest.mark.parametrize("config", [DEFAULT_CONFIG, *CONFIGS], ids=lambda p: Path(str(p)).name)
def test_shipped_configs_parse_validate_and_say_what_they_say(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    written = yaml.safe_load(Path(str(config)).read_text())
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    # What the parser ends up with is what the file says (the embedded default does not leak into a recipe) ...
    for section in ("trainer", "model", "data", "seed_everything"):
        assert _subset(printed[section], written[section]), section
    # ... and the values are valid: the callback and the model accept them.
    callback = written["trainer"]["callbacks"][0]
    {
        "lightning_stthree.ST3PruningCallback": ST3PruningCallback,
        "lightning_stthree.STRPruningCallback": STRPruningCallback,
    }[callback["class_path"]](**callback["init_args"])
    model_class = {
        "lightning_stthree.recipes.models.ImageClassifier": ImageClassifier,
        "lightning_stthree.recipes.models.CausalLanguageModel": CausalLanguageModel,
    }[written["model"]["class_path"]]
    model = model_class(**written["model"]["init_args"])
    for name in ("num_classes", "vocab_size", "context"):
        if name in written["model"]["init_args"]:
            assert model.hparams[name] == written["model"]["init_args"][name]


def _recipe(name: str) -> dict:
    return yaml.safe_load((ROOT / "examples" / "configs" / f"{name}.yaml").read_text())


def test_cifar10_recipe_is_the_papers_schedule() -> None:
    config = _recipe("cifar10_resnet20")
    epochs = config["trainer"]["max_epochs"]
    pruning = config["trainer"]["callbacks"][0]["init_args"]
    assert epochs == 170  # 160 epochs of sparse training + 10 with the mask frozen
    assert (pruning["start"] * epochs, pruning["end"] * epochs, pruning["freeze_at"] * epochs) == pytest.approx(
        (5, 80, 160)
    )
    assert (pruning["target_sparsity"], pruning["criterion"], pruning["power"]) == (0.9, "l1", 3)
    model = config["model"]["init_args"]
    assert model["model"] == "resnet20"
    assert [m * epochs for m in model["lr_milestones"]] == pytest.approx([80, 120])
    assert (model["lr"], model["momentum"], model["weight_decay"]) == (0.1, 0.9, 1e-4)
    assert config["data"]["init_args"]["batch_size"] == 128


@pytest.mark.parametrize("method", ["st3", "st3_sigma"])
@pytest.mark.parametrize(
    ("label", "target"), [("80", 0.8), ("90", 0.9), ("95", 0.95), ("96_5", 0.965), ("98", 0.98), ("99", 0.99)]
)
def test_imagenet_recipes_are_the_papers_schedule(method: str, label: str, target: float) -> None:
    config = _recipe(f"imagenet_resnet50_{method}_{label}")
    epochs = config["trainer"]["max_epochs"]
    pruning = config["trainer"]["callbacks"][0]["init_args"]
    assert epochs == 110  # 100 epochs of sparse training + 10 with the mask frozen
    assert (pruning["start"] * epochs, pruning["end"] * epochs, pruning["freeze_at"] * epochs) == pytest.approx(
        (5, 50, 100)
    )
    assert pruning["target_sparsity"] == target
    assert pruning["criterion"] == ("l1_std" if method == "st3_sigma" else "l1")
    model = config["model"]["init_args"]
    assert (model["model"], model["label_smoothing"], model["lr_schedule"]) == ("resnet50", 0.1, "cosine")
    assert model["warmup_fraction"] * epochs == pytest.approx(5)


def test_a_bad_value_in_a_config_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(DEFAULT_CONFIG.read_text().replace("target_sparsity: 0.9", "target_sparsity: 1.5"))
    with pytest.raises((SystemExit, ValueError)) as info:
        main(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert "`target_sparsity` must be in [0, 1), got 1.5" in str(info.value) + capsys.readouterr().err


@pytest.mark.parametrize(("recipe", "run_name"), [("", "st3_90"), ("_gmp", "gmp_90"), ("_str", "str")])
def test_fashion_mnist_recipes_run_on_tiny_local_idx_files(tmp_path: Path, recipe: str, run_name: str) -> None:
    make_tiny_idx_dataset(tmp_path / "fashion", num_train=40, num_test=10)
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "examples" / "configs" / f"fashion_mnist{recipe}.yaml"),
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
    (pruning,) = (c for c in cli.trainer.callbacks if isinstance(c, SparseTrainingCallback))
    if recipe == "_str":
        assert isinstance(pruning, STRPruningCallback)
        assert pruning.s_init == -2.5
        assert 0.0 < pruning.measure_sparsity()[0] < 1.0
    else:
        assert pruning.measure_sparsity()[0] == pytest.approx(0.9, abs=0.005)
        flags = (pruning.soft_threshold, pruning.straight_through, pruning.rescale)
        assert flags == ((False,) * 3 if recipe == "_gmp" else (True,) * 3)
    assert (tmp_path / "runs" / f"fashion_mnist_{run_name}" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_missing_dataset_error_reaches_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_stthree.recipes.data import mnist

    monkeypatch.setattr(mnist, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-package")
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


def _fit_default(tmp_path: Path, *extra: str):  # type: ignore[no-untyped-def]
    return main(
        [
            "fit",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            *extra,
        ]
    )


def test_validate_test_predict_on_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fit_default(tmp_path)
    last = tmp_path / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    common = ["--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    tested = main(["test", f"--ckpt_path={last}", *common])
    assert tested.trainer.callback_metrics["test_acc"] > 0.5
    capsys.readouterr()
    predicted = main(["predict", f"--ckpt_path={last}", *common])
    out = capsys.readouterr().out
    match = re.search(r"predictions \(\(270, 10\)\) saved to (\S+)", out)
    assert match, out
    predictions = torch.load(match.group(1), weights_only=True)
    assert predictions.shape == (270, 10)  # the 270 test digits, 10 logits each
    assert predicted.trainer.state.finished
    with pytest.warns(UserWarning, match=r"without `--ckpt_path` evaluates the freshly initialised model"):
        main(["validate", *common])


def test_model_that_does_not_fit_the_data_is_refused(tmp_path: Path) -> None:
    make_tiny_idx_dataset(tmp_path / "fashion", num_train=20, num_test=10)
    with pytest.raises(ValueError, match=r"HINT: pass --model.init_args.image_size 28 \(got 8\)"):
        _fit_default(
            tmp_path,
            "--data=lightning_stthree.recipes.data.FashionMNISTDataModule",
            f"--data.init_args.data_dir={tmp_path / 'fashion'}",
        )


@pytest.mark.slow
def test_stthree_fit_under_ddp(tmp_path: Path) -> None:
    executable = Path(sys.executable).with_name("stthree")
    result = subprocess.run(
        [
            str(executable),
            "fit",
            "--trainer.max_epochs=1",
            "--trainer.strategy=ddp",
            "--trainer.devices=2",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ST-3 run finished") == 1  # rank zero only
    assert re.search(r"sparsity\s+0\.9\d* \(target 0\.9", result.stdout)
    assert (tmp_path / "runs" / "digits" / "version_0" / "st3_sparsity.png").is_file()
