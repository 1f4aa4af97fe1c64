"""``stthree``: the LightningCLI of lightning-stthree (``fit``, ``validate``, ``test``, ``predict``).

``stthree fit`` with no arguments trains the embedded default (``lightning_stthree/configs/default.yaml``: a small CNN
on scikit-learn's 8x8 digits, 90% sparsity) and prints a summary. Any LightningModule and LightningDataModule can be
given by ``class_path`` (``--model``/``--data`` or a ``--config`` YAML), and ``ST3PruningCallback`` is configured under
``trainer.callbacks`` like any callback.
"""

from __future__ import annotations

import sys
from importlib import resources
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer

from lightning_stthree.callback import ST3PruningCallback

DEFAULT_CONFIG = resources.files("lightning_stthree") / "configs" / "default.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")
INSTALL_HINT = 'the stthree command needs the `cli` extra: pip install "lightning-stthree[cli]"'


def _summary(trainer: Trainer) -> str:
    """What a person wants to see when a run ends: accuracy, sparsity, MACs and where the files are."""
    lines = [f"ST-3 run finished after {trainer.global_step} optimizer steps"]
    metrics = trainer.callback_metrics
    for key in ("val_acc", "val_loss"):
        if key in metrics:
            lines.append(f"  {key:<22} {float(metrics[key]):.4f}")
    for cb in (c for c in trainer.callbacks if isinstance(c, ST3PruningCallback)):
        sparsity, _ = cb.measure_sparsity()
        lines.append(f"  {'sparsity':<22} {sparsity:.4f} (target {cb.target_sparsity}, {len(cb.layers)} layers)")
        macs = cb.measure_macs()
        if macs:
            sparse, dense, ratio = macs["macs_sparse"] / 1e6, macs["macs_dense"] / 1e6, macs["macs_ratio"]
            lines.append(f"  {'MACs per sample':<22} {sparse:.4f} M sparse of {dense:.4f} M dense (ratio {ratio:.4f})")
    if trainer.log_dir is not None:
        lines.append(f"  {'run directory':<22} {trainer.log_dir}")
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and getattr(checkpoint, "last_model_path", ""):
        lines.append(f"  {'checkpoint':<22} {checkpoint.last_model_path}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> Any:
    """Entry point of ``stthree`` and ``python -m lightning_stthree``.

    Args:
        args: Command-line arguments (default: ``sys.argv[1:]``), e.g. ``["fit", "--trainer.max_epochs=2"]``.

    Returns:
        The ``LightningCLI`` instance.
    """
    try:
        import jsonargparse  # noqa: F401  (LightningCLI's parser)
    except ImportError as err:
        raise SystemExit(f"{INSTALL_HINT} ({err})") from err
    from lightning.pytorch.cli import LightningCLI

    class STThreeCLI(LightningCLI):
        """LightningCLI that prints the ST-3 summary after ``fit``."""

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                print(_summary(self.trainer))  # the command's output, not a log line

    return STThreeCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={command: {"default_config_files": [str(DEFAULT_CONFIG)]} for command in SUBCOMMANDS},
        save_config_kwargs={"overwrite": True},
    )


def run() -> None:
    """Console-script entry point (``stthree``): like :func:`main`, with the exit status of a command."""
    main(sys.argv[1:])


if __name__ == "__main__":  # pragma: no cover
    run()
