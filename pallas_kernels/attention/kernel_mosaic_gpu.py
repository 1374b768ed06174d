"""Block-sparse flash attention for Hopper: Pallas Mosaic GPU, warp-specialised (FlashAttention-3 style).

NOT YET RUN ON HARDWARE. The kernels lower for CUDA on jax 0.10.2 and 0.12
(checked from a CPU machine through ``jax.export``) and, on jax >= 0.12, run in
the Mosaic GPU interpreter on CPU; the tests marked ``gpu`` run them on a GPU.

Structure of the forward and dQ kernels (three warpgroups per CTA):
  * a persistent grid of one CTA per SM over the (batch, query head, 128-row q-block) work
    items, longest (most visited kv-blocks) first, CTA ``c`` taking items ``c, c + CTAs, ...``;
  * two compute warpgroups, 64 query rows each, share the q-block's kv schedule; in the
    forward they run in ping-pong (a schedule barrier: one's softmax overlaps the other's
    QK / PV GEMMs);
  * one memory warpgroup streams the visited K/V blocks with TMA into a ring of
    ``max_concurrent_steps`` shared-memory slots (3 where shared memory allows, i.e. head_dim
    64; else 2), one step counter per CTA across its items. It reads each block index from
    global memory (Mosaic GPU has no scalar prefetch) one step ahead, then waits on the
    "consumed" barriers before reusing a slot; token-mask data is copied for partial
    blocks only;
  * the compute warpgroups run ``wgmma`` for ``q k^T`` and ``p v``, an online
    softmax in the exp2 domain, and the token mask only in the second loop (the
    schedule lists full blocks first, then partial ones).
Backward: a dQ kernel with the same structure (streams K/V), and a dK/dV kernel,
persistent in the same way over (batch, kv head, 128-row kv-block) items, whose memory warpgroup
streams Q/dO/LSE/delta blocks over the transposed schedules of all query heads
of the GQA group (so dK/dV need no extra reduction). Each visited q-block is processed
in two 64-column halves, so that S^T, P^T and dP^T fit in registers beside the dK and dV
accumulators at head_dim 128. Register pressure (ptxas, H100, jax 0.10.2 and 0.12: no spills in
dK/dV): one barrier per ring slot for all of a step's copies (mask data: an arrival without a
copy on full blocks), the dP^T accumulator starting at -delta, and the memory warpgroup's
branch lowered first (ptxas otherwise spilled values live across ``setmaxnreg``).

Lowering semantics are Lane on every jax version (``_compiler_params``): the default changed
from Lane to Warpgroup in jax 0.11, and Warpgroup's layout inference does not finish on the
dK/dV kernel in jax 0.12.

Constraints: float16/bfloat16, ``q_block == kv_block == 128``, ``head_dim`` 64
or 128 (shared memory of the two-slot pipelines). On CUDA 12.8.0-12.9.0, whose ptxas
miscompiles the masked softmax, token-masked blocks are refused (:func:`check_cuda_version`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _cost
from pallas_kernels.attention._common import (Dims, allowed_in_block, kv_block_items, mask_rows,
                                              pad_axis, q_block_items)
from pallas_kernels.attention.block_mask import BlockMask

__all__ = ["flash_fwd", "flash_bwd", "check_shapes", "check_cuda_version", "MosaicGPUConfig"]

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WG_ROWS = 64
_COMPUTE_WGS = 2


# Shared memory per CTA (H100 / H200 opt-in per block), less what Mosaic GPU adds to the scratch
# buffers (alignment and its own use: 2160 bytes in the forward kernel at head_dim 128, measured
# by compiling; a 3-slot ring there needs 232568 > 232448 bytes).
_SMEM_BYTES = 232448 - 4096
_MAX_RING = 3


@dataclasses.dataclass(frozen=True)
class MosaicGPUConfig:
  """Tuning knobs.

  Attributes:
    max_concurrent_steps: slots of the K/V (dK/dV: Q/dO) ring; ``None`` (default) takes the
      deepest ring of up to 3 slots that fits in shared memory with the kernel's other buffers
      (3 at head_dim 64; at head_dim 128, 2: one 128-row K and V slot takes 64 KiB).
  """

  max_concurrent_steps: int | None = None


_H100_SMS = 132
_INTERPRET_SMS = 2  # fewer CTAs than work items in the interpreter tests: items in sequence


def _num_ctas(num_items: int, interpret: bool) -> int:
  """CTAs of the persistent forward / dQ grid: one per SM, at most one per work item."""
  if interpret:
    sms = _INTERPRET_SMS
  else:
    sms = getattr(jax.devices()[0], "core_count", None) or _H100_SMS
  return max(1, min(sms, num_items))


def _work_items(counts, dims: Dims):
  """Work items ``(b * num_heads + h) * nq + q_block``, most visited kv-blocks first.

  ``counts`` is ``[B', H', nq]`` (visited kv-blocks per mask row). Ties keep their order.

  >>> d = Dims(1, 256, 256, 2, 2, 64, 128, 128, 1, 2)
  >>> _work_items(jnp.array([[[3, 1], [0, 4]]]), d).tolist()
  [3, 0, 1, 2]
  """
  return _longest_first(mask_rows(counts, dims))


def _longest_first(cost):
  """Flat indices of ``cost`` (visited blocks per work item) in decreasing order, ties stable."""
  return jnp.argsort(-cost.reshape(-1), stable=True).astype(jnp.int32)


def _smem_bytes(scratch) -> int:
  """Bytes of a scratch tree of ``plgpu.SMEM`` buffers and barriers (8 bytes each)."""
  total = 0
  for leaf in jax.tree.leaves(scratch, is_leaf=lambda x: hasattr(x, "shape") or
                              hasattr(x, "num_barriers")):
    if hasattr(leaf, "num_barriers"):
      n = leaf.num_barriers
      total += 8 * (math.prod(n) if isinstance(n, tuple) else n)
    else:
      total += math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _ring_depth(config: MosaicGPUConfig, steps: int, scratch_for) -> int:
  """The ring depth: ``config``'s, or the deepest that fits (``scratch_for(depth)``)."""
  if config.max_concurrent_steps is not None:
    return max(1, min(config.max_concurrent_steps, steps))
  for depth in range(_MAX_RING, 1, -1):
    if _smem_bytes(scratch_for(depth)) <= _SMEM_BYTES:
      return max(1, min(depth, steps))
  return 1


