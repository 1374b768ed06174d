"""XLA references: a blockwise flash attention over visited blocks, and a dense one for tests.

The blockwise reference is the CPU/fallback backend. It walks the block mask's
merged schedule (full blocks first, then partial ones) with an online softmax,
one kv-block per q-block per step, so memory stays at
``batch * heads * q_len * kv_block`` instead of ``q_len * kv_len``; the backward
pass walks the transposed schedule for dK/dV. Steps run up to the largest
visited count, so the work is ``max_count / mean_count`` times the visited FLOPs.

The dense reference materialises the token mask and the score matrix; use it
for tests and small sizes (it also computes in float64 when given float64).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention._common import (allowed_in_block, check_inputs,
                                              compute_dtype, mask_rows, pad_axis,
                                              padded_mask_data, safe_max)
from pallas_kernels.attention.block_mask import FULL, PARTIAL, BlockMask

__all__ = ["attention_dense_reference", "blockwise_attention_fwd", "blockwise_attention_bwd"]


def attention_dense_reference(q, k, v, block_mask: BlockMask | None = None, *, token_mask=None,
                              scale: float | None = None):
  """Dense masked softmax attention; returns ``(out, lse)``.

  Args:
    q: ``[batch, q_len, heads, head_dim]``; k, v: ``[batch, kv_len, kv_heads, head_dim]``.
    block_mask: mask to expand with :meth:`BlockMask.to_dense`, or
    token_mask: bool ``[B', H', q_len, kv_len]`` (``B'`` 1 or batch, ``H'`` divides heads).
    scale: logit scale (default ``head_dim ** -0.5``).

  Returns:
    ``out`` in the input dtype and ``lse [batch, heads, q_len]`` (float32, or float64
    for float64 inputs); fully masked rows give ``out = 0`` and ``lse = -inf``.

  >>> q = jnp.ones((1, 2, 1, 4)); k = v = jnp.arange(8.).reshape(1, 2, 1, 4)
  >>> out, lse = attention_dense_reference(q, k, v, token_mask=jnp.array([[[[1, 0], [0, 0]]]], bool))
  >>> out[0, :, 0].tolist()
  [[0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]
  """
  if token_mask is None:
    if block_mask is None:
      raise ValueError("attention_dense_reference: pass a block_mask or a token_mask")
    token_mask = block_mask.to_dense()
  b, sq, hq, d = q.shape
  hk = k.shape[2]
  ct = compute_dtype(q.dtype)
  scale = d ** -0.5 if scale is None else scale
  qf, kf, vf = (x.astype(ct) for x in (q, k, v))
  kf = jnp.repeat(kf, hq // hk, axis=2)
  vf = jnp.repeat(vf, hq // hk, axis=2)
  tm = jnp.asarray(token_mask, bool)
  tm = jnp.repeat(tm, hq // tm.shape[1], axis=1)
  s = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision="highest") * scale
  s = jnp.where(tm, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - safe_max(m))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision="highest")
  l_t = jnp.transpose(l[..., 0], (0, 2, 1))[..., None]
  o = jnp.where(l_t != 0, o / jnp.where(l_t != 0, l_t, 1), 0)  # NaN rows stay NaN
  lse = jnp.where(l[..., 0] != 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] != 0, l[..., 0], 1)),
                  -jnp.inf)
  return o.astype(q.dtype), lse


# ------------------------------------------------------------------ blockwise
def _blocked(x, block, n):
  """[B, S, H, D] -> [B, H, n, block, D] (padded)."""
  x = pad_axis(x, n * block, 1)
  b, _, h, d = x.shape
  return jnp.transpose(x.reshape(b, n, block, h, d), (0, 3, 1, 2, 4))


def _unblocked(x, length):
  """[B, H, n, block, D] -> [B, length, H, D]."""
  b, h, n, blk, d = x.shape
  return jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b, n * blk, h, d)[:, :length]


def _gather_data(data, bsel, pos):
  """data [B', S] gathered at pos [B, H, n, blk] -> [B, H, n, blk]."""
  return data[bsel[:, None, None, None], pos]


def _allowed(block_mask, dims, kind, q_pos, kv_pos, qd, kd):
  fn = None if block_mask.mask_mod is None else block_mask.mask_mod.fn
  partial = kind == PARTIAL
  a = allowed_in_block(fn, partial, q_pos, kv_pos, qd, kd, dims.kv_len, dims.ragged_kv)
  visited = (kind == FULL) | partial
  return visited if a is None else visited & a


def blockwise_attention_fwd(q, k, v, block_mask: BlockMask, *, scale: float | None = None):
  """Blockwise forward over visited blocks; returns ``(out, lse [batch, heads, q_len])``.

  >>> from pallas_kernels.attention import causal_mask
  >>> q = k = v = jnp.ones((1, 8, 2, 4))
  >>> out, lse = blockwise_attention_fwd(q, k, v, causal_mask(8, q_block=4))
  >>> out.shape, lse.shape
  ((1, 8, 2, 4), (1, 2, 8))
  """
  dims = check_inputs(q, k, v, block_mask)
  scale = dims.head_dim ** -0.5 if scale is None else scale
  ct = compute_dtype(q.dtype)
  prec = lax.Precision.HIGHEST
  bq, bk, g = dims.q_block, dims.kv_block, dims.group
  qb = _blocked(q.astype(ct), bq, dims.nq)           # [B, Hq, nq, bq, D]
  kb, vb = _blocked(k.astype(ct), bk, dims.nk), _blocked(v.astype(ct), bk, dims.nk)
  idx, kinds, counts = (mask_rows(x, dims) for x in block_mask.kv_schedule())
  qd, kd = padded_mask_data(block_mask, dims)
  bsel = jnp.arange(dims.batch) if dims.mask_batch > 1 else jnp.zeros(dims.batch, jnp.int32)
  bi = jnp.arange(dims.batch)[:, None, None]
  hki = (jnp.arange(dims.num_heads) // g)[None, :, None]
  q_pos = (jnp.arange(dims.nq)[:, None] * bq + jnp.arange(bq)[None, :]).astype(jnp.int32)
  q_pos = jnp.broadcast_to(q_pos, (dims.batch, dims.num_heads, dims.nq, bq))
  qd_al = tuple(_gather_data(x, bsel, q_pos)[..., None] for x in qd)
  q_pos_al = q_pos[..., None]

  shape = (dims.batch, dims.num_heads, dims.nq, bq)
  init = (jnp.zeros(shape + (dims.head_dim,), ct), jnp.full(shape, -jnp.inf, ct),
          jnp.zeros(shape, ct))

  def body(step, carry):
    acc, m, l = carry
    j = idx[..., step]                                 # [B, Hq, nq]
    kind = kinds[..., step][..., None, None]
    kj, vj = kb[bi, hki, j], vb[bi, hki, j]            # [B, Hq, nq, bk, D]
    s = jnp.einsum("bhiqd,bhikd->bhiqk", qb, kj, precision=prec) * scale
    kv_pos = (j[..., None] * bk + jnp.arange(bk)).astype(jnp.int32)   # [B, Hq, nq, bk]
    kd_al = tuple(_gather_data(x, bsel, kv_pos)[..., None, :] for x in kd)
    ok = _allowed(block_mask, dims, kind, q_pos_al, kv_pos[..., None, :], qd_al, kd_al)
    s = jnp.where(ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_safe = safe_max(m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    l = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhiqk,bhikd->bhiqd", p, vj, precision=prec)
    return alpha[..., None] * acc + pv, m_new, l

  acc, m, l = lax.fori_loop(0, jnp.max(counts, initial=0), body, init)
  pos = l != 0  # empty rows (l == 0) give 0 / -inf; NaN from q/k stays NaN, as in dense attention
  out = jnp.where(pos[..., None], acc / jnp.where(pos, l, 1)[..., None], 0)
  lse = jnp.where(pos, m + jnp.log(jnp.where(pos, l, 1)), -jnp.inf)
  lse = lse.reshape(dims.batch, dims.num_heads, dims.q_pad)[..., :dims.q_len]
  return _unblocked(out, dims.q_len).astype(q.dtype), lse.astype(ct)


def blockwise_attention_bwd(q, k, v, lse, delta, d_out, block_mask: BlockMask, *,
                            scale: float | None = None):
  """Blockwise backward from the saved ``lse``; returns ``(dq, dk, dv)``.

  Args:
    q, k, v: the forward inputs.
    lse: ``[batch, heads, q_len]`` log-sum-exp saved by the forward pass.
    delta: ``[batch, heads, q_len]`` ``rowsum(out * d_out)`` (minus the LSE cotangent).
    d_out: cotangent of the output.
    block_mask: the forward mask.
    scale: the forward logit scale.

  >>> from pallas_kernels.attention import causal_mask
  >>> q = k = v = jnp.ones((1, 8, 2, 4)); m = causal_mask(8, q_block=4)
  >>> out, lse = blockwise_attention_fwd(q, k, v, m)
  >>> delta = jnp.einsum("bqhd,bqhd->bhq", out, out)
  >>> [x.shape for x in blockwise_attention_bwd(q, k, v, lse, delta, out, m)]
  [(1, 8, 2, 4), (1, 8, 2, 4), (1, 8, 2, 4)]
  """
  dims = check_inputs(q, k, v, block_mask)
  scale = dims.head_dim ** -0.5 if scale is None else scale
  ct = compute_dtype(q.dtype)
  prec = lax.Precision.HIGHEST
  bq, bk, g = dims.q_block, dims.kv_block, dims.group
  b, h = dims.batch, dims.num_heads
  qb, dob = _blocked(q.astype(ct), bq, dims.nq), _blocked(d_out.astype(ct), bq, dims.nq)
  kb, vb = _blocked(k.astype(ct), bk, dims.nk), _blocked(v.astype(ct), bk, dims.nk)
  lse_b = pad_axis(lse.astype(ct), dims.q_pad, 2).reshape(b, h, dims.nq, bq)
  delta_b = pad_axis(delta.astype(ct), dims.q_pad, 2).reshape(b, h, dims.nq, bq)
  lse_b = safe_max(lse_b)  # empty rows: every entry is masked anyway
  qd, kd = padded_mask_data(block_mask, dims)
  bsel = jnp.arange(b) if dims.mask_batch > 1 else jnp.zeros(b, jnp.int32)
  bi = jnp.arange(b)[:, None, None]
  hi = jnp.arange(h)[None, :, None]
  hki = (jnp.arange(h) // g)[None, :, None]

  # dq: walk the kv schedule of every q-block.
  idx, kinds, counts = (mask_rows(x, dims) for x in block_mask.kv_schedule())
  q_pos = (jnp.arange(dims.nq)[:, None] * bq + jnp.arange(bq)[None, :]).astype(jnp.int32)
  q_pos = jnp.broadcast_to(q_pos, (b, h, dims.nq, bq))
  qd_al = tuple(_gather_data(x, bsel, q_pos)[..., None] for x in qd)

  def dq_body(step, dq):
    j = idx[..., step]
    kind = kinds[..., step][..., None, None]
    kj, vj = kb[bi, hki, j], vb[bi, hki, j]
    s = jnp.einsum("bhiqd,bhikd->bhiqk", qb, kj, precision=prec) * scale
    kv_pos = (j[..., None] * bk + jnp.arange(bk)).astype(jnp.int32)
    kd_al = tuple(_gather_data(x, bsel, kv_pos)[..., None, :] for x in kd)
    ok = _allowed(block_mask, dims, kind, q_pos[..., None], kv_pos[..., None, :], qd_al, kd_al)
    p = jnp.where(ok, jnp.exp(s - lse_b[..., None]), 0)
    dp = jnp.einsum("bhiqd,bhikd->bhiqk", dob, vj, precision=prec)
    ds = p * (dp - delta_b[..., None])
    return dq + jnp.einsum("bhiqk,bhikd->bhiqd", ds, kj, precision=prec)

  dq = lax.fori_loop(0, jnp.max(counts, initial=0), dq_body,
                     jnp.zeros(qb.shape, ct)) * scale

  # dk, dv: walk the transposed schedule of every kv-block (per query head).
  tidx, tkinds, tcounts = (mask_rows(x, dims) for x in block_mask.q_schedule())
  kv_pos = (jnp.arange(dims.nk)[:, None] * bk + jnp.arange(bk)[None, :]).astype(jnp.int32)
  kv_pos = jnp.broadcast_to(kv_pos, (b, h, dims.nk, bk))
  kd_al = tuple(_gather_data(x, bsel, kv_pos)[..., None, :] for x in kd)
  kh = kb[bi, hki, jnp.arange(dims.nk)[None, None, :]]   # [B, Hq, nk, bk, D]
  vh = vb[bi, hki, jnp.arange(dims.nk)[None, None, :]]

  def dkv_body(step, carry):
    dk, dv = carry
    i = tidx[..., step]                                  # [B, Hq, nk]
    kind = tkinds[..., step][..., None, None]
    qi, doi = qb[bi, hi, i], dob[bi, hi, i]              # [B, Hq, nk, bq, D]
    lse_i, delta_i = lse_b[bi, hi, i], delta_b[bi, hi, i]  # [B, Hq, nk, bq]
    qp = (i[..., None] * bq + jnp.arange(bq)).astype(jnp.int32)
    qd_i = tuple(_gather_data(x, bsel, qp)[..., None] for x in qd)
    s = jnp.einsum("bhjqd,bhjkd->bhjqk", qi, kh, precision=prec) * scale
    ok = _allowed(block_mask, dims, kind, qp[..., None], kv_pos[..., None, :], qd_i, kd_al)
    p = jnp.where(ok, jnp.exp(s - lse_i[..., None]), 0)
    dv = dv + jnp.einsum("bhjqk,bhjqd->bhjkd", p, doi, precision=prec)
    dp = jnp.einsum("bhjqd,bhjkd->bhjqk", doi, vh, precision=prec)
    ds = p * (dp - delta_i[..., None])
    dk = dk + jnp.einsum("bhjqk,bhjqd->bhjkd", ds, qi, precision=prec)
    return dk, dv

  zeros = jnp.zeros(kh.shape, ct)
  dk, dv = lax.fori_loop(0, jnp.max(tcounts, initial=0), dkv_body, (zeros, zeros))
  dk = dk.reshape(b, dims.num_kv_heads, g, dims.nk, bk, dims.head_dim).sum(2) * scale
  dv = dv.reshape(b, dims.num_kv_heads, g, dims.nk, bk, dims.head_dim).sum(2)
  return (_unblocked(dq, dims.q_len).astype(q.dtype), _unblocked(dk, dims.kv_len).astype(k.dtype),
          _unblocked(dv, dims.kv_len).astype(v.dtype))

