"""Validation perplexity against sparsity for a byte-level GPT-2: dense, GMP, ST-3 and ST-3 sigma, same budget.

    python benchmarks/language_model.py            # dense + 3 methods x 50/80/90%, seeds 0 and 1 (20 trainings)
    python benchmarks/language_model.py --quick    # a smoke run: one seed, 80%, a few steps

Every run trains the same GPT-2 (``--layers`` 4, ``--width`` 128, 4 heads, ``--context`` 128; built from
``transformers.GPT2Config`` with random init) on the bytes of the Python standard library's sources
(:class:`~lightning_stthree.recipes.data.ByteTextDataModule`, split by file), with AdamW (lr 2e-3, weight decay 0.1,
5% warm-up, cosine), batch ``--batch`` 8, gradients clipped to norm 1, for ``--steps`` optimizer steps, and reports the
loss on the first ``--val-batches`` validation batches (in order, the same tokens for every run): nats per token,
perplexity and bits per byte. The pruned methods prune every ``Conv1D`` and the tied ``lm_head`` (``prune_tied=True``:
the embedding lookup uses the same pruned matrix) on one schedule: dense for 5% of the steps, cubic ramp to the
target until 60%. GMP is ``ST3PruningCallback(soft_threshold=False, straight_through=False, rescale=False)``. The
unigram baseline is the cross-entropy of the validation tokens under the training bytes' frequencies.

It also records the per-layer density ST-3 and ST-3 sigma chose (attention ``c_attn``/``c_proj``, MLP
``c_fc``/``c_proj``, ``lm_head``) and tries the sparse-inference export (``to_sparse_inference``) on the ST-3 model at
the highest target: which layers convert and the measured speedup for one new token per sequence (the matrix shapes of
a decoding step) at batch 1 and 8.

Writes ``language_model.json``, ``language_model.md`` and ``language_model.png`` into ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_stthree import ST3PruningCallback, to_sparse_inference
from lightning_stthree.recipes.data import BYTE_VOCAB_SIZE, ByteTextDataModule
from lightning_stthree.recipes.models import CausalLanguageModel

METHODS = ("dense", "gmp", "st3", "st3_sigma")
SPARSITIES = (0.5, 0.8, 0.9)
GROUPS = {"attention": ("attn.c_attn", "attn.c_proj"), "mlp": ("mlp.c_fc", "mlp.c_proj"), "lm_head": ("lm_head",)}


def make_callback(method: str, sparsity: float) -> ST3PruningCallback | None:
    """The method's callback at ``sparsity`` (``None`` for dense)."""
    if method == "dense":
        return None
    common: dict[str, Any] = {
        "target_sparsity": sparsity,
        "start": 0.05,
        "end": 0.6,
        "prune_tied": True,
        "report": False,
        "log_layer_sparsity": False,
    }
    if method == "gmp":
        return ST3PruningCallback(soft_threshold=False, straight_through=False, rescale=False, **common)
    if method == "st3":
        return ST3PruningCallback(**common)
    if method == "st3_sigma":
        return ST3PruningCallback(criterion="l1_std", **common)
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def group_densities(callback: ST3PruningCallback) -> dict[str, float]:
    """Density of the weights of each layer group (attention, MLP, lm_head) the callback prunes."""
    _, per_layer = callback.measure_sparsity()
    densities = {}
    for group, suffixes in GROUPS.items():
        names = [n for n in callback.layers if n.endswith(suffixes)]
        sizes = {n: callback.layers[n].weight.numel() for n in names}
        kept = sum((1.0 - per_layer[n]) * sizes[n] for n in names)
        densities[group] = kept / sum(sizes.values()) if names else float("nan")
    return densities


def unigram_loss(data: ByteTextDataModule, tokens: torch.Tensor) -> float:
    """Cross-entropy (nats per token) of ``tokens`` under the training stream's token frequencies (add-one)."""
    counts = torch.bincount(data.datasets["train"].stream.long(), minlength=BYTE_VOCAB_SIZE).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return float(-log_p[tokens].mean())