def _plgpu():
  import jax.experimental.pallas.mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  return plgpu


def _new_api() -> bool:
  return tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


def _transpose(ref):
  plgpu = _plgpu()
  if _new_api():
    return ref.transpose((1, 0))
  return plgpu.transpose_ref(ref, (1, 0))


def _load(ref, layout):
  plgpu = _plgpu()
  if _new_api():
    return plgpu.load(ref, layout=layout)
  return plgpu.load(ref, (), layout=layout)


def _compiler_params():
  """Lane semantics on every jax version (the default changed to Warpgroup in 0.11)."""
  plgpu = _plgpu()
  return plgpu.CompilerParams(approx_math=True,
                              lowering_semantics=plgpu.LoweringSemantics.Lane)


def check_shapes(dims: Dims, block_mask: BlockMask):
  """Raises ValueError for shapes the Mosaic GPU kernels do not support."""
  del block_mask
  if dims.q_block != _WG_ROWS * _COMPUTE_WGS or dims.kv_block != _WG_ROWS * _COMPUTE_WGS:
    raise ValueError(f"block_mask/q_block, kv_block: the mosaic_gpu backend needs 128 x 128 "
                     f"blocks, got {dims.q_block} x {dims.kv_block}; rebuild the mask with "
                     "q_block=kv_block=128 or use backend='triton'")
  if dims.head_dim not in (64, 128):
    raise ValueError(f"q: the mosaic_gpu backend needs head_dim 64 or 128 (shared memory), got "
                     f"{dims.head_dim}; use backend='triton'")


def _check_dtype(q):
  if q.dtype not in (jnp.float16, jnp.bfloat16):
    raise TypeError(f"q: the mosaic_gpu backend needs float16 or bfloat16 inputs, got {q.dtype}; "
                    "cast the inputs or use backend='triton'")


# jax's attention_mgpu refuses causal masks on these CUDA versions: ptxas miscompiles the
# masked softmax. These kernels mask partial blocks (and a ragged kv edge) the same way.
_MISCOMPILING_CUDA = (12080, 12091)  # [12.8.0, 12.9.1), as cudaRuntimeGetVersion encodes them


def _masking_miscompiled(cuda_version: int | None) -> bool:
  """Whether a CUDA version (``1000 * major + 10 * minor + patch``) has the ptxas bug.

  >>> _masking_miscompiled(12080), _masking_miscompiled(12091), _masking_miscompiled(None)
  (True, False, False)
  """
  return cuda_version is not None and _MISCOMPILING_CUDA[0] <= cuda_version < _MISCOMPILING_CUDA[1]


