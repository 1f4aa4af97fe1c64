"""The IDX file format of the MNIST family: the four standard file names, parsing, reading and locating the files.

IDX is a 4-byte magic number, big-endian ``uint32`` sizes and raw row-major data; MNIST and Fashion-MNIST ship as
four such files of unsigned bytes (train/test images and labels), each possibly gzip-compressed. This is the only
place that parses them; :mod:`~lightning_stthree.recipes.data.mnist` builds its data modules on top of it.
"""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import torch

# The four files of the MNIST family, by role; each may also exist with a ``.gz`` suffix.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type code of unsigned bytes, the only element type the MNIST family uses.
_IDX_UNSIGNED_BYTE = 0x08


def parse_idx(data: bytes, source: str = "<bytes>") -> torch.Tensor:
    """Parse the bytes of an IDX file of unsigned bytes (the MNIST format) into a ``uint8`` tensor.

    The format is a 4-byte magic number ``0x00 0x00 <type> <ndim>``, ``ndim`` big-endian ``uint32`` sizes, then the
    data in row-major order. Only type ``0x08`` (unsigned byte) is supported: it is the one all MNIST-like
    datasets use.

    Args:
        data: The whole (decompressed) file content.
        source: A name for the data in error messages, usually the file path.

    Returns:
        A ``uint8`` tensor of the shape given in the header (a copy, independent of ``data``).

    Raises:
        ValueError: If the header is not an IDX header of unsigned bytes or the size does not match it.

    Example::

        >>> parse_idx(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])).tolist()
        [7, 8, 9]
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{source} is not an IDX file: its first two bytes must be zero, got {data[:2]!r}")
    if data[2] != _IDX_UNSIGNED_BYTE:
        raise ValueError(
            f"{source} holds IDX type {data[2]:#04x}; only unsigned bytes ({_IDX_UNSIGNED_BYTE:#04x}) are supported"
        )
    ndim = data[3]
    header_size = 4 + 4 * ndim
    if ndim == 0 or len(data) < header_size:
        raise ValueError(f"{source} has a truncated IDX header ({ndim} dimensions, {len(data)} bytes)")
    shape = struct.unpack(f">{ndim}I", data[4:header_size])
    if len(data) - header_size != math.prod(shape):
        raise ValueError(
            f"{source} should hold {math.prod(shape)} bytes of data for shape {tuple(shape)}, "
            f"got {len(data) - header_size} (truncated or corrupted file?)"
        )
    return torch.frombuffer(bytearray(data[header_size:]), dtype=torch.uint8).view(*shape)


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes, gzip-compressed when its name ends with ``.gz``.

    Args:
        path: The file.

    Returns:
        The ``uint8`` tensor it holds, see :func:`parse_idx`.
    """
    path = Path(path)
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return parse_idx(data, source=str(path))


def _find_idx_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The IDX files in ``directory`` by role (uncompressed preferred over ``.gz``), and the names it lacks.

    Args:
        directory: The folder to look in (it need not exist).

    Returns:
        The file found for each role of :data:`IDX_FILES`, and the names (``"<name>[.gz]"``) of those not found.
    """
    found: dict[str, Path] = {}
    missing: list[str] = []
    for role, name in IDX_FILES.items():
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            missing.append(f"{name}[.gz]")
    return found, missing
