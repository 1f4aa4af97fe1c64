"""The import paths of lightning-stthree 0.1, kept working after 0.2 arranged the package in folders.

0.2 put the functional core in ``core/``, the parametrizations in ``methods/``, the Lightning wiring in
``callbacks/``, the sparse-inference conversion in ``inference/`` and the recipes (DataModules, example models,
``stthree``) in ``recipes/``. What users wrote against 0.1 keeps working, resolving to the very same objects:

- the old module paths (``lightning_stthree.data``, ``lightning_stthree.models``, ``lightning_stthree.callback``,
  ``lightning_stthree.parametrization``, ...), in imports, in LightningCLI ``class_path`` entries and in pickles and
  checkpoints that name them, through a module that forwards every attribute to the new one;
- the top-level names that left ``lightning_stthree.__all__`` (``from lightning_stthree import num_pruned``).

Each old path and each old name warns once per process with a ``FutureWarning`` that says where it lives now; they
will be removed in a later release.
"""

from __future__ import annotations
import __future__

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

_PACKAGE = "lightning_stthree"

# Old module (0.1) -> the modules its names live in now, searched in order.
MOVED_MODULES: dict[str, tuple[str, ...]] = {
    f"{_PACKAGE}.{old}": tuple(f"{_PACKAGE}.{new}" for new in news)
    for old, news in {
        "callback": ("callbacks", "callbacks.base", "core.schedule", "core.tracking", "callbacks.st3"),
        "sparse_callback": ("callbacks.base",),
        "parametrization": ("methods.st3", "methods.parametrization"),
        "str_pruning": ("methods.str",),
        "export": ("methods.export",),
        "schedule": ("core.schedule",),
        "selection": ("core.selection",),
        "threshold": ("core.threshold", "core.selection"),
        "flops": ("core.flops",),
        "layers": ("core.layers", "core.registry"),
        "distributed": ("core.distributed",),
        "kernels": ("core.kernels",),
        "data": ("recipes.data",),
        "models": ("recipes.models",),
        "cli": ("recipes.cli",),
    }.items()
}

# Names that were renamed: old name -> new name.
RENAMED: dict[str, str] = {"remove_st3_parametrization": "remove_sparse_parametrization"}

# Names of 0.1 that are gone, with what replaces them (the AttributeError says so).
REMOVED: dict[str, str] = {
    "check_finite_sums": "`select_threshold(..., check_finite=True)` and `global_threshold(..., check_finite=True)` "
    "check the weights on the selection's own pass; `nonfinite_counts(weights)` gives the NaN/Inf counts",
}

# Names of 0.1 that a package no longer holds itself, by package -> {name: the module holding it now}: the top-level
# names that left `lightning_stthree.__all__`, and the internals of 0.1's single-module `inference`.
MOVED_NAMES: dict[str, dict[str, str]] = {
    package: {name: f"{_PACKAGE}.{module}" for module, names in table.items() for name in names}
    for package, table in {
        _PACKAGE: {
            "core.registry": ("PRUNABLE_TYPES",),
            "core.flops": ("measure_layer_macs", "sparse_macs"),
            "core.schedule": ("resolve_step",),
            "core.threshold": ("layer_score_factor", "num_pruned", "pruning_scores"),
            "core.selection": ("nonfinite_counts",),
            "methods.parametrization": ("remove_st3_parametrization",),
            "inference": (
                "LayerChoice",
                "SparseConv2d",
                "SparseInferenceReport",
                "SparseLinear",
                "SparseMultiheadAttention",
            ),
        },
        f"{_PACKAGE}.inference": {
            "inference.convert": ("DEFAULT_MIN_SPEEDUP", "HALF_OUTPUT_TOLERANCE", "OUTPUT_TOLERANCE"),
            "inference.csr": ("conv_output_size", "csr_row_slice"),
            "inference.timing": ("Call", "interleaved_times"),
        },
    }.items()
}

_warned: set[str] = set()


def _warn_once(old: str, new: str, stacklevel: int) -> None:
    if old in _warned:
        return
    warnings.warn(
        f"`{old}` moved to `{new}` in lightning-stthree 0.2; the old path still works but will be removed in a later "
        "release. HINT: update the import (or the `class_path` in your LightningCLI YAML).",
        FutureWarning,
        stacklevel=stacklevel + 1,
    )
    _warned.add(old)  # after the warning: where warnings are errors, every use raises