def _cuda_runtime_version() -> int | None:
  """The CUDA runtime version, as jax's attention_mgpu reads it; ``None`` without CUDA."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if cuda_versions is None:
    return None
  try:
    return int(cuda_versions.cuda_runtime_get_version())
  except Exception:  # pylint: disable=broad-except  (no CUDA libraries: compile-only machines)
    return None


def check_cuda_version(block_mask: BlockMask, dims: Dims, *, interpret: bool,
                       cuda_version: int | None = None):
  """Raises ValueError where the CUDA 12.8.0-12.9.0 ptxas would miscompile the token mask.

  Masks with a token mask function (causal, window, documents, ...) or a ragged kv edge are
  refused on those versions; block-level masks on whole blocks are not affected. ``cuda_version``
  defaults to the runtime's (``None`` on a machine without CUDA: nothing to check). Runs at
  trace time, so it also guards ahead-of-time compiles on a machine with such a CUDA.

  >>> from pallas_kernels.attention import causal_mask
  >>> from pallas_kernels.attention._common import Dims
  >>> dims = Dims(1, 256, 256, 1, 1, 64, 128, 128, 1, 1)
  >>> check_cuda_version(causal_mask(256, q_block=128), dims, interpret=False,
  ...                    cuda_version=12090)
  Traceback (most recent call last):
  ...
  ValueError: block_mask: ...
  """
  if interpret or (block_mask.mask_mod is None and not dims.ragged_kv):
    return
  version = _cuda_runtime_version() if cuda_version is None else cuda_version
  if _masking_miscompiled(version):
    raise ValueError(
        f"block_mask: the mosaic_gpu backend masks tokens inside partial blocks, which the ptxas "
        f"of CUDA 12.8.0-12.9.0 miscompiles (this is CUDA {version // 1000}.{version % 1000 // 10}."
        f"{version % 10}; jax's attention_mgpu refuses causal masks there too); upgrade CUDA to "
        ">= 12.9.1 or use backend='triton'")


def _stack_data(block_mask: BlockMask, dims: Dims):
  """Mask data stacked as ``q [B', n, q_pad]`` and ``kv [B', n, kv_pad]`` int32 (or None)."""
  mm = block_mask.mask_mod
  if mm is None:
    return None, None
  stack = lambda xs, n: (jnp.stack([pad_axis(x.astype(jnp.int32), n, 1) for x in xs], axis=1)
                         if xs else None)
  return stack(mm.q_data, dims.q_pad), stack(mm.kv_data, dims.kv_pad)


def _interpret_context(interpret: bool):
  plgpu = _plgpu()
  if not interpret:
    import contextlib  # pylint: disable=g-import-not-at-top
    return contextlib.nullcontext()
  if not hasattr(plgpu, "force_gpu_interpret_mode"):
    raise NotImplementedError(
        f"interpret=True for backend='mosaic_gpu' needs the Mosaic GPU interpreter of jax >= "
        f"0.12 (this is jax {jax.__version__}); use backend='interpret' instead")
  return plgpu.force_gpu_interpret_mode(plgpu.InterpretGPUParams())


def _mask_fn(block_mask):
  return None if block_mask.mask_mod is None else block_mask.mask_mod.fn


def _mma_into(acc, a, b, interpret: bool, a_smem=None):
  """``acc + a @ b`` with wgmma; ``a`` a register array (``p``, ``ds``) or a shared-memory ref.

  On hardware a register ``a`` stays in registers and the accumulator is updated in place
  (``run_state`` over ``ACC.init(acc)``), as in FlashAttention-3. The Mosaic GPU
  interpreter (jax 0.12) supports neither register operands nor ``run_state``, so
  there a register ``a`` goes through the shared-memory buffer ``a_smem`` and the product
  through a fresh accumulator that is added.
  """
  plgpu = _plgpu()
  if interpret:
    if a_smem is not None:
      a_smem[...] = a
      plgpu.commit_smem()
      a = a_smem

    def fresh(acc_ref):
      plgpu.wgmma(acc_ref, a, b)
      return acc_ref[...]
    return acc + pl.run_scoped(fresh, plgpu.ACC(acc.shape, jnp.float32))

  def in_place(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(in_place)(plgpu.ACC.init(acc))


def _broadcast_row(x, shape, plgpu):
  """[rows] (WGMMA.reduce(1)) -> [rows, cols] (WGMMA)."""
  del plgpu
  return lax.broadcast_in_dim(x, shape, [0])


def _broadcast_col(x, shape, plgpu):
  """[cols] (WGMMA.reduce(0)) -> [rows, cols] (WGMMA)."""
  del plgpu
  return lax.broadcast_in_dim(x, shape, [1])


def _div(x, n: int):
  return lax.div(x, jnp.array(n, x.dtype))


def _rem(x, n: int):
  return lax.rem(x, jnp.array(n, x.dtype))


def _split_item(w, num_heads: int, num_blocks: int):
  """Flat work item ``(b * num_heads + h) * num_blocks + x`` -> ``(b, h, x)`` (traced ints)."""
  x, bh = _rem(w, num_blocks), _div(w, num_blocks)
  return _div(bh, num_heads), _rem(bh, num_heads), x


def _run_work_items(items_ref, num_ctas: int, compute_item, memory_item, *, memory_first: bool):
  """The persistent, warp-specialised work loop of the forward / dQ and dK/dV kernels.

  CTA ``c`` runs items ``c, c + num_ctas, ...`` of ``items_ref``: its compute warpgroups
  (``wg < 2``, 232 registers each) run ``compute_item(i, step)`` and its memory warpgroup (40
  registers) runs ``memory_item(i, step)`` for its ``i``-th item, ``step`` being the K/V (Q/dO)
  ring step at the item's start; each returns the step after the item. ``memory_first`` lowers
  the memory warpgroup's branch first (this only changes ptxas's register allocation).
  """
  plgpu = _plgpu()
  cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
  n_mine = lax.div(items_ref.shape[0] - 1 - cta, jnp.array(num_ctas, cta.dtype)) + 1

  def compute():
    plgpu.set_max_registers(232, action="increase")
    lax.fori_loop(0, n_mine, compute_item, jnp.int32(0))

  def memory():
    plgpu.set_max_registers(40, action="decrease")
    lax.fori_loop(0, n_mine, memory_item, jnp.int32(0))

  branches = [(wg < _COMPUTE_WGS, compute), (wg == _COMPUTE_WGS, memory)]
  for cond, body in (branches[::-1] if memory_first else branches):
    pl.when(cond)(body)


# ---------------------------------------------------------------------------
# Forward / dQ: one CTA per (q head, q-block, batch), K/V streamed.
# ---------------------------------------------------------------------------
def _kv_stream_kernel(dims: Dims, *, scale: float, fn, n_qd: int, n_kd: int, mc: int,
                      mode: str, dtype, interpret: bool, num_ctas: int):
  """Builds the forward (``mode='fwd'``) or dQ (``mode='dq'``) kernel body.

  Persistent: CTA ``c`` runs work items ``c, c + num_ctas, ...`` of the longest-first list
  ``items`` (``(batch * H + head) * nq + q_block``). The K/V ring's slot and barrier phases
  follow one step counter per CTA, carried from item to item.
  """
  plgpu = _plgpu()
  bq, bk, d, g = _WG_ROWS, dims.kv_block, dims.head_dim, dims.group
  hpm = dims.heads_per_mask_head
  c = scale * _LOG2E
  ragged = dims.ragged_kv
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout, col_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
  fwd = mode == "fwd"

  def kernel(*refs):
    it = iter(refs)
    q_ref, k_ref, v_ref = next(it), next(it), next(it)
    if not fwd:
      do_ref, lse_ref, delta_ref = next(it), next(it), next(it)
    items_ref, sched_ref, nfull_ref, ntotal_ref = next(it), next(it), next(it), next(it)
    qd_ref = next(it) if n_qd else None
    kd_ref = next(it) if n_kd else None
    if fwd:
      out_ref, lse_out_ref = next(it), next(it)
    else:
      dq_ref = next(it)
    scoped = next(it)
    (q_smem2, do_smem2, row_smem2, k_smem, v_smem, qd_smem2, kd_smem, a_smem2, bars,
     consumed, schedule) = scoped
    q_bars, k_bar, v_bar, kd_bar = bars
    k_consumed, v_consumed = consumed

    def schedule_barrier():
      """Ping-pong (forward): each compute warpgroup's softmax overlaps the other's GEMMs."""
      if fwd:
        plgpu.barrier_arrive(schedule)
        plgpu.barrier_wait(schedule)

    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")

    def work(i):
      """Batch, head, q-block, mask batch / head, kv head and counts of this CTA's item i."""
      b, h, qi = _split_item(items_ref[cta + i * num_ctas], dims.num_heads, dims.nq)
      mb = b if dims.mask_batch > 1 else 0
      mh = _div(h, hpm)
      return b, h, qi, mb, mh, _div(h, g), nfull_ref[mb, mh, qi], ntotal_ref[mb, mh, qi]

    def compute_item(i, base):
      """One work item; ``base`` is the CTA's ring step at its start."""
      b, h, qi, mb, mh, _, n_full, n_total = work(i)
      q_smem = q_smem2.at[wg]
      a_smem = None if a_smem2 is None else a_smem2.at[wg]
      q_base = qi * (2 * bq) + wg * bq
      rows = pl.ds(q_base, bq)
      copies = [(q_ref.at[b, rows, h], q_smem)]
      if not fwd:
        copies += [(do_ref.at[b, rows, h], do_smem2.at[wg]),
                   (lse_ref.at[b, h, rows], row_smem2.at[wg, 0]),
                   (delta_ref.at[b, h, rows], row_smem2.at[wg, 1])]
      if n_qd:
        copies.append((qd_ref.at[mb, :, rows], qd_smem2.at[wg]))
      for (src, dst), bar in zip(copies, q_bars):  # one barrier per copy
        plgpu.copy_gmem_to_smem(src, dst, bar.at[wg])
      for bar in q_bars:
        plgpu.barrier_wait(bar.at[wg])
      shape = (bq, bk)
      # Row vectors, broadcast inside the step: full-tile ids live across the kv loop would hold
      # 64 registers each (the dQ kernel spilled at head_dim 128).
      q_row = q_base + plgpu.broadcasted_iota(jnp.int32, (bq,), 0, layout=row_layout)
      qd_rows = tuple(_load(qd_smem2.at[wg, r], row_layout) for r in range(n_qd))
      if not fwd:
        lse2 = _load(row_smem2.at[wg, 0], row_layout)
        lse2 = jnp.where(lse2 == -jnp.inf, 0.0, lse2)
        delta = _load(row_smem2.at[wg, 1], row_layout)

      @pl.when(n_total > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[_rem(base, mc)])

      def step(t, carry, partial):
        slot = _rem(base + t, mc)
        j = sched_ref[mb, mh, qi, t]

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, _transpose(k_smem.at[slot]))
          schedule_barrier()  # QK issued: the other warpgroup may issue its GEMM
          return acc_ref[...]

        qk = pl.run_scoped(compute_qk, plgpu.ACC((bq, bk), jnp.float32))
        kv_ids = j * bk + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=wgmma_layout)
        kd = ()
        if n_kd and partial:  # the memory warpgroup copies mask data for partial blocks only
          plgpu.barrier_wait(kd_bar.at[slot])
          kd = tuple(_broadcast_col(_load(kd_smem.at[slot, r], col_layout), shape, plgpu)
                     for r in range(n_kd))
        if fwd:  # dQ reads K once more (ds @ K): its slot is released at the end of the step
          plgpu.barrier_arrive(k_consumed.at[slot])
        qd = tuple(_broadcast_row(x, shape, plgpu) for x in qd_rows)
        ok = allowed_in_block(fn, partial, _broadcast_row(q_row, shape, plgpu), kv_ids, qd, kd,
                              dims.kv_len, ragged)
        s2 = qk * c
        if fwd:
          acc, m_i, l_i = carry
          if ok is not None:
            s2 = jnp.where(ok, s2, -jnp.inf)
          m_ij = jnp.maximum(m_i, s2.max(axis=1))
          m_safe = jnp.where(m_ij == -jnp.inf, 0.0, m_ij)
          p = jnp.exp2(s2 - lax.broadcast_in_dim(m_safe, shape, [0]))
          alpha = jnp.exp2(m_i - m_safe)
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          l_i = l_i * alpha + p.sum(axis=1)
          p16 = p.astype(dtype)
          plgpu.barrier_arrive(schedule)  # softmax done
          plgpu.barrier_wait(v_bar.at[slot])
          plgpu.barrier_wait(schedule)  # the other warpgroup's softmax is done too

          acc = _mma_into(acc, p16, v_smem.at[slot], interpret, a_smem)
          out_carry = (acc, m_ij, l_i)
        else:
          (dq_acc,) = carry
          p = jnp.exp2(s2 - lax.broadcast_in_dim(lse2, shape, [0]))
          if ok is not None:
            p = jnp.where(ok, p, 0.0)
          plgpu.barrier_wait(v_bar.at[slot])

          def compute_dp(acc_ref):
            plgpu.wgmma(acc_ref, do_smem2.at[wg], _transpose(v_smem.at[slot]))
            return acc_ref[...]

          dp = pl.run_scoped(compute_dp, plgpu.ACC((bq, bk), jnp.float32))
          ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))

          dq_acc = _mma_into(dq_acc, ds.astype(dtype), k_smem.at[slot], interpret, a_smem)
          out_carry = (dq_acc,)

        nxt = t + 1

        @pl.when(nxt < n_total)
        def _wait_next():
          plgpu.barrier_wait(k_bar.at[_rem(base + nxt, mc)])

        if not fwd:
          plgpu.barrier_arrive(k_consumed.at[slot])
        plgpu.barrier_arrive(v_consumed.at[slot])
        return out_carry

      zeros_acc = plgpu.layout_cast(jnp.full((bq, d), 0, jnp.float32), wgmma_layout)
      if fwd:
        carry = (zeros_acc,
                 plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout),
                 plgpu.layout_cast(jnp.full((bq,), 0, jnp.float32), row_layout))
      else:
        carry = (zeros_acc,)
      # Both warpgroups run the same steps; warpgroup 1 starts one schedule phase behind, so
      # its QK/PV overlap warpgroup 0's softmax and the other way round. Every warpgroup arrives
      # 2 * steps + 1 times.
      pl.when(wg == 1)(schedule_barrier)
      carry = lax.fori_loop(0, n_full, functools.partial(step, partial=False), carry)
      carry = lax.fori_loop(n_full, n_total, functools.partial(step, partial=True), carry)
      pl.when(wg == 0)(schedule_barrier)

      if fwd:
        acc, m_i, l_i = carry
        pos = l_i != 0  # empty rows: 0 / -inf; NaN from q/k stays NaN, as in dense attention
        l_safe = jnp.where(pos, l_i, 1.0)
        acc = acc / lax.broadcast_in_dim(l_safe, (bq, d), [0])
        q_smem[...] = acc.astype(dtype)
        row_smem2.at[wg, 0][...] = jnp.where(pos, m_i * _LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, out_ref.at[b, rows, h])
        plgpu.copy_smem_to_gmem(row_smem2.at[wg, 0], lse_out_ref.at[b, h, rows])
      else:
        (dq_acc,) = carry
        q_smem[...] = (dq_acc * scale).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)  # q_smem / row_smem are reused by the next item
      return base + n_total

    def memory_item(i, base):
      b, _, qi, mb, mh, hk, n_full, n_total = work(i)

      def copy_k(t, j, slot):
        cols = pl.ds(j * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, cols, hk], k_smem.at[slot], k_bar.at[slot])
        if n_kd:
          @pl.when(t >= n_full)  # full blocks need no mask data
          def _():
            plgpu.copy_gmem_to_smem(kd_ref.at[mb, :, cols], kd_smem.at[slot], kd_bar.at[slot])

      def copy_v(j, slot):
        plgpu.copy_gmem_to_smem(v_ref.at[b, pl.ds(j * bk, bk), hk], v_smem.at[slot],
                                v_bar.at[slot])

      def index(t):  # clamped: the read one step ahead may pass the schedule's end
        return sched_ref[mb, mh, qi, jnp.minimum(t, dims.nk - 1)]

      # Ring step base + t fills slot (base + t) % mc once step base + t - mc has released it.
      # Its index was read one step earlier, so no global load waits behind the consumed
      # barriers in front of the TMA.
      def stream(t, j):
        step = base + t
        slot = _rem(step, mc)
        j_next = index(t + 1)
        pl.when(step >= mc)(lambda: plgpu.barrier_wait(k_consumed.at[slot]))
        copy_k(t, j, slot)
        pl.when(step >= mc)(lambda: plgpu.barrier_wait(v_consumed.at[slot]))
        copy_v(j, slot)
        return j_next

      lax.fori_loop(0, n_total, stream, index(0))
      return base + n_total

    _run_work_items(items_ref, num_ctas, compute_item, memory_item, memory_first=False)

  return kernel


