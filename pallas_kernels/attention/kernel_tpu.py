"""Block-sparse flash attention for TPU: Pallas Mosaic with scalar prefetch (splash-like).

The block lists are scalar-prefetched into SMEM as one packed schedule per
(mask batch, mask head, q-block): entry ``s`` is ``kv_block * 4 + kind`` (kind 2
full, 1 partial, 0 past the end; full blocks first). The grid's last axis walks
the schedule; the K/V index maps read it, so a step past the end repeats the
previous block index and issues no DMA, and its body is skipped with
``pl.when``. Accumulators live in VMEM scratch and the output block is written
on the last step (output blocks are only revisited on consecutive steps).

Kernels (layout ``[batch, heads, seq, head_dim]``, the wrapper transposes):
  * forward: grid ``(batch, heads, nq, nk)``, ``s = q k^T`` with lane-broadcast
    ``m``/``l`` statistics, writes ``o`` and the LSE as a lane-dense row;
  * dQ: same grid, transposed scores ``s^T = k q^T`` so LSE and delta rows
    broadcast along lanes; ``dq += ds^T^T k``;
  * dK/dV: grid ``(batch, kv_heads, nk, group * nq)`` over the transposed
    schedules of every query head of the kv head's group.

On hardware the blocks must be multiples of 128 (lanes); in interpret mode
(``pltpu.InterpretParams()``) multiples of 8 suffice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _cost
from pallas_kernels.attention._common import Dims, allowed_in_block, pad_axis
from pallas_kernels.attention.block_mask import FULL, PARTIAL, BlockMask

__all__ = ["flash_fwd", "flash_bwd", "check_tpu_shapes"]

_LANES = 128


def check_tpu_shapes(dims: Dims, *, interpret: bool):
  """Block sizes the TPU tiling accepts (hardware: multiples of 128; interpreter: of 8)."""
  unit = 8 if interpret else _LANES
  for name, v in (("q_block", dims.q_block), ("kv_block", dims.kv_block)):
    if v % unit:
      raise ValueError(f"block_mask/{name}: the tpu backend needs a multiple of {unit} "
                       f"({'interpreter' if interpret else 'TPU lanes'}), got {v}; rebuild the "
                       "mask with another block size")


def _packed(idx, kinds):
  return (idx * 4 + kinds).astype(jnp.int32)


def _params(interpret):
  return pltpu.InterpretParams() if interpret else False


def _to_bhsd(x, length):
  return jnp.transpose(pad_axis(x, length, 1), (0, 2, 1, 3))


def _mask_data(block_mask: BlockMask, dims: Dims):
  """Token data as columns ``[B', S, 1]`` and rows ``[B', 1, S]`` (padded to blocks)."""
  mm = block_mask.mask_mod
  if mm is None:
    return (), (), (), ()
  qd = [pad_axis(x.astype(jnp.int32), dims.q_pad, 1) for x in mm.q_data]
  kd = [pad_axis(x.astype(jnp.int32), dims.kv_pad, 1) for x in mm.kv_data]
  col = lambda xs: tuple(x[:, :, None] for x in xs)
  row = lambda xs: tuple(x[:, None, :] for x in xs)
  return col(qd), row(qd), col(kd), row(kd)


def _kind_entry(entry):
  return entry & 3, entry >> 2


def _mb(dims):
  return (lambda b: b) if dims.mask_batch > 1 else (lambda b: 0)


def _token_mask(fn, partial, i, j, qd_refs, kd_refs, dims: Dims, *, kv_major: bool):
  """Token mask of block (q-block ``i``, kv-block ``j``), ``[bq, bk]`` (``[bk, bq]`` with
  ``kv_major``, the backward's orientation), or ``None`` when nothing is masked."""
  bq, bk = dims.q_block, dims.kv_block
  q_axis, kv_axis = (1, 0) if kv_major else (0, 1)
  q_shape, kv_shape = ((1, bq), (bk, 1)) if kv_major else ((bq, 1), (1, bk))
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, q_shape, q_axis)
  kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, kv_shape, kv_axis)
  return allowed_in_block(fn, partial, q_pos, kv_pos, tuple(r[...] for r in qd_refs),
                          tuple(r[...] for r in kd_refs), dims.kv_len, dims.ragged_kv)


