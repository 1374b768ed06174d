"""Block-sparse matmul kernels for Pallas Mosaic GPU (Hopper sm_90a: TMA + wgmma).

STATUS: written against the ``plgpu`` API of jax 0.10.2 .. 0.12, checked on CPU only: the
kernels run under the Mosaic GPU interpreter (``interpret=True``, jax >= 0.11) and compile for
an H100 through ptxas (``pallas_kernels.aot``), but they have NOT been run on a Hopper GPU;
tests marked ``gpu`` do that. Import this module lazily (the ops do).

Schedule (``_persistent_mma``), the one jax's Hopper matmul uses, over a dynamic step count:

* Persistent grid, one CTA per SM (``plgpu.kernel(grid=(num_sms,))``). Work tiles are listed
  heaviest first (``spmm``: output block columns / rows by stored-block count, the order
  precomputed in :class:`BlockSparseMatrix` at build time) and dealt to the CTAs in a snake
  (round ``i`` goes ``0 .. S-1`` when ``i`` is even, ``S-1 .. 0`` when odd), a greedy
  longest-first balance of rows of very different lengths.
* Three warpgroups, warp-specialised: warpgroup 2 (memory, 40 registers) issues TMA copies into
  a ring of ``stages >= 3`` shared-memory buffers; warpgroups 0 and 1 (compute, 232 registers)
  each own half of the CTA's output tile (``256 x 128``, ``256 x 64`` or ``128 x 256`` for
  ``spmm``) and issue ``wgmma`` on the shared buffers, releasing each buffer one step later
  (``wgmma_wait(1)``). The ring runs across tile boundaries, so the next tile's loads overlap
  this tile's last steps and epilogue.
* Indices are read ahead: the memory warpgroup loads step ``k + 1``'s block indices while it
  issues step ``k``'s copies, and every warpgroup loads the next tile's metadata (and its first
  step's indices) at the start of the current tile, so no global load sits in front of a TMA.
* Epilogue overlapped with the next tile's MMAs: a compute warpgroup converts tile ``i``'s
  accumulator to 16 bits, carries it into tile ``i + 1`` and stores it once that tile's first
  wgmma is in flight, in ``64 x 64`` sub-tiles through two shared-memory slots: a slot is
  rewritten only once the TMA store issued two sub-tiles earlier has read it, so the TMA
  stores drain under the MMAs too.

* ``spmm``: tiles ``(output block, row tile)``; a tile's steps are its stored blocks, each split
  into ``bk // tk`` sub-steps. The two compute warpgroups split the tile's rows.
* ``sddmm``: tiles ``(slot, row chunk of the block)``; steps are row tiles of ``a``/``b``;
  ``a``'s tile is fed to wgmma transposed. The compute warpgroups split the block's rows
  (``br >= 128``) or its columns (``br == 64``), each with its own TMA copy of that operand.
  Padding slots run zero steps and store zeros.

Constraints: float16/bfloat16 only; ``br`` and ``bc`` in {64, 128, 256}.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _cost
from pallas_kernels.matmul import _common
from pallas_kernels.matmul.format import BlockSparseMatrix, _name

# H100/H200 opt-in shared memory per block (232448 B), minus barriers and buffer alignment.
_SMEM_BYTES = 232448 - 2048
_H100_SMS = 132
_COMPUTE_WGS = 2  # warpgroups 0 and 1 compute, warpgroup 2 issues the copies
_MEMORY_REGISTERS = 40
_COMPUTE_REGISTERS = 232  # 2 x 232 + 40 <= 512 registers per thread summed over warpgroups
_MIN_STAGES = 3
_MAX_STAGES = 4
_EPI = 64  # epilogue sub-tile edge (64 16-bit elements: one 128-byte swizzle row)


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


def _stages(step_bytes: int, out_bytes: int) -> int:
  """Ring depth that fits next to ``out_bytes`` of epilogue buffers (at most ``_MAX_STAGES``)."""
  return max(0, min(_MAX_STAGES, (_SMEM_BYTES - out_bytes) // step_bytes))


def _epilogue_tile(acc_shape) -> tuple[int, int]:
  return min(_EPI, acc_shape[0]), min(_EPI, acc_shape[1])


def _out_bytes(acc_shape, itemsize) -> int:
  em, en = _epilogue_tile(acc_shape)
  return _COMPUTE_WGS * 2 * em * en * itemsize


def _compiler_params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def visit_order(w: BlockSparseMatrix, transpose: bool) -> jax.Array:
  """Output groups of ``spmm`` heaviest first: block columns (block rows with ``transpose``).

  The order stored in ``w`` at build time, or, for a matrix assembled from its index arrays
  alone (no order fields), a stable sort of the group sizes computed here.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> mask = jnp.array([[0, 1, 1], [0, 0, 1]], bool).repeat(64, 0).repeat(64, 1)
  >>> w = bsr_from_dense(jnp.ones((128, 192), jnp.bfloat16), mask, (64, 64))
  >>> visit_order(w, transpose=False).tolist(), visit_order(w, transpose=True).tolist()
  ([2, 1, 0], [0, 1])
  """
  order = w.row_order if transpose else w.col_order
  if order is None:
    ptr = w.row_ptr if transpose else w.col_ptr
    order = jnp.argsort(ptr[:-1] - ptr[1:], stable=True)
  return order.astype(jnp.int32)


class _Schedule(NamedTuple):
  """Which work tiles CTA ``sm`` runs: ``lin(i)`` for ``i < count``."""

  n_tiles: int
  num_sms: int

  def count(self, sm):
    rounds, rem = divmod(self.n_tiles, self.num_sms)
    return rounds + (self._pos(jnp.int32(rounds), sm) < rem).astype(jnp.int32)

  def _pos(self, i, sm):
    return jnp.where(lax.rem(i, 2) == 0, sm, self.num_sms - 1 - sm)

  def lin(self, i, sm):
    """Snake over the heaviest-first list, clamped (a look-ahead past the end reloads the last)."""
    return jnp.minimum(i * self.num_sms + self._pos(i, sm), self.n_tiles - 1)


def _persistent_mma(*, schedule, stages, acc_shape, out_dtype, tile_info, step_index, issue, mma,
                    epilogue, loaded, consumed):
  """Warp-specialized persistent loop: ``acc = sum_k A_k @ B_k`` for every work tile.

  Both compute warpgroups and the memory warpgroup walk the same tiles and steps, carrying a
  global step counter ``c``: step ``c`` uses ring buffer ``c % stages``. The memory warpgroup
  waits on ``consumed`` (one arrival per compute warpgroup) before it refills a buffer; the
  compute warpgroups wait on ``loaded``.

  Args:
    schedule: a :class:`_Schedule`.
    tile_info: ``lin -> (n_steps, *fields)``, int32 scalars loaded from global memory
      (``n_steps`` may be 0).
    step_index: ``(info, k) -> indices`` of step ``k`` (a tuple of int32 scalars, possibly
      empty); must stay in bounds for ``k == n_steps``.
    issue: ``(info, k, indices, buf) -> None`` issues step ``k``'s copies into buffer ``buf``.
    mma: ``(acc_ref, info, wg, buf) -> None`` issues warpgroup ``wg``'s wgmma on buffer ``buf``.
    epilogue: ``(info, wg, out, seq) -> None`` stores warpgroup ``wg``'s part ``out`` (in
      ``out_dtype``) of its ``seq``-th tile. It runs while the next tile's first wgmma is in
      flight.
  """
  sm, wg = lax.axis_index("sm"), lax.axis_index("wg")
  my_tiles = schedule.count(sm)
  info_of = lambda i: tuple(jnp.asarray(v, jnp.int32) for v in tile_info(schedule.lin(i, sm)))

  @pl.when(wg == _COMPUTE_WGS)
  def _memory():
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

    def tile(i, carry):
      c, info, first = carry
      nxt = info_of(i + 1)  # next tile's metadata and first indices, a whole tile ahead
      nxt_first = step_index(nxt, 0)

      def step(k, carry):
        c, idx = carry
        idx_next = step_index(info, k + 1)
        buf = lax.rem(c, stages)

        @pl.when(c >= stages)
        def _():
          plgpu.barrier_wait(consumed.at[buf])

        issue(info, k, idx, buf)
        return c + 1, idx_next

      c, _ = lax.fori_loop(0, info[0], step, (c, first))
      return c, nxt, nxt_first

    info0 = info_of(jnp.int32(0))
    lax.fori_loop(0, my_tiles, tile, (jnp.int32(0), info0, step_index(info0, 0)))

  @pl.when(wg < _COMPUTE_WGS)
  def _compute():
    plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")

    def flush(pending):
      p_info, p_out, p_seq = pending
      epilogue(p_info, wg, p_out, p_seq)

    def tile(i, carry):
      # `pending`: the previous tile's output, already 16-bit; it is stored once this tile's
      # first wgmma is in flight (or right away if this tile has no steps).
      c, info, pending = carry
      nxt = info_of(i + 1)
      n_steps = info[0]

      def acc_scope(acc_ref):
        def step(k, c):
          buf = lax.rem(c, stages)
          plgpu.barrier_wait(loaded.at[buf])
          mma(acc_ref, info, wg, buf)

          @pl.when((k == 0) & (i > 0))
          def _():
            flush(pending)

          plgpu.wgmma_wait(1)  # the wgmma of step c - 1 has retired: release its buffer

          @pl.when(k > 0)
          def _():
            plgpu.barrier_arrive(consumed.at[lax.rem(c + stages - 1, stages)])

          return c + 1

        c_end = lax.fori_loop(0, n_steps, step, c)

        @pl.when((n_steps == 0) & (i > 0))
        def _():
          flush(pending)

        plgpu.wgmma_wait(0)

        @pl.when(n_steps > 0)
        def _():
          plgpu.barrier_arrive(consumed.at[lax.rem(c_end + stages - 1, stages)])

        return acc_ref[...], c_end

      acc, c = pl.run_scoped(acc_scope, plgpu.ACC(acc_shape, jnp.float32))
      return c, nxt, (info, acc.astype(out_dtype), i)

    info0 = info_of(jnp.int32(0))
    no_output = plgpu.layout_cast(jnp.zeros(acc_shape, out_dtype), plgpu.Layout.WGMMA)
    _, _, pending = lax.fori_loop(0, my_tiles, tile, (jnp.int32(0), info0, (info0, no_output, jnp.int32(0))))
    flush(pending)  # every CTA has at least one tile
    plgpu.wait_smem_to_gmem(0)


def _store_tiled(out_smem, acc, dst, wg, seq):
  """Registers -> SMEM -> GMEM (TMA) in sub-tiles alternating between two slots of ``wg``.

  ``dst`` is the GMEM view of the accumulator's tile. Before a slot is rewritten, the store
  issued two sub-tiles earlier (the slot's previous use, maybe in the previous tile) must have
  read it; the most recent store keeps running, over the next tile's MMAs.
  """
  em, en = out_smem.shape[-2:]
  m, n = acc.shape
  acc = acc.astype(out_smem.dtype)
  n_sub = (m // em) * (n // en)
  for s, (mi, ni) in enumerate(itertools.product(range(m // em), range(n // en))):
    slot = s % 2 if n_sub % 2 == 0 else lax.rem(seq * n_sub + s, 2)
    plgpu.wait_smem_to_gmem(1, wait_read_only=True)
    out_smem[wg, slot] = acc[mi * em:(mi + 1) * em, ni * en:(ni + 1) * en]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], dst.at[pl.ds(mi * em, em), pl.ds(ni * en, en)])


def _kernel(body, out_type, scratch, n_tiles, interpret, cost):
  schedule = _Schedule(n_tiles, min(_num_sms(interpret), n_tiles))
  return plgpu.kernel(
      functools.partial(body, schedule=schedule),
      out_type=out_type,
      scratch_types=scratch,
      grid=(schedule.num_sms,),
      grid_names=("sm",),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=_compiler_params(),
      interpret=_interpret_params() if interpret else None,
      **_cost.kernel_kwargs(plgpu.kernel, cost),
  )


class _SpmmTiles(NamedTuple):
  wg_rows: int  # rows of a compute warpgroup's accumulator
  tk: int  # reduction sub-tile per pipeline step
  stages: int

  @property
  def rows(self) -> int:
    """Rows of a CTA tile (both compute warpgroups)."""
    return _COMPUTE_WGS * self.wg_rows


def _spmm_tiles(bk: int, bo: int, itemsize: int, m: int) -> _SpmmTiles:
  """Row tile, reduction sub-tile and ring depth that fit in SMEM, for ``m`` rows of ``a``.

  A warpgroup's accumulator is at most 128 x 128 float32 (128 registers per thread): 128 rows
  for ``bo <= 128``, 64 for ``bo == 256``, and 64 when ``m <= 128`` (less row padding). The
  reduction sub-tile is the largest of ``bk``, 128, 64 that leaves a ring of 3 buffers.
  """
  wg_rows = 128 if bo <= 128 and m > 128 else 64
  acc_bytes = _out_bytes((wg_rows, bo), itemsize)
  for tk in (t for t in (bk, 128, 64) if t <= bk and bk % t == 0):
    stages = _stages((_COMPUTE_WGS * wg_rows * tk + tk * bo) * itemsize, acc_bytes)
    if stages >= _MIN_STAGES:
      return _SpmmTiles(wg_rows, tk, stages)
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
  itemsize = jnp.dtype(dtype).itemsize
  m = a.shape[0]
  tiles = _spmm_tiles(bk, bo, itemsize, m)
  wg_rows, tk, stages = tiles
  subs = bk // tk
  a_p = _common.pad_rows(a, tiles.rows)
  m_tiles = a_p.shape[0] // tiles.rows
  order = visit_order(w, transpose)
  starts = ptr[order]
  counts = ptr[order + 1] - starts
  last = w.capacity - 1
  epi = _epilogue_tile((wg_rows, bo))

  def body(order_ref, start_ref, count_ref, inner_ref, slot_ref, a_gmem, w_gmem, o_gmem,
           a_smem, w_smem, o_smem, loaded, consumed, *, schedule):
    def tile_info(lin):  # three independent loads
      j = lin // m_tiles
      rows0 = lax.rem(lin, m_tiles) * tiles.rows
      return count_ref[j] * subs, order_ref[j], start_ref[j], rows0

    def step_index(info, k):
      t = jnp.minimum(info[2] + k // subs, last)
      return inner_ref[t], slot_ref[t]

    def issue(info, k, idx, buf):
      rows0 = pl.multiple_of(info[3], tiles.rows)  # carried through the loop: not provable
      blk_inner, blk_slot = idx
      sub = pl.multiple_of(lax.rem(k, subs) * tk, tk)
      cols = pl.ds(pl.multiple_of(blk_inner * bk + sub, tk), tk)
      plgpu.copy_gmem_to_smem(a_gmem.at[pl.ds(rows0, tiles.rows), cols], a_smem.at[buf], loaded.at[buf])
      blk = w_gmem.at[blk_slot]
      src = blk.at[:, pl.ds(sub, tk)] if transpose else blk.at[pl.ds(sub, tk)]
      plgpu.copy_gmem_to_smem(src, w_smem.at[buf], loaded.at[buf])

    def mma(acc_ref, info, wg, buf):
      w_tile = w_smem.at[buf]
      a_rows = pl.ds(pl.multiple_of(wg * wg_rows, wg_rows), wg_rows)  # this warpgroup's half
      plgpu.wgmma(acc_ref, a_smem.at[buf].at[a_rows], _transposed(w_tile) if transpose else w_tile)

    def epilogue(info, wg, acc, seq):
      _, group, _, rows0 = info
      rows = pl.ds(pl.multiple_of(rows0 + wg * wg_rows, wg_rows), wg_rows)
      dst = o_gmem.at[rows, pl.ds(pl.multiple_of(group * bo, bo), bo)]
      _store_tiled(o_smem, acc, dst, wg, seq)

    _persistent_mma(
        schedule=schedule, stages=stages, acc_shape=(wg_rows, bo), out_dtype=dtype, tile_info=tile_info,
        step_index=step_index, issue=issue, mma=mma, epilogue=epilogue, loaded=loaded,
        consumed=consumed,
    )

  n_tiles = groups * m_tiles
  w_tile = (bo, tk) if transpose else (tk, bo)
  kernel = _kernel(
      body,
      jax.ShapeDtypeStruct((a_p.shape[0], groups * bo), dtype),
      [
          plgpu.SMEM((stages, tiles.rows, tk), dtype),
          plgpu.SMEM((stages, *w_tile), dtype),
          plgpu.SMEM((_COMPUTE_WGS, 2, *epi), dtype),
          plgpu.Barrier(num_arrivals=2, num_barriers=stages),
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      ],
      n_tiles,
      interpret,
      _cost.matmul_spmm(a_p.shape[0], w, transpose, itemsize),
  )
  return kernel(order, starts, counts, inner, slot, a_p, w.blocks)[:m]


class _SddmmTiles(NamedTuple):
  split_rows: bool  # compute warpgroups split the block's rows (else its columns)
  acc_shape: tuple[int, int]  # one compute warpgroup's accumulator
  chunks: int  # CTA tiles per block
  tm: int  # rows of a and b per pipeline step (the wgmma K dim)
  stages: int


def _sddmm_tiles(br: int, bc: int, itemsize: int) -> _SddmmTiles:
  """How two compute warpgroups share a ``(br, bc)`` block of ``dW``, and the ring depth.

  ``br >= 128``: each takes ``sr`` rows (``sr`` <= 128, 64 when ``bc == 256``: at most 128
  accumulator registers per thread), a CTA tile is ``2 * sr`` rows and ``b``'s tile is shared.
  ``br == 64`` (a warpgroup's wgmma needs 64 rows): each takes half the columns and ``a``'s tile
  is shared.
  """
  split_rows = br >= 128
  if split_rows:
    sr = min(br // 2, 128 if bc <= 128 else 64)
    acc_shape, chunks = (sr, bc), br // (2 * sr)
  else:
    acc_shape, chunks = (br, bc // 2), 1
  out_bytes = _out_bytes(acc_shape, itemsize)
  for tm in (64, 32):
    a_cols = 2 * acc_shape[0] if split_rows else br
    stages = _stages(tm * (a_cols + bc) * itemsize, out_bytes)
    if stages >= _MIN_STAGES:
      return _SddmmTiles(split_rows, acc_shape, chunks, tm, stages)
  raise ValueError(f"no Mosaic GPU tiling fits dW blocks of {(br, bc)}")


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
  split_rows, (am, an), chunks, tm, stages = tiles = _sddmm_tiles(br, bc, itemsize)
  a_p, b_p = _common.pad_rows(a, tm), _common.pad_rows(b, tm)
  row_tiles = a_p.shape[0] // tm
  epi = _epilogue_tile(tiles.acc_shape)

  def body(nnzb_ref, row_ref, col_ref, a_gmem, b_gmem, o_gmem, a_smem, b_smem, o_smem, loaded,
           consumed, *, schedule):
    def tile_info(lin):
      p, chunk = lin // chunks, lax.rem(lin, chunks)
      n_steps = jnp.where(p < nnzb_ref[0], row_tiles, 0)  # padding slots store zeros
      return n_steps, p, chunk, row_ref[p], col_ref[p]

    def issue(info, k, idx, buf):
      _, _, chunk, block_row, block_col = info
      rows = pl.ds(k * tm, tm)
      if split_rows:  # one copy of a's columns per warpgroup, b shared
        for g in range(_COMPUTE_WGS):
          cols = pl.ds(block_row * br + (chunk * _COMPUTE_WGS + g) * am, am)
          plgpu.copy_gmem_to_smem(a_gmem.at[rows, cols], a_smem.at[buf, g], loaded.at[buf])
        plgpu.copy_gmem_to_smem(b_gmem.at[rows, pl.ds(block_col * bc, bc)], b_smem.at[buf], loaded.at[buf])
      else:  # a shared, one copy of b's columns per warpgroup
        plgpu.copy_gmem_to_smem(a_gmem.at[rows, pl.ds(block_row * br, br)], a_smem.at[buf], loaded.at[buf])
        for g in range(_COMPUTE_WGS):
          cols = pl.ds(block_col * bc + g * an, an)
          plgpu.copy_gmem_to_smem(b_gmem.at[rows, cols], b_smem.at[buf, g], loaded.at[buf])

    def mma(acc_ref, info, wg, buf):
      a_tile = a_smem.at[buf, wg] if split_rows else a_smem.at[buf]
      b_tile = b_smem.at[buf] if split_rows else b_smem.at[buf, wg]
      plgpu.wgmma(acc_ref, _transposed(a_tile), b_tile)

    def epilogue(info, wg, acc, seq):
      _, p, chunk, _, _ = info
      if split_rows:
        dst = o_gmem.at[p, pl.ds((chunk * _COMPUTE_WGS + wg) * am, am)]
      else:
        dst = o_gmem.at[p, :, pl.ds(wg * an, an)]
      _store_tiled(o_smem, acc, dst, wg, seq)

    _persistent_mma(
        schedule=schedule, stages=stages, acc_shape=tiles.acc_shape, out_dtype=w.dtype, tile_info=tile_info,
        step_index=lambda info, k: (), issue=issue, mma=mma, epilogue=epilogue, loaded=loaded,
        consumed=consumed,
    )

  n_tiles = w.capacity * chunks
  a_tile = (_COMPUTE_WGS, tm, am) if split_rows else (tm, br)
  b_tile = (tm, bc) if split_rows else (_COMPUTE_WGS, tm, an)
  kernel = _kernel(
      body,
      jax.ShapeDtypeStruct(w.blocks.shape, w.dtype),
      [
          plgpu.SMEM((stages, *a_tile), dtype),
          plgpu.SMEM((stages, *b_tile), dtype),
          plgpu.SMEM((_COMPUTE_WGS, 2, *epi), w.dtype),
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS + 1, num_barriers=stages),
          plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      ],
      n_tiles,
      interpret,
      _cost.matmul_sddmm(a_p.shape[0], w, itemsize),
  )
  return kernel(w.nnzb.reshape(1), w.row_idx, w.col_idx, a_p, b_p)
