"""Byte-level language modelling on text every machine has: :class:`ByteTextDataModule`.

The default corpus is the Python standard library's own source (every ``*.py`` file under
``sysconfig.get_paths()["stdlib"]``, ``site-packages`` left out): real text, on every machine with Python, nothing
downloaded. ``data_dir`` points at any folder of text files instead. Tokens are bytes (0-255) plus one end-of-file
token (:data:`END_OF_FILE`, 256), so the vocabulary is :data:`BYTE_VOCAB_SIZE` (257) and no tokenizer is needed.

The split is by file and does not depend on the order files are listed in, nor on which other files exist: a file
goes to validation when ``crc32(its path relative to the corpus root) mod 10000`` is below ``val_fraction * 10000``,
to test when it is below ``(val_fraction + test_fraction) * 10000``, else to training. Each split's files, sorted by
path, are concatenated with an end-of-file token after each, and the stream is cut into non-overlapping windows of
``context + 1`` tokens (``context`` inputs and their next-token targets); the tail shorter than a window is dropped.
"""

from __future__ import annotations

import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_stthree.core.checks import check_int
from lightning_stthree.recipes.data.base import check_split_fractions

#: The end-of-file token written after every file (bytes are 0-255).
END_OF_FILE = 256
#: Bytes plus the end-of-file token.
BYTE_VOCAB_SIZE = 257
# How much of a file is read to tell text from binary (a NUL byte means binary).
_SNIFF_BYTES = 8192
_SPLIT_BUCKETS = 10_000

Split = Literal["train", "val", "test"]


def stdlib_source_dir() -> Path:
    """The folder of this Python's standard library sources (the default corpus)."""
    return Path(sysconfig.get_paths()["stdlib"])


def text_files(root: Path, extensions: Sequence[str] | None) -> list[Path]:
    """The text files under ``root`` (recursively, sorted by relative path): those with one of ``extensions``
    (``None``: any), without a NUL byte in their first 8 KiB (binaries), and not under ``site-packages``."""
    wanted = None if extensions is None else {e.lower() for e in extensions}
    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root)
        if "site-packages" in relative.parts or (wanted is not None and path.suffix.lower() not in wanted):
            continue
        with path.open("rb") as handle:
            if b"\0" in handle.read(_SNIFF_BYTES):
                continue
        found.append(path)
    return found


def split_of(relative_path: str, val_fraction: float, test_fraction: float) -> Split:
    """The split a file goes to, from the CRC-32 of its path relative to the corpus root (see the module docstring).

    Example::

        >>> split_of("json/decoder.py", 0.05, 0.05), split_of("json/decoder.py", 0.0, 0.0)
        ('train', 'train')
    """
    bucket = zlib.crc32(relative_path.encode("utf-8")) % _SPLIT_BUCKETS
    if bucket < round(val_fraction * _SPLIT_BUCKETS):
        return "val"
    if bucket < round((val_fraction + test_fraction) * _SPLIT_BUCKETS):
        return "test"
    return "train"


