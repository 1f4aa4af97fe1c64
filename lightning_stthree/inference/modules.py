"""The CSR layers: inference replacements of ``nn.Linear``, ``nn.Conv2d`` and ``nn.MultiheadAttention``.

Each holds its weight as the three CSR components (``crow_indices``, ``col_indices``, ``values``) and its bias as
buffers, never as Parameters, so a converted model's ``state_dict`` holds plain tensors only and loads with
``torch.load(weights_only=True)``. The maths is in :mod:`lightning_stthree.inference.csr`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_stthree.inference.csr import (
    _CSR_KEYS,
    _csr_tensor,
    conv_weight_to_csr,
    csr_conv2d,
    csr_linear,
    csr_row_slice,
    dense_to_csr,
)


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

    @classmethod
    def from_conv1d(cls, layer: nn.Module) -> SparseLinear:
        """The sparse version of a Hugging Face ``Conv1D`` (``y = x W + b`` with ``W`` stored ``(in, out)``): a linear
        layer of ``W^T``."""
        weight = layer.weight.detach()
        return cls(weight.shape[0], weight.shape[1], dense_to_csr(weight.T.contiguous()), layer.bias)

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
