"""CSR maths as plain functions: a dense weight to CSR components, and the sparse products that replace a linear layer
and a (grouped) convolution.

A convolution is lowered to a matrix product: ``unfold`` (im2col) of the input, then the CSR weight ``(out_channels,
in_channels / groups * kh * kw)`` times the columns (a grouped convolution is one block-diagonal CSR matrix). The sparse
matrix is always on the left of ``addmm``, where PyTorch's sparse kernels (MKL on a CPU, cuSPARSE on a GPU) are fast.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

# The names of a CSR matrix's three components, in order (also the buffer names of the CSR layers).
_CSR_KEYS = ("crow_indices", "col_indices", "values")


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