def _smem_scratch(dims: Dims, n_qd: int, n_kd: int, mc: int, mode: str, dtype,
                  interpret: bool):
  plgpu = _plgpu()
  bq, bk, d = _WG_ROWS, dims.kv_block, dims.head_dim
  tiling = plgpu.TilingTransform((8, 64))
  swizzle = plgpu.SwizzleTransform(128)
  tiles = (tiling, swizzle)
  q_smem = plgpu.SMEM((_COMPUTE_WGS, bq, d), dtype, transforms=tiles)
  do_smem = plgpu.SMEM((_COMPUTE_WGS, bq, d), dtype, transforms=tiles) if mode == "dq" else None
  row_smem = plgpu.SMEM((_COMPUTE_WGS, 2, bq), jnp.float32)
  k_smem = plgpu.SMEM((mc, bk, d), dtype, transforms=tiles)
  v_smem = plgpu.SMEM((mc, bk, d), dtype, transforms=tiles)
  qd_smem = plgpu.SMEM((_COMPUTE_WGS, n_qd, bq), jnp.int32) if n_qd else None
  kd_smem = plgpu.SMEM((mc, n_kd, bk), jnp.int32) if n_kd else None
  a_smem = plgpu.SMEM((_COMPUTE_WGS, bq, bk), dtype, transforms=tiles) if interpret else None
  n_q_copies = (1 if mode == "fwd" else 4) + (1 if n_qd else 0)
  q_bars = tuple(plgpu.Barrier(num_barriers=_COMPUTE_WGS) for _ in range(n_q_copies))
  bars = (q_bars, plgpu.Barrier(num_barriers=mc), plgpu.Barrier(num_barriers=mc),
          plgpu.Barrier(num_barriers=mc) if n_kd else None)
  consumed = (plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=mc),) * 2
  schedule = plgpu.Barrier(num_arrivals=_COMPUTE_WGS) if mode == "fwd" else None
  return (q_smem, do_smem, row_smem, k_smem, v_smem, qd_smem, kd_smem, a_smem, bars, consumed,
          schedule)


