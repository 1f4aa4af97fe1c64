"""Sparse parametrizations: the shared machinery (:mod:`~lightning_stthree.methods.parametrization`), one module per
method (:mod:`~lightning_stthree.methods.st3`, :mod:`~lightning_stthree.methods.str`), and the export of the sparse
model (:mod:`~lightning_stthree.methods.export`). A new method is one new module with a ``SparseParametrization``
subclass."""
