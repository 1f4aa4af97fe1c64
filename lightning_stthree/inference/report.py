"""What :func:`~lightning_stthree.inference.to_sparse_inference` decided, layer by layer: :class:`LayerChoice` and
:class:`SparseInferenceReport`, which prints as a table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from lightning_stthree.report import format_table


@dataclass
class LayerChoice:
    """What :func:`to_sparse_inference` decided for one prunable layer, and why.

    Attributes:
        name: Module name in the model.
        layer_type: The original layer class name.
        shape: The weight's shape.
        density: Non-zero fraction of the weight.
        dense_ms: Median time of the dense layer on its example input, in milliseconds (None if not timed).
        sparse_ms: Median time of the sparse layer on the same input (None if not timed).
        converted: Whether the model now holds the sparse layer.
        reason: Why, in words.
    """

    name: str
    layer_type: str
    shape: tuple[int, ...]
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    converted: bool
    reason: str

    @property
    def speedup(self) -> float | None:
        """``dense_ms / sparse_ms``, when both were timed."""
        if self.dense_ms is None or self.sparse_ms is None:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SparseInferenceReport:
    """The per-layer choices of :func:`to_sparse_inference` and the end-to-end times on the example input.

    ``print(report)`` shows a table. ``dense_ms`` / ``sparse_ms`` are the medians of the whole model's forward pass
    (dense model vs converted model, interleaved) on the example input.
    """

    layers: list[LayerChoice] = field(default_factory=list)
    dense_ms: float = math.nan
    sparse_ms: float = math.nan
    device: str = "cpu"

    @property
    def speedup(self) -> float:
        """End-to-end ``dense_ms / sparse_ms``."""
        return self.dense_ms / self.sparse_ms

    @property
    def converted(self) -> list[str]:
        """Names of the converted layers."""
        return [choice.name for choice in self.layers if choice.converted]

    def __str__(self) -> str:
        header = ["layer", "type", "shape", "density", "dense ms", "sparse ms", "speedup", "choice"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        cells = [
            [
                c.name,
                c.layer_type,
                "x".join(map(str, c.shape)),
                f"{c.density:.4f}",
                ms(c.dense_ms),
                ms(c.sparse_ms),
                "-" if c.speedup is None else f"x{c.speedup:.2f}",
                ("sparse" if c.converted else "dense") + f" ({c.reason})",
            ]
            for c in self.layers
        ]
        total = ["model", "", "", "", ms(self.dense_ms), ms(self.sparse_ms), f"x{self.speedup:.2f}", self.device]
        return format_table(header, cells, total, left_columns=3)
