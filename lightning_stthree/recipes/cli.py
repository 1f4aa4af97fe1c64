"""``stthree``: the LightningCLI of lightning-stthree (``fit``, ``validate``, ``test``, ``predict``).

``stthree fit`` with no arguments trains the embedded default (``lightning_stthree/recipes/configs/default.yaml``: a
small CNN on scikit-learn's 8x8 digits, 90% sparsity) and prints a summary. Any LightningModule and LightningDataModule
can be given by ``class_path`` (``--model``/``--data`` or a ``--config`` YAML), and ``ST3PruningCallback`` (or
``STRPruningCallback``) is configured under ``trainer.callbacks`` like any callback.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_stthree.callbacks.base import SparseTrainingCallback
from lightning_stthree.callbacks.st3 import ST3PruningCallback

DEFAULT_CONFIG = resources.files("lightning_stthree.recipes") / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
INSTALL_HINT = 'the stthree command needs the `cli` extra: pip install "lightning-stthree[cli]"'
# Attributes of the shipped DataModules that the shipped ImageClassifier must agree with.
SHAPE_ATTRIBUTES = ("num_classes", "in_channels", "image_size")
# Attributes of the text DataModule that the shipped CausalLanguageModel must agree with.
TEXT_ATTRIBUTES = ("vocab_size", "context")


def summary(trainer: Trainer, log_dir: str | None) -> str:
    """What a person wants to see when a run ends: accuracy, sparsity, MACs and where the files are.

    Every rank must call it under sharded training (the sparsity is counted from the shards with a collective)."""
    methods = [c for c in trainer.callbacks if isinstance(c, SparseTrainingCallback)]
    name = " + ".join(c.method_name for c in methods) or "Dense"
    lines = [f"{name} run finished after {trainer.global_step} optimizer steps"]
    metrics = trainer.callback_metrics
    for key in ("val_acc", "val_loss", "val_ppl", "val_bpb"):
        if key in metrics:
            lines.append(f"  {key:<22} {float(metrics[key]):.4f}")
    for cb in methods:
        sparsity, _ = cb.measure_sparsity()
        target = f"target {cb.target_sparsity}, " if isinstance(cb, ST3PruningCallback) else ""
        lines.append(f"  {'sparsity':<22} {sparsity:.4f} ({target}{len(cb.layers)} layers)")
        macs = cb.measure_macs()
        if macs:
            sparse, dense, ratio = macs["macs_sparse"] / 1e6, macs["macs_dense"] / 1e6, macs["macs_ratio"]
            unit = f"MACs per {getattr(trainer.lightning_module, 'macs_unit', 'sample')}"
            lines.append(f"  {unit:<22} {sparse:.4f} M sparse of {dense:.4f} M dense (ratio {ratio:.4f})")
    if log_dir is not None:
        lines.append(f"  {'run directory':<22} {log_dir}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "last_model_path", ""):
        lines.append(f"  {'checkpoint':<22} {checkpoint.last_model_path}")
    return "\n".join(lines)


def check_model_matches_data(model: LightningModule, datamodule: LightningDataModule | None) -> None:
    """Refuse a shipped ImageClassifier (CausalLanguageModel) whose shape (vocabulary, context) arguments disagree
    with a shipped DataModule's.

    Raises:
        ValueError: Naming each mismatched argument and the command-line option that fixes it.
    """
    from lightning_stthree.recipes.data import ByteTextDataModule, ImageDataModule
    from lightning_stthree.recipes.models import CausalLanguageModel, ImageClassifier

    if isinstance(model, ImageClassifier) and isinstance(datamodule, ImageDataModule):
        names: tuple[str, ...] = SHAPE_ATTRIBUTES
    elif isinstance(model, CausalLanguageModel) and isinstance(datamodule, ByteTextDataModule):
        names = TEXT_ATTRIBUTES
    else:
        return
    mismatched = [
        f"--model.init_args.{name} {getattr(datamodule, name)} (got {model.hparams[name]})"
        for name in names
        if model.hparams[name] != getattr(datamodule, name)
    ]
    if mismatched:
        raise ValueError(
            f"The model's arguments do not match {type(datamodule).__name__}'s data. HINT: pass "
            + ", ".join(mismatched)
        )


def validate_if_never_validated(
    trainer: Trainer, model: LightningModule, datamodule: LightningDataModule | None
) -> None:
    """Validate once after ``fit`` when the run ended before its first validation (``--trainer.max_steps 20`` of a
    recipe that validates every 250 steps), so that the summary reports the validation metrics of the model handed
    back. Only in one process, with validation batches allowed and a ``val_dataloader``."""
    if any(key.startswith("val_") for key in trainer.callback_metrics) or trainer.world_size != 1:
        return
    if trainer.limit_val_batches == 0 or datamodule is None or not is_overridden("val_dataloader", datamodule):
        return
    trainer.validate(model, datamodule=datamodule, verbose=False)


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``stthree`` and ``python -m lightning_stthree``.

    Args:
        args: Command-line arguments, e.g. ``["fit", "--trainer.max_epochs=2"]``; ``None`` reads ``sys.argv``.

    Returns:
        The ``LightningCLI`` instance.
    """
    try:
        import jsonargparse  # noqa: F401  (LightningCLI's parser)
    except ImportError as err:
        raise SystemExit(f"{INSTALL_HINT} ({err})") from err
    from lightning.pytorch.cli import LightningCLI

    class STThreeCLI(LightningCLI):
        """LightningCLI that checks the model against the data, prints a summary and keeps predictions."""

        def _before_run(self) -> None:
            check_model_matches_data(self.model, self.datamodule)

        def _warn_without_checkpoint(self) -> None:
            if self.config_init[self.subcommand].get("ckpt_path") is None:
                rank_zero_warn(
                    f"`stthree {self.subcommand}` without `--ckpt_path` evaluates the freshly initialised model. "
                    "HINT: pass --ckpt_path runs/<name>/version_<n>/checkpoints/last.ckpt"
                )

        def before_fit(self) -> None:
            self._before_run()

        def before_validate(self) -> None:
            self._before_run()
            self._warn_without_checkpoint()

        def before_test(self) -> None:
            self._before_run()
            self._warn_without_checkpoint()

        def before_predict(self) -> None:
            self._before_run()
            self._warn_without_checkpoint()

        def after_fit(self) -> None:
            validate_if_never_validated(self.trainer, self.model, self.datamodule)
            log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
            text = summary(self.trainer, log_dir)  # sharded weights are counted by every rank
            if self.trainer.is_global_zero:
                print(text)  # the command's output, not a log line

        def after_predict(self) -> None:
            log_dir = self.trainer.log_dir
            predictions = self.trainer.predict_loop.predictions
            if self.trainer.is_global_zero and predictions:
                path = Path(log_dir or self.trainer.default_root_dir) / "predictions.pt"
                path.parent.mkdir(parents=True, exist_ok=True)
                outputs = (
                    torch.cat([p.detach().cpu() for p in predictions]) if _all_tensors(predictions) else predictions
                )
                torch.save(outputs, path)
                shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else len(outputs)
                print(f"predictions ({shape}) saved to {path}")

    return STThreeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={command: {"default_config_files": [str(DEFAULT_CONFIG)]} for command in SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
    )


def _all_tensors(items: list[Any]) -> bool:
    return all(isinstance(item, torch.Tensor) for item in items)


def run() -> None:
    """Console-script entry point (``stthree`` and ``python -m lightning_stthree``).

    After a successful DDP run the process group is destroyed before the interpreter exits: a process that exits with
    a live gloo group can abort at shutdown ("terminate called without an active exception", pytorch#190489). It is
    not destroyed after a failure, where the other ranks may still be inside a collective.
    """
    main()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    run()
