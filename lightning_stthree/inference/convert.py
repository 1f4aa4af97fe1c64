"""The conversion: :func:`to_sparse_inference` replaces each layer whose CSR kernel is faster on the example input by
its sparse version, checking that the outputs agree, and :func:`restore_sparse_inference` rebuilds a converted model
from its ``state_dict``.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_stthree.core.checks import check_int, check_number
from lightning_stthree.core.layers import find_prunable_layers, pruned_tensor
from lightning_stthree.inference.csr import _CSR_KEYS
from lightning_stthree.inference.modules import SparseConv2d, SparseLinear, SparseMultiheadAttention, _CSRLayer
from lightning_stthree.inference.report import LayerChoice, SparseInferenceReport
from lightning_stthree.inference.timing import Call, median_ms
from lightning_stthree.methods.export import make_permanent

# Default ratio dense time / sparse time a layer must reach to be converted: a margin over timing noise so that a
# converted layer is faster, not merely as fast (the per-layer "never slower than dense" guarantee).
DEFAULT_MIN_SPEEDUP = 1.1
# Largest difference between a converted layer's output and the dense layer's, relative to the largest dense output
# magnitude, per dtype: the sparse kernels sum the same products in another order.
OUTPUT_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-4}
HALF_OUTPUT_TOLERANCE = 2e-2

# How PyTorch says that a sparse kernel does not exist for a dtype or device (e.g. CPU float16/bfloat16 CSR addmm).
_UNSUPPORTED = re.compile(r"not implemented|not supported|unsupported", re.IGNORECASE)


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _places(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """Where each submodule sits, by ``id``: every ``(parent, attribute name)`` (a shared module has several)."""
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent.named_children():
            places.setdefault(id(child), []).append((parent, child_name))
    return places


def _replace(places: dict[int, list[tuple[nn.Module, str]]], module: nn.Module, replacement: nn.Module) -> None:
    for parent, child_name in places[id(module)]:
        setattr(parent, child_name, replacement)


def _not_convertible(module: nn.Module) -> str | None:
    """Why ``module`` keeps its dense form whatever the timings, or None if it can be converted."""
    kind = type(module)
    if parametrize.is_parametrized(module):
        return "weight has a parametrization that is not ST-3's"
    if isinstance(module, nn.MultiheadAttention):
        if kind.forward is not nn.MultiheadAttention.forward:
            return f"{kind.__name__} has its own forward"
        if not module._qkv_same_embed_dim:
            return "kdim/vdim differ from embed_dim: no packed in_proj_weight"
        if module.bias_k is not None or module.add_zero_attn:
            return "add_bias_kv/add_zero_attn are not supported"
        return None
    conv1d = _hf_conv1d()
    if isinstance(module, (nn.Linear, nn.Conv2d)) or (conv1d is not None and isinstance(module, conv1d)):
        base = next(b for b in (nn.Linear, nn.Conv2d, conv1d) if b is not None and isinstance(module, b))
        return None if kind.forward is base.forward else f"{kind.__name__} has its own forward"
    return f"no sparse kernel for {kind.__name__}"


def _hf_conv1d() -> type | None:
    """Hugging Face's ``Conv1D`` (GPT-2's layers: ``y = x W + b``, ``W`` stored ``(in, out)``) if ``transformers`` is
    imported (it holds no model of this process otherwise)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def _sparse_version(module: nn.Module) -> _CSRLayer:
    if isinstance(module, nn.MultiheadAttention):
        return SparseMultiheadAttention.from_dense(module)
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module)
    conv1d = _hf_conv1d()
    if conv1d is not None and isinstance(module, conv1d):
        return SparseLinear.from_conv1d(module)
    return SparseConv2d.from_dense(module)


def _tensors(output: Any) -> list[Tensor]:
    return [t for t in (output if isinstance(output, tuple) else (output,)) if isinstance(t, Tensor)]


def _check_output(name: str, dense: Any, sparse: Any) -> None:
    """Raise if the sparse version's output tensors differ from the dense one's beyond :data:`OUTPUT_TOLERANCE`."""
    for expected, actual in zip(_tensors(dense), _tensors(sparse), strict=True):
        tolerance = OUTPUT_TOLERANCE.get(expected.dtype, HALF_OUTPUT_TOLERANCE)
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        error = float((actual.float() - expected.float()).abs().max()) if expected.numel() else 0.0
        if not error <= tolerance * max(scale, 1e-30):
            raise RuntimeError(
                f"The sparse version of `{name}` gives outputs that differ from the dense layer's by {error:.3g} "
                f"(largest output {scale:.3g}, allowed {tolerance:g} of it). This is a bug; please report it with "
                "the layer's configuration."
            )


