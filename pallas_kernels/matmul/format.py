"""Block-sparse weight format: a fixed-capacity BSR of a Flax Dense kernel ``(in, out)``.

The weight ``W`` of shape ``(K, N) = (in, out)`` is cut into ``(br, bc)`` blocks, giving a
``(K // br, N // bc)`` grid of blocks ``(i, j)``: ``i`` indexes input rows (the reduction axis
of ``y = x @ W``) and ``j`` output columns. Non-zero blocks are stored in *slots* in row-major
block order (BSR, compressed over ``i``); a second, column-compressed view (CSC, compressed over
``j``) lists the same slots grouped by output column. ``y = x @ W`` walks the column view
(one output column block at a time); ``dx = dy @ W^T`` walks the row view; ``dW`` is computed
only on the stored slots.

The number of slots (``capacity``) is fixed, so a mask that changes during training (RigL/SET
in block pattern) keeps every array shape static under ``jit``. Slots ``>= nnzb`` are padding:
every op ignores them (their gradient is zero) and their indices point at the last block row and
column, so kernels that step over them revisit the last output block consecutively.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["blocks", "row_ptr", "row_idx", "col_idx", "col_ptr", "col_slot", "row_order", "col_order"],
    meta_fields=["shape"],
)
@dataclasses.dataclass(frozen=True)
class BlockSparseMatrix:
  """A block-sparse ``(K, N)`` weight with a fixed block capacity (a pytree).

  Build it with :func:`bsr_from_dense`. All index arrays are ``int32``.

  Attributes:
    blocks: ``[capacity, br, bc]`` values of the stored blocks, slot ``p`` in row-major block
      order (block row ``i``, then block column ``j``).
    row_ptr: ``[K // br + 1]``; the blocks of block row ``i`` are slots
      ``row_ptr[i]:row_ptr[i + 1]``; ``row_ptr[-1]`` is the number of stored blocks ``nnzb``.
    row_idx: ``[capacity]`` block row ``i`` of each slot (padding: ``K // br - 1``).
    col_idx: ``[capacity]`` block column ``j`` of each slot (padding: ``N // bc - 1``).
    col_ptr: ``[N // bc + 1]``; positions ``col_ptr[j]:col_ptr[j + 1]`` of ``col_slot`` are the
      blocks of block column ``j`` (the transposed, column-compressed view).
    col_slot: ``[capacity]`` slot of the ``t``-th block in column-major order (padding: ``t``).
    shape: static ``(K, N)``.
    row_order: ``[K // br]`` block rows, most stored blocks first (stable): the order in which
      kernels visit the row view (``dx = dy @ W^T``). ``None`` when the matrix was assembled
      from its index arrays alone; kernels then sort per call. Any permutation is correct; the
      order only balances work.
    col_order: ``[N // bc]`` block columns, most stored blocks first (``y = x @ W``).
  """

  blocks: jax.Array
  row_ptr: jax.Array
  row_idx: jax.Array
  col_idx: jax.Array
  col_ptr: jax.Array
  col_slot: jax.Array
  shape: tuple[int, int]
  row_order: jax.Array | None = None
  col_order: jax.Array | None = None

  @property
  def block_shape(self) -> tuple[int, int]:
    """``(br, bc)``."""
    return tuple(self.blocks.shape[1:])

  @property
  def capacity(self) -> int:
    """Number of block slots (static)."""
    return self.blocks.shape[0]

  @property
  def grid(self) -> tuple[int, int]:
    """Number of blocks along each dim, ``(K // br, N // bc)``."""
    return self.shape[0] // self.blocks.shape[1], self.shape[1] // self.blocks.shape[2]

  @property
  def dtype(self):
    return self.blocks.dtype

  @property
  def nnzb(self) -> jax.Array:
    """Number of stored (non-padding) blocks, an int32 scalar (traced under jit)."""
    return self.row_ptr[-1]

  @property
  def density(self) -> jax.Array:
    """Fraction of the weight's blocks that are stored."""
    kb, nb = self.grid
    return self.nnzb / (kb * nb)

  def valid(self) -> jax.Array:
    """``[capacity]`` bool: which slots hold a stored block (the rest are padding)."""
    return jnp.arange(self.capacity) < self.nnzb

  def block_mask(self) -> jax.Array:
    """Bool ``(K // br, N // bc)`` mask of the stored blocks.

    >>> w = bsr_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), (2, 2))
    >>> w.block_mask().astype(int).tolist()
    [[1, 0], [0, 1]]
    """
    return _block_mask(self)

  def mask(self) -> jax.Array:
    """Bool ``(K, N)`` element mask (constant on blocks), the sparsejax block pattern.

    >>> w = bsr_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), (2, 2))
    >>> int(w.mask().sum())
    8
    """
    br, bc = self.block_shape
    return jnp.repeat(jnp.repeat(self.block_mask(), br, axis=0), bc, axis=1)

  def to_dense(self) -> jax.Array:
    """The dense ``(K, N)`` weight (zeros outside stored blocks; padding slots ignored).

    >>> w = bsr_from_dense(jnp.arange(16.).reshape(4, 4), jnp.ones((4, 4), bool), (2, 2))
    >>> bool((w.to_dense() == jnp.arange(16.).reshape(4, 4)).all())
    True
    """
    return _to_dense(self)


@jax.jit
def _scatter_indices(w: BlockSparseMatrix):
  """Block indices with padding slots sent out of bounds (dropped by scatters)."""
  return jnp.where(w.valid(), w.row_idx, w.grid[0]), w.col_idx


@jax.jit
def _block_mask(w: BlockSparseMatrix) -> jax.Array:
  rows, cols = _scatter_indices(w)
  return jnp.zeros(w.grid, bool).at[rows, cols].set(True, mode="drop")


@jax.jit
def _to_dense(w: BlockSparseMatrix) -> jax.Array:
  (kb, nb), (br, bc) = w.grid, w.block_shape
  rows, cols = _scatter_indices(w)
  dense = jnp.zeros((kb, nb, br, bc), w.dtype).at[rows, cols].set(w.blocks, mode="drop")
  return dense.transpose(0, 2, 1, 3).reshape(w.shape)


def bsr_to_dense(w: BlockSparseMatrix) -> jax.Array:
  """The dense ``(K, N)`` weight of ``w`` (see :meth:`BlockSparseMatrix.to_dense`).

  >>> w = bsr_from_dense(jnp.ones((4, 2)), jnp.array([[1, 1], [1, 1], [0, 0], [0, 0]], bool), (2, 2))
  >>> bsr_to_dense(w).sum().item()
  4.0
  """
  return w.to_dense()


def _name(path):
  return f"{path!r}" if path else "the weight"


def _check_block_shape(block_shape, shape, path) -> tuple[int, int]:
  try:
    br, bc = (int(b) for b in block_shape)
  except (TypeError, ValueError):
    raise ValueError(f"{_name(path)}: block_shape must be a pair of ints (br, bc), got {block_shape!r}") from None
  if br < 1 or bc < 1:
    raise ValueError(f"{_name(path)}: block_shape {(br, bc)} must be positive")
  if shape[0] % br or shape[1] % bc:
    raise ValueError(
        f"{_name(path)}: block_shape {(br, bc)} does not divide the weight shape {tuple(shape)}; "
        "choose a block size that divides (in, out) or pad the layer"
    )
  return br, bc


def _check_weight(w, path):
  if w.ndim != 2:
    raise ValueError(f"{_name(path)}: expected a 2-D (in, out) weight, got shape {w.shape}")
  if jnp.dtype(w.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(
        f"{_name(path)}: weight dtype {w.dtype} is not supported; use float32, bfloat16 or float16 "
        "(cast with .astype)"
    )


def _concrete(x):
  """``x`` as a NumPy array, or ``None`` when it is traced."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def bsr_from_dense(
    w: jax.Array,
    mask: jax.Array,
    block_shape: tuple[int, int],
    *,
    capacity: int | None = None,
    path: str | None = None,
) -> BlockSparseMatrix:
  """Builds the block-sparse form of ``where(mask, w, 0)``.

  Args:
    w: dense ``(in, out)`` weight, float32, bfloat16 or float16.
    mask: bool array of ``w``'s shape, constant on ``block_shape`` blocks (the sparsejax block
      pattern, e.g. from ``sparsejax.core.patterns.block_mask``).
    block_shape: ``(br, bc)``; must divide ``w.shape``.
    capacity: number of block slots (static). Defaults to the mask's block count (at least 1),
      which needs a concrete mask; pass it explicitly under ``jit`` with a traced mask, or to keep
      shapes fixed while the mask changes. Under ``jit`` a traced mask with more blocks than
      ``capacity`` cannot raise: every stored value is then NaN, so the error shows in outputs.
    path: leaf path used in error messages.

  Returns:
    A :class:`BlockSparseMatrix`. With a traced mask the values are still exactly
    ``where(mask, w, 0)`` on stored blocks, even if the mask is not constant on blocks.

  >>> import jax.numpy as jnp
  >>> mask = jnp.array([[1, 1, 0, 0], [1, 1, 0, 0]], bool)
  >>> w = bsr_from_dense(jnp.ones((2, 4)), mask, (2, 2), capacity=2)
  >>> w.blocks.shape, int(w.nnzb), w.col_ptr.tolist()
  ((2, 2, 2), 1, [0, 1, 1])
  """
  w = jnp.asarray(w)
  _check_weight(w, path)
  br, bc = _check_block_shape(block_shape, w.shape, path)
  mask = jnp.asarray(mask) if not isinstance(mask, np.ndarray) else mask
  if tuple(mask.shape) != tuple(w.shape):
    raise ValueError(f"{_name(path)}: mask shape {tuple(mask.shape)} does not match weight shape {tuple(w.shape)}")
  if mask.dtype != jnp.bool_:
    raise TypeError(f"{_name(path)}: mask dtype must be bool, got {mask.dtype} (use mask.astype(bool))")
  if capacity is not None and (
      isinstance(capacity, (bool, jax.Array)) or not isinstance(capacity, (int, np.integer))
  ):
    raise TypeError(f"{_name(path)}: capacity must be a static Python int, got {capacity!r}")
  k, n = w.shape
  kb, nb = k // br, n // bc
  concrete = _concrete(mask)
  if concrete is not None:
    blocks4 = concrete.reshape(kb, br, nb, bc)
    partial = blocks4.any(axis=(1, 3)) & ~blocks4.all(axis=(1, 3))
    if partial.any():
      i, j = (int(v) for v in np.argwhere(partial)[0])
      raise ValueError(
          f"{_name(path)}: mask is not constant on {(br, bc)} blocks (block ({i}, {j}) is partly "
          "kept); build it with sparsejax.core.patterns.block_mask or the same block_shape"
      )
    nnzb = int(blocks4.any(axis=(1, 3)).sum())
    if capacity is None:
      capacity = max(nnzb, 1)
    elif int(capacity) < nnzb:
      raise ValueError(
          f"{_name(path)}: capacity {capacity} is smaller than the mask's {nnzb} non-zero blocks; "
          "raise capacity (it fixes the number of block slots)"
      )
  elif capacity is None:
    raise ValueError(
        f"{_name(path)}: the mask is traced, so the block count is unknown at trace time; pass a "
        "static capacity= (the maximum number of non-zero blocks)"
    )
  capacity = int(capacity)
  if not 1 <= capacity <= kb * nb:
    raise ValueError(f"{_name(path)}: capacity {capacity} must be in [1, {kb * nb}] (the number of blocks)")
  return _build(w, jnp.asarray(mask), (br, bc), capacity)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _build(w, mask, block_shape, capacity) -> BlockSparseMatrix:
  """Index arrays and the values of ``where(mask, w, 0)`` on the blocks ``mask`` touches."""
  (k, n), (br, bc) = w.shape, block_shape
  kb, nb = k // br, n // bc
  block_any = mask.reshape(kb, br, nb, bc).any(axis=(1, 3))
  w = jnp.where(mask, w, jnp.zeros((), w.dtype))
  total = kb * nb
  flat = block_any.reshape(-1)
  nnzb = jnp.sum(flat, dtype=jnp.int32)
  # Row-major slots: the first `capacity` non-zero blocks, padding ids = total (sorted last).
  (ids,) = jnp.nonzero(flat, size=capacity, fill_value=total)
  ids = ids.astype(jnp.int32)
  valid = ids < total
  row_idx = jnp.where(valid, ids // nb, kb - 1).astype(jnp.int32)
  col_idx = jnp.where(valid, ids % nb, nb - 1).astype(jnp.int32)
  row_ptr = jnp.searchsorted(ids, jnp.arange(kb + 1, dtype=jnp.int32) * nb, side="left").astype(jnp.int32)
  tiles = w.reshape(kb, br, nb, bc).transpose(0, 2, 1, 3).reshape(total, br, bc)
  blocks = jnp.where(valid[:, None, None], tiles[jnp.minimum(ids, total - 1)], jnp.zeros((), w.dtype))
  # A traced mask with more blocks than slots cannot raise: poison every value instead.
  blocks = jnp.where(nnzb > capacity, jnp.full((), jnp.nan, w.dtype), blocks)
  # Column-major view: t-th block of the transposed order -> its row-major slot.
  slot_of = (jnp.cumsum(flat, dtype=jnp.int32) - 1).reshape(kb, nb)
  (ids_t,) = jnp.nonzero(block_any.T.reshape(-1), size=capacity, fill_value=total)
  ids_t = ids_t.astype(jnp.int32)
  valid_t = ids_t < total
  j_t, i_t = jnp.minimum(ids_t, total - 1) // kb, jnp.minimum(ids_t, total - 1) % kb
  positions = jnp.arange(capacity, dtype=jnp.int32)
  col_slot = jnp.clip(jnp.where(valid_t, slot_of[i_t, j_t], positions), 0, capacity - 1).astype(jnp.int32)
  col_ptr = jnp.searchsorted(ids_t, jnp.arange(nb + 1, dtype=jnp.int32) * kb, side="left").astype(jnp.int32)
  # Heaviest-first visiting orders of both views, sorted once here rather than on every call.
  row_order = jnp.argsort(row_ptr[:-1] - row_ptr[1:], stable=True).astype(jnp.int32)
  col_order = jnp.argsort(col_ptr[:-1] - col_ptr[1:], stable=True).astype(jnp.int32)
  return BlockSparseMatrix(blocks, row_ptr, row_idx, col_idx, col_ptr, col_slot, (k, n), row_order, col_order)
