"""Sharded weights: what this rank counts of each weight, and the collective that adds up the other ranks' counts.

Under FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) every rank holds only a slice of each weight, a
``DTensor`` sharded on dim 0 (output channels). ST-3's global threshold and the measured sparsity are counts over all
weights, so they are computed from the local slices and summed across ranks with an all-reduce of a few small count
tensors (never of the weights): :func:`local_parts` says what this rank counts and how to sum. Under DDP (and in a
single process) every rank holds whole weights, nothing is communicated, and every rank computes the same values.

The per-output-channel rescale of ST-3 only needs whole rows, so a dim-0 slice is thresholded on its own
(:func:`on_local_rows`); the other collectives the effective weight needs are FSDP2's own all-gathers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, Replicate

    _HAS_DTENSOR = True
except ImportError:  # torch built without distributed support
    _HAS_DTENSOR = False


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated distributed tensor)."""
    return _HAS_DTENSOR and isinstance(tensor, DTensor)


def local_tensor(tensor: Tensor) -> Tensor:
    """This rank's part of ``tensor``: its local shard if it is a DTensor, else ``tensor`` itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LocalParts:
    """What this rank counts of each weight, and how to add up the counts of all ranks.

    Attributes:
        tensors: One tensor per weight: this rank's shard, the whole weight, or an empty tensor where another rank
            holding the same values counts them (replicated weights are counted once).
        reduce: Sums a count tensor in place over the ranks that hold different parts (an all-reduce per sharded mesh
            dimension) and returns it; ``None`` when every rank holds whole weights (nothing to communicate).
    """

    tensors: list[Tensor]
    reduce: Reduce | None

    def total(self, counts: Tensor) -> Tensor:
        """``counts`` summed over the ranks (``counts`` itself without sharding)."""
        return counts if self.reduce is None else self.reduce(counts)

    def subset(self, indices: Sequence[int]) -> LocalParts:
        """The parts of the weights at ``indices``, summed over the same ranks."""
        return LocalParts([self.tensors[i] for i in indices], self.reduce)

    @torch.no_grad()
    def count(self, count: Callable[[int, Tensor], Tensor]) -> list[int]:
        """``count(index, part)`` of every weight's part, summed over the ranks (one all-reduce when sharded).

        Args:
            count: Returns a 0-dim integer tensor for a non-empty part of weight ``index``; empty parts count 0.

        Returns:
            One exact count per weight, the same on every rank.
        """
        if not self.tensors:
            return []
        device = self.tensors[0].device
        counts = torch.stack(
            [
                count(index, part).to(device=device, dtype=torch.int64)
                if part.numel()
                else torch.zeros((), dtype=torch.int64, device=device)
                for index, part in enumerate(self.tensors)
            ]
        )
        return [int(c) for c in self.total(counts).tolist()]


def local_parts(weights: Sequence[Tensor]) -> LocalParts:
    """Split ``weights`` (plain tensors and/or DTensors on one device mesh) into what this rank counts.

    A DTensor is counted through its local shard on the mesh dimensions it is sharded on, and by the ranks at
    coordinate 0 of those it is replicated on; a plain tensor (a layer left unsharded) only at coordinate 0 of every
    sharded mesh dimension. Summing each rank's counts over the sharded mesh dimensions then counts every weight
    entry exactly once, on every rank.

    Args:
        weights: The tensors (detached or not; only read).

    Returns:
        The :class:`LocalParts`; ``reduce`` is ``None`` when no weight is sharded.

    Raises:
        ValueError: If the DTensors live on different device meshes or have a ``Partial`` placement.
    """
    dtensors = [w for w in weights if is_dtensor(w)]
    if not dtensors:
        return LocalParts(list(weights), None)
    mesh = dtensors[0].device_mesh
    for weight in dtensors:
        if weight.device_mesh != mesh:
            raise ValueError(
                f"the sharded weights live on different device meshes ({mesh} and {weight.device_mesh}); "
                "a global threshold needs them all on one mesh"
            )
        if any(p.is_partial() for p in weight.placements):
            raise ValueError(f"a weight has the placements {weight.placements}; Partial placements are not supported")
    sharded_dims = sorted({d for w in dtensors for d, p in enumerate(w.placements) if p.is_shard()})
    if not sharded_dims:
        return LocalParts([local_tensor(w) for w in weights], None)
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"this rank is not part of the weights' device mesh {mesh}")
    tensors = []
    for weight in weights:
        placements = weight.placements if is_dtensor(weight) else (Replicate(),) * mesh.ndim
        counted = all(placements[d].is_shard() or coordinate[d] == 0 for d in sharded_dims)
        local = local_tensor(weight)
        tensors.append(local if counted else local.reshape(-1)[:0])
    groups = [mesh.get_group(d) for d in sharded_dims]

    def reduce(counts: Tensor) -> Tensor:
        for group in groups:
            torch.distributed.all_reduce(counts, group=group)
        return counts

    return LocalParts(tensors, reduce)


def count_per_tensor(weights: Sequence[Tensor], count: Callable[[int, Tensor], Tensor]) -> list[int]:
    """``count(index, part)`` of every weight, summed over the ranks' parts: :meth:`LocalParts.count` of
    :func:`local_parts` of ``weights``.

    Args:
        weights: Plain tensors or DTensors (see :func:`local_parts`).
        count: Returns a 0-dim integer tensor for a non-empty part of ``weights[index]``; empty parts count 0.

    Returns:
        One exact count per weight, the same on every rank.
    """
    return local_parts(weights).count(count)


def on_local_rows(function: Callable[[Tensor], Tensor], weight: Tensor) -> Tensor:
    """``function(weight)`` for a function that works row by row (output channels, dim 0), on a DTensor's shard.

    A plain tensor is passed through ``function``. A DTensor sharded on dim 0 (FSDP2's default) or replicated has
    whole rows locally: ``function`` runs on the local tensor and the result is a DTensor with the same placements
    (differentiable, so straight-through gradients reach the shard).

    Raises:
        ValueError: If the DTensor is sharded on another dim (rows are split across ranks).
    """
    if not is_dtensor(weight):
        return function(weight)
    split = [p for p in weight.placements if (p.is_shard() and p.dim != 0) or p.is_partial()]
    if split:
        raise ValueError(
            f"a weight sharded with placements {weight.placements} splits its output channels' rows across ranks; "
            "ST-3 rescales each output channel, so weights must be sharded on dim 0 (FSDP2's default; do not pass a "
            "`shard_placement_fn` that shards prunable weights on another dim) or replicated"
        )
    out = function(weight.to_local())
    return DTensor.from_local(
        out, weight.device_mesh, weight.placements, run_check=False, shape=weight.shape, stride=weight.stride()
    )


def follow_parametrization(root: nn.Module, module: nn.Module, name: str) -> None:
    """Tell FSDP2 that ``module.<name>`` moved to ``module.parametrizations.<name>.original``.

    FSDP2 swaps each sharded parameter for its gathered value before the forward pass by setting it on the module it
    found it on when ``fully_shard`` ran. When a parametrization is registered after ``fully_shard`` (layers built and
    sharded in ``configure_model``), the parameter now lives in the parametrization list: FSDP2 must set it there.
    Nothing to do for a parameter FSDP2 does not manage.

    Raises:
        ValueError: If the parameter is shared with another module (tied weights).
    """
    param = module.parametrizations[name].original
    if not is_dtensor(param):
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param import ParamModuleInfo

    for owner in root.modules():
        if not isinstance(owner, FSDPModule):
            continue
        group = owner._get_fsdp_state()._fsdp_param_group
        for fsdp_param in [] if group is None else group.fsdp_params:
            if fsdp_param.sharded_param is not param:
                continue
            if fsdp_param._module_info.shared_modules:
                raise ValueError(
                    f"`{name}` is shared with {len(fsdp_param._module_info.shared_modules)} other modules (tied "
                    "weights), which ST-3 cannot prune under FSDP"
                )
            fsdp_param._module_info = ParamModuleInfo(module.parametrizations[name], "original")
