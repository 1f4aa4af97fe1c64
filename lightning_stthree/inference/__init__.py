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

The package's modules: ``csr`` (the maths), ``modules`` (the CSR layers), ``convert`` (the conversion and its
constants), ``report`` (the report classes) and ``timing`` (the interleaved timing, internal).
"""

from __future__ import annotations

from typing import Any

from lightning_stthree.inference.convert import restore_sparse_inference, to_sparse_inference
from lightning_stthree.inference.csr import conv_weight_to_csr, csr_conv2d, csr_linear, dense_to_csr
from lightning_stthree.inference.modules import SparseConv2d, SparseLinear, SparseMultiheadAttention
from lightning_stthree.inference.modules import _no_fast_path as _no_fast_path  # named by models pickled before 0.2
from lightning_stthree.inference.report import LayerChoice, SparseInferenceReport

__all__ = [
    "LayerChoice",
    "SparseConv2d",
    "SparseInferenceReport",
    "SparseLinear",
    "SparseMultiheadAttention",
    "conv_weight_to_csr",
    "csr_conv2d",
    "csr_linear",
    "dense_to_csr",
    "restore_sparse_inference",
    "to_sparse_inference",
]


def __getattr__(name: str) -> Any:
    # 0.1's single-module `inference` also held its constants and timing helpers: still resolved, with a FutureWarning.
    from lightning_stthree import _moved

    return _moved.moved_attribute(__name__, name)