def _capture_inputs(model: nn.Module, layers: Mapping[str, nn.Module], example_args: tuple[Any, ...]) -> dict:
    """Each layer's ``(args, kwargs)`` on its first call during one forward pass of ``model``."""
    captured: dict[str, Call] = {}

    def recorder(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            captured.setdefault(name, (args, kwargs))

        return record

    handles = [module.register_forward_pre_hook(recorder(name), with_kwargs=True) for name, module in layers.items()]
    try:
        model(*example_args)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _new_choice(name: str, module: nn.Module) -> LayerChoice:
    weight = pruned_tensor(module)
    return LayerChoice(
        name=name,
        layer_type=type(module).__name__,
        shape=tuple(weight.shape),
        density=float(torch.count_nonzero(weight)) / weight.numel(),
        dense_ms=None,
        sparse_ms=None,
        converted=False,
        reason="",
    )


def _decide(
    choice: LayerChoice, module: nn.Module, call: Call | None, min_speedup: float, repeats: int, device: torch.device
) -> nn.Module | None:
    """Fill in ``choice`` for ``module`` called as ``call``; the sparse version if it is to replace the layer."""
    choice.reason = _not_convertible(module) or ("not called by the example input" if call is None else "")
    if choice.reason or call is None:
        return None
    args, kwargs = call
    sparse = _sparse_version(module).train(module.training)  # new modules start in training mode (dropout)
    try:
        sparse_output = sparse(*args, **kwargs)
    except (RuntimeError, NotImplementedError) as error:
        if not _UNSUPPORTED.search(str(error)):
            raise
        choice.reason = f"no sparse kernel here: {str(error).splitlines()[0]}"
        return None
    _check_output(choice.name, module(*args, **kwargs), sparse_output)
    timings = median_ms({"dense": module, "sparse": sparse}, call, repeats, device)
    choice.dense_ms, choice.sparse_ms = timings["dense"], timings["sparse"]
    choice.converted = choice.dense_ms >= min_speedup * choice.sparse_ms
    choice.reason = f"{'>=' if choice.converted else '<'} x{min_speedup:g} faster"
    return sparse if choice.converted else None


@torch.no_grad()  # not inference_mode: its tensors could not be used, or loaded into, outside of it
def to_sparse_inference(
    model: nn.Module,
    example_input: Any,
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    repeats: int = 10,
    inplace: bool = False,
) -> tuple[nn.Module, SparseInferenceReport]:
    """A copy of the trained ``model`` for inference in which each layer whose CSR kernel is faster runs sparse.

    Steps: copy ``model`` (unless ``inplace``), remove the ST-3/STR parametrizations (:func:`make_permanent`), switch
    to ``eval()``, run the example input once to record each prunable layer's input, then for each ``nn.Linear``,
    ``nn.Conv2d``, ``nn.MultiheadAttention`` (with its ``out_proj``) and Hugging Face ``Conv1D`` (as a
    :class:`SparseLinear` of its transposed weight): build its sparse version, check that its
    output equals the dense layer's (within :data:`OUTPUT_TOLERANCE`; a mismatch raises), time both on the recorded
    input (``repeats`` interleaved calls each, medians) and keep the sparse layer if ``dense_ms / sparse_ms >=
    min_speedup``. Layers without a sparse kernel (``Conv1d``/``Conv3d``, attention with ``kdim``/``vdim`` other
    than ``embed_dim``, layer subclasses with their own ``forward``, half precision on a CPU) and layers the example
    input does not reach stay dense, with the reason in the report. A converted model keeps
    ``nn.TransformerEncoderLayer`` off its fused fast path (which reads dense weights), so its sparse layers run.

    The choice holds for the example input's shape, dtype and device: time with the batch size you will serve. The
    result runs on ``model``'s device; move the model before converting to choose for another device. While it
    converts, a dense copy of the model is kept for the end-to-end timing and check (two with ``inplace=False``).

    Args:
        model: A trained model, with ST-3/STR parametrizations or made permanent.
        example_input: The forward pass's input (a tuple is unpacked as positional arguments).
        min_speedup: Convert a layer only if its sparse kernel is at least this many times faster; ``0`` converts
            every layer that has a sparse kernel, ``math.inf`` none (timings still reported).
        repeats: Timed calls per layer and version (after one warm-up call).
        inplace: Convert ``model`` itself instead of a deep copy.

    Returns:
        ``(sparse_model, report)``; ``print(report)`` shows every layer's timings and choice.

    Raises:
        TypeError: If ``min_speedup`` is not a number or ``repeats`` is not an ``int``.
        ValueError: If ``min_speedup`` is negative or NaN, or ``repeats`` is below 1.

    Example::

        sparse_model, report = to_sparse_inference(model, torch.randn(8, 3, 224, 224))
        print(report)
        torch.save(sparse_model.state_dict(), "sparse.pt")  # load: restore_sparse_inference
    """
    check_number("min_speedup", min_speedup, 0.0, math.inf, "[]", finite=False)  # math.inf: time all, convert none
    check_int("repeats", repeats, minimum=1, unit="timed calls per layer")
    dense_model = make_permanent(model if inplace else copy.deepcopy(model)).eval()
    reference = copy.deepcopy(dense_model)  # for the end-to-end timing, never modified
    args = _as_args(example_input)
    layers = find_prunable_layers(dense_model)
    inputs = _capture_inputs(dense_model, layers, args)
    places = _places(dense_model)
    device = next((t.device for t in dense_model.parameters()), torch.device("cpu"))
    report = SparseInferenceReport(device=str(device))
    attention: dict[int, LayerChoice] = {}  # an attention layer's out_proj goes with it
    for name, module in layers.items():
        parent = places[id(module)][0][0]
        choice = _new_choice(name, module)
        report.layers.append(choice)
        if isinstance(parent, nn.MultiheadAttention):
            owner = attention.get(id(parent))
            choice.converted = owner is not None and owner.converted
            choice.reason = "in its sparse attention" if choice.converted else "its nn.MultiheadAttention stays dense"
            continue
        if isinstance(module, nn.MultiheadAttention):
            attention[id(module)] = choice
        sparse = _decide(choice, module, inputs.get(name), min_speedup, repeats, device)
        if sparse is not None:
            _replace(places, module, sparse)
    if report.converted:
        _check_output("the model", reference(*args), dense_model(*args))
    end_to_end = median_ms({"dense": reference, "sparse": dense_model}, (args, {}), repeats, device)
    report.dense_ms, report.sparse_ms = end_to_end["dense"], end_to_end["sparse"]
    return dense_model, report


def restore_sparse_inference(model: nn.Module, state_dict: Mapping[str, Any]) -> nn.Module:
    """Load a converted model's ``state_dict`` into a freshly built (dense) model of the same architecture.

    Every layer whose entries in ``state_dict`` are CSR buffers (``<layer>.crow_indices`` ...) is replaced by an
    empty :class:`SparseLinear`/:class:`SparseConv2d`/:class:`SparseMultiheadAttention` of its configuration, then
    the whole state dict is loaded strictly. No timing is repeated: the choices were made when the model was converted.

    Args:
        model: The plain model (same architecture as the one given to :func:`to_sparse_inference`), modified in place.
        state_dict: ``sparse_model.state_dict()``, e.g. from ``torch.load(path, weights_only=True)``.

    Returns:
        ``model``, in ``eval()`` mode.

    Raises:
        KeyError: If a layer named in ``state_dict`` does not exist in ``model`` or is not a Linear, Conv2d or
            MultiheadAttention.

    Example::

        torch.save(sparse_model.state_dict(), "sparse.pt")
        model = restore_sparse_inference(build_model(), torch.load("sparse.pt", weights_only=True))
    """
    suffix = "." + _CSR_KEYS[0]
    names = [key[: -len(suffix)] for key in state_dict if key.endswith(suffix)]
    modules = dict(model.named_modules())
    places = _places(model)
    attention: list[str] = []  # converted attention layers: their out_proj came with them
    for name in names:
        if any(name.startswith(prefix + ".") for prefix in attention):
            continue
        module = modules.get(name)
        if not isinstance(module, tuple(t for t in (nn.Linear, nn.Conv2d, nn.MultiheadAttention, _hf_conv1d()) if t)):
            raise KeyError(
                f"`state_dict` holds a sparse layer `{name}`, but the model has "
                f"{'no such module' if module is None else type(module).__name__ + ' there'}; build the same "
                "architecture that was converted."
            )
        with torch.no_grad():  # the layer is replaced anyway: zeros give an empty CSR to load into, not a full one
            for _, tensor in module.named_parameters():
                tensor.zero_()
        if isinstance(module, nn.MultiheadAttention):
            attention.append(name)
        _replace(places, module, _sparse_version(module))
    model.load_state_dict(state_dict)
    return model.eval()
