"""Block-sparse flash attention as plain Pallas kernels (Triton lowering, or the interpreter).

Written to the Triton lowering's rules, so one code path serves the ``"triton"``
backend (NVIDIA GPUs without Mosaic GPU) and the ``"interpret"`` backend (any
platform, tests):

  * no scalar prefetch: the block lists are ordinary inputs, each program reads
    its (batch, head, block) row and loops over it with ``lax.fori_loop`` and
    dynamic ``pl.ds`` slices of K/V (or Q/dO) held whole in the block spec;
  * every tile is a power of two: block sizes are powers of two >= 16 and the
    head dimension is zero-padded to a power of two;
  * full blocks and partial blocks run in two loops, so full blocks never pay
    for the token-level mask;
  * no scratch buffers: accumulators are loop carries.

Kernels: forward (grid batch x heads x q-blocks, saves the log-sum-exp), dQ
(same grid, recomputes P from the LSE) and dK/dV (grid batch x kv-heads x
kv-blocks, walks the transposed lists of every query head of the group, so
GQA needs no extra reduction).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _cost
from pallas_kernels.attention._common import (Dims, allowed_in_block, pad_axis,
                                              padded_mask_data)
from pallas_kernels.attention.block_mask import BlockMask

__all__ = ["flash_fwd", "flash_bwd", "triton_compiler_params"]


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def triton_compiler_params(num_warps: int | None, num_stages: int | None, head_dim: int):
  """``plt.CompilerParams`` for the Triton lowering (imported lazily).

  Defaults: 4 warps for ``head_dim <= 64``, else 8; 2 pipeline stages.
  """
  from jax.experimental.pallas import triton as plt  # pylint: disable=g-import-not-at-top
  num_warps = (4 if head_dim <= 64 else 8) if num_warps is None else num_warps
  num_stages = 2 if num_stages is None else num_stages
  return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _dot(a, b, contract, ct):
  """``a @ b`` contracting ``contract=(da, db)``, accumulating in ``ct``."""
  prec = lax.Precision.HIGHEST if a.dtype in (jnp.float32, jnp.float64) else None
  return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())), precision=prec,
                         preferred_element_type=ct)


def _mask_idx(dims: Dims):
  """Index-map helpers from (batch, q-head) program ids to mask rows."""
  mb = (lambda b: b) if dims.mask_batch > 1 else (lambda b: 0)
  mh = lambda h: h // dims.heads_per_mask_head
  return mb, mh


def _kv_block(k_ref, v_ref, kd_refs, j, q, q_pos, qd, partial, *, fn, dims: Dims, scale, ct):
  """kv-block ``j`` of a q-block's walk: ``(k, v, scaled logits, token mask or None)``."""
  bk = dims.kv_block
  start = pl.multiple_of(j * bk, bk)
  kt = k_ref[pl.ds(start, bk), :]
  vt = v_ref[pl.ds(start, bk), :]
  sc = _dot(q, kt, (1, 1), ct) * scale
  kv_pos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  kd = tuple(r[pl.ds(start, bk)][None, :] for r in kd_refs)
  ok = allowed_in_block(fn, partial, q_pos, kv_pos, qd, kd, dims.kv_len, dims.ragged_kv)
  return kt, vt, sc, ok


