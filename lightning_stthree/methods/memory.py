"""Memory for a layer's effective weight, reused from step to step, and the effective weight itself reused while its
inputs have not changed.

On a CPU most of the cost of building a large effective weight is allocating its output: a 536 MB tensor written into
fresh memory takes about five times as long as the same write into memory already touched (page faults of a large
allocation). :class:`ReusedWeightMemory` keeps one effective weight per layer alive between forward passes and writes
the next one into it, with two rules:

- **Never overwrite what someone holds.** A forward pass hands out an alias of the memory (a view); autograd saves that
  alias for the backward pass of the matrix product. Before writing, the memory's storage reference count is compared
  with its count when nobody else held it: while a graph (or any user code) still holds an alias, the next value goes
  into new memory, and the old memory lives as long as its holder. Gradient accumulation, two forwards before one
  backward, activation checkpointing and ``retain_graph`` are therefore exact.
- **Recompute only when an input changed.** The value is keyed by the raw weight's and the threshold's identity,
  memory and in-place version counters, the settings, and the memory's own version (an in-place change of the handed
  out alias). Several forward passes within one optimizer step (gradient accumulation, a validation loop) build the
  effective weight once. In-place changes through ``.data`` are invisible to version counters:
  :meth:`ReusedWeightMemory.invalidate` forgets the value (the callback calls it at every optimizer step).

Under the caller's ``torch.compile`` it is not used (the graph plans its own memory); under a dispatch mode (FLOP
counting, ``FakeTensorMode``) and in inference mode a value already built is reused, but nothing is written
(:meth:`ReusedWeightMemory.reused`). The callback turns it off for weights sharded by FSDP2: holding every layer's
gathered effective weight between forward passes would undo the sharding's memory savings.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch import Tensor


def storage_references(tensor: Tensor) -> int:
    """How many tensors (and storage objects) reference ``tensor``'s memory, as PyTorch counts them."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


class ReusedWeightMemory:
    """One layer's effective-weight memory (see the module docstring for the rules that make the reuse safe).

    Not pickled or deep-copied: a copy starts without memory (it is a cache, rebuilt by the next forward pass).

    Example::

        >>> memory = ReusedWeightMemory()
        >>> weight, threshold = torch.ones(2, 3), torch.zeros(())
        >>> first = memory.value(weight, (threshold,), (), lambda w, out: out.copy_(w * 2))
        >>> second = memory.value(weight, (threshold,), (), lambda w, out: out.copy_(w * 3))  # unchanged inputs
        >>> bool((second == 2).all()), first.data_ptr() == second.data_ptr()
        (True, True)
    """

    def __init__(self) -> None:
        self._memory: Tensor | None = None
        self._free_references = 0  # the memory's storage reference count while nobody else holds it
        self._key: tuple[Hashable, ...] | None = None
        self.writes = 0  # effective weights built (a count for tests and benchmarks)
        self.allocations = 0  # memory allocated for them

    def invalidate(self) -> None:
        """Forget the value: the next forward pass rebuilds it (into the same memory when nobody holds it)."""
        self._key = None

    def release(self) -> None:
        """Drop the memory (and the value): what a graph still holds lives as long as that graph."""
        self._memory = None
        self._key = None

    @property
    def nbytes(self) -> int:
        """Bytes held between forward passes."""
        return 0 if self._memory is None else self._memory.nbytes

    def value(
        self,
        weight: Tensor,
        inputs: tuple[Tensor, ...],
        settings: tuple[Hashable, ...],
        write: Callable[[Tensor, Tensor], Any],
    ) -> Tensor:
        """The effective weight of ``weight``: reused if nothing it depends on changed, else ``write(weight, out)``
        into memory nobody holds.

        Args:
            weight: The raw weight.
            inputs: The other tensors the value depends on (the threshold).
            settings: The plain-Python settings it depends on.
            write: Writes the effective weight of its first argument into its second (same shape and dtype as
                ``weight``, contiguous).

        Returns:
            A fresh alias (view) of the memory: autograd may attach its own history to it.
        """
        key = _key(weight, inputs, settings)
        memory = self._memory
        if memory is not None and self._key is not None and self._key == (*key, memory._version):
            return memory.view(memory.shape)
        if (
            memory is None
            or memory.shape != weight.shape
            or memory.dtype != weight.dtype
            or memory.device != weight.device
            or storage_references(memory) > self._free_references
        ):
            self._memory = memory = None  # the stale one goes first (it may be the only reference)
            memory = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
            self._memory = memory
            self._free_references = storage_references(memory)
            self.allocations += 1
        self._key = None  # a failed write leaves no value behind
        with torch.no_grad():
            write(weight, memory)
        self.writes += 1
        self._key = (*key, memory._version)
        return memory.view(memory.shape)

    def reused(self, weight: Tensor, inputs: tuple[Tensor, ...], settings: tuple[Hashable, ...]) -> Tensor | None:
        """The value :meth:`value` would reuse for these arguments, or ``None`` (it then writes nothing).

        For code that must not write the memory: under a dispatch mode, or in inference mode (inference tensors have
        no version counter; such a weight is never reused)."""
        memory = self._memory
        if memory is None or self._key is None or type(weight) not in (Tensor, torch.nn.Parameter):
            return None  # a tensor subclass (FakeTensor) has no memory of its own to compare
        try:
            key = _key(weight, inputs, settings)
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        return memory.view(memory.shape) if self._key == (*key, memory._version) else None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]

    def __deepcopy__(self, memo: dict[int, Any]) -> ReusedWeightMemory:
        return ReusedWeightMemory()


def _key(weight: Tensor, inputs: tuple[Tensor, ...], settings: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
    return (*_identity(weight), *(part for tensor in inputs for part in _identity(tensor)), *settings)


def _identity(tensor: Tensor) -> tuple[Hashable, ...]:
    """What says a tensor's values are unchanged: the same tensor (or view of the same base), in the same memory, with
    the same layout, not modified in place (views share their base's version counter)."""
    base = tensor if tensor._base is None else tensor._base
    return id(base), tensor.data_ptr(), tensor._version, tensor.shape, tensor.stride(), tensor.dtype
