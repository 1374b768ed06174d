"""Block-sparse matmul kernels for Pallas Mosaic TPU (scalar prefetch).

``spmm`` runs a grid ``(row tiles, steps)``: the step axis walks a *visit schedule* (prefetched
into SMEM) that lists the stored blocks grouped by output block, plus one empty step for each
output block with no stored block, so every output block is written exactly once and is only
revisited on consecutive steps. A float32 VMEM accumulator is zeroed on a group's first step and
flushed on its last. Steps past the end repeat the last step's block indices, so the pipeline
issues no DMA for them. ``sddmm`` runs a grid ``(slots, row tiles)`` with the reduction over row
tiles innermost; padding slots read one fixed block and write zeros.

TPU tiling: ``br`` and ``bc`` must be multiples of 128 (or the whole dim); float16 is not
supported (use bfloat16). The schedule (four int32 arrays of ``capacity + groups``) lives in
SMEM: a very large capacity may not fit there (not yet checked on a TPU). With ``interpret=True`` the kernels run under
``pltpu.InterpretParams()``, which simulates TPU semantics (scalar prefetch, DMAs) on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _cost
from pallas_kernels.matmul import _common
from pallas_kernels.matmul.format import BlockSparseMatrix, _name

_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


def check(w: BlockSparseMatrix, dtype, path: str | None = None) -> None:
  """Raises if the TPU kernels cannot run ``w`` in ``dtype`` (tiling, float16)."""
  name = _name(path)
  if jnp.dtype(dtype) == jnp.float16:
    raise TypeError(f"{name}: the TPU kernels do not support float16; use bfloat16 or float32")
  for b, d in zip(w.block_shape, w.shape):
    if b % 128 and b != d:
      raise ValueError(
          f"{name}: the TPU kernels need block sizes that are multiples of 128 (or the whole "
          f"dim), got {w.block_shape} for shape {w.shape}; rebuild with such blocks or use "
          "backend='reference'"
      )


def _interpret(interpret: bool):
  return pltpu.InterpretParams() if interpret else False


def _block_m(m: int, dtype) -> int:
  sublanes = 8 * (4 // jnp.dtype(dtype).itemsize)  # 8 rows of f32, 16 of bf16
  return min(256, _common.round_up(m, sublanes))


def visit_schedule(ptr: jax.Array, inner: jax.Array, slot: jax.Array):
  """Grid steps over a compressed structure, every group visited on consecutive steps.

  Args:
    ptr: ``[groups + 1]`` group boundaries into ``inner``/``slot``.
    inner: ``[capacity]`` reduction block of each position.
    slot: ``[capacity]`` block slot of each position.

  Returns:
    ``(group, inner, slot, valid)``, each int32 ``[capacity + groups]``: step ``s`` adds block
    ``slot[s]`` (reduction block ``inner[s]``) into output block ``group[s]`` when ``valid[s]``.
    A group with no block gets one invalid step; steps past the end repeat the last step.

  >>> import jax.numpy as jnp
  >>> g, i, s, v = visit_schedule(jnp.array([0, 0, 2]), jnp.array([3, 1]), jnp.array([0, 1]))
  >>> g.tolist(), v.tolist()
  ([0, 1, 1, 1], [0, 1, 1, 0])
  """
  groups, capacity = ptr.shape[0] - 1, inner.shape[0]
  counts = ptr[1:] - ptr[:-1]
  steps = jnp.maximum(counts, 1)
  step_end = jnp.cumsum(steps)
  s = jnp.arange(capacity + groups, dtype=jnp.int32)
  s_eff = jnp.minimum(s, step_end[-1] - 1)
  group = jnp.searchsorted(step_end, s_eff, side="right").astype(jnp.int32)
  offset = s_eff - (step_end[group] - steps[group])
  valid = (s < step_end[-1]) & (offset < counts[group])
  pos = jnp.clip(ptr[group] + offset, 0, capacity - 1)
  return group, inner[pos], slot[pos], valid.astype(jnp.int32)


def _spmm_kernel(group_ref, inner_ref, slot_ref, valid_ref, a_ref, w_ref, o_ref, acc_ref, *, n_steps, transpose):
  del inner_ref, slot_ref  # used by the index maps
  s = pl.program_id(1)
  group = group_ref[s]
  first = (s == 0) | (group_ref[jnp.maximum(s - 1, 0)] != group)
  last = (s == n_steps - 1) | (group_ref[jnp.minimum(s + 1, n_steps - 1)] != group)

  @pl.when(first)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(valid_ref[s] != 0)
  def _():
    if transpose:
      acc_ref[...] += lax.dot_general(a_ref[...], w_ref[...], _NT, preferred_element_type=jnp.float32)
    else:
      acc_ref[...] += jnp.dot(a_ref[...], w_ref[...], preferred_element_type=jnp.float32)

  @pl.when(last)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def spmm(
    a: jax.Array,
    w: BlockSparseMatrix,
    *,
    transpose: bool = False,
    interpret: bool = False,
    block_m: int | None = None,
) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``) in ``a``'s dtype, float32 accumulation.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> mask = jnp.ones((256, 128), bool).at[128:].set(False)  # one of the two blocks stored
  >>> w = bsr_from_dense(jnp.ones((256, 128)), mask, (128, 128))
  >>> float(spmm(jnp.ones((8, 256)), w, interpret=True)[0, 0])
  128.0
  """
  ptr, inner, slot = _common.compressed_view(w, transpose)
  group, inner, slot, valid = visit_schedule(ptr, inner, slot)
  bk, bo, groups = _common.spmm_dims(w, transpose)
  br, bc = w.block_shape
  m = a.shape[0]
  bm = block_m or _block_m(m, a.dtype)
  a_p = _common.pad_rows(a, bm)
  n_steps = group.shape[0]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(a_p.shape[0] // bm, n_steps),
      in_specs=[
          pl.BlockSpec((bm, bk), lambda i, s, g, k, p, v: (i, k[s])),
          pl.BlockSpec((None, br, bc), lambda i, s, g, k, p, v: (p[s], 0, 0)),
      ],
      out_specs=pl.BlockSpec((bm, bo), lambda i, s, g, k, p, v: (i, g[s])),
      scratch_shapes=[pltpu.VMEM((bm, bo), jnp.float32)],
  )
  out = pl.pallas_call(
      functools.partial(_spmm_kernel, n_steps=n_steps, transpose=transpose),
      out_shape=jax.ShapeDtypeStruct((a_p.shape[0], groups * bo), a.dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=_cost.matmul_spmm(a_p.shape[0], w, transpose, jnp.dtype(a.dtype).itemsize),
      interpret=_interpret(interpret),
      name="bsr_spmm_t" if transpose else "bsr_spmm",
  )(group, inner, slot, valid, a_p, w.blocks)
  return out[:m]


def _sddmm_kernel(row_ref, col_ref, nnzb_ref, a_ref, b_ref, o_ref, acc_ref, *, row_tiles):
  del row_ref, col_ref  # used by the index maps
  p, r = pl.program_id(0), pl.program_id(1)

  @pl.when(r == 0)
  def _():
    acc_ref[...] = jnp.zeros_like(acc_ref)

  @pl.when(p < nnzb_ref[0])
  def _():
    acc_ref[...] += lax.dot_general(a_ref[...], b_ref[...], _TN, preferred_element_type=jnp.float32)

  @pl.when(r == row_tiles - 1)
  def _():
    o_ref[...] = acc_ref[...].astype(o_ref.dtype)


def sddmm(
    a: jax.Array,
    b: jax.Array,
    w: BlockSparseMatrix,
    *,
    interpret: bool = False,
    block_m: int | None = None,
) -> jax.Array:
  """``(a^T @ b)`` on ``w``'s stored blocks: ``[capacity, br, bc]`` in ``w``'s dtype, zero padding.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((128, 256)), jnp.ones((128, 256), bool), (128, 128))
  >>> dw = sddmm(jnp.ones((8, 128)), jnp.ones((8, 256)), w, interpret=True)  # 8 tokens
  >>> dw.shape, float(dw[1, 0, 0])
  ((2, 128, 128), 8.0)
  """
  br, bc = w.block_shape
  m = a.shape[0]
  bm = block_m or _block_m(m, a.dtype)
  a_p, b_p = _common.pad_rows(a, bm), _common.pad_rows(b, bm)
  row_tiles = a_p.shape[0] // bm

  def rows(r, p, nnzb):  # padding slots all read row tile 0: no DMA after the first
    return jnp.where(p < nnzb[0], r, 0)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3,
      grid=(w.capacity, row_tiles),
      in_specs=[
          pl.BlockSpec((bm, br), lambda p, r, i, j, n: (rows(r, p, n), i[p])),
          pl.BlockSpec((bm, bc), lambda p, r, i, j, n: (rows(r, p, n), j[p])),
      ],
      out_specs=pl.BlockSpec((None, br, bc), lambda p, r, i, j, n: (p, 0, 0)),
      scratch_shapes=[pltpu.VMEM((br, bc), jnp.float32)],
  )
  return pl.pallas_call(
      functools.partial(_sddmm_kernel, row_tiles=row_tiles),
      out_shape=jax.ShapeDtypeStruct(w.blocks.shape, w.dtype),
      grid_spec=grid_spec,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=_cost.matmul_sddmm(a_p.shape[0], w, jnp.dtype(a.dtype).itemsize),
      interpret=_interpret(interpret),
      name="bsr_sddmm",
  )(w.row_idx, w.col_idx, w.nnzb.reshape(1), a_p, b_p)