# ------------------------------------------------------------------- forward
def _fwd_kernel(q_ref, k_ref, v_ref, fc_ref, fi_ref, pc_ref, pi_ref, *rest, dims: Dims,
                scale, fn, n_qd, n_kd, ct):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  o_ref, lse_ref = rest[n_qd + n_kd:]
  bq = dims.q_block
  i = pl.program_id(2)
  q = q_ref[...]
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  qd = tuple(r[...][:, None] for r in qd_refs)

  def make_body(idx_ref, row, partial):
    def body(s, carry):
      acc, m, l = carry
      kt, vt, sc, ok = _kv_block(k_ref, v_ref, kd_refs, idx_ref[row, s], q, q_pos, qd,
                                 partial, fn=fn, dims=dims, scale=scale, ct=ct)
      if ok is not None:
        sc = jnp.where(ok, sc, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(sc, axis=1))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      p = jnp.exp(sc - m_safe[:, None])
      alpha = jnp.exp(m - m_safe)
      l = alpha * l + jnp.sum(p, axis=1)
      acc = alpha[:, None] * acc + _dot(p.astype(vt.dtype), vt, (1, 0), ct)
      return acc, m_new, l
    return body

  dp = q_ref.shape[-1]
  carry = (jnp.zeros((bq, dp), ct), jnp.full((bq,), -jnp.inf, ct), jnp.zeros((bq,), ct))
  carry = lax.fori_loop(0, fc_ref[i], make_body(fi_ref, i, False), carry)
  carry = lax.fori_loop(0, pc_ref[i], make_body(pi_ref, i, True), carry)
  acc, m, l = carry
  pos = l != 0  # empty rows (l == 0) give 0 / -inf; NaN from q/k stays NaN, as in dense attention
  l_safe = jnp.where(pos, l, 1.0)
  o_ref[...] = jnp.where(pos[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(pos, m + jnp.log(l_safe), -jnp.inf).astype(lse_ref.dtype)


def _prep(q, k, v, dims: Dims):
  dp = _next_pow2(max(dims.head_dim, 16))
  q = pad_axis(pad_axis(q, dims.q_pad, 1), dp, 3)
  k = pad_axis(pad_axis(k, dims.kv_pad, 1), dp, 3)
  v = pad_axis(pad_axis(v, dims.kv_pad, 1), dp, 3)
  return q, k, v, dp


def flash_fwd(q, k, v, block_mask: BlockMask, dims: Dims, *, scale: float, interpret,
              compiler_params=None):
  """Forward kernel; returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``."""
  ct = jnp.float32
  qp, kp, vp, dp = _prep(q, k, v, dims)
  bq = dims.q_block
  mb, mh = _mask_idx(dims)
  nq, nk = dims.nq, dims.nk
  qd, kd = padded_mask_data(block_mask, dims)
  fn = None if block_mask.mask_mod is None else block_mask.mask_mod.fn
  in_specs = [
      pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
      pl.BlockSpec((None, dims.kv_pad, None, dp), lambda b, h, i: (b, 0, h // dims.group, 0)),
      pl.BlockSpec((None, dims.kv_pad, None, dp), lambda b, h, i: (b, 0, h // dims.group, 0)),
      pl.BlockSpec((None, None, nq), lambda b, h, i: (mb(b), mh(h), 0)),
      pl.BlockSpec((None, None, nq, nk), lambda b, h, i: (mb(b), mh(h), 0, 0)),
      pl.BlockSpec((None, None, nq), lambda b, h, i: (mb(b), mh(h), 0)),
      pl.BlockSpec((None, None, nq, nk), lambda b, h, i: (mb(b), mh(h), 0, 0)),
  ]
  in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (mb(b), i)) for _ in qd]
  in_specs += [pl.BlockSpec((None, dims.kv_pad), lambda b, h, i: (mb(b), 0)) for _ in kd]
  out_shape = [jax.ShapeDtypeStruct(qp.shape, q.dtype),
               jax.ShapeDtypeStruct((dims.batch, dims.num_heads, dims.q_pad), ct)]
  out_specs = [pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0)),
               pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))]
  kernel = functools.partial(_fwd_kernel, dims=dims, scale=scale, fn=fn, n_qd=len(qd),
                             n_kd=len(kd), ct=ct)
  bm = block_mask
  out, lse = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(dims.batch, dims.num_heads, nq), in_specs=in_specs,
      out_specs=out_specs, interpret=interpret, compiler_params=compiler_params,
      cost_estimate=_cost.attention(dims, block_mask, "fwd", jnp.dtype(q.dtype).itemsize),
      name="block_sparse_attention_fwd",
  )(qp, kp, vp, bm.full_kv_counts, bm.full_kv_indices, bm.partial_kv_counts,
    bm.partial_kv_indices, *qd, *kd)
  return out[:, :dims.q_len, :, :dims.head_dim], lse[:, :, :dims.q_len]


