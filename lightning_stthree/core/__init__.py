"""The functional core: plain torch, no Lightning import; every function here is usable and tested without a Trainer.

- :mod:`~lightning_stthree.core.schedule`: the cubic sparsity schedule and :class:`SparsitySchedule`;
- :mod:`~lightning_stthree.core.threshold`: the global threshold (ST-3 and ST-3 sigma scores, parameter and FLOPs
  budgets) and :mod:`~lightning_stthree.core.selection`, the exact selection behind it;
- :mod:`~lightning_stthree.core.tracking`: the threshold from step to step (pivot, window, non-finite weights);
- :mod:`~lightning_stthree.core.flops`: MACs accounting;
- :mod:`~lightning_stthree.core.layers`: which layers and tensors are prunable;
- :mod:`~lightning_stthree.core.distributed`: counting over sharded (FSDP2) weights;
- :mod:`~lightning_stthree.core.kernels`: the fused ``torch.compile`` kernels.
"""
