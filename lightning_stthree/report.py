"""Per-layer sparsity and MACs report, for programs (a list of dicts) and people (a plain-text or rich table)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_stthree.core.distributed import count_per_tensor
from lightning_stthree.core.flops import measure_layer_macs
from lightning_stthree.core.layers import find_prunable_layers, layer_type, pruned_tensor
from lightning_stthree.methods.measure import received_sparsity
from lightning_stthree.methods.parametrization import find_sparse_parametrization, reads_tied_weight

REPORT_COLUMNS = ("name", "type", "shape", "weights", "zeros", "density", "macs_dense", "macs_sparse", "pruned")
TOTAL_ROW_NAME = "total"


@torch.no_grad()
def sparsity_report(
    model: nn.Module,
    example_input: Any = None,
    layer_macs: Mapping[str, float] | None = None,
    check_received: bool = False,
    input_density: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """One row per ``nn.Linear``/``nn.Conv1d/2d/3d``/``nn.MultiheadAttention`` of ``model``
    (parametrized by ST-3 or plain), then a total row.

    Each row has the keys of :data:`REPORT_COLUMNS`: ``name`` (module name), ``type`` (layer class, as before any
    parametrization), ``shape`` (weight shape, a list), ``weights``, ``zeros`` (exactly-zero entries of the effective
    weight), ``density`` (non-zero fraction), ``macs_dense`` and ``macs_sparse`` (per input sample, ``None`` when no
    MACs are known) and ``pruned`` (whether ST-3 parametrizes it). The last row has ``name == "total"`` and the sums
    (its ``density`` is over all weights, its ``shape``/``type``/``pruned`` are ``None``).

    Args:
        model: Any model.
        example_input: An example batch to measure MACs with (see
            :func:`~lightning_stthree.core.flops.measure_layer_macs`); ignored when ``layer_macs`` is given.
        layer_macs: Dense MACs per layer name, if already measured.
        check_received: Also give each row ``received_zeros``: the fraction of zeros in the weight the layer's matrix
            products and convolutions receive on ``example_input`` (needs it;
            :func:`~lightning_stthree.methods.measure.received_sparsity`), to compare with ``1 - density``. A layer
            whose forward transforms its weight shows fewer zeros there than in ``zeros``.
        input_density: Each layer's fraction of non-zero input elements (sparse activations,
            :attr:`~lightning_stthree.ActivationSparsityCallback.input_density`): ``macs_sparse`` then counts both
            sparsities (weight density x input density x dense MACs).

    With sharded (FSDP2) weights every rank must call it: the zeros are counted shard by shard and all-reduced.

    Returns:
        The rows, ready for ``pandas.DataFrame(rows)`` or :func:`format_report`.
    """
    # A layer reading another layer's effective weight (`prune_tied=True`) holds no tensor of its own: its one tensor
    # is counted once, in the row of the layer that prunes it.
    layers = {n: m for n, m in find_prunable_layers(model).items() if not reads_tied_weight(m)}
    if check_received and example_input is None:
        raise ValueError("`check_received=True` needs an `example_input` to run the layers' operations on")
    received = received_sparsity(model, example_input, layers) if check_received else None
    if layer_macs is None and example_input is not None:
        layer_macs = measure_layer_macs(model, example_input, layers)
    rows: list[dict[str, Any]] = []
    weights = [pruned_tensor(module) for module in layers.values()]
    all_zeros = count_per_tensor(weights, lambda _, part: torch.count_nonzero(part == 0))
    for (name, module), weight, zeros in zip(layers.items(), weights, all_zeros, strict=True):
        density = 1.0 - zeros / weight.numel()
        dense = None if layer_macs is None else float(layer_macs.get(name, 0.0))
        rows.append(
            {
                "name": name,
                "type": layer_type(module).__name__,
                "shape": list(weight.shape),
                "weights": weight.numel(),
                "zeros": zeros,
                "density": density,
                "macs_dense": dense,
                "macs_sparse": None if dense is None else density * (input_density or {}).get(name, 1.0) * dense,
                "pruned": find_sparse_parametrization(module) is not None,
                **({} if received is None else {"received_zeros": received[name]}),
            }
        )
    weights = sum(r["weights"] for r in rows)
    zeros = sum(r["zeros"] for r in rows)
    known = layer_macs is not None
    rows.append(
        {
            "name": TOTAL_ROW_NAME,
            "type": None,
            "shape": None,
            "weights": weights,
            "zeros": zeros,
            "density": 1.0 - zeros / weights if weights else 1.0,
            "macs_dense": sum(r["macs_dense"] for r in rows) if known else None,
            "macs_sparse": sum(r["macs_sparse"] for r in rows) if known else None,
            "pruned": None,
            **({} if received is None else {"received_zeros": None}),
        }
    )
    return rows


def _millions(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def report_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the report table (MACs in millions), shared by the plain and rich renderings."""
    header = ["layer", "type", "shape", "weights", "zeros", "density", "MMACs dense", "MMACs sparse"]
    cells = [
        [
            str(row["name"]) + ("" if row["pruned"] in (True, None) else " (not pruned)"),
            row["type"] or "",
            "x".join(map(str, row["shape"])) if row["shape"] else "",
            str(row["weights"]),
            str(row["zeros"]),
            f"{row['density']:.4f}",
            _millions(row["macs_dense"]),
            _millions(row["macs_sparse"]),
        ]
        for row in rows
    ]
    return header, cells


def format_table(header: list[str], cells: list[list[str]], total: list[str], left_columns: int) -> str:
    """A plain-text table: header, rule, rows, rule, total row; the first ``left_columns`` columns left-aligned."""
    widths = [max(len(line[i]) for line in [header, *cells, total]) for i in range(len(header))]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.ljust(w) if i < left_columns else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ).rstrip()

    rule = "-" * max(len(line(header)), *(len(line(c)) for c in [*cells, total]))
    return "\n".join([line(header), rule, *(line(c) for c in cells), rule, line(total)])


def format_report(rows: list[dict[str, Any]]) -> str:
    """The report as a plain-text table (MACs in millions), for logs."""
    header, cells = report_cells(rows)
    return format_table(header, cells[:-1], cells[-1], left_columns=3)


def print_rich_report(rows: list[dict[str, Any]], title: str) -> None:
    """Print the report as a rich table (through rich's console, as Lightning's ``RichProgressBar`` does); layer
    names are never truncated: the console is widened to the table."""
    from rich.console import Console
    from rich.table import Table

    header, cells = report_cells(rows)
    table = Table(title=title)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index < 3 else "right", no_wrap=True)
    for index, line in enumerate(cells):
        table.add_row(*line, end_section=index == len(cells) - 2)
    # rich assumes 80 columns without a tty.
    needed = sum(max(len(c[i]) for c in [header, *cells]) + 3 for i in range(len(header))) + 1
    console = Console()
    console.width = max(console.width, needed)
    console.print(table)
