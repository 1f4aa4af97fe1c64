"""Sparse inference: turn a trained sparse model into a faster one, layer by layer, by measurement.

A model pruned by ST-3 (parametrized or made permanent) runs exactly as slowly as the dense one: its zeros are still
multiplied. :func:`to_sparse_inference` replaces each ``nn.Linear``, ``nn.Conv2d`` and ``nn.MultiheadAttention`` whose
sparse kernel is faster than its dense one *on the example input* with :class:`SparseLinear` / :class:`SparseConv2d` /
:class:`SparseMultiheadAttention`, which store the weight in CSR (compressed sparse rows: ``crow_indices``,
``col_indices``, ``values``) and multiply with PyTorch's sparse ``addmm`` (MKL on a CPU, cuSPARSE on a GPU). A
convolution is lowered to a matrix product: ``unfold`` (im2col) of the input, then the CSR weight ``(out_channels,
in_channels / groups * kh * kw)`` times the columns (a grouped convolution is one block-diagonal CSR matrix). Attention
projects with CSR matrices and attends with ``F.scaled_dot_product_attention``. Every choice is timed on the layer's
real input and recorded in a :class:`SparseInferenceReport`.

The maths is in plain functions (:func:`dense_to_csr`, :func:`conv_weight_to_csr`, :func:`csr_linear`,
:func:`csr_conv2d`); the modules only hold the CSR tensors as buffers, so a converted model's ``state_dict`` holds
plain tensors only and loads with ``torch.load(weights_only=True)`` (see :func:`restore_sparse_inference`).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_stthree.core.layers import find_prunable_layers, pruned_tensor
from lightning_stthree.methods.export import make_permanent
from lightning_stthree.report import format_table

# Default ratio dense time / sparse time a layer must reach to be converted: a margin over timing noise so that a
# converted layer is faster, not merely as fast (the per-layer "never slower than dense" guarantee).
DEFAULT_MIN_SPEEDUP = 1.1
# Largest difference between a converted layer's output and the dense layer's, relative to the largest dense output
# magnitude, per dtype: the sparse kernels sum the same products in another order.
OUTPUT_TOLERANCE: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-4}
HALF_OUTPUT_TOLERANCE = 2e-2

_CSR_KEYS = ("crow_indices", "col_indices", "values")
# How PyTorch says that a sparse kernel does not exist for a dtype or device (e.g. CPU float16/bfloat16 CSR addmm).
_UNSUPPORTED = re.compile(r"not implemented|not supported|unsupported", re.IGNORECASE)
# How a layer was called: its positional and keyword arguments.
Call = tuple[tuple[Any, ...], dict[str, Any]]


# ----------------------------------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_csr() -> Iterator[None]:
    """Silence PyTorch's "Sparse CSR tensor support is in beta" warning while building CSR tensors."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def dense_to_csr(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The CSR components ``(crow_indices, col_indices, values)`` of a 2-D tensor's non-zero entries.

    Exactly the entries that are not ``0.0`` are stored (``-0.0`` is zero), row by row, columns ascending.

    Example::

        >>> dense_to_csr(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
        (tensor([0, 1, 2]), tensor([1, 0]), tensor([2., 3.]))
    """
    if matrix.ndim != 2:
        raise ValueError(f"`matrix` must be 2-D, got shape {tuple(matrix.shape)}")
    with _quiet_csr():
        csr = matrix.detach().to_sparse_csr()
    return csr.crow_indices(), csr.col_indices(), csr.values()


def conv_weight_to_csr(weight: Tensor, groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    r"""CSR components of the matrix that multiplies ``unfold``-ed input columns for a (grouped) convolution.

    A convolution weight ``(out_channels, in_channels / groups, kh, kw)`` becomes the block-diagonal matrix
    ``(out_channels, in_channels * kh * kw)`` whose row ``o`` (in group ``g = o // (out_channels / groups)``) holds
    the kernel of ``o`` at columns ``g * (in_channels / groups) * kh * kw + c * kh * kw + i * kw + j``: the column
    order of ``torch.nn.functional.unfold``.

    Args:
        weight: The convolution weight, output channels on dim 0 (any number of spatial dims).
        groups: The convolution's ``groups``.

    Returns:
        ``(crow_indices, col_indices, values)``.
    """
    out_channels = weight.shape[0]
    if groups < 1 or out_channels % groups:
        raise ValueError(f"`groups` must be a positive divisor of out_channels={out_channels}, got {groups}")
    crow, col, values = dense_to_csr(weight.reshape(out_channels, -1))
    if groups == 1:
        return crow, col, values
    block = weight[0].numel()  # columns per group: in_channels / groups * kh * kw
    row_of_entry = torch.repeat_interleave(torch.arange(out_channels, device=weight.device), crow.diff())
    return crow, col + (row_of_entry // (out_channels // groups)) * block, values


def _csr_tensor(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with _quiet_csr():
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr_matmul(weight: Tensor, columns: Tensor, bias: Tensor | None) -> Tensor:
    """``weight @ columns`` (+ ``bias`` per row) with the CSR ``weight`` on the left, where sparse kernels are fast."""
    return torch.mm(weight, columns) if bias is None else torch.addmm(bias.unsqueeze(1), weight, columns)


def csr_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, W, bias)`` with a CSR ``weight`` ``(out_features, in_features)``, for ``x`` of any leading shape.

    Computed as ``bias + W @ x.T`` (``addmm`` with the sparse matrix on the left, which is what the sparse kernels
    are fast at) and returned transposed: for 2-D ``x`` the result is a ``(batch, out_features)`` view whose
    transpose, what a following :class:`SparseLinear` multiplies, is contiguous.
    """
    out = _csr_matmul(weight, x.reshape(-1, x.shape[-1]).T, bias)
    return out.T.reshape(*x.shape[:-1], weight.shape[0])


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one dimension (the formula of ``nn.Conv2d``'s documentation)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def csr_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """``F.conv2d`` with the CSR matrix of :func:`conv_weight_to_csr` as ``weight`` (zero padding, any groups).

    The input ``(batch, in_channels, h, w)`` (or unbatched ``(in_channels, h, w)``) is unfolded into columns
    ``(in_channels * kh * kw, batch * h_out * w_out)`` (a strided view, no copy, for a 1x1 kernel without padding),
    multiplied by the CSR weight, and returned contiguous as ``(batch, out_channels, h_out, w_out)``.
    """
    if x.ndim == 3:
        return csr_conv2d(x.unsqueeze(0), weight, bias, kernel_size, stride, padding, dilation).squeeze(0)
    batch, channels, height, width = x.shape
    out_h, out_w = (
        conv_output_size(n, k, s, p, d)
        for n, k, s, p, d in zip((height, width), kernel_size, stride, padding, dilation, strict=True)
    )
    if kernel_size == (1, 1) and padding == (0, 0):
        picked = x[:, :, : (out_h - 1) * stride[0] + 1 : stride[0], : (out_w - 1) * stride[1] + 1 : stride[1]]
        columns = picked.transpose(0, 1).reshape(channels, batch * out_h * out_w)
    else:
        unfolded = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
        columns = unfolded.transpose(0, 1).reshape(unfolded.shape[1], batch * out_h * out_w)
    out = _csr_matmul(weight, columns, bias)
    return out.view(weight.shape[0], batch, out_h, out_w).transpose(0, 1).contiguous()


# ----------------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------------


def _no_fast_path(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that does nothing: its presence keeps ``nn.TransformerEncoderLayer`` off its fused fast
    path, which reads ``linear1.weight`` / ``linear2.weight`` as dense tensors instead of calling the layers."""


class _CSRLayer(nn.Module):
    """The CSR weight as three buffers and the bias as a buffer (named ``_bias_name``); the base of
    :class:`SparseLinear`, :class:`SparseConv2d` and :class:`SparseMultiheadAttention`. Inference only: nothing here is
    a Parameter, so an optimizer sees no weights to train."""

    crow_indices: Tensor
    col_indices: Tensor
    values: Tensor
    _bias_name = "bias"

    def __init__(self, matrix_shape: tuple[int, int], csr: tuple[Tensor, Tensor, Tensor], bias: Tensor | None) -> None:
        super().__init__()
        self.matrix_shape = matrix_shape
        for key, tensor in zip(_CSR_KEYS, csr, strict=True):
            self.register_buffer(key, tensor.detach().clone())
        self.register_buffer(self._bias_name, None if bias is None else bias.detach().clone())
        self.register_forward_pre_hook(_no_fast_path)

    def sparse_weight(self) -> Tensor:
        """The weight as a ``torch.sparse_csr_tensor`` over the buffers (cheap: no copy, no validation)."""
        return _csr_tensor(self.crow_indices, self.col_indices, self.values, self.matrix_shape)

    @property
    def nnz(self) -> int:
        """Number of stored (non-zero) weights."""
        return self.values.numel()

    @property
    def density(self) -> float:
        """Stored weights over all weights."""
        return self.nnz / math.prod(self.matrix_shape)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # The number of stored weights is data, not architecture: take the incoming buffers' sizes.
        for key in _CSR_KEYS:
            incoming = state_dict.get(prefix + key)
            if isinstance(incoming, Tensor) and incoming.shape != getattr(self, key).shape:
                setattr(self, key, torch.empty_like(incoming, device=getattr(self, key).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SparseLinear(_CSRLayer):
    """Inference replacement of ``nn.Linear`` with its weight in CSR: ``y = x W^T + b`` by a sparse ``addmm``.

    The ``state_dict`` keys are ``crow_indices``, ``col_indices``, ``values`` and ``bias``; ``weight`` is a
    read-only property that rebuilds the dense weight (for code that reads it directly; it costs a dense copy).

    Args:
        in_features: As ``nn.Linear``.
        out_features: As ``nn.Linear``.
        csr: ``(crow_indices, col_indices, values)`` of the ``(out_features, in_features)`` weight.
        bias: The bias, or None.

    Example::

        fast = SparseLinear.from_dense(linear)  # outputs equal linear's within float tolerance
    """

    def __init__(
        self, in_features: int, out_features: int, csr: tuple[Tensor, Tensor, Tensor], bias: Tensor | None
    ) -> None:
        super().__init__((out_features, in_features), csr, bias)
        self.in_features = in_features
        self.out_features = out_features

    @classmethod
    def from_dense(cls, layer: nn.Linear) -> SparseLinear:
        """The sparse version of ``layer`` (its zeros are not stored)."""
        return cls(layer.in_features, layer.out_features, dense_to_csr(layer.weight), layer.bias)

    @property
    def weight(self) -> Tensor:
        """The dense weight, rebuilt from CSR on every access."""
        return self.sparse_weight().to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return csr_linear(x, self.sparse_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, density={self.density:.4f}"


class SparseConv2d(_CSRLayer):
    """Inference replacement of ``nn.Conv2d`` with its weight in CSR: ``unfold`` (im2col), then a sparse ``addmm``.

    Supports every ``nn.Conv2d`` configuration: stride, dilation, groups (one block-diagonal CSR matrix), integer or
    string padding, and the padding modes (non-zero padding and ``"same"`` are applied with ``F.pad`` first, as
    ``nn.Conv2d`` does). ``weight`` is a read-only property that rebuilds the dense weight.

    Args:
        conv: The convolution to mirror (its configuration; its weight is not kept).
        csr: ``(crow_indices, col_indices, values)`` of :func:`conv_weight_to_csr` of the weight.
        bias: The bias, or None.
    """

    def __init__(self, conv: nn.Conv2d, csr: tuple[Tensor, Tensor, Tensor], bias: Tensor | None) -> None:
        kernel_size = tuple(conv.kernel_size)
        super().__init__((conv.out_channels, conv.in_channels * math.prod(kernel_size)), csr, bias)
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = kernel_size
        self.stride = tuple(conv.stride)
        self.dilation = tuple(conv.dilation)
        self.groups = conv.groups
        self.padding_mode = conv.padding_mode
        self.padding = conv.padding
        # Padding applied before unfolding when unfold's own (symmetric, zero) padding cannot express it.
        self.pre_padding: tuple[int, ...] | None = None
        self.unfold_padding: tuple[int, int] = (0, 0)
        if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
            self.pre_padding = tuple(conv._reversed_padding_repeated_twice)
        else:
            self.unfold_padding = tuple(conv.padding)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> SparseConv2d:
        """The sparse version of ``conv`` (its zeros are not stored)."""
        return cls(conv, conv_weight_to_csr(conv.weight, conv.groups), conv.bias)

    @property
    def weight(self) -> Tensor:
        """The dense ``(out_channels, in_channels / groups, kh, kw)`` weight, rebuilt from CSR on every access."""
        full = self.sparse_weight().to_dense().view(self.out_channels, self.groups, -1)
        per_group = self.out_channels // self.groups
        blocks = [full[g * per_group : (g + 1) * per_group, g] for g in range(self.groups)]
        return torch.cat(blocks).view(self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_padding is not None:
            mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
            x = F.pad(x, self.pre_padding, mode=mode)
        return csr_conv2d(
            x, self.sparse_weight(), self.bias, self.kernel_size, self.stride, self.unfold_padding, self.dilation
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, density={self.density:.4f}"
        )


def csr_row_slice(weight: Tensor, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of a CSR matrix, as a CSR tensor over views of its buffers (no copy of the entries)."""
    crow = weight.crow_indices()
    first, last = int(crow[start]), int(crow[stop])
    return _csr_tensor(
        crow[start : stop + 1] - first,
        weight.col_indices()[first:last],
        weight.values()[first:last],
        (stop - start, weight.shape[1]),
    )


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True: may not attend) as ``-inf``/``0`` in ``dtype``; a float mask as it is."""
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _attention_mask(
    attn_mask: Tensor | None, key_padding_mask: Tensor | None, batch: int, heads: int, dtype: torch.dtype
) -> Tensor | None:
    """``nn.MultiheadAttention``'s two masks as one additive mask broadcastable to ``(batch, heads, L, S)``."""
    merged = _additive_mask(attn_mask, dtype)
    if merged is not None:
        merged = merged.view(batch, heads, *merged.shape[1:]) if merged.ndim == 3 else merged
    padding = _additive_mask(key_padding_mask, dtype)
    if padding is not None:
        padding = padding.view(batch, 1, 1, padding.shape[-1])
        merged = padding if merged is None else merged + padding
    return merged


class SparseMultiheadAttention(_CSRLayer):
    """Inference replacement of ``nn.MultiheadAttention`` whose packed ``in_proj_weight`` and ``out_proj`` are CSR.

    The query/key/value projections are sparse ``addmm``s (one over the packed ``(3 * embed_dim, embed_dim)`` matrix
    for self-attention, one over each third of its rows otherwise), attention is ``F.scaled_dot_product_attention``
    (explicit softmax when the weights are asked for), and ``out_proj`` is a :class:`SparseLinear`. It takes
    ``nn.MultiheadAttention``'s arguments (masks boolean or additive, ``need_weights``, ``average_attn_weights``,
    ``is_causal``) and returns the same ``(output, weights or None)``. Only attention with ``kdim == vdim ==
    embed_dim`` and without ``add_bias_kv``/``add_zero_attn`` is converted. ``in_proj_weight`` is a read-only
    property that rebuilds the dense weight.

    Args:
        attention: The layer to mirror (configuration and biases).
        csr: CSR components of its ``in_proj_weight``.
        out_proj: The sparse output projection.
    """

    in_proj_bias: Tensor | None
    _bias_name = "in_proj_bias"
    _qkv_same_embed_dim = True  # read by nn.TransformerEncoderLayer's fast-path checks

    def __init__(
        self, attention: nn.MultiheadAttention, csr: tuple[Tensor, Tensor, Tensor], out_proj: nn.Module
    ) -> None:
        embed_dim = attention.embed_dim
        super().__init__((3 * embed_dim, embed_dim), csr, attention.in_proj_bias)
        self.embed_dim = embed_dim
        self.num_heads = attention.num_heads
        self.head_dim = attention.head_dim
        self.dropout = attention.dropout
        self.batch_first = attention.batch_first
        self.out_proj = out_proj

    @classmethod
    def from_dense(cls, attention: nn.MultiheadAttention) -> SparseMultiheadAttention:
        """The sparse version of ``attention`` (in_proj and out_proj; zeros not stored)."""
        return cls(attention, dense_to_csr(attention.in_proj_weight), SparseLinear.from_dense(attention.out_proj))

    @property
    def in_proj_weight(self) -> Tensor:
        """The dense packed projection weight, rebuilt from CSR on every access."""
        return self.sparse_weight().to_dense()

    def _projections(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        weight, bias, dim = self.sparse_weight(), self.in_proj_bias, self.embed_dim
        if query is key and key is value:
            return csr_linear(query, weight, bias).chunk(3, dim=-1)
        rows = [(i * dim, (i + 1) * dim) for i in range(3)]
        q, k, v = (
            csr_linear(x, csr_row_slice(weight, a, b), None if bias is None else bias[a:b])
            for x, (a, b) in zip((query, key, value), rows, strict=True)
        )
        return q, k, v

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        batched = query.ndim == 3
        same = query is key and key is value

        def batch_first(x: Tensor) -> Tensor:
            if not batched:  # (L, E): one sequence
                return x.unsqueeze(0)
            return x if self.batch_first else x.transpose(0, 1)

        query = batch_first(query)
        # Self-attention stays recognisable (one projection over the packed weight).
        key, value = (query, query) if same else (batch_first(key), batch_first(value))
        if not batched and key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
        q, k, v = self._projections(query, key, value)
        batch, target = q.shape[0], q.shape[1]
        q, k, v = (x.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2) for x in (q, k, v))
        mask = _attention_mask(attn_mask, key_padding_mask, batch, self.num_heads, q.dtype)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            out = F.dropout(weights, dropout) @ v if dropout else weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, target, self.embed_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, density={self.density:.4f}"


# ----------------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """What :func:`to_sparse_inference` decided for one prunable layer, and why.

    Attributes:
        name: Module name in the model.
        layer_type: The original layer class name.
        shape: The weight's shape.
        density: Non-zero fraction of the weight.
        dense_ms: Median time of the dense layer on its example input, in milliseconds (None if not timed).
        sparse_ms: Median time of the sparse layer on the same input (None if not timed).
        converted: Whether the model now holds the sparse layer.
        reason: Why, in words.
    """

    name: str
    layer_type: str
    shape: tuple[int, ...]
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    converted: bool
    reason: str

    @property
    def speedup(self) -> float | None:
        """``dense_ms / sparse_ms``, when both were timed."""
        if self.dense_ms is None or self.sparse_ms is None:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class SparseInferenceReport:
    """The per-layer choices of :func:`to_sparse_inference` and the end-to-end times on the example input.

    ``print(report)`` shows a table. ``dense_ms`` / ``sparse_ms`` are the medians of the whole model's forward pass
    (dense model vs converted model, interleaved) on the example input.
    """

    layers: list[LayerChoice] = field(default_factory=list)
    dense_ms: float = math.nan
    sparse_ms: float = math.nan
    device: str = "cpu"

    @property
    def speedup(self) -> float:
        """End-to-end ``dense_ms / sparse_ms``."""
        return self.dense_ms / self.sparse_ms

    @property
    def converted(self) -> list[str]:
        """Names of the converted layers."""
        return [choice.name for choice in self.layers if choice.converted]

    def __str__(self) -> str:
        header = ["layer", "type", "shape", "density", "dense ms", "sparse ms", "speedup", "choice"]

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:.3f}"

        cells = [
            [
                c.name,
                c.layer_type,
                "x".join(map(str, c.shape)),
                f"{c.density:.4f}",
                ms(c.dense_ms),
                ms(c.sparse_ms),
                "-" if c.speedup is None else f"x{c.speedup:.2f}",
                ("sparse" if c.converted else "dense") + f" ({c.reason})",
            ]
            for c in self.layers
        ]
        total = ["model", "", "", "", ms(self.dense_ms), ms(self.sparse_ms), f"x{self.speedup:.2f}", self.device]
        return format_table(header, cells, total, left_columns=3)


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def interleaved_times(
    functions: Mapping[str, Callable[..., Any]], call: Call, repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall times in seconds of ``repeats`` calls ``function(*args, **kwargs)`` of each function, interleaved round
    by round after one warm-up round (synchronizing a GPU around each call)."""
    args, kwargs = call
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in functions}
    for round_index in range(repeats + 1):
        for name, function in functions.items():
            synchronize()
            start = time.perf_counter()
            function(*args, **kwargs)
            synchronize()
            if round_index:  # round 0 warms up (allocations, MKL's sparse handles, cuSPARSE descriptors)
                times[name].append(time.perf_counter() - start)
    return times


def _median_ms(
    functions: Mapping[str, Callable[..., Any]], call: Call, repeats: int, device: torch.device
) -> dict[str, float]:
    """Median of :func:`interleaved_times` per function, in milliseconds."""
    times = interleaved_times(functions, call, repeats, device)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


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
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        return None if kind.forward is base.forward else f"{kind.__name__} has its own forward"
    return f"no sparse kernel for {kind.__name__}"


def _sparse_version(module: nn.Module) -> _CSRLayer:
    if isinstance(module, nn.MultiheadAttention):
        return SparseMultiheadAttention.from_dense(module)
    if isinstance(module, nn.Linear):
        return SparseLinear.from_dense(module)
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
    timings = _median_ms({"dense": module, "sparse": sparse}, call, repeats, device)
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
    ``nn.Conv2d`` and ``nn.MultiheadAttention`` (with its ``out_proj``): build its sparse version, check that its
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
            every layer that has a sparse kernel (timings still reported).
        repeats: Timed calls per layer and version (after one warm-up call).
        inplace: Convert ``model`` itself instead of a deep copy.

    Returns:
        ``(sparse_model, report)``; ``print(report)`` shows every layer's timings and choice.

    Raises:
        ValueError: If ``min_speedup`` is negative or ``repeats`` is not a positive integer.

    Example::

        sparse_model, report = to_sparse_inference(model, torch.randn(8, 3, 224, 224))
        print(report)
        torch.save(sparse_model.state_dict(), "sparse.pt")  # load: restore_sparse_inference
    """
    if not isinstance(min_speedup, (int, float)) or isinstance(min_speedup, bool) or not min_speedup >= 0:
        raise ValueError(f"`min_speedup` must be a number >= 0 (1.1: at least 10% faster), got {min_speedup!r}")
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}")
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
    end_to_end = _median_ms({"dense": reference, "sparse": dense_model}, (args, {}), repeats, device)
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
        if not isinstance(module, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)):
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