def token_stream(files: Sequence[Path]) -> torch.Tensor:
    """The files' bytes, one after the other, each followed by :data:`END_OF_FILE` (an int16 tensor)."""
    parts = []
    for path in files:
        data = path.read_bytes()
        parts.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16) if data else None)
        parts.append(torch.tensor([END_OF_FILE], dtype=torch.int16))
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int16)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``context + 1`` tokens of a stream: window ``i`` is
    ``stream[i * context : i * context + context + 1]`` (an int64 tensor), the inputs and their next tokens."""

    def __init__(self, stream: torch.Tensor, context: int) -> None:
        self.stream = stream
        self.context = context

    def __len__(self) -> int:
        return max((self.stream.numel() - 1) // self.context, 0)

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} of {len(self)}")
        start = index * self.context
        return self.stream[start : start + self.context + 1].long()


class ByteTextDataModule(pl.LightningDataModule):
    """Byte-level language modelling on local text, split by file (see the module docstring).

    Batches are int64 tensors of shape ``(batch_size, context + 1)``; the training windows are shuffled (with
    ``seed``), the validation and test windows are in order.

    Args:
        data_dir: A folder of text files (searched recursively); ``None``: the Python standard library's sources.
        context: Tokens per training example (the model's context length), >= 1.
        batch_size: Windows per batch, >= 1.
        val_fraction: Fraction of the files (by path hash) for validation, in ``[0, 1)``.
        test_fraction: Fraction of the files for test; ``val_fraction + test_fraction < 1``.
        extensions: File suffixes to read, e.g. ``[".py", ".txt"]``; ``None``: ``[".py"]`` for the standard library,
            any text file (no NUL byte in its first 8 KiB) for a ``data_dir``.
        seed: Seed of the training windows' shuffling.
        num_workers: DataLoader worker processes.

    Attributes:
        vocab_size: 257 (bytes and the end-of-file token), available right after ``__init__`` for the model.

    Raises:
        FileNotFoundError: At setup, naming the folder, when it does not exist or holds no text file, or when a split
            gets no file (too few files for the fractions).
    """

    def __init__(
        self,
        data_dir: str | None = None,
        context: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        extensions: list[str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("context", context, minimum=1)
        check_int("batch_size", batch_size, minimum=1)
        check_split_fractions(val_fraction, test_fraction, "[)")
        if extensions is not None and (
            isinstance(extensions, str) or not all(isinstance(e, str) and e.startswith(".") for e in extensions)
        ):
            raise TypeError(f"`extensions` must be a list of suffixes such as ['.py', '.txt'], got {extensions!r}")
        check_int("num_workers", num_workers, minimum=0)
        self.data_dir = data_dir
        self.context = context
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.extensions = extensions
        self.seed = seed
        self.num_workers = num_workers
        self.vocab_size = BYTE_VOCAB_SIZE
        self.files: dict[Split, list[Path]] = {}
        self.datasets: dict[Split, ByteWindows] = {}

    @property
    def root(self) -> Path:
        """The corpus folder."""
        return stdlib_source_dir() if self.data_dir is None else Path(self.data_dir).expanduser()

    def setup(self, stage: str) -> None:
        if self.datasets:
            return
        root = self.root
        if not root.is_dir():
            raise FileNotFoundError(
                f"`data_dir` {str(root)!r} is not a folder. HINT: point it at a folder of text files"
            )
        extensions = [".py"] if self.extensions is None and self.data_dir is None else self.extensions
        files = text_files(root, extensions)
        if not files:
            kinds = "text files" if extensions is None else f"files ending in {extensions}"
            raise FileNotFoundError(
                f"{str(root)!r} holds no {kinds} (searched recursively; binaries, with a NUL byte in their first "
                "8 KiB, are skipped). HINT: point `data_dir` at a folder of text files, or set `extensions`"
            )
        self.files = {"train": [], "val": [], "test": []}
        for path in files:
            self.files[split_of(path.relative_to(root).as_posix(), self.val_fraction, self.test_fraction)].append(path)
        for split, fraction in (("train", 1.0), ("val", self.val_fraction), ("test", self.test_fraction)):
            if fraction > 0 and not self.files[split]:
                raise FileNotFoundError(
                    f"{str(root)!r} holds {len(files)} text files, and none falls in the {split} split. HINT: add "
                    "files, or change `val_fraction` / `test_fraction`"
                )
        self.datasets = {split: ByteWindows(token_stream(paths), self.context) for split, paths in self.files.items()}

    def _loader(self, split: Split) -> DataLoader:
        dataset = self.datasets[split]
        if len(dataset) == 0:
            raise FileNotFoundError(
                f"the {split} split of {str(self.root)!r} holds fewer than context + 1 = {self.context + 1} tokens. "
                "HINT: add text, lower `context`, or raise the split's fraction"
            )
        generator = torch.Generator().manual_seed(self.seed) if split == "train" else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=split == "train",
            generator=generator,
            num_workers=self.num_workers,
            drop_last=split == "train",
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
