"""``pl.CostEstimate`` of the kernels: FLOPs, exponentials and bytes over the blocks they visit.

XLA's scheduler and ``compiled.cost_analysis()`` see a Pallas call only through its estimate.
The number of visited blocks is data-dependent: when the sparsity structure is concrete at trace
time (a constant mask or weight), the estimate counts the blocks actually stored / visited;
when it is traced, it counts the static upper bound (every slot, every block pair).
"""

from __future__ import annotations

import inspect

import jax
import numpy as np
from jax.experimental import pallas as pl

__all__ = ["concrete_sum", "matmul_spmm", "matmul_sddmm", "attention", "kernel_kwargs"]


def concrete_sum(x, bound: int) -> int:
  """``sum(x)`` if ``x`` is concrete at trace time, else ``bound``.

  >>> concrete_sum(np.array([1, 2]), 10)
  3
  """
  try:
    return int(np.asarray(x).sum())
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return bound


def matmul_spmm(m: int, w, transpose: bool, itemsize: int) -> pl.CostEstimate:
  """``a @ W`` (``W^T``): per stored block a ``[m, bk] x [bk, bo]`` product.

  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(np.ones((4, 4), np.float32), np.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), (2, 2))
  >>> matmul_spmm(3, w, False, 4).flops  # 2 stored 2x2 blocks, 3 rows
  48
  """
  br, bc = w.block_shape
  blocks = concrete_sum(w.nnzb, w.capacity)
  bk = bc if transpose else br
  out_cols = w.shape[0] if transpose else w.shape[1]
  return pl.CostEstimate(
      flops=2 * m * blocks * br * bc, transcendentals=0,
      bytes_accessed=itemsize * (blocks * (m * bk + br * bc) + m * out_cols))


def matmul_sddmm(m: int, w, itemsize: int) -> pl.CostEstimate:
  """``(a^T b)`` at the stored blocks: per block a ``[br, m] x [m, bc]`` product."""
  br, bc = w.block_shape
  blocks = concrete_sum(w.nnzb, w.capacity)
  return pl.CostEstimate(flops=2 * m * blocks * br * bc, transcendentals=0,
                         bytes_accessed=itemsize * (blocks * m * (br + bc) + w.capacity * br * bc))


# (matmuls of [q_block, kv_block] x head_dim per visited block, q-side tensors, kv-side tensors)
_KINDS = {"fwd": (2, 2, 2), "dq": (3, 3, 2), "dkv": (4, 2, 4)}


def attention(dims, block_mask, kind: str, itemsize: int) -> pl.CostEstimate:
  """Forward (``QK^T``, ``PV``), dQ (+ ``dO V^T``, ``dS K``) or dK/dV (4 products) cost.

  Per visited (batch, head, q-block, kv-block): ``2 * q_block * kv_block * head_dim`` FLOPs per
  product and ``q_block * kv_block`` exponentials. Bytes: the q-side tensors once per row
  (``q``/``out`` or ``q``/``dO``/``dQ``), the kv-side tensors once per visited block (``k``,
  ``v``; for dK/dV the q-side ``q``/``dO`` are streamed per visited block and ``k``, ``v``,
  ``dK``, ``dV`` read or written once), plus float32 row statistics.
  """
  products, q_side, kv_side = _KINDS[kind]
  bq, bk, d = dims.q_block, dims.kv_block, dims.head_dim
  per_mask = dims.mask_batch * dims.mask_heads * dims.nq * dims.nk
  counted = min(concrete_sum(block_mask.full_kv_counts, per_mask)
                + concrete_sum(block_mask.partial_kv_counts, 0), per_mask)
  visited = counted * (dims.batch // dims.mask_batch) * (dims.num_heads // dims.mask_heads)
  rows = dims.batch * dims.num_heads * dims.q_len
  if kind == "dkv":
    kv_rows = dims.batch * dims.num_kv_heads * dims.kv_len
    nbytes = itemsize * (kv_side * kv_rows * d + q_side * visited * bq * d) + 8 * visited * bq
  else:
    stats = 8 if kind == "dq" else 4  # float32 lse (and delta) per row
    nbytes = itemsize * (q_side * rows * d + kv_side * visited * bk * d) + stats * rows
  return pl.CostEstimate(flops=2 * products * visited * bq * bk * d,
                         transcendentals=visited * bq * bk, bytes_accessed=int(nbytes))


def kernel_kwargs(kernel_fn, estimate: pl.CostEstimate) -> dict:
  """``{"cost_estimate": estimate}`` if ``kernel_fn`` (``plgpu.kernel``) takes one (jax >= 0.11)."""
  try:
    params = inspect.signature(kernel_fn).parameters
  except (TypeError, ValueError):
    return {}
  return {"cost_estimate": estimate} if "cost_estimate" in params else {}