def _run_kv_stream(mode, q, k, v, extra, block_mask: BlockMask, dims: Dims, *, scale: float,
                   interpret: bool, config: MosaicGPUConfig):
  plgpu = _plgpu()
  _check_dtype(q)
  check_cuda_version(block_mask, dims, interpret=interpret)
  qp = pad_axis(q, dims.q_pad, 1)
  kp, vp = pad_axis(k, dims.kv_pad, 1), pad_axis(v, dims.kv_pad, 1)
  idx, _, counts = block_mask.kv_schedule()
  qd, kd = _stack_data(block_mask, dims)
  n_qd = 0 if qd is None else qd.shape[1]
  n_kd = 0 if kd is None else kd.shape[1]
  mc = _ring_depth(config, dims.nk, lambda depth: _smem_scratch(
      dims, n_qd, n_kd, depth, mode, q.dtype, interpret=False))
  items = q_block_items(block_mask, dims)
  num_ctas = _num_ctas(items.shape[0], interpret)
  kernel = _kv_stream_kernel(dims, scale=scale, fn=_mask_fn(block_mask), n_qd=n_qd, n_kd=n_kd,
                             mc=mc, mode=mode, dtype=q.dtype, interpret=interpret,
                             num_ctas=num_ctas)
  scratch = _smem_scratch(dims, n_qd, n_kd, mc, mode, q.dtype, interpret)
  if mode == "fwd":
    out_type = [jax.ShapeDtypeStruct(qp.shape, q.dtype),
                jax.ShapeDtypeStruct((dims.batch, dims.num_heads, dims.q_pad), jnp.float32)]
  else:
    out_type = jax.ShapeDtypeStruct(qp.shape, q.dtype)
  args = [qp, kp, vp, *extra, items, idx, block_mask.full_kv_counts, counts]
  args += [x for x in (qd, kd) if x is not None]
  with _interpret_context(interpret):
    return plgpu.kernel(
        kernel, out_type=out_type, scratch_types=[scratch],
        grid=(num_ctas,), grid_names=("cta",),
        num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=_compiler_params(),
        **_cost.kernel_kwargs(plgpu.kernel, _cost.attention(
            dims, block_mask, mode, jnp.dtype(q.dtype).itemsize)),
    )(*args)