# ------------------------------------------------------------------- forward
def _fwd_kernel(sched_ref, q_ref, k_ref, v_ref, *rest, dims: Dims, scale, fn, n_qd, n_kd):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  o_ref, lse_ref, m_scr, l_scr, acc_scr = rest[n_qd + n_kd:]
  b, h, i, s = (pl.program_id(a) for a in range(4))
  kind, j = _kind_entry(sched_ref[_mb(dims)(b), h // dims.heads_per_mask_head, i, s])

  @pl.when(s == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  def step(partial):
    q, kt, vt = q_ref[...], k_ref[...], v_ref[...]
    sc = lax.dot_general(q, kt, (((1,), (1,)), ((), ())),
                         preferred_element_type=jnp.float32) * scale
    ok = _token_mask(fn, partial, i, j, qd_refs, kd_refs, dims, kv_major=False)
    if ok is not None:
      sc = jnp.where(ok, sc, -jnp.inf)
    m_prev = m_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(sc, axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    p = jnp.exp(sc - m_safe[:, :1])
    alpha = jnp.exp(m_prev - m_safe)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv
    m_scr[...] = m_next

  pl.when(kind == FULL)(lambda: step(False))
  pl.when(kind == PARTIAL)(lambda: step(True))

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    l, m = l_scr[...], m_scr[...]
    pos = l != 0  # empty rows (l == 0) give 0 / -inf; NaN from q/k stays NaN, as in dense attention
    l_safe = jnp.where(pos, l, 1.0)
    o_ref[...] = jnp.where(pos[:, :1], acc_scr[...] / l_safe[:, :1], 0.0).astype(o_ref.dtype)
    lse = jnp.where(pos, m + jnp.log(l_safe), -jnp.inf)      # [bq, 128], lanes equal
    lse_ref[...] = jnp.transpose(lse)[:1, :]                  # lane-dense row [1, bq]


def flash_fwd(q, k, v, block_mask: BlockMask, dims: Dims, *, scale: float, interpret: bool):
  """TPU forward; returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
  bq, bk, d = dims.q_block, dims.kv_block, dims.head_dim
  qt, kt, vt = _to_bhsd(q, dims.q_pad), _to_bhsd(k, dims.kv_pad), _to_bhsd(v, dims.kv_pad)
  idx, kinds, _ = block_mask.kv_schedule()
  sched = _packed(idx, kinds)
  qd_col, _, _, kd_row = _mask_data(block_mask, dims)
  fn = None if block_mask.mask_mod is None else block_mask.mask_mod.fn
  mb, hpm, g = _mb(dims), dims.heads_per_mask_head, dims.group

  def kv_map(b, h, i, s, sched_ref):
    return b, h // g, sched_ref[mb(b), h // hpm, i, s] >> 2, 0

  def kd_map(b, h, i, s, sched_ref):
    return mb(b), 0, sched_ref[mb(b), h // hpm, i, s] >> 2

  in_specs = [pl.BlockSpec((None, None, bq, d), lambda b, h, i, s, _: (b, h, i, 0)),
              pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map)]
  in_specs += [pl.BlockSpec((None, bq, 1), lambda b, h, i, s, _: (mb(b), i, 0)) for _ in qd_col]
  in_specs += [pl.BlockSpec((None, 1, bk), kd_map) for _ in kd_row]
  out_specs = [pl.BlockSpec((None, None, bq, d), lambda b, h, i, s, _: (b, h, i, 0)),
               pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, _: (b, h, 0, i))]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(dims.batch, dims.num_heads, dims.nq, dims.nk),
      in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM((bq, _LANES), jnp.float32), pltpu.VMEM((bq, _LANES), jnp.float32),
                      pltpu.VMEM((bq, d), jnp.float32)])
  kernel = functools.partial(_fwd_kernel, dims=dims, scale=scale, fn=fn, n_qd=len(qd_col),
                             n_kd=len(kd_row))
  out, lse = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct(qt.shape, q.dtype),
                 jax.ShapeDtypeStruct((dims.batch, dims.num_heads, 1, dims.q_pad), jnp.float32)],
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      cost_estimate=_cost.attention(dims, block_mask, "fwd", jnp.dtype(q.dtype).itemsize),
      interpret=_params(interpret), name="block_sparse_attention_fwd_tpu",
  )(sched, qt, kt, vt, *qd_col, *kd_row)
  out = jnp.transpose(out, (0, 2, 1, 3))[:, :dims.q_len]
  return out, lse[:, :, 0, :dims.q_len]


# ------------------------------------------------------------------ backward
def _bwd_step(q, kt, vt, do, lse, delta, ok, scale):
  """Transposed-orientation block: returns (p^T, ds^T) of shape [bk, bq]."""
  lse = jnp.where(lse == -jnp.inf, 0.0, lse)  # rows that attend nothing: p = 0, not NaN
  st = lax.dot_general(kt, q, (((1,), (1,)), ((), ())),
                       preferred_element_type=jnp.float32) * scale
  pt = jnp.exp(st - lse)
  if ok is not None:
    pt = jnp.where(ok, pt, 0.0)
  dpt = lax.dot_general(vt, do, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return pt, pt * (dpt - delta)


def _dq_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, dims: Dims,
               scale, fn, n_qd, n_kd):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  dq_ref, dq_scr = rest[n_qd + n_kd:]
  b, h, i, s = (pl.program_id(a) for a in range(4))
  kind, j = _kind_entry(sched_ref[_mb(dims)(b), h // dims.heads_per_mask_head, i, s])

  @pl.when(s == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  def step(partial):
    kt = k_ref[...]
    ok = _token_mask(fn, partial, i, j, qd_refs, kd_refs, dims, kv_major=True)
    _, dst = _bwd_step(q_ref[...], kt, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...], ok,
                       scale)
    dq_scr[...] += lax.dot_general(dst.astype(kt.dtype), kt, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

  pl.when(kind == FULL)(lambda: step(False))
  pl.when(kind == PARTIAL)(lambda: step(True))

  @pl.when(s == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(sched_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *rest, dims: Dims,
                scale, fn, n_qd, n_kd):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  dk_ref, dv_ref, dk_scr, dv_scr = rest[n_qd + n_kd:]
  nq = dims.nq
  b, hk, j, t = (pl.program_id(a) for a in range(4))
  h = hk * dims.group + t // nq
  kind, i = _kind_entry(sched_ref[_mb(dims)(b), h // dims.heads_per_mask_head, j, t % nq])

  @pl.when(t == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  def step(partial):
    q, do = q_ref[...], do_ref[...]
    ok = _token_mask(fn, partial, i, j, qd_refs, kd_refs, dims, kv_major=True)
    pt, dst = _bwd_step(q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...], ok, scale)
    dv_scr[...] += lax.dot_general(pt.astype(do.dtype), do, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    dk_scr[...] += lax.dot_general(dst.astype(q.dtype), q, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

  pl.when(kind == FULL)(lambda: step(False))
  pl.when(kind == PARTIAL)(lambda: step(True))

  @pl.when(t == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def flash_bwd(q, k, v, d_out, lse, delta, block_mask: BlockMask, dims: Dims, *, scale: float,
              interpret: bool):
  """TPU dQ and dK/dV kernels; returns ``(dq, dk, dv)`` in the input layout."""
  bq, bk, d, g, nq = dims.q_block, dims.kv_block, dims.head_dim, dims.group, dims.nq
  qt, dot_ = _to_bhsd(q, dims.q_pad), _to_bhsd(d_out, dims.q_pad)
  kt, vt = _to_bhsd(k, dims.kv_pad), _to_bhsd(v, dims.kv_pad)
  row = lambda x: pad_axis(x.astype(jnp.float32), dims.q_pad, 2)[:, :, None, :]
  lse_r, delta_r = row(lse), row(delta)
  _, qd_row, kd_col, _ = _mask_data(block_mask, dims)
  fn = None if block_mask.mask_mod is None else block_mask.mask_mod.fn
  mb, hpm = _mb(dims), dims.heads_per_mask_head
  common = dict(dims=dims, scale=scale, fn=fn, n_qd=len(qd_row), n_kd=len(kd_col))
  sem = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel",
                                                  "arbitrary"))

  # dQ: walk the kv schedule.
  idx, kinds, _ = block_mask.kv_schedule()
  sched = _packed(idx, kinds)

  def kv_map(b, h, i, s, sr):
    return b, h // g, sr[mb(b), h // hpm, i, s] >> 2, 0

  def kd_map(b, h, i, s, sr):
    return mb(b), sr[mb(b), h // hpm, i, s] >> 2, 0

  q_spec = pl.BlockSpec((None, None, bq, d), lambda b, h, i, s, _: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, s, _: (b, h, 0, i))
  in_specs = [q_spec, pl.BlockSpec((None, None, bk, d), kv_map),
              pl.BlockSpec((None, None, bk, d), kv_map), q_spec, row_spec, row_spec]
  in_specs += [pl.BlockSpec((None, 1, bq), lambda b, h, i, s, _: (mb(b), 0, i)) for _ in qd_row]
  in_specs += [pl.BlockSpec((None, bk, 1), kd_map) for _ in kd_col]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(dims.batch, dims.num_heads, nq, dims.nk),
          in_specs=in_specs, out_specs=q_spec,
          scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype), compiler_params=sem,
      cost_estimate=_cost.attention(dims, block_mask, "dq", jnp.dtype(q.dtype).itemsize),
      interpret=_params(interpret), name="block_sparse_attention_dq_tpu",
  )(sched, qt, kt, vt, dot_, lse_r, delta_r, *qd_row, *kd_col)

  # dK/dV: walk the transposed schedules of the group's query heads.
  tidx, tkinds, _ = block_mask.q_schedule()
  tsched = _packed(tidx, tkinds)

  def q_map(b, hk, j, t, sr):
    h = hk * g + t // nq
    return b, h, sr[mb(b), h // hpm, j, t % nq] >> 2, 0

  def qrow_map(b, hk, j, t, sr):
    h = hk * g + t // nq
    return b, h, 0, sr[mb(b), h // hpm, j, t % nq] >> 2

  def qd_map(b, hk, j, t, sr):
    h = hk * g + t // nq
    return mb(b), 0, sr[mb(b), h // hpm, j, t % nq] >> 2

  kv_spec = pl.BlockSpec((None, None, bk, d), lambda b, hk, j, t, _: (b, hk, j, 0))
  in_specs = [pl.BlockSpec((None, None, bq, d), q_map), kv_spec, kv_spec,
              pl.BlockSpec((None, None, bq, d), q_map), pl.BlockSpec((None, None, 1, bq), qrow_map),
              pl.BlockSpec((None, None, 1, bq), qrow_map)]
  in_specs += [pl.BlockSpec((None, 1, bq), qd_map) for _ in qd_row]
  in_specs += [pl.BlockSpec((None, bk, 1), lambda b, hk, j, t, _: (mb(b), j, 0))
               for _ in kd_col]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(dims.batch, dims.num_kv_heads, dims.nk, g * nq),
          in_specs=in_specs, out_specs=[kv_spec, kv_spec],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
      cost_estimate=_cost.attention(dims, block_mask, "dkv", jnp.dtype(q.dtype).itemsize),
      compiler_params=sem, interpret=_params(interpret), name="block_sparse_attention_dkv_tpu",
  )(tsched, qt, kt, vt, dot_, lse_r, delta_r, *qd_row, *kd_col)
  back = lambda x, n: jnp.transpose(x, (0, 2, 1, 3))[:, :n]
  return back(dq, dims.q_len), back(dk, dims.kv_len), back(dv, dims.kv_len)
