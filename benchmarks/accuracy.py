"""Accuracy vs sparsity on Fashion-MNIST: dense, GMP, ST-3, ST-3 sigma and STR, same model, optimizer and seeds.

    python benchmarks/accuracy.py                 # the full run: 26 trainings, about 25 min on 2 CPU cores
    python benchmarks/accuracy.py --epochs 2      # the same with 2 epochs per training (about an hour)
    python benchmarks/accuracy.py --quick         # a smoke run of every method in a couple of minutes
    python benchmarks/accuracy.py --methods st3 st3_sigma --sparsities 0.9 0.98 --min-density-ratio 0 0.05
                                                  # the density floor against the pure global threshold
    python benchmarks/accuracy.py --epochs 30 --seeds 0 1 2 --accelerator gpu   # a longer run on a GPU

Every run trains a CIFAR-style ResNet-8 (75k parameters, 1-channel input) on the 60,000 Fashion-MNIST training
images with SGD (lr 0.1, momentum 0.9, weight decay 5e-4, cosine schedule, batch 128, gradients clipped to norm
``--gradient-clip-val`` 1.0) for ``--epochs`` epochs, and reports top-1 accuracy on the 10,000 test images. The
pruned methods prune every Conv/Linear weight (first conv and classifier included) and share one schedule: dense for
the first 5% of the steps, cubic ramp to the target until 50%, then at the target (``ST3PruningCallback``
defaults). GMP is ``ST3PruningCallback(soft_threshold=False, straight_through=False, rescale=False)``: a hard global
magnitude mask, gradients through kept weights only. STR's sparsity is not scheduled; it comes from weight decay on
its per-layer thresholds, so each target gets its own ``s_init`` (:data:`STR_S_INIT`, found by a sweep with this
script's ``--str-s-init``) and the table reports the sparsity it reached.

Why gradient clipping: without it, ST-3 collapsed to chance accuracy at 95% and 98% (``--gradient-clip-val 0``
reproduces that run, written as ``accuracy_clip0.*``). Global magnitude pruning leaves the last convolutions of this
small network at about 1% density; the few kept weights of such a layer are shrunk by the soft threshold, BatchNorm
divides the tiny outputs by their tiny spread, so that layer's gradient grows like one over its effective weights'
norm, and the straight-through estimator hands that gradient to every raw weight, pruned ones included: within a few
steps the raw weights and the threshold blow up. Clipping the gradient norm (the same for all methods) stops it.

``--shrinkages`` trains ST-3 and ST-3 sigma once per shrinkage of the kept weights
(``ST3PruningCallback(shrinkage=...)``: ``soft``, ST-3's, ``hard``, ``firm``, ``half``; same schedule, so the same
sparsity and MACs) and writes
``accuracy_shrinkage*`` files whose table adds the kept weights' relative distortion at the end,
``||w_eff - w|| / ||w||`` over the kept entries of all pruned layers (``w_eff`` is what the layers compute with, the
rescale included)::

    python benchmarks/accuracy.py --methods dense st3 --shrinkages soft hard firm half   # 26 trainings, ~25 min
    python benchmarks/accuracy.py --methods st3 --shrinkages soft hard firm half --sparsities 0.98 --no-rescale

``--min-density-ratio`` sets ``ST3PruningCallback``'s density floor for GMP, ST-3 and ST-3 sigma (default: the
callback's, 0.05); several values train each configuration once per value and write ``accuracy_floor*`` files whose
table also lists the layers the floor held in any step of any seed.

Writes ``accuracy.json`` (every run), ``accuracy.md`` (mean and spread over seeds) and ``accuracy.png``
(accuracy vs sparsity and vs MACs) into ``--out`` (default ``benchmarks/results``). Data is read from local IDX files
(Debian's ``dataset-fashion-mnist`` at ``/usr/share/datasets/fashion-mnist``, or ``--data-dir``); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import Subset

from lightning_stthree import ST3PruningCallback, STRPruningCallback, sparsity_report
from lightning_stthree.callbacks.st3 import DEFAULT_MIN_DENSITY_RATIO
from lightning_stthree.core.layers import pruned_tensor
from lightning_stthree.methods.parametrization import raw_weight
from lightning_stthree.methods.shrinkage import SHRINKAGES, shrink
from lightning_stthree.methods.st3 import find_st3_parametrization
from lightning_stthree.recipes.data import FashionMNISTDataModule
from lightning_stthree.recipes.models import ImageClassifier

METHODS = ("dense", "gmp", "st3", "st3_sigma", "str")
SPARSITIES = (0.9, 0.95, 0.98)
# STR's initial s per target row. STR has no target: s_init sets where its sparsity lands. A `--str-s-init` sweep at
# 2 epochs (seed 0) gave 54% / 75% / 87% sparsity for s_init -4 / -3 / -2.5; these values for the 1-epoch default
# move toward 0 from there (fewer steps of weight decay on s), and the table reports the sparsity actually reached.
STR_S_INIT = {0.9: -2.2, 0.95: -1.9, 0.98: -1.5}
MODEL = "resnet8"


class HeldLayers(pl.Callback):
    """Records every layer an ``ST3PruningCallback`` held at its density floor during the run."""

    def __init__(self, callback: ST3PruningCallback) -> None:
        self.callback = callback
        self.held: set[str] = set()

    def on_train_batch_end(self, *args: Any) -> None:
        self.held.update(self.callback.held_layers)


def make_callback(
    method: str,
    sparsity: float,
    s_init: float | None,
    min_density_ratio: float = DEFAULT_MIN_DENSITY_RATIO,
    shrinkage: str = "soft",
    rescale: bool = True,
) -> pl.Callback | None:
    """The sparse-training callback of ``method`` at ``sparsity`` (``None`` for dense training; STR uses ``s_init``;
    the others the density floor ``min_density_ratio``; ST-3 and ST-3 sigma the ``shrinkage`` of kept weights)."""
    common: dict[str, Any] = {"report": False, "log_layer_sparsity": False}
    if method == "dense":
        return None
    if method == "str":
        return STRPruningCallback(s_init=s_init, **common)
    schedule: dict[str, Any] = {
        "target_sparsity": sparsity,
        "start": 0.05,
        "end": 0.5,
        "min_density_ratio": min_density_ratio,
        **common,
    }
    if method == "gmp":
        return ST3PruningCallback(soft_threshold=False, straight_through=False, rescale=False, **schedule)
    if method == "st3":
        return ST3PruningCallback(shrinkage=shrinkage, rescale=rescale, **schedule)
    if method == "st3_sigma":
        return ST3PruningCallback(criterion="l1_std", shrinkage=shrinkage, rescale=rescale, **schedule)
    raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")


def fit_and_test(
    callbacks: list[pl.Callback],
    seed: int,
    *,
    epochs: int = 1,
    lr: float = 0.1,
    gradient_clip_val: float | None = None,
    accelerator: str = "cpu",
    data_dir: str | None = None,
    train_subset: int = 0,
    test_subset: int = 10_000,
) -> tuple[ImageClassifier, float, float]:
    """Train this benchmark's model and recipe with ``callbacks`` (see the module docstring).

    Returns:
        The trained module, its test accuracy and the training time in seconds.
    """
    pl.seed_everything(seed, verbose=False)
    data = FashionMNISTDataModule(data_dir=data_dir, batch_size=128, val_size=0, seed=seed)
    if train_subset:
        data.setup("fit")
        data.train_dataset = Subset(data.train_dataset, range(train_subset))
        data.setup("test")
        data.test_dataset = Subset(data.test_dataset, range(test_subset))
    model = ImageClassifier(model=MODEL, in_channels=1, image_size=28, lr=lr, weight_decay=5e-4)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=gradient_clip_val,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    return model, trainer.test(model, datamodule=data, verbose=False)[0]["test_acc"], seconds


def run(
    method: str,
    sparsity: float,
    seed: int,
    args: argparse.Namespace,
    s_init: float | None = None,
    min_density_ratio: float = DEFAULT_MIN_DENSITY_RATIO,
    shrinkage: str = "soft",
) -> dict[str, Any]:
    """Train one configuration and measure test accuracy, sparsity and MACs (STR: ``s_init`` or the target's)."""
    if method == "str" and s_init is None:
        s_init = STR_S_INIT[sparsity]
    callback = make_callback(method, sparsity, s_init, min_density_ratio, shrinkage, not args.no_rescale)
    held = HeldLayers(callback) if isinstance(callback, ST3PruningCallback) else None
    model, accuracy, seconds = fit_and_test(
        [c for c in (callback, held) if c is not None],
        seed,
        epochs=args.epochs,
        gradient_clip_val=args.gradient_clip_val or None,
        accelerator=args.accelerator,
        data_dir=args.data_dir,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
    )
    total = sparsity_report(model.model, example_input=torch.zeros(1, 1, 28, 28, device=model.device))[-1]
    result = {
        "method": method,
        "target": None if method == "dense" else sparsity,
        "seed": seed,
        "test_acc": accuracy,
        "sparsity": 1.0 - total["density"],
        "macs_sparse": total["macs_sparse"],
        "macs_dense": total["macs_dense"],
        "train_seconds": seconds,
    }
    if method == "str":
        result["s_init"] = s_init
    if held is not None:
        result["min_density_ratio"] = min_density_ratio
        result["held_layers"] = sorted(held.held)
        result["shrinkage"] = callback.shrinkage
        result["distortion"], result["shrinkage_distortion"] = kept_distortion(callback.layers.values())
    print(json.dumps(result), flush=True)
    return result


@torch.no_grad()
def kept_distortion(layers: Any) -> tuple[float, float]:
    """``||w_eff - w|| / ||w||`` over the kept entries of all ``layers`` (pruned modules, ``w`` their raw weights):
    with ``w_eff`` the weight the layer computes with (the rescale included), and with ``w_eff`` the shrinkage alone
    (:func:`~lightning_stthree.methods.shrinkage.shrink` at the layer's threshold)."""
    sums = [0.0, 0.0, 0.0]  # squared error with the rescale, without it, squared norm
    for module in layers:
        parametrization = find_st3_parametrization(module)
        raw, effective = raw_weight(module).double(), pruned_tensor(module).double()
        kept = effective != 0
        shrunk = shrink(raw, parametrization.threshold.double(), parametrization.shrinkage, parametrization.firm_ratio)
        sums[0] += float((effective - raw)[kept].square().sum())
        sums[1] += float((shrunk - raw)[kept].square().sum())
        sums[2] += float(raw[kept].square().sum())
    return (sums[0] / sums[2]) ** 0.5, (sums[1] / sums[2]) ** 0.5


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread (min-max over seeds) per method and target."""
    groups: dict[tuple[str, str | None, float | None, float | None], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], r.get("shrinkage"), r["target"], r.get("min_density_ratio")), []).append(r)
    rows = []
    for (method, shrinkage, target, ratio), runs in groups.items():
        accs = [r["test_acc"] for r in runs]
        rows.append(
            {
                "method": method,
                "shrinkage": shrinkage,
                "target": target,
                "min_density_ratio": ratio,
                "held_layers": sorted({n for r in runs for n in r.get("held_layers", [])}),
                "seeds": len(runs),
                "acc_mean": statistics.mean(accs),
                "acc_min": min(accs),
                "acc_max": max(accs),
                "sparsity_mean": statistics.mean(r["sparsity"] for r in runs),
                "macs_sparse_mean": statistics.mean(r["macs_sparse"] for r in runs),
                "macs_dense": runs[0]["macs_dense"],
            }
        )
        if shrinkage is not None:
            rows[-1]["distortion_mean"] = statistics.mean(r["distortion"] for r in runs)
            rows[-1]["shrinkage_distortion_mean"] = statistics.mean(r["shrinkage_distortion"] for r in runs)
    order = {m: i for i, m in enumerate(METHODS)}
    return sorted(
        rows,
        key=lambda r: (
            r["target"] or 0.0,
            order[r["method"]],
            SHRINKAGES.index(r["shrinkage"] or "soft"),
            r["min_density_ratio"] or 0.0,
        ),
    )


def markdown(rows: list[dict[str, Any]], floors: bool = False, shrinkages: bool = False) -> str:
    """The summary as a Markdown table (``floors``: with each row's ``min_density_ratio`` and the layers it held;
    ``shrinkages``: with each row's shrinkage and the kept weights' distortion)."""
    extra = " min_density_ratio | layers held (any seed, any step) |" if floors else ""
    extra += " shrinkage |" if shrinkages else ""
    lines = [
        "| target | method |"
        + extra
        + " test acc. (mean, min-max) | sparsity | MMACs / image |"
        + (" kept-weight distortion: shrinkage, with rescale |" if shrinkages else ""),
        "|---|---|"
        + ("---|---|" if floors else "")
        + ("---|" if shrinkages else "")
        + "---|---|---|"
        + ("---|" if shrinkages else ""),
    ]
    for r in rows:
        target = "dense" if r["target"] is None else f"{100 * r['target']:.0f}%"
        cells = ""
        if floors:
            ratio = "-" if r["min_density_ratio"] is None else f"{r['min_density_ratio']:g}"
            cells = f" {ratio} | {', '.join(r['held_layers']) or 'none'} |"
        if shrinkages:
            cells += f" {r['shrinkage'] or '-'} |"
        line = (
            f"| {target} | {r['method']} |{cells} {100 * r['acc_mean']:.2f} ({100 * r['acc_min']:.2f}-"
            f"{100 * r['acc_max']:.2f}) | {100 * r['sparsity_mean']:.2f}% | {r['macs_sparse_mean'] / 1e6:.3f} |"
        )
        if shrinkages:
            if "distortion_mean" in r:
                line += f" {r['shrinkage_distortion_mean']:.3f}, {r['distortion_mean']:.3f} |"
            else:
                line += " - |"
        lines.append(line)
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Accuracy vs sparsity and accuracy vs MACs, one line per method."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), layout="constrained")
    by_sparsity, by_macs = figure.subplots(1, 2)
    lines = sorted(
        {(r["method"], r["min_density_ratio"], r["shrinkage"]) for r in rows},
        key=lambda k: (METHODS.index(k[0]), k[1] or 0, SHRINKAGES.index(k[2] or "soft")),
    )
    several = len({ratio for _, ratio, _ in lines if ratio is not None}) > 1
    several_shrinkages = len({shrinkage for _, _, shrinkage in lines if shrinkage is not None}) > 1
    for method, ratio, shrinkage in lines:
        points = [
            r for r in rows if r["method"] == method and r["min_density_ratio"] == ratio and r["shrinkage"] == shrinkage
        ]
        x = [100 * r["sparsity_mean"] for r in points]
        macs = [r["macs_sparse_mean"] / 1e6 for r in points]
        acc = [100 * r["acc_mean"] for r in points]
        errors = [
            [100 * (r["acc_mean"] - r["acc_min"]) for r in points],
            [100 * (r["acc_max"] - r["acc_mean"]) for r in points],
        ]
        label = f"{method}, min_density_ratio {ratio:g}" if several and ratio is not None else method
        if several_shrinkages and shrinkage is not None:
            label += f", {shrinkage}"
        style = {"marker": "o", "capsize": 3, "label": label}
        by_sparsity.errorbar(x, acc, yerr=errors, **style)
        by_macs.errorbar(macs, acc, yerr=errors, **style)
    by_sparsity.set(xlabel="sparsity of Conv/Linear weights (%)", ylabel="test accuracy (%)")
    by_macs.set(xlabel="MMACs per image", ylabel="test accuracy (%)", xscale="log")
    for axes in (by_sparsity, by_macs):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"Fashion-MNIST, {MODEL}: accuracy vs sparsity (left) and vs MACs (right)")
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--str-s-init", type=float, nargs="+", default=None, help="sweep STR's s_init instead")
    parser.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--gradient-clip-val", type=float, default=1.0, help="gradient norm clipping, 0 for none")
    parser.add_argument("--train-subset", type=int, default=0, help="train on the first N images only")
    parser.add_argument("--test-subset", type=int, default=10_000)
    parser.add_argument(
        "--min-density-ratio",
        type=float,
        nargs="+",
        default=[DEFAULT_MIN_DENSITY_RATIO],
        help="ST3PruningCallback's density floor for gmp/st3/st3_sigma; several values compare them (written as "
        "accuracy_floor*)",
    )
    parser.add_argument(
        "--shrinkages",
        nargs="+",
        default=["soft"],
        choices=SHRINKAGES,
        help="train st3/st3_sigma once per shrinkage of the kept weights (written as accuracy_shrinkage*)",
    )
    parser.add_argument(
        "--no-rescale", action="store_true", help="st3/st3_sigma without the channel rescale (written as *_norescale)"
    )
    parser.add_argument("--quick", action="store_true", help="1 epoch on 2,000 images, one seed, 90%% only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.sparsities = 1, [0], [0.9]
        args.train_subset, args.test_subset = 2000, 1000
    unknown = [s for s in args.sparsities if "str" in args.methods and s not in STR_S_INIT and not args.str_s_init]
    if unknown:
        parser.error(f"STR has no s_init for --sparsities {unknown}; known: {sorted(STR_S_INIT)} (or --str-s-init)")

    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    for seed in args.seeds:
        if args.str_s_init:  # a sweep: one row per s_init, which also stands in the `target` column
            results += [run("str", s, seed, args, s_init=s) for s in args.str_s_init]
            continue
        if "dense" in args.methods:
            results.append(run("dense", 0.0, seed, args))
        for sparsity in args.sparsities:
            for method in [m for m in args.methods if m != "dense"]:
                ratios = [DEFAULT_MIN_DENSITY_RATIO] if method == "str" else args.min_density_ratio
                shrinkages = args.shrinkages if method in ("st3", "st3_sigma") else ["soft"]
                results += [
                    run(method, sparsity, seed, args, min_density_ratio=ratio, shrinkage=shrinkage)
                    for ratio in ratios
                    for shrinkage in shrinkages
                ]
    rows = summarize(results) if not args.str_s_init else results
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"CPU ({os.cpu_count()} cores)"
    info = {
        "device": device,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "epochs": args.epochs,
        "seeds": args.seeds,
        "train_subset": args.train_subset,
        "gradient_clip_val": args.gradient_clip_val,
        "model": MODEL,
        "min_density_ratio": args.min_density_ratio,
        "shrinkages": args.shrinkages,
        "rescale": not args.no_rescale,
        "wall_seconds": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "accuracy_quick" if args.quick else ("str_sweep" if args.str_s_init else "accuracy")
    floors = args.min_density_ratio != parser.get_default("min_density_ratio")
    if floors:
        name += "_floor"
    shrinkages = args.shrinkages != parser.get_default("shrinkages")
    if shrinkages:
        name += "_shrinkage"
    if args.no_rescale:
        name += "_norescale"
    if args.gradient_clip_val != parser.get_default("gradient_clip_val"):
        name += f"_clip{args.gradient_clip_val:g}"
    (out / f"{name}.json").write_text(json.dumps({"machine": info, "runs": results, "summary": rows}, indent=2))
    if not args.str_s_init:
        table = markdown(rows, floors, shrinkages)
        (out / f"{name}.md").write_text(f"{table}\n{info}\n")
        plot(rows, out / f"{name}.png")
        print(table)
    print(f"written {out}/{name}.* in {info['wall_seconds']:.0f} s")
    return {"machine": info, "runs": results, "summary": rows}


if __name__ == "__main__":
    main()
