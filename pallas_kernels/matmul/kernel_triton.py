"""Block-sparse matmul kernels for the Pallas Triton lowering (NVIDIA GPUs); also the interpret path.

GPU lowerings have no scalar prefetch: the index arrays are ordinary inputs in global memory,
read inside the kernel. ``spmm`` runs one program per ``(row tile, output block)`` and loops
(``fori_loop`` with dynamic bounds) over that output block's stored blocks; ``sddmm`` runs one
program per slot and loops over the row tiles. Triton needs power-of-two tiles of at least 16:
blocks must be powers of two in [16, 256].

With ``interpret=True`` the same ``pallas_call`` runs on any platform (the ``"interpret"`` backend).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _cost
from pallas_kernels.matmul import _common
from pallas_kernels.matmul.format import BlockSparseMatrix, _name

_ANY = pl.BlockSpec(memory_space=pl.ANY)
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def check(w: BlockSparseMatrix, dtype, path: str | None = None) -> None:
  """Raises ``ValueError`` if the Triton kernels cannot run ``w`` (block sizes)."""
  del dtype
  for b in w.block_shape:
    if b < 16 or b > 256 or b & (b - 1):
      raise ValueError(
          f"{_name(path)}: the Triton kernels need block sizes that are powers of two in "
          f"[16, 256], got {w.block_shape}; rebuild with such blocks or use backend='reference'"
      )


def _compiler_params(num_warps: int, num_stages: int):
  from jax.experimental.pallas import triton as plt  # noqa: PLC0415 (GPU-only module)

  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _block_m(m: int) -> int:
  return min(128, max(16, _common.next_pow2(m)))


# Operand bytes of one software-pipeline stage that fit H100's 227 KiB of shared memory with
# Triton's buffering, found by compiling every block shape for H100 (benchmarks/compile_sweep.py):
# spmm stages up to 128 KiB compile, 192 KiB do not; sddmm (both operands pipelined) 80 KiB
# compile, 128 KiB do not.
_SPMM_STAGE_BYTES = 128 * 1024
_SDDMM_STAGE_BYTES = 96 * 1024


def _reduction_tile(bm: int, bk: int, bo: int, itemsize: int) -> int:
  """Reduction sub-tile of a block for spmm: ``bk`` halved until a stage fits."""
  tk = bk
  while tk > 16 and (bm * tk + tk * bo) * itemsize > _SPMM_STAGE_BYTES:
    tk //= 2
  return tk


def _spmm_kernel(ptr_ref, inner_ref, slot_ref, a_ref, w_ref, o_ref, *, bm, bk, tk, transpose):
  row = pl.program_id(0)
  group = pl.program_id(1)
  rows = pl.ds(pl.multiple_of(row * bm, bm), bm)
  chunks = bk // tk  # each stored block's reduction in ``chunks`` sub-tiles of ``tk``

  def step(u, acc):
    t, c = lax.div(u, chunks), lax.rem(u, chunks)
    cols = pl.ds(pl.multiple_of(inner_ref[t] * bk + c * tk, tk), tk)
    part = pl.ds(pl.multiple_of(c * tk, tk), tk)
    a = a_ref[rows, cols]
    if transpose:
      blk = w_ref[slot_ref[t], :, part]
      return acc + lax.dot_general(a, blk, _NT, preferred_element_type=jnp.float32)
    blk = w_ref[slot_ref[t], part, :]
    return acc + jnp.dot(a, blk, preferred_element_type=jnp.float32)

  acc = lax.fori_loop(ptr_ref[group] * chunks, ptr_ref[group + 1] * chunks, step,
                      jnp.zeros(o_ref.shape, jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def spmm(
    a: jax.Array,
    w: BlockSparseMatrix,
    *,
    transpose: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``) in ``a``'s dtype, float32 accumulation.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((32, 32)), jnp.ones((32, 32), bool), (16, 16))
  >>> float(spmm(jnp.ones((2, 32)), w, interpret=True)[0, 0])
  32.0
  """
  ptr, inner, slot = _common.compressed_view(w, transpose)
  bk, bo, groups = _common.spmm_dims(w, transpose)
  m = a.shape[0]
  bm = block_m or _block_m(m)
  a_p = _common.pad_rows(a, bm)
  tk = _reduction_tile(bm, bk, bo, jnp.dtype(a.dtype).itemsize)
  kernel = functools.partial(_spmm_kernel, bm=bm, bk=bk, tk=tk, transpose=transpose)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((a_p.shape[0], groups * bo), a.dtype),
      grid=(a_p.shape[0] // bm, groups),
      in_specs=[_ANY] * 5,
      out_specs=pl.BlockSpec((bm, bo), lambda i, g: (i, g)),
      # 8 warps once the accumulator or the activation tile holds 128 x 128 float32 values.
      compiler_params=None if interpret else _compiler_params(
          num_warps or (8 if max(bm * bo, bm * tk) >= 128 * 128 else 4), num_stages),
      cost_estimate=_cost.matmul_spmm(a_p.shape[0], w, transpose, jnp.dtype(a.dtype).itemsize),
      interpret=interpret,
      name="bsr_spmm_t" if transpose else "bsr_spmm",
  )(ptr, inner, slot, a_p, w.blocks)
  return out[:m]