# ------------------------------------------------------------------------ dQ
def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, fc_ref, fi_ref, pc_ref, pi_ref,
               *rest, dims: Dims, scale, fn, n_qd, n_kd, ct):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  (dq_ref,) = rest[n_qd + n_kd:]
  bq = dims.q_block
  i = pl.program_id(2)
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...]
  lse = jnp.where(lse == -jnp.inf, 0.0, lse)[:, None]
  delta = delta_ref[...][:, None]
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  qd = tuple(r[...][:, None] for r in qd_refs)

  def make_body(idx_ref, row, partial):
    def body(s, dq):
      kt, vt, sc, ok = _kv_block(k_ref, v_ref, kd_refs, idx_ref[row, s], q, q_pos, qd,
                                 partial, fn=fn, dims=dims, scale=scale, ct=ct)
      p = jnp.exp(sc - lse)
      if ok is not None:
        p = jnp.where(ok, p, 0.0)
      dpv = _dot(do, vt, (1, 1), ct)
      ds = p * (dpv - delta)
      return dq + _dot(ds.astype(kt.dtype), kt, (1, 0), ct)
    return body

  dq = jnp.zeros(q_ref.shape, ct)
  dq = lax.fori_loop(0, fc_ref[i], make_body(fi_ref, i, False), dq)
  dq = lax.fori_loop(0, pc_ref[i], make_body(pi_ref, i, True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# --------------------------------------------------------------------- dK/dV
def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, fc_ref, fi_ref, pc_ref, pi_ref,
                *rest, dims: Dims, scale, fn, n_qd, n_kd, ct):
  qd_refs, kd_refs = rest[:n_qd], rest[n_qd:n_qd + n_kd]
  dk_ref, dv_ref = rest[n_qd + n_kd:]
  bq, bk, g = dims.q_block, dims.kv_block, dims.group
  hk = pl.program_id(1)
  j = pl.program_id(2)
  kt, vt = k_ref[...], v_ref[...]
  kv_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  kd = tuple(r[...][None, :] for r in kd_refs)

  def make_body(gi, idx_ref, row, partial):
    def body(s, carry):
      dk, dv = carry
      start = pl.multiple_of(idx_ref[row, s] * bq, bq)
      qt = q_ref[pl.ds(start, bq), gi, :]
      dot_ = do_ref[pl.ds(start, bq), gi, :]
      lse = lse_ref[gi, pl.ds(start, bq)]
      lse = jnp.where(lse == -jnp.inf, 0.0, lse)[:, None]
      delta = delta_ref[gi, pl.ds(start, bq)][:, None]
      sc = _dot(qt, kt, (1, 1), ct) * scale
      q_pos = start + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      qd = tuple(r[pl.ds(start, bq)][:, None] for r in qd_refs)
      ok = allowed_in_block(fn, partial, q_pos, kv_pos, qd, kd, dims.kv_len, dims.ragged_kv)
      p = jnp.exp(sc - lse)
      if ok is not None:
        p = jnp.where(ok, p, 0.0)
      dv = dv + _dot(p.astype(dot_.dtype), dot_, (0, 0), ct)
      dpv = _dot(dot_, vt, (1, 1), ct)
      ds = p * (dpv - delta)
      dk = dk + _dot(ds.astype(qt.dtype), qt, (0, 0), ct)
      return dk, dv
    return body

  def group_body(gi, carry):
    mh = (hk * g + gi) // dims.heads_per_mask_head
    carry = lax.fori_loop(0, fc_ref[mh], make_body(gi, fi_ref, mh, False), carry)
    return lax.fori_loop(0, pc_ref[mh], make_body(gi, pi_ref, mh, True), carry)

  zeros = jnp.zeros(k_ref.shape, ct)
  dk, dv = lax.fori_loop(0, g, group_body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_bwd(q, k, v, d_out, lse, delta, block_mask: BlockMask, dims: Dims, *, scale: float,
              interpret, compiler_params=None):
  """dQ and dK/dV kernels; ``delta = rowsum(out * d_out) - d_lse`` ``[B, H, Sq]`` float32."""
  ct = jnp.float32
  qp, kp, vp, dp = _prep(q, k, v, dims)
  dop = pad_axis(pad_axis(d_out, dims.q_pad, 1), dp, 3)
  lse_p = pad_axis(lse.astype(ct), dims.q_pad, 2)
  delta_p = pad_axis(delta.astype(ct), dims.q_pad, 2)
  bq, bk, g = dims.q_block, dims.kv_block, dims.group
  mb, mh = _mask_idx(dims)
  nq, nk = dims.nq, dims.nk
  qd, kd = padded_mask_data(block_mask, dims)
  fn = None if block_mask.mask_mod is None else block_mask.mask_mod.fn
  bm = block_mask
  common = dict(dims=dims, scale=scale, fn=fn, n_qd=len(qd), n_kd=len(kd), ct=ct)

  q_spec = pl.BlockSpec((None, bq, None, dp), lambda b, h, i: (b, i, h, 0))
  kv_full = pl.BlockSpec((None, dims.kv_pad, None, dp), lambda b, h, i: (b, 0, h // g, 0))
  row_spec = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
  in_specs = [q_spec, kv_full, kv_full, q_spec, row_spec, row_spec,
              pl.BlockSpec((None, None, nq), lambda b, h, i: (mb(b), mh(h), 0)),
              pl.BlockSpec((None, None, nq, nk), lambda b, h, i: (mb(b), mh(h), 0, 0)),
              pl.BlockSpec((None, None, nq), lambda b, h, i: (mb(b), mh(h), 0)),
              pl.BlockSpec((None, None, nq, nk), lambda b, h, i: (mb(b), mh(h), 0, 0))]
  in_specs += [pl.BlockSpec((None, bq), lambda b, h, i: (mb(b), i)) for _ in qd]
  in_specs += [pl.BlockSpec((None, dims.kv_pad), lambda b, h, i: (mb(b), 0)) for _ in kd]
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, **common), grid=(dims.batch, dims.num_heads, nq),
      out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype), in_specs=in_specs, out_specs=q_spec,
      cost_estimate=_cost.attention(dims, block_mask, "dq", jnp.dtype(q.dtype).itemsize),
      interpret=interpret, compiler_params=compiler_params, name="block_sparse_attention_dq",
  )(qp, kp, vp, dop, lse_p, delta_p, bm.full_kv_counts, bm.full_kv_indices,
    bm.partial_kv_counts, bm.partial_kv_indices, *qd, *kd)

  # dK/dV: one program per (batch, kv head, kv-block); the group's query heads are a loop.
  hk = dims.num_kv_heads
  q5 = qp.reshape(dims.batch, dims.q_pad, hk, g, dp)
  do5 = dop.reshape(dims.batch, dims.q_pad, hk, g, dp)
  lse4 = lse_p.reshape(dims.batch, hk, g, dims.q_pad)
  delta4 = delta_p.reshape(dims.batch, hk, g, dims.q_pad)
  hm = dims.mask_heads
  grp_spec = pl.BlockSpec((None, dims.q_pad, None, g, dp), lambda b, h, j: (b, 0, h, 0, 0))
  grp_row = pl.BlockSpec((None, None, g, dims.q_pad), lambda b, h, j: (b, h, 0, 0))
  kv_blk = pl.BlockSpec((None, bk, None, dp), lambda b, h, j: (b, j, h, 0))
  in_specs = [grp_spec, kv_blk, kv_blk, grp_spec, grp_row, grp_row,
              pl.BlockSpec((None, hm, None), lambda b, h, j: (mb(b), 0, j)),
              pl.BlockSpec((None, hm, None, nq), lambda b, h, j: (mb(b), 0, j, 0)),
              pl.BlockSpec((None, hm, None), lambda b, h, j: (mb(b), 0, j)),
              pl.BlockSpec((None, hm, None, nq), lambda b, h, j: (mb(b), 0, j, 0))]
  in_specs += [pl.BlockSpec((None, dims.q_pad), lambda b, h, j: (mb(b), 0)) for _ in qd]
  in_specs += [pl.BlockSpec((None, bk), lambda b, h, j: (mb(b), j)) for _ in kd]
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, **common), grid=(dims.batch, hk, nk),
      out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype), jax.ShapeDtypeStruct(vp.shape, v.dtype)],
      in_specs=in_specs, out_specs=[kv_blk, kv_blk], interpret=interpret,
      cost_estimate=_cost.attention(dims, block_mask, "dkv", jnp.dtype(q.dtype).itemsize),
      compiler_params=compiler_params, name="block_sparse_attention_dkv",
  )(q5, kp, vp, do5, lse4, delta4, bm.full_q_counts, bm.full_q_indices, bm.partial_q_counts,
    bm.partial_q_indices, *qd, *kd)
  crop = lambda x, n: x[:, :n, :, :dims.head_dim]
  return crop(dq, dims.q_len), crop(dk, dims.kv_len), crop(dv, dims.kv_len)
