"""XLA:CPU block-sparse products: loops of cache-sized GEMMs over the stored blocks.

The reference backend multiplies by the dense weight; this backend does only the stored blocks'
work. XLA:CPU runs each ``dot_general`` as one GEMM (YNNPACK/Eigen), so the products are written
as loops whose bodies are GEMMs big enough to run near the GEMM's peak and small enough that
their operands stay in cache:

* ``spmm`` (``y = a @ W`` and ``y = a @ W^T``): for each output block (a block column of ``W``,
  or a block row for ``W^T``) an inner loop walks its stored blocks ``group`` at a time, gathers
  the matching ``group`` input slabs of ``a^T`` (contiguous ``[bk, tokens]`` rows, gathered
  without a transpose) and accumulates one ``[bo, group * bk] x [group * bk, tokens]`` GEMM in
  float32. Trip counts are the stored block counts (traced), so no work is padded to the
  longest column.
* ``sddmm`` (``dW`` on the stored blocks): for each block row ``i`` an inner loop gathers
  ``group`` slabs of ``dy^T`` and runs one ``[br, tokens] x [tokens, group * bc]`` GEMM against
  the row's ``x^T`` slab, writing the blocks in slot order.

``a`` is transposed once per call (``[tokens, in] -> [in, tokens]``), and so is the output.
Non-finite values propagate through stored blocks only (as in the Pallas kernels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.matmul._common import next_pow2
from pallas_kernels.matmul.format import BlockSparseMatrix

def _group(block: int, capacity: int, groups: int, dtype) -> int:
  """Stored blocks per GEMM: the mean per output block rounded up to a power of two, capped so
  the gathered width is 128 (float32) or 256 (16-bit) values."""
  width = 256 if jnp.dtype(dtype).itemsize == 2 else 128
  return max(1, min(width // block, next_pow2(-(-capacity // groups))))


_JAX_VERSION = tuple(int(v) for v in jax.__version__.split(".")[:2])


def _dot_dtype(dtype):
  """Operand dtype of the chunk GEMMs: 16-bit inputs stay 16-bit (YNNPACK, AMX) on jax 0.10;
  from jax 0.11 on they are widened to float32 per chunk, because jax 0.12's XLA:CPU raises
  "Unsupported element type for DotThunk: BF16 x BF16 = F32" for these looped dots (0.11 untested)."""
  dtype = jnp.dtype(dtype)
  if dtype.itemsize != 2 or _JAX_VERSION < (0, 11):
    return dtype
  return jnp.dtype(jnp.float32)


def _bits(v: jax.Array) -> jax.Array:
  """16-bit floats as ``uint16`` (XLA:CPU moves them in float32 otherwise); others unchanged."""
  return lax.bitcast_convert_type(v, jnp.uint16) if v.dtype.itemsize == 2 else v


def _float(bits: jax.Array, dtype) -> jax.Array:
  return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits


def _pad(v: jax.Array, count: int, fill) -> jax.Array:
  pad = jnp.full((count, *v.shape[1:]), fill, v.dtype)
  return jnp.concatenate([v, pad], axis=0)


# Token rows per pass. On a quiet 2-core machine one pass over up to 4096 tokens ran 15-45% faster
# than 512-row passes (f32 and bf16, 1024 and 4096 tokens; benchmarks/RESULTS.md).
TOKEN_TILE = 4096


def _tiles(a: jax.Array) -> tuple[jax.Array, int]:
  """``a`` ``[tokens, n]`` as ``[tiles, TOKEN_TILE, n]`` (zero-padded) and the tile count."""
  tiles = -(-a.shape[0] // TOKEN_TILE)
  a = jnp.pad(a, ((0, tiles * TOKEN_TILE - a.shape[0]), (0, 0)))
  return a.reshape(tiles, TOKEN_TILE, a.shape[1]), tiles


def spmm(a: jax.Array, w: BlockSparseMatrix, *, transpose: bool = False) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``), float32 accumulation, in ``a``'s dtype.

  Args:
    a: ``[tokens, in]`` (``[tokens, out]`` with ``transpose``).
    w: the block-sparse weight.
    transpose: multiply by ``W^T``.

  Returns:
    ``[tokens, out]`` (``[tokens, in]`` with ``transpose``).

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), (2, 2))
  >>> spmm(jnp.ones((1, 4)), w).tolist()
  [[2.0, 2.0, 2.0, 2.0]]
  """
  if a.shape[0] > TOKEN_TILE:
    tiled, _ = _tiles(a)
    out = lax.map(lambda t: _spmm(t, w, transpose), tiled)
    return out.reshape(-1, out.shape[-1])[: a.shape[0]]
  return _spmm(a, w, transpose)


