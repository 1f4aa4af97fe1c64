"""End-to-end inference latency and throughput: dense model vs the model `to_sparse_inference` converts, interleaved.

    python benchmarks/inference.py [--models mlp transformer resnet20 resnet18] [--sparsities 0.9 0.95 0.98]
                                   [--batches 1 8 64] [--rounds 15] [--out benchmarks/results/inference.json]

Models (eval mode, float32, on the CPU, or on the GPU when one is present):

- ``mlp``: 8 x ``Linear(4096, 4096)`` with ReLU;
- ``transformer``: ``nn.TransformerEncoder``, 4 layers, d_model 512, 8 heads, feed-forward 2048, 32 tokens;
- ``resnet20``: the CIFAR ResNet-20 of ``lightning_stthree.recipes.models`` at 32x32;
- ``resnet18``: torchvision's ResNet-18 (1000 classes) at 224x224.

Each model is pruned once at its random initialisation with the package's own global threshold (ST-3 sigma's
``"l1_std"`` scores: a more even spread over layers than plain magnitudes) and made permanent; a trained model has
its own per-layer sparsities, so convert yours and read its report. For each sparsity and batch size, the model is
converted with ``to_sparse_inference`` on an example batch of that size (default ``min_speedup``), then ``--rounds``
rounds each time one forward pass of the dense and of the converted model on the same batch, under
``torch.inference_mode()``. Reported: median latency of each, the median of the per-round ratios (the speedup), the
throughput (samples/s at the median latency) and how many layers were converted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from lightning_stthree import (
    find_prunable_layers,
    make_permanent,
    register_st3_parametrization,
    sparsity_report,
    to_sparse_inference,
)
from lightning_stthree.core.threshold import global_threshold, layer_score_factor
from lightning_stthree.inference.timing import interleaved_times
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.recipes.models import cifar_resnet


def _mlp() -> nn.Module:
    return nn.Sequential(*[layer for _ in range(8) for layer in (nn.Linear(4096, 4096), nn.ReLU())])


def _transformer() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor]]] = {
    "mlp": (_mlp, lambda batch: torch.randn(batch, 4096)),
    "transformer": (_transformer, lambda batch: torch.randn(batch, 32, 512)),
    "resnet20": (lambda: cifar_resnet(20), lambda batch: torch.randn(batch, 3, 32, 32)),
    "resnet18": (lambda: torchvision.models.resnet18(), lambda batch: torch.randn(batch, 3, 224, 224)),
}


@torch.no_grad()
def prune_once(model: nn.Module, sparsity: float) -> nn.Module:
    """Prune ``model`` in place to ``sparsity`` with one global ``"l1_std"`` threshold (ST-3 sigma), made permanent."""
    layers = list(find_prunable_layers(model).values())
    parametrizations = [register_st3_parametrization(layer) for layer in layers]
    raw = [raw_weight(layer) for layer in layers]
    threshold = float(global_threshold(raw, sparsity, criterion="l1_std"))
    for parametrization, weight in zip(parametrizations, raw, strict=True):
        parametrization.threshold.fill_(threshold / layer_score_factor(weight.shape, "l1_std"))
    return make_permanent(model)


def measure(dense: nn.Module, sparse: nn.Module, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median latencies (ms) of both models and the median of the per-round ratios, interleaved after a warm-up."""
    with torch.inference_mode():
        times = interleaved_times({"dense": dense, "sparse": sparse}, ((x,), {}), rounds, x.device)
    ratios = [d / s for d, s in zip(times["dense"], times["sparse"], strict=True)]
    return {
        "dense_ms": 1000 * statistics.median(times["dense"]),
        "sparse_ms": 1000 * statistics.median(times["sparse"]),
        "speedup": statistics.median(ratios),
    }


def run(model_name: str, sparsity: float, batch: int, rounds: int, repeats: int, device: torch.device) -> dict:
    build, make_input = MODELS[model_name]
    torch.manual_seed(0)
    dense = prune_once(build(), sparsity).eval().to(device)
    x = make_input(batch).to(device)
    start = time.perf_counter()
    sparse, report = to_sparse_inference(dense, x, repeats=repeats)
    convert_seconds = time.perf_counter() - start
    result = measure(dense, sparse, x, rounds)
    with torch.inference_mode():
        expected = dense(x)
        error = float((sparse(x) - expected).abs().max() / expected.abs().max())
    return {
        "model": model_name,
        "target_sparsity": sparsity,
        "measured_sparsity": 1.0 - sparsity_report(dense)[-1]["density"],
        "batch": batch,
        **result,
        "dense_samples_per_s": 1000 * batch / result["dense_ms"],
        "sparse_samples_per_s": 1000 * batch / result["sparse_ms"],
        "converted_layers": len(report.converted),
        "prunable_layers": len(report.layers),
        "convert_seconds": convert_seconds,
        "max_relative_error": error,
        "report": str(report),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | sparsity | batch | dense ms | sparse ms | speedup | samples/s dense → sparse | layers converted |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['model']} | {r['target_sparsity']:.0%} | {r['batch']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} "
        f"| x{r['speedup']:.2f} | {r['dense_samples_per_s']:.0f} → {r['sparse_samples_per_s']:.0f} "
        f"| {r['converted_layers']}/{r['prunable_layers']} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.98])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64])
    parser.add_argument("--rounds", type=int, default=15, help="timed forward passes per model and configuration")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per layer when converting")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "inference.json")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    machine = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    print(f"{machine['device']}, {machine['threads']} threads, torch {machine['torch']}")
    rows = []
    for model_name in args.models:
        for sparsity in args.sparsities:
            for batch in args.batches:
                row = run(model_name, sparsity, batch, args.rounds, args.repeats, device)
                rows.append(row)
                print(
                    f"{model_name:<12} {sparsity:.0%} batch {batch:>3}: dense {row['dense_ms']:8.2f} ms, sparse "
                    f"{row['sparse_ms']:8.2f} ms, x{row['speedup']:.2f}, {row['converted_layers']}/"
                    f"{row['prunable_layers']} layers converted (conversion {row['convert_seconds']:.1f} s)",
                    flush=True,
                )
    print()
    print(markdown(rows))
    result = {"machine": machine, "arguments": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    return result


if __name__ == "__main__":
    main()
