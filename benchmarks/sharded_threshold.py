"""Bytes communicated and time per global-threshold update with weights sharded across processes (FSDP2).

    python benchmarks/sharded_threshold.py [--sizes 0.27M 11.7M 25.6M 124M] [--world 2] [--out FILE.json]

Each of ``--world`` CPU processes (gloo) holds a ``Shard(0)`` slice of every weight (FSDP2's layout: rows split as
``torch.chunk`` splits them), with the shapes of a real model of each size (see ``threshold_selection.py``). The
package's selection runs on the DTensors: every rank builds two radix histograms over its shards and all-reduces them.
The bytes handed to ``all_reduce`` are counted (a wrapper around ``torch.distributed.all_reduce``); the time is the
median of ``--repeats`` updates, each started after a barrier. Rank 0 then computes the threshold of the same full
weights in one process (the first-update path, no pivot) and checks it is bitwise the sharded one. Under DDP every
process holds whole weights and computes the threshold alone: 0 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from threshold_selection import shapes

from lightning_stthree.core.threshold import global_threshold

SPARSITY = 0.9


def _full_weights(size: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator) * 0.05 for shape in shapes(size)]


def count_all_reduce_bytes() -> list[int]:
    """Wrap ``torch.distributed.all_reduce`` (for the rest of the process) to add up the bytes it is handed; the
    returned one-item list holds the running total."""
    sent = [0]
    original = dist.all_reduce

    def counting(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        sent[0] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    return sent


def _run(rank: int, world: int, port: int, sizes: list[str], repeats: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sent = count_all_reduce_bytes()
    rows = []
    for size in sizes:
        full = _full_weights(size)
        sharded = [
            DTensor.from_local(w.chunk(world)[rank].clone(), mesh, [Shard(0)], shape=w.shape, stride=w.stride())
            for w in full
        ]
        if rank != 0:
            del full
        times, per_update = [], []
        for _ in range(repeats):
            dist.barrier()
            before = sent[0]
            start = time.perf_counter()
            threshold = global_threshold(sharded, SPARSITY)
            times.append(time.perf_counter() - start)
            per_update.append(sent[0] - before)
        row: dict[str, Any] = {
            "size": size,
            "weights": sum(w.numel() for w in sharded),
            "tensors": len(sharded),
            "bytes_per_update": per_update[0],
            "bytes_constant": len(set(per_update)) == 1,
            "sharded_ms": statistics.median(times) * 1e3,
        }
        dist.barrier()
        if rank == 0:
            single = []
            for _ in range(repeats):
                start = time.perf_counter()
                reference = global_threshold(full, SPARSITY)
                single.append(time.perf_counter() - start)
            row["single_process_ms"] = statistics.median(single) * 1e3
            row["bitwise_equal"] = bool(torch.equal(reference, threshold))
            rows.append(row)
            print(
                f"{size:>6} {row['weights']:>12,} weights: {row['bytes_per_update']:,} bytes per update, "
                f"{row['sharded_ms']:.1f} ms sharded over {world}, {row['single_process_ms']:.1f} ms in one "
                f"process, bitwise equal: {row['bitwise_equal']}",
                flush=True,
            )
            del full
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"world": world, "rows": rows}))
    dist.destroy_process_group()


def markdown(rows: list[dict[str, Any]], world: int) -> str:
    lines = [
        f"| weights | tensors | bytes all-reduced per update | update, sharded over {world} (ms) "
        "| update, one process (ms) | bitwise equal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['size']} ({r['weights']:,}) | {r['tensors']} | {r['bytes_per_update']:,} | {r['sharded_ms']:.1f} "
            f"| {r['single_process_ms']:.1f} | {'yes' if r['bitwise_equal'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["0.27M", "11.7M", "25.6M", "124M"])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--port", type=int, default=29531)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sharded_threshold.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".raw.json")
    mp.spawn(_run, args=(args.world, args.port, args.sizes, args.repeats, str(raw)), nprocs=args.world, join=True)
    result = json.loads(raw.read_text())
    raw.unlink()
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, gloo"
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result["rows"], args.world)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