def _spmm(a, w, transpose):
  (kb, nb), (br, bc) = w.grid, w.block_shape
  tokens = a.shape[0]
  if transpose:  # groups: block rows i (slots in row-major order); inner: block columns
    ptr, inner, blocks = w.row_ptr, w.col_idx, w.blocks
    n_in, bk, n_out, bo = nb, bc, kb, br
    contract = ((1, 2), (0, 2))  # slabs [tokens, g, bc] . blocks [g, br, bc] -> [tokens, br]
  else:  # groups: block columns j (column-major view); inner: block rows
    ptr, inner, blocks = w.col_ptr, w.row_idx[w.col_slot], w.blocks[w.col_slot]
    n_in, bk, n_out, bo = kb, br, nb, bc
    contract = ((1, 2), (0, 1))  # slabs [tokens, g, br] . blocks [g, br, bc] -> [tokens, bc]
  g = _group(bk, w.capacity, n_out, a.dtype)
  slabs = _bits(a).reshape(tokens, n_in, bk)
  inner = _pad(inner, g, 0)
  blocks = _pad(_bits(blocks), g, 0)
  lanes = jnp.arange(g, dtype=jnp.int32)
  zero = jnp.zeros((), slabs.dtype)

  def output_block(o, out):
    start, stop = ptr[o], ptr[o + 1]

    def chunk(c, acc):
      s = start + c * g
      valid = s + lanes < stop
      idx = lax.dynamic_slice(inner, (s,), (g,))
      # Lanes past this output block read zeros (not the next block's inputs): no NaN leaks.
      x = jnp.where(valid[None, :, None], jnp.take(slabs, idx, axis=1, mode="clip"), zero)
      blk = jnp.where(valid[:, None, None], lax.dynamic_slice(blocks, (s, 0, 0), (g, br, bc)), zero)
      ct = _dot_dtype(a.dtype)
      part = lax.dot_general(
          _float(x, a.dtype).astype(ct), _float(blk, a.dtype).astype(ct), (contract, ((), ())),
          preferred_element_type=jnp.float32,
      )
      return acc + part

    acc = lax.fori_loop(0, (stop - start + g - 1) // g, chunk, jnp.zeros((tokens, bo), jnp.float32))
    return lax.dynamic_update_slice(out, _bits(acc.astype(a.dtype)), (0, o * bo))

  out = lax.fori_loop(0, n_out, output_block, jnp.zeros((tokens, n_out * bo), slabs.dtype))
  return _float(out, a.dtype)


def sddmm(a: jax.Array, b: jax.Array, w: BlockSparseMatrix) -> jax.Array:
  """``(a^T @ b)`` on ``w``'s stored blocks: ``[capacity, br, bc]`` in ``w.dtype``, zero on padding.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((2, 4)), jnp.array([[0, 0, 1, 1]] * 2, bool), (2, 2),
  ...                    capacity=2)
  >>> sddmm(jnp.ones((3, 2)), jnp.arange(12.0).reshape(3, 4), w).tolist()  # slot 1: padding
  [[[18.0, 21.0], [18.0, 21.0]], [[0.0, 0.0], [0.0, 0.0]]]
  """
  if a.shape[0] > TOKEN_TILE:
    (a_tiles, tiles), (b_tiles, _) = _tiles(a), _tiles(b)
    total = lax.fori_loop(
        0, tiles, lambda t, acc: acc + _sddmm(a_tiles[t], b_tiles[t], w), jnp.zeros(w.blocks.shape, jnp.float32)
    )
  else:
    total = _sddmm(a, b, w)
  return jnp.where(w.valid()[:, None, None], total, 0.0).astype(w.dtype)


def _sddmm(a, b, w):
  """float32 ``[capacity, br, bc]``; padding slots hold garbage."""
  (kb, nb), (br, bc) = w.grid, w.block_shape
  tokens = a.shape[0]
  g = _group(bc, w.capacity, kb, b.dtype)
  a_bits = _bits(a)
  b_slabs = _bits(b).reshape(tokens, nb, bc)
  cols = _pad(w.col_idx, g, 0)

  def block_row(i, out):
    start, stop = w.row_ptr[i], w.row_ptr[i + 1]
    row = _float(lax.dynamic_slice(a_bits, (0, i * br), (tokens, br)), a.dtype)

    def chunk(c, out):
      s = start + c * g
      gathered = _float(jnp.take(b_slabs, lax.dynamic_slice(cols, (s,), (g,)), axis=1, mode="clip"), b.dtype)
      ct = _dot_dtype(a.dtype)
      part = lax.dot_general(row.astype(ct), gathered.astype(ct), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      # [br, g, bc] -> [g, br, bc]; lanes past the row land on the next rows' slots, which
      # are written after this one (or are padding, zeroed below).
      return lax.dynamic_update_slice(out, part.transpose(1, 0, 2), (s, 0, 0))

    return lax.fori_loop(0, (stop - start + g - 1) // g, chunk, out)

  out = lax.fori_loop(0, kb, block_row, jnp.zeros((w.capacity + g, br, bc), jnp.float32))
  return out[: w.capacity]