def flash_fwd(q, k, v, block_mask: BlockMask, dims: Dims, *, scale: float, interpret: bool,
              config: MosaicGPUConfig = MosaicGPUConfig()):
  """Mosaic GPU forward; returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
  out, lse = _run_kv_stream("fwd", q, k, v, (), block_mask, dims, scale=scale,
                            interpret=interpret, config=config)
  return out[:, :dims.q_len], lse[:, :, :dims.q_len]


# ---------------------------------------------------------------------------
# dK/dV: one CTA per (kv head, kv-block, batch), Q/dO/LSE/delta streamed.
# ---------------------------------------------------------------------------
def _group_schedule(block_mask: BlockMask, dims: Dims):
  """Per (mask batch, kv head, kv-block): the q-blocks of every query head of the group.

  Returns ``(entries [B', Hk, nk, G * nq], n_full [B', Hk, nk], n_total)``; an entry
  is ``q_block * G + g`` (``g`` the head within the group), full entries first.
  """
  from pallas_kernels.attention.block_mask import index_lists  # pylint: disable=g-import-not-at-top
  g, nq, hpm = dims.group, dims.nq, dims.heads_per_mask_head
  mh = (jnp.arange(dims.num_kv_heads)[:, None] * g + jnp.arange(g)[None, :]) // hpm  # [Hk, G]

  def flat(counts, indices):
    c = counts[:, mh]                                # [B', Hk, G, nk]
    idx = indices[:, mh]                             # [B', Hk, G, nk, nq]
    c = jnp.moveaxis(c, 2, 3)                        # [B', Hk, nk, G]
    idx = jnp.moveaxis(idx, 2, 3)                    # [B', Hk, nk, G, nq]
    valid = jnp.arange(nq)[None, None, None, None, :] < c[..., None]
    n, pos = index_lists(valid.reshape(valid.shape[:3] + (g * nq,)))
    entries = idx.reshape(idx.shape[:3] + (g * nq,))
    qb = jnp.take_along_axis(entries, pos, axis=-1)
    return n, qb * g + pos // nq

  nf, ef = flat(block_mask.full_q_counts, block_mask.full_q_indices)
  np_, ep = flat(block_mask.partial_q_counts, block_mask.partial_q_indices)
  total = g * nq
  s = jnp.arange(total)
  from_p = jnp.take_along_axis(ep, jnp.clip(s - nf[..., None], 0, total - 1), axis=-1)
  entries = jnp.where(s < nf[..., None], ef, from_p)
  return entries.astype(jnp.int32), nf.astype(jnp.int32), (nf + np_).astype(jnp.int32)


def _dkv_kernel(dims: Dims, *, scale: float, fn, n_qd: int, n_kd: int, mc: int, dtype,
                interpret: bool, num_ctas: int):
  """The dK/dV kernel body: persistent over (batch, kv head, kv-block) items, as the forward."""
  plgpu = _plgpu()
  bkw, bq, d, g = _WG_ROWS, dims.q_block, dims.head_dim, dims.group
  hw = _WG_ROWS  # q columns per sub-step
  c = scale * _LOG2E
  wgmma_layout = plgpu.Layout.WGMMA
  row_layout, col_layout = wgmma_layout.reduce(1), wgmma_layout.reduce(0)
  shape = (bkw, hw)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, items_ref, ent_ref, nfull_ref,
             ntotal_ref, *rest):
    it = iter(rest)
    qd_ref = next(it) if n_qd else None
    kd_ref = next(it) if n_kd else None
    dk_ref, dv_ref, scoped = next(it), next(it), next(it)
    (k_smem2, v_smem2, kd_smem2, q_smem, do_smem, row_smem, qd_smem, a_smem2, kv_bars,
     slot_bars, consumed) = scoped
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")

    def work(i):
      """Batch, kv head, kv-block, mask batch and counts of this CTA's item i."""
      b, hk, j = _split_item(items_ref[cta + i * num_ctas], dims.num_kv_heads, dims.nk)
      mb = b if dims.mask_batch > 1 else 0
      return b, hk, j, mb, nfull_ref[mb, hk, j], ntotal_ref[mb, hk, j]

    def compute_item(i, base):
      b, hk, j, mb, n_full, n_total = work(i)

      def decode(t):
        e = ent_ref[mb, hk, j, t]
        return _div(e, g), _rem(e, g)

      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      a_smem = None if a_smem2 is None else a_smem2.at[wg]
      kv_base = j * (2 * bkw) + wg * bkw
      rows = pl.ds(kv_base, bkw)
      copies = [(k_ref.at[b, rows, hk], k_smem), (v_ref.at[b, rows, hk], v_smem)]
      if n_kd:
        copies.append((kd_ref.at[mb, :, rows], kd_smem2.at[wg]))
      for src, dst in copies:
        plgpu.copy_gmem_to_smem(src, dst, kv_bars.at[wg])
      plgpu.barrier_wait(kv_bars.at[wg])
      # Row vectors (2 registers per thread), broadcast only where a partial block needs them:
      # full-tile ids live across the loops would cost 64 registers each.
      kv_row = kv_base + plgpu.broadcasted_iota(jnp.int32, (bkw,), 0, layout=row_layout)
      kd_rows = tuple(_load(kd_smem2.at[wg, r], row_layout) for r in range(n_kd))

      def step(t, carry, partial):
        dk, dv = carry
        slot = _rem(base + t, mc)
        qi, _ = decode(t)
        plgpu.barrier_wait(slot_bars.at[slot])
        # The q-block in 64-column halves: with the dK and dV accumulators (64 registers each
        # at head_dim 128), a (64, 128) S^T, P^T and dP^T do not fit in 232 registers; halves do.
        for half in range(bq // hw):
          cols = pl.ds(half * hw, hw)
          q_h, do_h = q_smem.at[slot, cols], do_smem.at[slot, cols]

          def compute_st(acc_ref, q_h=q_h):
            plgpu.wgmma(acc_ref, k_smem, _transpose(q_h))
            return acc_ref[...]

          st = pl.run_scoped(compute_st, plgpu.ACC(shape, jnp.float32))
          lse2 = _load(row_smem.at[slot, 0, cols], col_layout)
          lse2 = jnp.where(lse2 == -jnp.inf, 0.0, lse2)
          pt = jnp.exp2(st * c - lax.broadcast_in_dim(lse2, shape, [1]))
          q_col = qi * bq + half * hw + plgpu.broadcasted_iota(jnp.int32, (hw,), 0,
                                                               layout=col_layout)
          qd = tuple(_broadcast_col(_load(qd_smem.at[slot, r, cols], col_layout), shape, plgpu)
                     for r in range(n_qd if partial else 0))
          kd = tuple(_broadcast_row(x, shape, plgpu) for x in kd_rows) if partial else ()
          ok = allowed_in_block(fn, partial, _broadcast_col(q_col, shape, plgpu),
                                _broadcast_row(kv_row, shape, plgpu), qd, kd, dims.kv_len,
                                dims.ragged_kv)
          if ok is not None:
            pt = jnp.where(ok, pt, 0.0)
          dv = _mma_into(dv, pt.astype(dtype), do_h, interpret, a_smem)

          # dP^T - delta: the accumulator starts at -delta, so delta is not live beside pt, dP^T.
          delta = _load(row_smem.at[slot, 1, cols], col_layout)
          dpt = _mma_into(-lax.broadcast_in_dim(delta, shape, [1]), v_smem, _transpose(do_h),
                          interpret)
          dst = pt * dpt
          dk = _mma_into(dk, dst.astype(dtype), q_h, interpret, a_smem)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      zeros = plgpu.layout_cast(jnp.full((bkw, d), 0, jnp.float32), wgmma_layout)
      carry = lax.fori_loop(0, n_full, functools.partial(step, partial=False), (zeros, zeros))
      dk, dv = lax.fori_loop(n_full, n_total, functools.partial(step, partial=True), carry)
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[b, rows, hk], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[b, rows, hk], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)  # k_smem / v_smem are reused by the next item
      return base + n_total

    def memory_item(i, base):
      b, hk, j, mb, n_full, n_total = work(i)

      def entry(t):  # clamped: the read one step ahead may pass the schedule's end
        return ent_ref[mb, hk, j, jnp.minimum(t, g * dims.nq - 1)]

      def issue(t, e, slot):
        qi, gi = _div(e, g), _rem(e, g)
        h = hk * g + gi
        rows = pl.ds(qi * bq, bq)
        copies = [(q_ref.at[b, rows, h], q_smem.at[slot]),
                  (lse_ref.at[b, h, rows], row_smem.at[slot, 0]),
                  (delta_ref.at[b, h, rows], row_smem.at[slot, 1]),
                  (do_ref.at[b, rows, h], do_smem.at[slot])]
        for src, dst in copies:
          plgpu.copy_gmem_to_smem(src, dst, slot_bars.at[slot])
        if n_qd:  # mask data for partial blocks only; full blocks arrive without it
          @pl.when(t >= n_full)
          def _():
            plgpu.copy_gmem_to_smem(qd_ref.at[mb, :, rows], qd_smem.at[slot], slot_bars.at[slot])

          pl.when(t < n_full)(lambda: plgpu.barrier_arrive(slot_bars.at[slot]))

      # As in the forward: ring step base + t reuses its slot once step base + t - mc has
      # released it, and the next entry is read one step ahead of that consumed barrier.
      def stream(t, e):
        step = base + t
        slot = _rem(step, mc)
        e_next = entry(t + 1)
        pl.when(step >= mc)(lambda: plgpu.barrier_wait(consumed.at[slot]))
        issue(t, e, slot)
        return e_next

      lax.fori_loop(0, n_total, stream, entry(0))
      return base + n_total

    # The memory branch first: in the other order ptxas spills 8-12 B/thread (jax 0.10.2,
    # documents mask) of values live across setmaxnreg.
    _run_work_items(items_ref, num_ctas, compute_item, memory_item, memory_first=True)

  return kernel


