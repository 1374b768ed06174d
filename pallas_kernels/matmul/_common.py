"""Helpers shared by the block-sparse matmul backends: the two compressed views, row padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.matmul.format import BlockSparseMatrix


def compressed_view(w: BlockSparseMatrix, transpose: bool):
  """The structure ``spmm`` walks: ``(ptr, inner, slot)``.

  Without ``transpose`` (``y = a @ W``) the groups are output block columns ``j``: positions
  ``ptr[j]:ptr[j + 1]`` hold the block rows ``inner`` (the reduction blocks of ``a``) and the
  slots of ``W``'s blocks. With ``transpose`` (``y = a @ W^T``) the groups are block rows ``i``
  and ``inner`` are block columns.
  """
  if transpose:
    return w.row_ptr, w.col_idx, jnp.arange(w.capacity, dtype=jnp.int32)
  return w.col_ptr, w.row_idx[w.col_slot], w.col_slot


def spmm_dims(w: BlockSparseMatrix, transpose: bool):
  """``(bk, bo, groups)``: reduction block width, output block width, number of output blocks."""
  br, bc = w.block_shape
  kb, nb = w.grid
  return (bc, br, kb) if transpose else (br, bc, nb)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 << max(int(x) - 1, 0).bit_length()


def pad_rows(a: jax.Array, multiple: int) -> jax.Array:
  """Zero-pads the leading dim of ``a`` to a multiple of ``multiple`` (no copy when aligned)."""
  extra = round_up(a.shape[0], multiple) - a.shape[0]
  return a if extra == 0 else jnp.pad(a, ((0, extra), (0, 0)))
