"""Measuring sparsity phenomena: activation, update and essential sparsity, mask dynamics.

Pure functions over pytrees and activations (jit-able where noted), plus plot helpers that take
an optional matplotlib ``Axes`` (matplotlib is imported only when a plot helper is called).
"""

# Mask dynamics of dynamic sparse training (distance, IoU, in-time over-parameterisation).
from sparsejax.analysis.mask_dynamics import (ever_active, hamming_distance, itop_rate,  # noqa: F401
                                              mask_iou, regrown_count, regrown_survival)
