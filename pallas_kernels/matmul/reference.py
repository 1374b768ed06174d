"""XLA reference implementation of the block-sparse products (CPU and fallback backend).

Each product goes through the dense weight: simple, exact and fast on CPU, but it costs dense
FLOPs and an ``(in, out)`` temporary; the Pallas kernels are the sparse paths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.matmul.format import BlockSparseMatrix


def spmm(a: jax.Array, w: BlockSparseMatrix, *, transpose: bool = False) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``) with float32 accumulation, in ``a``'s dtype.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((4, 4)), jnp.ones((4, 4), bool), (2, 2))
  >>> spmm(jnp.ones((1, 4)), w).tolist()
  [[4.0, 4.0, 4.0, 4.0]]
  """
  dense = w.to_dense()
  if transpose:
    dense = dense.T
  return jnp.dot(a, dense, preferred_element_type=jnp.float32).astype(a.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: BlockSparseMatrix) -> jax.Array:
  """``(a^T @ b)`` sampled on ``w``'s stored blocks: ``[capacity, br, bc]``, zero on padding.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((2, 4)), jnp.array([[0, 0, 1, 1]] * 2, bool), (2, 2))
  >>> sddmm(jnp.ones((3, 2)), jnp.ones((3, 4)), w)[0].tolist()
  [[3.0, 3.0], [3.0, 3.0]]
  """
  kb, nb = w.grid
  br, bc = w.block_shape
  full = jnp.dot(a.T, b, preferred_element_type=jnp.float32).reshape(kb, br, nb, bc)
  sampled = full[w.row_idx, :, w.col_idx, :]
  return jnp.where(w.valid()[:, None, None], sampled, 0.0).astype(w.dtype)