def _dkv_scratch(dims: Dims, n_qd: int, n_kd: int, mc: int, dtype, interpret: bool):
  plgpu = _plgpu()
  bkw, bq, d = _WG_ROWS, dims.q_block, dims.head_dim
  tiles = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  k_smem = plgpu.SMEM((_COMPUTE_WGS, bkw, d), dtype, transforms=tiles)
  v_smem = plgpu.SMEM((_COMPUTE_WGS, bkw, d), dtype, transforms=tiles)
  kd_smem = plgpu.SMEM((_COMPUTE_WGS, n_kd, bkw), jnp.int32) if n_kd else None
  q_smem = plgpu.SMEM((mc, bq, d), dtype, transforms=tiles)
  do_smem = plgpu.SMEM((mc, bq, d), dtype, transforms=tiles)
  row_smem = plgpu.SMEM((mc, 2, bq), jnp.float32)
  qd_smem = plgpu.SMEM((mc, n_qd, bq), jnp.int32) if n_qd else None
  a_smem = plgpu.SMEM((_COMPUTE_WGS, bkw, _WG_ROWS), dtype, transforms=tiles) if interpret else None
  kv_bars = plgpu.Barrier(num_arrivals=3 if n_kd else 2, num_barriers=_COMPUTE_WGS)
  slot_bars = plgpu.Barrier(num_arrivals=5 if n_qd else 4, num_barriers=mc)
  consumed = plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=mc)
  return (k_smem, v_smem, kd_smem, q_smem, do_smem, row_smem, qd_smem, a_smem, kv_bars,
          slot_bars, consumed)


