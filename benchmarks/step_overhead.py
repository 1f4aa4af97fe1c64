"""Training-step time and peak memory with ST3PruningCallback vs dense training, in one process, interleaved rounds.

    python benchmarks/step_overhead.py [--rounds 7] [--steps 12] [--models mlp134m llama resnet18 resnet20]
                                       [--variants default eager compiled copy] [--no-memory] [--out FILE.json]

Models: ``mlp134m`` (8 x ``nn.Linear(4096, 4096)``, 134M weights, batch 8: the weight-heavy regime of transformer
fine-tuning), ``llama`` (Hugging Face ``LlamaForCausalLM`` from its config, random init: 4 layers, hidden 1024,
2 sequences of 64 tokens), torchvision ``resnet18`` (batch 32, 64x64) and the CIFAR ``resnet20`` (batch 128, 32x32);
``resnet50`` (batch 64, 224x224) when a GPU is present. All train with SGD (momentum 0.9, weight decay 1e-4) on one
synthetic batch repeated.

Variants: ``default`` is ``ST3PruningCallback(0.9, start=0, end=1)`` with no other argument (the threshold recomputed
every step at its target, as on a real run's plateau; fused kernels where they build), ``eager`` the same with
``compile_kernels=False``, ``compiled`` with ``compile_kernels=True``, and ``copy`` no callback but a
parametrization that writes a copy of each Linear/Conv weight into memory reused from step to step: one read and one
write of every weight per forward pass, the floor of any weight parametrization (ST-3's effective weight is that plus
the threshold arithmetic; its selection adds about one read).

Each round fits the dense model and one model per variant for ``--steps`` optimizer steps each, on the same batches;
every step is timed from the start of ``on_train_batch_start`` (so the callback's threshold update counts) to the
end of ``on_train_batch_end``. The ratio of each variant's median to the dense median is taken per round; the table
reports the median of those ratios (robust to a noisy machine) and their interquartile range. A warm-up fit of each
model comes first (it compiles the kernels).

Peak memory (unless ``--no-memory``; ``--memory-only`` adds it to an existing ``--out``): each model and variant also
runs alone in a fresh process for a fit of 4 steps; on a CPU the peak resident memory during the fit (``VmHWM``,
reset before it) minus the resident memory just before (weights and batch built), on a GPU
``torch.cuda.max_memory_allocated`` minus the memory allocated before. The table gives each variant's extra peak over
the dense fit's, in units of the prunable weights' bytes; it includes one-time costs: the effective weights' memory,
and with fused kernels the compiler's own memory in the process (about 125 MB on a CPU, whatever the model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader

from lightning_stthree import ST3PruningCallback
from lightning_stthree.methods.memory import ReusedWeightMemory
from lightning_stthree.recipes.models import cifar_resnet

Batch = Any


def _images(batch: int, size: int, classes: int) -> Callable[[], Batch]:
    return lambda: (torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,)))


def _classify(net: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(net(x), y)


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(8):
        layers += [nn.Linear(4096, 4096), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _language_model_loss(net: nn.Module, batch: Batch) -> torch.Tensor:
    return net(input_ids=batch, labels=batch).loss


CONFIGS: dict[str, dict[str, Any]] = {
    "mlp134m": {
        "build": _mlp,
        "batch": lambda: (torch.randn(8, 4096), torch.randint(0, 4096, (8,))),
        "loss": _classify,
        "shape": "8 x 4096",
    },
    "llama": {
        "build": _llama,
        "batch": lambda: torch.randint(0, 4096, (2, 64)),
        "loss": _language_model_loss,
        "shape": "2 x 64 tokens",
    },
    "resnet18": {
        "build": lambda: torchvision.models.resnet18(num_classes=10),
        "batch": _images(32, 64, 10),
        "loss": _classify,
        "shape": "32 x 64x64",
    },
    "resnet20": {
        "build": lambda: cifar_resnet(20),
        "batch": _images(128, 32, 10),
        "loss": _classify,
        "shape": "128 x 32x32",
    },
    "resnet50": {
        "build": lambda: torchvision.models.resnet50(num_classes=1000),
        "batch": _images(64, 224, 1000),
        "loss": _classify,
        "shape": "64 x 224x224",
    },
}

# Variant: `compile_kernels` of its ST3PruningCallback ("default": no argument), or "copy" for the copy floor.
VARIANTS: dict[str, Any] = {"default": "default", "eager": False, "compiled": True, "copy": "copy"}


class StepModule(pl.LightningModule):
    def __init__(self, net: nn.Module, loss: Callable[[nn.Module, Batch], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.loss = loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self.loss(self.net, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)


class _CopyIntoMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, weight: torch.Tensor, memory: ReusedWeightMemory) -> torch.Tensor:
        memory.invalidate()  # rewritten at every forward pass, as ST-3's effective weight is at every step
        return memory.value(weight, (), (), lambda raw, out: out.copy_(raw))

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class Copy(nn.Module):
    """The ``copy`` variant's parametrization: the weight's value written into reused memory (gradient: identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.memory = ReusedWeightMemory()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return _CopyIntoMemory.apply(weight, self.memory)


def prunable(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def register_copies(net: nn.Module) -> None:
    """Put the ``copy`` variant's parametrization on every Conv/Linear weight of ``net``."""
    for module in prunable(net):
        parametrize.register_parametrization(module, "weight", Copy())


class StepTimer(pl.Callback):
    """Wall time of each training batch, from the first `on_train_batch_start` to the last `on_train_batch_end`."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._start)


def _trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def _callback(variant: str) -> ST3PruningCallback | None:
    setting = VARIANTS[variant]
    if setting == "copy":
        return None
    # Target reached at step 1 and recomputed every step: the steady-state cost of ST-3.
    kwargs = {} if setting == "default" else {"compile_kernels": setting}
    return ST3PruningCallback(0.9, start=0, end=1, report=False, log_layer_sparsity=False, **kwargs)


def _module(name: str, variant: str | None, state: dict[str, torch.Tensor] | None = None) -> StepModule:
    config = CONFIGS[name]
    torch.manual_seed(0)
    module = StepModule(config["build"](), config["loss"])
    if state is not None:
        module.load_state_dict(state)
    if variant == "copy":
        register_copies(module.net)
    return module


def _loader(name: str, steps: int) -> DataLoader:
    torch.manual_seed(1)
    batch = CONFIGS[name]["batch"]()
    return DataLoader([batch] * steps, batch_size=None)


def run_round(module: StepModule, loader: DataLoader, steps: int, pruning: ST3PruningCallback | None) -> float:
    timer = StepTimer()
    _trainer(steps, [timer] if pruning is None else [timer, pruning]).fit(module, loader)
    return statistics.median(timer.times[2:])  # the first steps warm up allocators and caches


def quartiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles (inclusive method), as reported next to the median."""
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _peak_resident_bytes() -> int:
    """This process's peak resident memory (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across exec)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_peak(name: str, variant: str, steps: int = 4) -> dict[str, int]:
    """Peak extra memory of ``fit`` for one model and variant (``"dense"`` too), in this process (run it alone).

    Measured against the memory in use just before ``fit`` (weights and batch built), so one-time costs count: the
    effective weights' memory and, for fused kernels, the compiler's own memory (``torch.compile`` in the process).
    """
    module = _module(name, None if variant == "dense" else variant)
    loader = _loader(name, steps)
    pruning = None if variant == "dense" else _callback(variant)
    gpu = torch.cuda.is_available()
    if gpu:
        module.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident memory (the model build's peak is gone)
        before = _resident_bytes()
    _trainer(steps, [] if pruning is None else [pruning]).fit(module, loader)
    peak = torch.cuda.max_memory_allocated() if gpu else _peak_resident_bytes()
    return {"before": before, "peak": peak, "extra": peak - before}


def _peak_in_subprocess(name: str, variant: str) -> dict[str, int]:
    result = subprocess.run(
        [sys.executable, __file__, "--peak-memory", name, variant],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def benchmark(name: str, rounds: int, steps: int, variants: list[str], memory: bool) -> dict[str, Any]:
    dense = _module(name, None)
    state = dense.state_dict()
    loader = _loader(name, steps)
    runs: dict[str, tuple[StepModule, ST3PruningCallback | None]] = {"dense": (dense, None)}
    for variant in variants:
        runs[variant] = (_module(name, variant, state), _callback(variant))
    for module, pruning in runs.values():
        run_round(module, _loader(name, 4), 4, pruning)  # warm-up: allocators, caches, kernel compilation
    times: dict[str, list[float]] = {run: [] for run in runs}
    for _ in range(rounds):
        for run, (module, pruning) in runs.items():
            times[run].append(run_round(module, loader, steps, pruning))
    weights = prunable(dense.net)
    row: dict[str, Any] = {
        "model": name,
        "input": CONFIGS[name]["shape"],
        "prunable_weights": sum(m.weight.numel() for m in weights),
        "prunable_bytes": sum(m.weight.numel() * m.weight.element_size() for m in weights),
        "dense_step_s": statistics.median(times["dense"]),
        "variants": {},
    }
    for variant in variants:
        ratios = [s / d for s, d in zip(times[variant], times["dense"], strict=True)]
        row["variants"][variant] = {
            "step_s": statistics.median(times[variant]),
            "overhead_median_ratio": statistics.median(ratios),
            "overhead_quartile_ratios": quartiles(ratios) if len(ratios) > 1 else (ratios[0], ratios[0]),
            "ratios": ratios,
        }
    del runs, dense
    if memory:
        add_peaks(row, variants)
    return row


def add_peaks(row: dict[str, Any], variants: list[str]) -> None:
    """Measure the dense and each variant's peak extra memory, each in a fresh process, into ``row``."""
    dense_peak = _peak_in_subprocess(row["model"], "dense")
    row["dense_peak_extra_bytes"] = dense_peak["extra"]
    for variant in variants:
        peak = _peak_in_subprocess(row["model"], variant)
        row["variants"][variant]["peak_extra_bytes"] = peak["extra"]
        extra = (peak["extra"] - dense_peak["extra"]) / row["prunable_bytes"]
        row["variants"][variant]["peak_over_dense_in_weights"] = extra


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | input | prunable weights | dense step | variant | step | step / dense (IQR) | peak over dense |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        for variant, v in r["variants"].items():
            low, high = v["overhead_quartile_ratios"]
            peak = v.get("peak_over_dense_in_weights")
            lines.append(
                f"| {r['model']} | {r['input']} | {r['prunable_weights']:,} | {r['dense_step_s']:.4f} s | {variant} | "
                f"{v['step_s']:.4f} s | x{v['overhead_median_ratio']:.3f} (x{low:.3f} to x{high:.3f}) | "
                + ("-" if peak is None else f"{peak:+.2f} x weights")
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["default", "eager", "copy"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--memory-only", action="store_true", help="measure the peaks into an existing --out")
    parser.add_argument("--peak-memory", nargs=2, metavar=("MODEL", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = parser.parse_args(argv)
    if args.peak_memory:
        print(json.dumps(measure_peak(*args.peak_memory)))
        return []
    if args.memory_only:
        saved = json.loads(Path(args.out).read_text())
        for row in saved["results"]:
            if args.models is None or row["model"] in args.models:
                add_peaks(row, list(row["variants"]))
        Path(args.out).write_text(json.dumps(saved, indent=2))
        table = markdown(saved["results"])
        machine = saved["machine"]
        Path(args.out).with_suffix(".md").write_text(
            f"{machine['device']}, torch {machine['torch']}, {machine['rounds']} rounds\n\n" + table
        )
        print(table)
        return saved["results"]
    gpu = torch.cuda.is_available()
    models = args.models or (["mlp134m", "llama", "resnet18", "resnet20"] + (["resnet50"] if gpu else []))
    device = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores)"
    rows = [benchmark(name, args.rounds, args.steps, args.variants, not args.no_memory) for name in models]
    print(f"\nStep time with ST3PruningCallback vs dense on {device}, torch {torch.__version__}, {args.rounds} rounds")
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"device": device, "torch": torch.__version__, "platform": platform.platform(), "rounds": args.rounds}
    out.write_text(json.dumps({"machine": info, "steps": args.steps, "results": rows}, indent=2))
    out.with_suffix(".md").write_text(f"{device}, torch {torch.__version__}, {args.rounds} rounds\n\n" + table)
    print(f"written {out} and {out.with_suffix('.md')}")
    return rows


if __name__ == "__main__":
    main()
