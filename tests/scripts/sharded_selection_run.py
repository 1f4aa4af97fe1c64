"""Run by ``tests/callbacks/test_sharded.py`` as a script: the global threshold over weights sharded across 4 CPU
processes (gloo).

Every rank builds the same full weights from one seed, shards them as DTensors (FSDP2's ``Shard(0)`` on a 1-D mesh;
HSDP's ``(Replicate(), Shard(0))`` on a 2x2 mesh; some layers left as plain tensors) and computes the threshold from
its shards with the package's functions. It saves, per case, that threshold, the single-process threshold on the
full weights and ``torch.kthvalue`` of the concatenated scores, plus the bytes the selection all-reduced, for the
test to compare.

Usage: ``python sharded_selection_run.py OUT_DIR`` (spawns 4 processes).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from lightning_stthree.core.distributed import count_per_tensor

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from sharded_threshold import count_all_reduce_bytes  # the benchmark's own byte count

from lightning_stthree.core.selection import nonfinite_counts
from lightning_stthree.core.threshold import global_threshold, num_pruned, pruning_scores, weighted_global_threshold

WORLD = 4
# Rows 37 and 5 split unevenly, 3 and 1 rows leave some ranks without any row.
SHAPES = [(37, 64), (5, 3, 3, 3), (200, 30), (3, 7), (1, 10)]


def _weights(kind: str, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for shape in SHAPES:
        w = torch.randn(shape, generator=generator)
        if kind == "tied":
            w = (w * 4).round() / 4
        elif kind == "equal":
            w = torch.full(shape, -0.5)
        elif kind == "zeros":
            w = w * (torch.rand(shape, generator=generator) < 0.1)
        elif kind == "denormal":
            w = w * 1e-39
        out.append(w.to(dtype))
    return out


def _run(rank: int, out_dir: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 4 processes share the cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    meshes = {
        "fsdp": (init_device_mesh("cpu", (WORLD,)), (Shard(0),)),
        "hsdp": (init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard")), (Replicate(), Shard(0))),
    }
    sent = count_all_reduce_bytes()
    results: dict[str, Any] = {}
    for mesh_name, (mesh, placements) in meshes.items():
        for kind in ("random", "tied", "equal", "zeros", "denormal"):
            dtypes = (torch.float32, torch.float16, torch.bfloat16) if kind in ("random", "tied") else (torch.float32,)
            for dtype in dtypes:
                full = _weights(kind, dtype)
                # The last layer stays a plain tensor, as a layer left out of fully_shard.
                sharded = [distribute_tensor(w, mesh, placements) for w in full[:-1]] + [full[-1]]
                for criterion in ("l1", "l1_std"):
                    for sparsity in (0.1, 0.9, 0.999):
                        key = f"{mesh_name}/{kind}/{dtype}/{criterion}/{sparsity}"
                        before = sent[0]
                        got = global_threshold(sharded, sparsity, criterion, pivot=0.3)
                        bytes_sent = sent[0] - before
                        reference = global_threshold(full, sparsity, criterion)
                        scores = torch.cat([pruning_scores(w, criterion) for w in full])
                        k = num_pruned(sparsity, scores.numel())
                        results[key] = (got, reference, torch.kthvalue(scores, k).values, bytes_sent)
                shares = [float(i + 1) for i in range(len(full))]
                got = weighted_global_threshold(sharded, shares, 0.7, "l1_std")
                results[f"{mesh_name}/{kind}/{dtype}/flops"] = (
                    got,
                    weighted_global_threshold(full, shares, 0.7, "l1_std"),
                    None,
                    0,
                )
        full = _weights("random", torch.float32)
        full[0][3, 5] = float("nan")
        full[2][150, 0] = float("inf")
        full[2][199, 1] = float("nan")
        sharded = [distribute_tensor(w, mesh, placements) for w in full[:-1]] + [full[-1]]
        results[f"{mesh_name}/nonfinite"] = nonfinite_counts(sharded)
        results[f"{mesh_name}/positive"] = count_per_tensor(sharded, lambda _, part: (part > 0).sum())
        results[f"{mesh_name}/positive_reference"] = [int((w > 0).sum()) for w in full]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(_run, args=(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 29517), nprocs=WORLD, join=True)