def _sddmm_kernel(nnzb_ref, row_ref, col_ref, a_ref, b_ref, o_ref, *, bm, br, bc, tc, row_tiles):
  p = pl.program_id(0)
  part = pl.program_id(1)  # column part of the block: ``tc`` of its ``bc`` columns
  a_cols = pl.ds(pl.multiple_of(row_ref[p] * br, br), br)
  b_cols = pl.ds(pl.multiple_of(col_ref[p] * bc + part * tc, tc), tc)

  def step(r, acc):
    rows = pl.ds(pl.multiple_of(r * bm, bm), bm)
    return acc + lax.dot_general(a_ref[rows, a_cols], b_ref[rows, b_cols], _TN, preferred_element_type=jnp.float32)

  # Padding slots get zeros. Both bounds int32 scalars: a where() of Python ints lowers to an i1
  # bound that Triton's scf.for verifier rejects (found by compiling for H100, pallas_kernels.aot).
  trips = lax.select(p < nnzb_ref[0], jnp.int32(row_tiles), jnp.int32(0))
  acc = lax.fori_loop(0, trips, step, jnp.zeros((br, tc), jnp.float32))
  o_ref[...] = acc.astype(o_ref.dtype)


def sddmm(
    a: jax.Array,
    b: jax.Array,
    w: BlockSparseMatrix,
    *,
    interpret: bool = False,
    block_m: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 3,
) -> jax.Array:
  """``(a^T @ b)`` on ``w``'s stored blocks: ``[capacity, br, bc]`` in ``w``'s dtype, zero padding.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((16, 16)), jnp.ones((16, 16), bool), (16, 16))
  >>> float(sddmm(jnp.ones((4, 16)), jnp.ones((4, 16)), w, interpret=True)[0, 0, 0])
  4.0
  """
  br, bc = w.block_shape
  m = a.shape[0]
  bm = block_m or min(64, max(16, _common.next_pow2(m)))
  while block_m is None and bm > 16 and bm * (br + bc) * jnp.dtype(a.dtype).itemsize > _SDDMM_STAGE_BYTES:
    bm //= 2
  # The output block in column parts of at most 128 x 256 float32 accumulators: the epilogue
  # stages the accumulator through shared memory (a 256 x 256 one needs 256 KiB).
  tc = bc
  while tc > 16 and br * tc > 128 * 256:
    tc //= 2
  a_p, b_p = _common.pad_rows(a, bm), _common.pad_rows(b, bm)
  kernel = functools.partial(_sddmm_kernel, bm=bm, br=br, bc=bc, tc=tc, row_tiles=a_p.shape[0] // bm)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(w.blocks.shape, w.dtype),
      grid=(w.capacity, bc // tc),
      in_specs=[_ANY] * 5,
      out_specs=pl.BlockSpec((None, br, tc), lambda p, c: (p, 0, c)),
      compiler_params=None if interpret else _compiler_params(
          num_warps or (8 if br * tc >= 128 * 128 else 4), num_stages),
      cost_estimate=_cost.matmul_sddmm(a_p.shape[0], w, jnp.dtype(a.dtype).itemsize),
      interpret=interpret,
      name="bsr_sddmm",
  )(w.nnzb.reshape(1), w.row_idx, w.col_idx, a_p, b_p)