def run(method: str, sparsity: float, seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """Train one configuration; its result row and the trained module."""
    pl.seed_everything(seed, verbose=False)
    data = ByteTextDataModule(context=args.context, batch_size=args.batch, seed=seed)
    model = CausalLanguageModel(
        config={"n_layer": args.layers, "n_embd": args.width, "n_head": 4},
        context=args.context,
        lr=2e-3,
        weight_decay=0.1,
        warmup_fraction=0.05,
    )
    callback = make_callback(method, sparsity)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        callbacks=[] if callback is None else [callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=args.val_batches,
        num_sanity_val_steps=0,
        val_check_interval=args.steps,
        check_val_every_n_epoch=None,
        gradient_clip_val=1.0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    loss = float(trainer.validate(model, datamodule=data, verbose=False)[0]["val_loss"])
    result: dict[str, Any] = {
        "method": method,
        "target": None if callback is None else sparsity,
        "seed": seed,
        "val_loss": loss,
        "val_ppl": math.exp(loss),
        "val_bpb": loss / math.log(2),
        "sparsity": 0.0 if callback is None else callback.measure_sparsity()[0],
        "train_seconds": seconds,
    }
    if callback is not None:
        result["densities"] = group_densities(callback)
        result["held_layers"] = callback.held_layers
    print(json.dumps(result), flush=True)
    return result, model


def export_trial(model: CausalLanguageModel, batches: tuple[int, ...]) -> list[dict[str, Any]]:
    """Which layers ``to_sparse_inference`` converts, and the end-to-end speedup, for one new token per sequence."""
    rows = []
    for batch in batches:
        tokens = torch.zeros(batch, 1, dtype=torch.long)
        _, report = to_sparse_inference(model, tokens)
        print(report, flush=True)
        rows.append({"batch": batch, "converted": report.converted, "speedup": report.speedup})
    return rows


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per method and target."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r["target"]), []).append(r)
    rows = []
    for (method, target), runs in groups.items():
        ppl = [r["val_ppl"] for r in runs]
        row = {
            "method": method,
            "target": target,
            "seeds": len(runs),
            "ppl_mean": statistics.mean(ppl),
            "ppl_min": min(ppl),
            "ppl_max": max(ppl),
            "bpb_mean": statistics.mean(r["val_bpb"] for r in runs),
            "sparsity_mean": statistics.mean(r["sparsity"] for r in runs),
        }
        if "densities" in runs[0]:
            row["densities"] = {g: statistics.mean(r["densities"][g] for r in runs) for g in GROUPS}
        rows.append(row)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(rows, key=lambda r: (r["target"] or 0.0, order[r["method"]]))


def markdown(rows: list[dict[str, Any]], unigram: float) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| target | method | val. perplexity (mean, min-max) | bits per byte | density attention / MLP / lm_head |",
        "|---|---|---|---|---|",
        f"| - | unigram | {math.exp(unigram):.2f} | {unigram / math.log(2):.3f} | |",
    ]
    for r in rows:
        target = "dense" if r["target"] is None else f"{100 * r['target']:.0f}%"
        dens = " / ".join(f"{100 * r['densities'][g]:.1f}%" for g in GROUPS) if "densities" in r else ""
        lines.append(
            f"| {target} | {r['method']} | {r['ppl_mean']:.3f} ({r['ppl_min']:.3f}-{r['ppl_max']:.3f}) | "
            f"{r['bpb_mean']:.3f} | {dens} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Perplexity against sparsity per method, and the layer groups' density ST-3 and ST-3 sigma chose."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    by_sparsity, by_group = figure.subplots(1, 2)
    dense = [r for r in rows if r["method"] == "dense"]
    for method in METHODS[1:]:
        points = [r for r in rows if r["method"] == method]
        if points:
            by_sparsity.plot(
                [100 * r["sparsity_mean"] for r in points], [r["ppl_mean"] for r in points], "o-", label=method
            )
    if dense:
        by_sparsity.axhline(dense[0]["ppl_mean"], color="gray", linestyle="--", label="dense")
    by_sparsity.set(xlabel="sparsity of the pruned weights (%)", ylabel="validation perplexity")
    width = 0.8 / max(1, 2 * len({r["target"] for r in rows if r["target"]}))
    bars = [r for r in rows if r["method"] in ("st3", "st3_sigma") and "densities" in r]
    for i, r in enumerate(bars):
        xs = [j + (i - len(bars) / 2) * width for j in range(len(GROUPS))]
        by_group.bar(
            xs, [100 * r["densities"][g] for g in GROUPS], width, label=f"{r['method']} {100 * r['target']:.0f}%"
        )
    by_group.set_xticks(range(len(GROUPS)), list(GROUPS))
    by_group.set(ylabel="density of the group's weights (%)", yscale="log")
    for axes in (by_sparsity, by_group):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.suptitle("byte-level GPT-2 on the Python standard library: perplexity (left), per-layer density (right)")
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--val-batches", type=int, default=100)
    parser.add_argument("--export-batches", type=int, nargs="*", default=[1, 8])
    parser.add_argument("--quick", action="store_true", help="one seed, 80%%, 10 steps, 4 validation batches")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.sparsities, args.val_batches = 10, [0], [0.8], 4
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    exported: list[dict[str, Any]] = []
    for seed in args.seeds:
        if "dense" in args.methods:
            results.append(run("dense", 0.0, seed, args)[0])
        for sparsity in args.sparsities:
            for method in [m for m in args.methods if m != "dense"]:
                result, model = run(method, sparsity, seed, args)
                results.append(result)
                if method == "st3" and seed == args.seeds[0] and sparsity == max(args.sparsities):
                    exported = export_trial(model, tuple(args.export_batches))
    data = ByteTextDataModule(context=args.context, batch_size=args.batch)
    data.setup("fit")
    batches = itertools.islice(data.val_dataloader(), args.val_batches)
    val_tokens = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    unigram = unigram_loss(data, val_tokens)
    rows = summarize(results)
    info = {
        "device": f"CPU ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python_stdlib_files": {split: len(files) for split, files in data.files.items()},
        "python_stdlib_bytes": {split: int(d.stream.numel()) for split, d in data.datasets.items()},
        "steps": args.steps,
        "seeds": args.seeds,
        "model": {"layers": args.layers, "width": args.width, "heads": 4, "context": args.context},
        "batch": args.batch,
        "val_batches": args.val_batches,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "language_model_quick" if args.quick else "language_model"
    payload = {"machine": info, "runs": results, "summary": rows, "unigram_loss": unigram, "export": exported}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    table = markdown(rows, unigram)
    export_lines = "".join(
        f"- export, batch {e['batch']}: converted {e['converted'] or 'none'}, end-to-end x{e['speedup']:.2f}\n"
        for e in exported
    )
    (out / f"{name}.md").write_text(f"{table}\n{export_lines}\n{info}\n")
    plot(rows, out / f"{name}.png")
    print(table + export_lines)
    print(f"written {out}/{name}.* in {info['wall_seconds']:.0f} s")
    return payload


if __name__ == "__main__":
    main()
