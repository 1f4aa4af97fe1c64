"""Causal language modelling over any Hugging Face causal-LM config: :class:`CausalLanguageModel`.

The network is built from its config class with random initialisation (``AutoModelForCausalLM.from_config``; nothing
is downloaded), by default a GPT-2, whose attention and MLP layers are ``transformers.pytorch_utils.Conv1D`` (pruned by
ST-3 along their output dim 1) and whose ``lm_head`` is tied to the token embedding (pruned for both with
``ST3PruningCallback(prune_tied=True)``). ``transformers`` is needed (``pip install "lightning-stthree[lm]"``).
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_stthree.core.checks import check_bool, check_choice, check_int, check_number
from lightning_stthree.recipes.models.schedules import LR_SCHEDULES, LRSchedule, lr_factor_fn

LM_HINT = 'the language-model recipe needs transformers: pip install "lightning-stthree[lm]"'
#: The default network: a small GPT-2 (4 layers, width 256, 4 heads).
DEFAULT_GPT2 = {"n_layer": 4, "n_embd": 256, "n_head": 4}
# Config attributes that bound the context length, by config family.
_POSITIONS = ("n_positions", "max_position_embeddings")


def build_causal_lm(config_class: str, config: dict[str, Any], vocab_size: int, context: int) -> torch.nn.Module:
    """A randomly initialised causal LM from ``config_class(**config)`` with ``vocab_size`` and room for ``context``
    positions.

    Raises:
        ImportError: Without ``transformers``.
        ValueError: If ``config_class`` does not resolve to a ``transformers.PretrainedConfig``, ``config`` sets
            ``vocab_size``, or its position limit is below ``context``.
    """
    try:
        import transformers
    except ImportError as err:
        raise ImportError(LM_HINT) from err
    module_name, _, name = config_class.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except ImportError:
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PretrainedConfig)):
        raise ValueError(
            f"`config_class` must be the import path of a Hugging Face config class, e.g. "
            f"'transformers.GPT2Config', got {config_class!r}"
        )
    if "vocab_size" in config:
        raise ValueError("`config` must not set `vocab_size`: it comes from the `vocab_size` argument (the data's)")
    kwargs = dict(config)
    defaults = cls()
    if not any(key in kwargs for key in _POSITIONS):  # GPT-2 maps one name to the other: set at most one
        key = next((key for key in _POSITIONS if hasattr(defaults, key)), None)
        if key is not None:
            kwargs[key] = context
    for key in ("bos_token_id", "eos_token_id"):
        if hasattr(defaults, key) and key not in kwargs:
            kwargs[key] = vocab_size - 1  # the end-of-file token of the byte data
    built = cls(vocab_size=vocab_size, **kwargs)
    limit = next((getattr(built, key) for key in _POSITIONS if getattr(built, key, None) is not None), None)
    if limit is not None and limit < context:
        raise ValueError(f"the config allows {limit} positions, fewer than `context={context}`")
    return transformers.AutoModelForCausalLM.from_config(built)


class CausalLanguageModel(pl.LightningModule):
    """Next-token prediction with AdamW and a per-step learning-rate schedule, over any HF causal-LM config.

    Batches are int64 tensors ``(batch, context + 1)`` (e.g. :class:`~lightning_stthree.recipes.data.
    ByteTextDataModule`): the first ``context`` tokens are the inputs, each token's target the next one. Logs
    ``train_loss`` (progress bar) every step and, per validation / test, ``val_loss`` / ``test_loss`` (mean
    cross-entropy in nats per token, over all tokens of the loop and all processes), ``val_ppl`` (``exp`` of it) and
    ``val_bpb`` (bits per token: bits per byte for byte data, the end-of-file tokens counted as bytes).
    ``example_input_array`` is one token, so the MACs the callbacks report are **per token** (the pruned layers' MACs
    per token do not depend on the context length). The network is ``self.model``: ``exclude`` patterns read
    ``["model.lm_head"]``.

    Args:
        config_class: Import path of the HF config class, e.g. ``"transformers.GPT2Config"`` or
            ``"transformers.LlamaConfig"``.
        config: Its keyword arguments (``vocab_size`` comes from ``vocab_size``; the position limit defaults to
            ``context``); ``None``: :data:`DEFAULT_GPT2`.
        vocab_size: Tokens of the data (257 for bytes and the end-of-file token).
        context: Longest input, in tokens.
        lr: Peak learning rate of AdamW.
        weight_decay: AdamW's decoupled weight decay, on the parameters with more than one dim (matrices and
            embeddings), not on biases and norms.
        betas: AdamW's ``(beta1, beta2)``.
        lr_schedule: ``"cosine"`` (to 0 at the last step), ``"step"`` or ``"constant"``, per optimizer step.
        warmup_fraction: Fraction of the run with a linear warm-up, in ``[0, 1)``.
        decay_all: Decay every parameter (PyTorch's default) instead of only those with more than one dim.

    Raises:
        TypeError, ValueError: On a bad argument, naming it.

    Example::

        >>> module = CausalLanguageModel(config={"n_layer": 1, "n_embd": 32, "n_head": 2}, context=16)
        >>> module(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 257])
    """

    def __init__(
        self,
        config_class: str = "transformers.GPT2Config",
        config: dict[str, Any] | None = None,
        vocab_size: int = 257,
        context: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        lr_schedule: LRSchedule = "cosine",
        warmup_fraction: float = 0.05,
        decay_all: bool = False,
    ) -> None:
        super().__init__()
        check_int("vocab_size", vocab_size, minimum=2)
        check_int("context", context, minimum=1)
        check_number("lr", lr, 0.0, math.inf, "()")
        check_number("weight_decay", weight_decay, 0.0, math.inf, "[)")
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise TypeError(f"`betas` must be two numbers in [0, 1), got {betas!r}")
        for beta in betas:
            check_number("betas", beta, 0.0, 1.0, "[)")
        check_choice("lr_schedule", lr_schedule, LR_SCHEDULES)
        check_number("warmup_fraction", warmup_fraction, 0.0, 1.0, "[)")
        check_bool("decay_all", decay_all)
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"`config` must be a mapping of the config class's arguments, got {config!r}")
        self.save_hyperparameters()
        self.model = build_causal_lm(
            config_class, dict(DEFAULT_GPT2 if config is None else config), vocab_size, context
        )
        self.example_input_array = torch.zeros(1, 1, dtype=torch.long)
        self.macs_unit = "token"  # what one example input is (the `stthree` summary says it)
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()

    @override
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (nats per token) of a batch of ``context + 1`` token windows."""
        if batch.ndim != 2 or batch.shape[1] < 2:
            raise ValueError(f"a batch must be (batch, context + 1) tokens, got shape {tuple(batch.shape)}")
        logits = self(batch[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))

    @override
    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch.shape[0])
        return loss

    def _evaluate(self, batch: torch.Tensor, metric: MeanMetric) -> None:
        metric.update(self.loss(batch), weight=batch[:, 1:].numel())

    @override
    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loss)

    @override
    def test_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loss)

    def _log_loop(self, stage: Literal["val", "test"], metric: MeanMetric) -> None:
        loss = metric.compute()  # over every token of the loop and every process
        metric.reset()
        self.log(f"{stage}_loss", loss, prog_bar=stage == "val")
        self.log(f"{stage}_ppl", torch.exp(loss), prog_bar=stage == "val")
        self.log(f"{stage}_bpb", loss / math.log(2))

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_loop("val", self.val_loss)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_loop("test", self.test_loss)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        tokens = batch[:, :-1] if batch.ndim == 2 and batch.shape[1] > 1 else batch
        return self(tokens)

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        hparams = self.hparams
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        decayed = [p for _, p in named if hparams.decay_all or p.ndim > 1]
        others = [p for _, p in named if not any(p is d for d in decayed)]
        optimizer = torch.optim.AdamW(
            [{"params": decayed}, {"params": others, "weight_decay": 0.0}],
            lr=hparams.lr,
            betas=tuple(hparams.betas),
            weight_decay=hparams.weight_decay,
        )
        total = self.trainer.estimated_stepping_batches
        if math.isinf(total) and hparams.lr_schedule != "constant":
            raise MisconfigurationException(
                f"`lr_schedule`={hparams.lr_schedule!r} needs the run's length. HINT: set `max_steps` or `max_epochs`"
            )
        factor = lr_factor_fn(
            hparams.lr_schedule, max(int(min(total, 2**62)), 1), warmup_fraction=hparams.warmup_fraction
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
