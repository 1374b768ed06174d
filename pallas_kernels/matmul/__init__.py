"""Block-sparse matmul: ``y = x @ W`` with a block-sparse ``(in, out)`` weight, with autodiff.

Modules:
  * ``format``: :class:`BlockSparseMatrix` (fixed-capacity BSR + transposed view), conversions.
  * ``op``: :func:`bsr_matmul`, the differentiable op and its backend dispatch.
  * ``reference``: XLA implementation (CPU, fallback).
  * ``kernel_triton``: Pallas kernel for the Triton lowering (NVIDIA GPUs; the interpret path).
  * ``kernel_tpu``: Pallas Mosaic TPU kernel with scalar prefetch.
  * ``kernel_mosaic_gpu``: Pallas Mosaic GPU kernel for Hopper (imported lazily).
"""

from pallas_kernels.matmul.format import BlockSparseMatrix, bsr_from_dense, bsr_to_dense
from pallas_kernels.matmul.op import bsr_matmul

__all__ = ["BlockSparseMatrix", "bsr_from_dense", "bsr_matmul", "bsr_to_dense"]