def flash_bwd(q, k, v, d_out, lse, delta, block_mask: BlockMask, dims: Dims, *, scale: float,
              interpret: bool, config: MosaicGPUConfig = MosaicGPUConfig()):
  """Mosaic GPU dQ and dK/dV kernels; returns ``(dq, dk, dv)``."""
  plgpu = _plgpu()
  _check_dtype(q)
  lse2 = pad_axis(lse.astype(jnp.float32) * _LOG2E, dims.q_pad, 2)
  delta_p = pad_axis(delta.astype(jnp.float32), dims.q_pad, 2)
  dop = pad_axis(d_out.astype(q.dtype), dims.q_pad, 1)
  dq = _run_kv_stream("dq", q, k, v, (dop, lse2, delta_p), block_mask, dims, scale=scale,
                      interpret=interpret, config=config)

  qp = pad_axis(q, dims.q_pad, 1)
  kp, vp = pad_axis(k, dims.kv_pad, 1), pad_axis(v, dims.kv_pad, 1)
  entries, n_full, n_total = _group_schedule(block_mask, dims)
  qd, kd = _stack_data(block_mask, dims)
  n_qd = 0 if qd is None else qd.shape[1]
  n_kd = 0 if kd is None else kd.shape[1]
  mc = _ring_depth(config, dims.nq * dims.group, lambda depth: _dkv_scratch(
      dims, n_qd, n_kd, depth, q.dtype, interpret=False))
  items = kv_block_items(block_mask, dims)
  num_ctas = _num_ctas(items.shape[0], interpret)
  kernel = _dkv_kernel(dims, scale=scale, fn=_mask_fn(block_mask), n_qd=n_qd, n_kd=n_kd, mc=mc,
                       dtype=q.dtype, interpret=interpret, num_ctas=num_ctas)
  scratch = _dkv_scratch(dims, n_qd, n_kd, mc, q.dtype, interpret)
  args = [qp, kp, vp, dop, lse2, delta_p, items, entries, n_full, n_total]
  args += [x for x in (qd, kd) if x is not None]
  with _interpret_context(interpret):
    dk, dv = plgpu.kernel(
        kernel, out_type=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                          jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        scratch_types=[scratch], grid=(num_ctas,), grid_names=("cta",),
        num_threads=_COMPUTE_WGS + 1, thread_name="wg",
        compiler_params=_compiler_params(),
        **_cost.kernel_kwargs(plgpu.kernel, _cost.attention(
            dims, block_mask, "dkv", jnp.dtype(q.dtype).itemsize)),
    )(*args)
  return dq[:, :dims.q_len], dk[:, :dims.kv_len], dv[:, :dims.kv_len]
