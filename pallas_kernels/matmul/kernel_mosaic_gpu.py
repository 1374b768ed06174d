"""Block-sparse matmul kernels for Pallas Mosaic GPU (Hopper sm_90a: TMA + wgmma).

STATUS: written against the ``plgpu`` API of jax 0.10.2 .. 0.12, checked on CPU only: the
kernels run under the Mosaic GPU interpreter (``interpret=True``) and lower for CUDA through
Mosaic GPU in the tests, but they have NOT yet been compiled by ptxas nor run on a Hopper GPU;
tests marked ``gpu`` do that. Import this module lazily (the ops do).

Design: one persistent CTA per SM (``plgpu.kernel(grid=(num_sms,))``) takes work tiles
round-robin; Warpgroup lowering semantics (Mosaic GPU infers the shared-memory swizzles); two
warpgroups per CTA, warp-specialized: a memory warpgroup issues TMA copies into a ring of
``stages`` shared-memory buffers and a compute warpgroup issues wgmma from them (see
``_persistent_mma``). The number of steps per tile is *dynamic* (GPU Pallas has no scalar
prefetch and ``emit_pipeline`` needs a static grid), and the ring runs across tile boundaries,
so the pipeline does not drain between tiles: that matters at low density, where a tile has
only a few blocks. Index arrays stay in global memory.

* ``spmm``: tiles ``(output block, row tile)``, heaviest output blocks first (a static
  round-robin over an LPT order: load balancing across rows/columns of very different
  lengths); a tile's steps are its stored blocks, each split into ``bk // tk`` sub-steps.
* ``sddmm``: tiles ``(slot, row chunk of the block)``; steps are row tiles of ``a``/``b``;
  ``a``'s tile is fed to wgmma transposed. Padding slots run zero steps and store zeros.

Constraints: float16/bfloat16 only; ``br`` and ``bc`` in {64, 128, 256}.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _cost
from pallas_kernels.matmul import _common
from pallas_kernels.matmul.format import BlockSparseMatrix, _name

_SMEM_BYTES = 227 * 1024 - 2048  # H100/H200 opt-in shared memory per block, minus barriers/slack
_H100_SMS = 132
_MEMORY_REGISTERS = 40
_COMPUTE_REGISTERS = 232  # what (512 - 40) registers per thread leave one compute warpgroup, capped


def check(w: BlockSparseMatrix, dtype, path: str | None = None) -> None:
  """Raises if the Mosaic GPU kernels cannot run ``w`` in ``dtype``."""
  name = _name(path)
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16)):
    raise TypeError(
        f"{name}: the Mosaic GPU kernels need float16 or bfloat16 inputs, got {jnp.dtype(dtype)}; "
        "cast them or use backend='triton'"
    )
  if any(b not in (64, 128, 256) for b in w.block_shape):
    raise ValueError(
        f"{name}: the Mosaic GPU kernels need block sizes in {{64, 128, 256}}, got "
        f"{w.block_shape}; rebuild with such blocks or use backend='triton'"
    )


def _interpret_params():
  try:
    return plgpu.InterpretGPUParams()
  except AttributeError:  # jax < 0.11 keeps it private
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415

    return InterpretGPUParams()


def _transposed(ref):
  try:
    return ref.transpose((1, 0))
  except AttributeError:  # jax <= 0.10 refs have no .transpose
    return plgpu.transpose_ref(ref, (1, 0))


def _num_sms(interpret: bool) -> int:
  if interpret:
    return 4
  dev = jax.devices()[0]
  return getattr(dev, "core_count", None) or _H100_SMS


def _stages(step_bytes: int, out_bytes: int, max_stages: int = 4) -> int:
  return max(0, min(max_stages, (_SMEM_BYTES - out_bytes) // step_bytes))


def _compiler_params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _persistent_mma(*, n_tiles, num_sms, stages, acc_shape, tile_info, issue, epilogue, smem, loaded, consumed, a_view, b_view):
  """Warp-specialized persistent loop: ``acc = sum_k A_k @ B_k`` for every work tile.

  CTA ``sm`` takes tiles ``sm, sm + num_sms, ...``. Warpgroup 1 (memory) walks those tiles'
  steps issuing TMA copies into a ring of ``stages`` buffers, waiting on ``consumed`` before it
  reuses a buffer; it runs ahead across tile boundaries, so the next tile's loads overlap this
  tile's tail and epilogue. Warpgroup 0 (compute) walks the same steps: it waits on ``loaded``,
  issues the wgmma, and after ``wgmma_wait(1)`` releases the previous step's buffer. Both carry
  a global step counter ``c``; step ``c`` uses buffer ``c % stages``.

  Args:
    tile_info: ``lin -> (n_steps, ctx)`` for work tile ``lin`` (``n_steps`` traced, may be 0).
    issue: ``(ctx, k, buf) -> None`` issues the copies of step ``k`` into buffer ``buf`` with
      barrier ``loaded.at[buf]`` (two copies: ``loaded`` expects two arrivals).
    epilogue: ``(ctx, acc) -> None`` stores the float32 accumulator of a tile.
    smem: ``(a_smem, b_smem)``, each ``[stages, ...]``.
  """
  a_smem, b_smem = smem
  sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
  my_tiles = (n_tiles - 1 - sm) // num_sms + 1  # the grid has at most n_tiles CTAs

  @pl.when(wg == 1)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

    def tile(i, c):
      n_steps, ctx = tile_info(sm + i * num_sms)

      def step(k, c):
        buf = lax.rem(c, stages)

        @pl.when(c >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[buf])

        issue(ctx, k, buf)
        return c + 1

      return lax.fori_loop(0, n_steps, step, c)

    lax.fori_loop(0, my_tiles, tile, jnp.int32(0))

  @pl.when(wg == 0)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")

    def tile(i, c):
      n_steps, ctx = tile_info(sm + i * num_sms)

      def acc_scope(acc_ref):
        def step(k, c):
          buf = lax.rem(c, stages)
          plgpu.barrier_wait(loaded.at[buf])
          plgpu.wgmma(acc_ref, a_view(a_smem.at[buf]), b_view(b_smem.at[buf]))
          plgpu.wgmma_wait(1)  # the wgmma of step c - 1 has retired: release its buffer

          @pl.when(k > 0)
          def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(c + stages - 1, stages)])

          return c + 1

        c_end = lax.fori_loop(0, n_steps, step, c)
        plgpu.wgmma_wait(0)

        @pl.when(n_steps > 0)
        def _():
          plgpu.barrier_arrive(consumed.at[lax.rem(c_end + stages - 1, stages)])

        return acc_ref[...], c_end

      acc, c = pl.run_scoped(acc_scope, plgpu.ACC(acc_shape, jnp.float32))
      epilogue(ctx, acc)
      return c

    lax.fori_loop(0, my_tiles, tile, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0)


def _store(o_smem, acc, dst):
  """Registers -> SMEM -> GMEM (TMA); waits until the previous store has read ``o_smem``."""
  plgpu.wait_smem_to_gmem(0, wait_read_only=True)
  o_smem[...] = acc.astype(o_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, dst)


def _kernel(body, out_type, scratch, n_tiles, interpret, cost):
  num_sms = min(_num_sms(interpret), n_tiles)
  return plgpu.kernel(
      functools.partial(body, num_sms=num_sms),
      out_type=out_type,
      scratch_types=scratch,
      grid=(num_sms,),
      grid_names=("sm",),
      num_threads=2,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params() if interpret else None,
      **_cost.kernel_kwargs(plgpu.kernel, cost),
  )


def _spmm_tiles(bk, bo, itemsize):
  """``(bm, tk, stages)``: row tile, reduction sub-tile and pipeline depth that fit in SMEM."""
  bm = 128 if bo <= 128 else 64  # a 128 x 128 f32 accumulator is 128 registers per thread
  for tk in (t for t in (bk, 128, 64) if t <= bk and bk % t == 0):
    stages = _stages((bm * tk + tk * bo) * itemsize, bm * bo * itemsize)
    if stages >= 2:
      return bm, tk, stages
  raise ValueError(f"no Mosaic GPU tiling fits blocks with bk={bk}, bo={bo}")


def spmm(a: jax.Array, w: BlockSparseMatrix, *, transpose: bool = False, interpret: bool = False) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``) in ``a``'s dtype, float32 accumulation.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((64, 64), jnp.bfloat16), jnp.ones((64, 64), bool), (64, 64))
  >>> float(spmm(jnp.ones((8, 64), jnp.bfloat16), w, interpret=True)[0, 0])
  64.0
  """
  ptr, inner, slot = _common.compressed_view(w, transpose)
  bk, bo, groups = _common.spmm_dims(w, transpose)
  dtype = a.dtype
  bm, tk, stages = _spmm_tiles(bk, bo, jnp.dtype(dtype).itemsize)
  subs = bk // tk
  m = a.shape[0]
  a_p = _common.pad_rows(a, bm)
  m_tiles = a_p.shape[0] // bm
  order = jnp.argsort(ptr[:-1] - ptr[1:], stable=True).astype(jnp.int32)  # most blocks first

  def body(order_ref, ptr_ref, inner_ref, slot_ref, a_gmem, w_gmem, o_gmem, a_smem, w_smem, o_smem, loaded, consumed, *, num_sms):
    def tile_info(lin):
      group = order_ref[lin // m_tiles]
      start = ptr_ref[group]
      return (ptr_ref[group + 1] - start) * subs, (group, pl.ds((lin % m_tiles) * bm, bm), start)

    def issue(ctx, k, buf):
      _, rows, start = ctx
      t = start + k // subs
      sub = lax.rem(k, subs) * tk
      plgpu.copy_gmem_to_smem(a_gmem.at[rows, pl.ds(inner_ref[t] * bk + sub, tk)], a_smem.at[buf], loaded.at[buf])
      blk = w_gmem.at[slot_ref[t]]
      src = blk.at[:, pl.ds(sub, tk)] if transpose else blk.at[pl.ds(sub, tk)]
      plgpu.copy_gmem_to_smem(src, w_smem.at[buf], loaded.at[buf])

    def epilogue(ctx, acc):
      group, rows, _ = ctx
      _store(o_smem, acc, o_gmem.at[rows, pl.ds(group * bo, bo)])

    _persistent_mma(
        n_tiles=n_tiles, num_sms=num_sms, stages=stages, acc_shape=(bm, bo), tile_info=tile_info,
        issue=issue, epilogue=epilogue, smem=(a_smem, w_smem), loaded=loaded, consumed=consumed,
        a_view=lambda r: r, b_view=_transposed if transpose else (lambda r: r),
    )

  n_tiles = groups * m_tiles
  w_tile = (bo, tk) if transpose else (tk, bo)
  kernel = _kernel(
      body,
      jax.ShapeDtypeStruct((a_p.shape[0], groups * bo), dtype),
      [
          plgpu.SMEM((stages, bm, tk), dtype),
          plgpu.SMEM((stages, *w_tile), dtype),
          plgpu.SMEM((bm, bo), dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      ],
      n_tiles,
      interpret,
      _cost.matmul_spmm(a_p.shape[0], w, transpose, jnp.dtype(dtype).itemsize),
  )
  return kernel(order, ptr, inner, slot, a_p, w.blocks)[:m]


def sddmm(a: jax.Array, b: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False) -> jax.Array:
  """``(a^T @ b)`` on ``w``'s stored blocks: ``[capacity, br, bc]`` in ``w``'s dtype, zero padding.

  Runs on CPU under the Mosaic GPU interpreter with ``interpret=True`` (jax >= 0.11: the jax
  0.10 interpreter cannot transpose refs); tracing works anywhere:

  >>> import jax
  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((64, 64), jnp.bfloat16), jnp.ones((64, 64), bool), (64, 64))
  >>> a = jnp.ones((8, 64), jnp.bfloat16)
  >>> jax.eval_shape(sddmm, a, a, w).shape
  (1, 64, 64)
  """
  br, bc = w.block_shape
  dtype = a.dtype
  itemsize = jnp.dtype(dtype).itemsize
  sr = min(br, 128 if bc <= 128 else 64)  # rows of the block per tile (the wgmma M dim)
  chunks = br // sr
  tm = 64  # rows of a and b per pipeline step (the wgmma K dim)
  a_p, b_p = _common.pad_rows(a, tm), _common.pad_rows(b, tm)
  row_tiles = a_p.shape[0] // tm
  stages = _stages((tm * sr + tm * bc) * itemsize, sr * bc * itemsize)

  def body(nnzb_ref, row_ref, col_ref, a_gmem, b_gmem, o_gmem, a_smem, b_smem, o_smem, loaded, consumed, *, num_sms):
    def tile_info(lin):
      p, chunk = lin // chunks, lax.rem(lin, chunks)
      a_cols = pl.ds(row_ref[p] * br + chunk * sr, sr)
      n_steps = jnp.where(p < nnzb_ref[0], row_tiles, 0)  # padding slots store zeros
      return n_steps, (p, pl.ds(chunk * sr, sr), a_cols, pl.ds(col_ref[p] * bc, bc))

    def issue(ctx, k, buf):
      _, _, a_cols, b_cols = ctx
      rows = pl.ds(k * tm, tm)
      plgpu.copy_gmem_to_smem(a_gmem.at[rows, a_cols], a_smem.at[buf], loaded.at[buf])
      plgpu.copy_gmem_to_smem(b_gmem.at[rows, b_cols], b_smem.at[buf], loaded.at[buf])

    def epilogue(ctx, acc):
      p, sub, _, _ = ctx
      _store(o_smem, acc, o_gmem.at[p, sub])

    _persistent_mma(
        n_tiles=n_tiles, num_sms=num_sms, stages=stages, acc_shape=(sr, bc), tile_info=tile_info,
        issue=issue, epilogue=epilogue, smem=(a_smem, b_smem), loaded=loaded, consumed=consumed,
        a_view=_transposed, b_view=lambda r: r,
    )

  n_tiles = w.capacity * chunks
  kernel = _kernel(
      body,
      jax.ShapeDtypeStruct(w.blocks.shape, w.dtype),
      [
          plgpu.SMEM((stages, tm, sr), dtype),
          plgpu.SMEM((stages, tm, bc), dtype),
          plgpu.SMEM((sr, bc), w.dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=1, num_barriers=stages),
      ],
      n_tiles,
      interpret,
      _cost.matmul_sddmm(a_p.shape[0], w, jnp.dtype(dtype).itemsize),
  )
  return kernel(w.nnzb.reshape(1), w.row_idx, w.col_idx, a_p, b_p)