def _resolve(modules: tuple[str, ...], name: str) -> Any:
    """``name`` (or its new name) from the first of ``modules`` that has it."""
    for module_name in modules:
        module = importlib.import_module(module_name)
        for candidate in (name, RENAMED.get(name)):
            if candidate is not None and hasattr(module, candidate):
                return getattr(module, candidate)
    if name in REMOVED:
        raise AttributeError(f"`{name}` was removed in lightning-stthree 0.2: {REMOVED[name]}")
    raise AttributeError(f"`{name}` is not in {' or '.join(modules)}")


def _holder(targets: tuple[str, ...], name: str) -> types.ModuleType:
    """The first of ``targets`` that has ``name`` (the first target if none has it)."""
    modules = [importlib.import_module(t) for t in targets]
    return next((m for m in modules if hasattr(m, name)), modules[0])


def _is_definition(value: Any) -> bool:
    """Whether a module attribute is something the module defines or re-exports (not a module it imported, nor
    ``from __future__ import annotations``)."""
    return not isinstance(value, (types.ModuleType, __future__._Feature))


class _MovedModule(types.ModuleType):
    """Stands at an old module path: every attribute is read from, and written to, the modules that hold it now (so
    ``monkeypatch.setattr("lightning_stthree.selection.CHUNK_SIZE", ...)`` patches the real module, and its undo puts
    the real value back)."""

    _LOCAL = frozenset({"_targets", "_originals"})

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved to {', '.join(targets)} (lightning-stthree 0.2).")
        self._targets = targets
        self._originals: dict[str, tuple[types.ModuleType, Any]] = {}  # names assigned through the alias

    def __getattr__(self, name: str) -> Any:
        if name == "__all__":  # `from <old module> import *`: the public names the modules holding them now define
            return [n for n in self.__dir__() if not n.startswith("_") and _is_definition(getattr(self, n))]
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return _resolve(self._targets, name)
        except AttributeError:
            if name in REMOVED:
                raise
            moved = " and ".join(self._targets)
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r} (it moved to {moved})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("__") or name in self._LOCAL:
            super().__setattr__(name, value)
            return
        holder = _holder(self._targets, name)
        if hasattr(holder, name):
            self._originals.setdefault(name, (holder, getattr(holder, name)))
        setattr(holder, name, value)

    def __delattr__(self, name: str) -> None:
        # Deleting a name assigned through the alias puts back the value it had before (what `monkeypatch`'s undo
        # means: it sees no entry of the alias's own and deletes); the modules' own names are never deleted.
        if name.startswith("__") or name in self._LOCAL:
            super().__delattr__(name)
        elif name in self._originals:
            holder, value = self._originals.pop(name)
            setattr(holder, name, value)
        else:
            raise AttributeError(
                f"module {self.__name__!r}: only names assigned through it can be deleted, not {name!r}"
            )

    def __dir__(self) -> list[str]:
        names = {n for t in self._targets for n in dir(importlib.import_module(t)) if not n.startswith("__")}
        return sorted(names)


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the old module paths of :data:`MOVED_MODULES` (only those) and loads a :class:`_MovedModule` for each."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED_MODULES:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _MovedModule(spec.name, MOVED_MODULES[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system's own frames are skipped by `warnings`: level 2 is the importing line.
        _warn_once(module.__name__, " and ".join(MOVED_MODULES[module.__name__]), stacklevel=2)


def install() -> None:
    """Let the old module paths import (idempotent). Called by ``lightning_stthree/__init__.py``."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # it claims only the exact old names


def moved_attribute(package: str, name: str) -> Any:
    """A name of 0.1 that ``package`` no longer holds itself (:data:`MOVED_NAMES`), from where it lives now, with a
    ``FutureWarning`` once per process. For the packages' module-level ``__getattr__``.

    Raises:
        AttributeError: If ``name`` was never a name of ``package``.
    """
    old_module = f"{package}.{name}"
    if old_module in MOVED_MODULES:  # `lightning_stthree.threshold` as an attribute, as 0.1 imported it
        _warn_once(old_module, " and ".join(MOVED_MODULES[old_module]), stacklevel=3)  # caller -> __getattr__
        return importlib.import_module(old_module)
    moved = MOVED_NAMES.get(package, {})
    if name not in moved:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    module = moved[name]
    _warn_once(f"{package}.{name}", f"{module}.{RENAMED.get(name, name)}", stacklevel=3)  # caller -> __getattr__
    return _resolve((module,), name)
