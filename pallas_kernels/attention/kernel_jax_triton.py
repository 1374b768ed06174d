"""Block-sparse flash attention in the Triton language, called through ``jax_triton.triton_call``.

The ``"jax_triton"`` backend: the route for NVIDIA GPUs before Hopper (sm_80 A100, sm_86/sm_89
Ampere and Ada) that does not depend on Pallas' Triton lowering (deprecated from jax 0.11). Same
:class:`~pallas_kernels.attention.BlockMask`, outputs and backward as
:mod:`pallas_kernels.attention.kernel_triton` (FlashAttention-2):

* forward: one program per (batch, head, q-block); it walks the q-block's full kv-blocks, then its
  partial ones, with an online softmax, and saves the float32 log-sum-exp;
* dQ: the same grid, recomputing the probabilities from the log-sum-exp;
* dK/dV: one program per (batch, kv head, kv-block), walking the transposed lists of every query
  head of the GQA group (no extra reduction).

Token-level masks: a Triton kernel cannot call the mask's ``jnp`` function, so the
:class:`~pallas_kernels.attention.MaskMod` is evaluated once per call in XLA into a bit mask
``[B', q_pad, ceil(kv_pad / 32)]`` int32 (``B' * q_len * kv_len / 8`` bytes: 2 MiB at 4096 x 4096),
read only on partial blocks (the load is predicated off on full ones). Any mask function works.

Rows and the head dim need no padding: loads and stores are masked (head dims are rounded up to a
power of two >= 16 inside the kernel). Float32 inputs multiply in IEEE float32. ``interpret=True``
runs the same kernels in Triton's interpreter (any platform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _jax_triton
from pallas_kernels.attention._common import Dims, padded_mask_data
from pallas_kernels.attention.block_mask import BlockMask

__all__ = ["flash_fwd", "flash_bwd", "token_mask_bits"]

# ImportError saying what to install when the triton extra is missing.
triton, tl = _jax_triton.require()


@triton.jit
def _block_index(full_ref, part_ref, row_off, s, n_full):
  """The ``s``-th visited block of a merged (full, then partial) list."""
  jf = tl.load(full_ref + row_off + s, mask=s < n_full, other=0)
  jp = tl.load(part_ref + row_off + s - n_full, mask=s >= n_full, other=0)
  return tl.where(s < n_full, jf, jp)


@triton.jit
def _allowed(bits_ref, bits_row, q_pos, kv_pos, past_full, SKV: tl.constexpr, W: tl.constexpr,
             HAS_MASK: tl.constexpr):
  """Token mask of one block: the bit mask on partial blocks (``past_full >= 0``: the step's
  position past the full blocks), and keys inside ``kv_len``."""
  # Triton's interpreter gives ``block & scalar`` of int1 values an int32 result, which a load
  # mask rejects: the scalar predicate goes through tl.where.
  in_rows = q_pos[:, None] >= 0
  in_keys = kv_pos[None, :] < SKV
  ok = in_rows & in_keys
  if HAS_MASK:
    partial = past_full >= 0
    word_ptr = bits_ref + (bits_row + q_pos[:, None]).to(tl.int64) * W + (kv_pos[None, :] >> 5)
    words = tl.load(word_ptr, mask=tl.where(partial, ok, False), other=-1)
    bit = (words >> (kv_pos[None, :] & 31)) & 1
    ok = ok & (bit != 0)
  return ok


@triton.jit
def _q_block_program(G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BQ: tl.constexpr,
                     NQ: tl.constexpr, MB: tl.constexpr, HM: tl.constexpr, HPM: tl.constexpr,
                     BITS_B: tl.constexpr):
  """What a forward / dQ program (batch ``b``, head ``h``, q-block ``i``) addresses: ``b, h``,
  its mask row, bit-mask row and kv head, its query rows, head-dim lanes and their mask."""
  b = tl.program_id(0)
  h = tl.program_id(1)
  i = tl.program_id(2)
  row = ((b if MB > 1 else 0) * HM + h // HPM) * NQ + i
  bits_row = (b if BITS_B > 1 else 0) * (NQ * BQ)
  ds = tl.arange(0, DP)
  return b, h, row, bits_row, h // G, i * BQ + tl.arange(0, BQ), ds, ds < D


@triton.jit
def _q_rows(b, h, qs, ds, d_ok, H: tl.constexpr, SQ: tl.constexpr, D: tl.constexpr):
  """Offsets and load mask of query rows ``qs`` of head ``h`` in a ``[B, SQ, H, D]`` array."""
  q_off = ((b * SQ + qs[:, None]).to(tl.int64) * H + h) * D + ds[None, :]
  return q_off, (qs[:, None] < SQ) & d_ok[None, :]


@triton.jit
def _load_q_rows(q_ref, do_ref, lse_ref, delta_ref, b, h, qs, ds, d_ok, H: tl.constexpr,
                 SQ: tl.constexpr, D: tl.constexpr):
  """The backward's per-row inputs: ``q, dO, lse (-inf -> 0), delta, offsets, mask``."""
  q_off, q_mask = _q_rows(b, h, qs, ds, d_ok, H, SQ, D)
  q = tl.load(q_ref + q_off, mask=q_mask, other=0.0)
  do = tl.load(do_ref + q_off, mask=q_mask, other=0.0)
  q_ok = qs < SQ
  lse = tl.load(lse_ref + (b * H + h) * SQ + qs, mask=q_ok, other=0.0)
  lse = tl.where(lse == float("-inf"), 0.0, lse)
  delta = tl.load(delta_ref + (b * H + h) * SQ + qs, mask=q_ok, other=0.0)
  return q, do, lse, delta, q_off, q_mask


@triton.jit
def _load_kv(k_ref, v_ref, b, hk, kvs, ds, d_ok, HK: tl.constexpr, SKV: tl.constexpr,
             D: tl.constexpr):
  """Key rows ``kvs`` of kv head ``hk``: ``k, v, offsets, mask`` (``[B, SKV, HK, D]`` arrays)."""
  kv_off = ((b * SKV + kvs[:, None]).to(tl.int64) * HK + hk) * D + ds[None, :]
  kv_mask = (kvs[:, None] < SKV) & d_ok[None, :]
  kt = tl.load(k_ref + kv_off, mask=kv_mask, other=0.0)
  vt = tl.load(v_ref + kv_off, mask=kv_mask, other=0.0)
  return kt, vt, kv_off, kv_mask


@triton.jit
def fwd_kernel(q_ref, k_ref, v_ref, fc_ref, fi_ref, pc_ref, pi_ref, bits_ref, o_ref, lse_ref,
               H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               SQ: tl.constexpr, SKV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               NQ: tl.constexpr, NK: tl.constexpr, MB: tl.constexpr, HM: tl.constexpr,
               HPM: tl.constexpr, BITS_B: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr,
               SCALE: tl.constexpr, PRECISION: tl.constexpr, BKS: tl.constexpr,
               BQS: tl.constexpr):
  b, h, row, bits_row, hk, qs, ds, d_ok = _q_block_program(G, D, DP, BQ, NQ, MB, HM, HPM, BITS_B)
  q_off, q_mask = _q_rows(b, h, qs, ds, d_ok, H, SQ, D)
  q = tl.load(q_ref + q_off, mask=q_mask, other=0.0)
  acc = tl.zeros((BQ, DP), tl.float32)
  m_i = tl.full((BQ,), float("-inf"), tl.float32)
  l_i = tl.zeros((BQ,), tl.float32)
  n_full = tl.load(fc_ref + row)
  n_all = n_full + tl.load(pc_ref + row)
  for s in range(0, n_all):
    j = _block_index(fi_ref, pi_ref, row * NK, s, n_full)
    for sub in range(0, BK, BKS):  # the block's keys in sub-tiles of BKS (register pressure)
      kvs = j * BK + sub + tl.arange(0, BKS)
      kt, vt, _, _ = _load_kv(k_ref, v_ref, b, hk, kvs, ds, d_ok, H // G, SKV, D)
      sc = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * SCALE
      ok = _allowed(bits_ref, bits_row, qs, kvs, s - n_full, SKV, W, HAS_MASK)
      sc = tl.where(ok, sc, float("-inf"))
      m_new = tl.maximum(m_i, tl.max(sc, axis=1))
      m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
      p = tl.exp(sc - m_safe[:, None])
      alpha = tl.exp(m_i - m_safe)
      l_i = alpha * l_i + tl.sum(p, axis=1)
      acc = alpha[:, None] * acc + tl.dot(p.to(vt.dtype), vt, input_precision=PRECISION)
      m_i = m_new
  pos = l_i != 0.0  # rows that attend nothing: zero output, lse = -inf
  l_safe = tl.where(pos, l_i, 1.0)
  out = tl.where(pos[:, None], acc / l_safe[:, None], 0.0)
  tl.store(o_ref + q_off, out.to(o_ref.dtype.element_ty), mask=q_mask)
  lse = tl.where(pos, m_i + tl.log(l_safe), float("-inf"))
  tl.store(lse_ref + (b * H + h) * SQ + qs, lse, mask=qs < SQ)


@triton.jit
def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, fc_ref, fi_ref, pc_ref, pi_ref,
              bits_ref, dq_ref,
              H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
              SQ: tl.constexpr, SKV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
              NQ: tl.constexpr, NK: tl.constexpr, MB: tl.constexpr, HM: tl.constexpr,
              HPM: tl.constexpr, BITS_B: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr,
              SCALE: tl.constexpr, PRECISION: tl.constexpr, BKS: tl.constexpr,
              BQS: tl.constexpr):
  b, h, row, bits_row, hk, qs, ds, d_ok = _q_block_program(G, D, DP, BQ, NQ, MB, HM, HPM, BITS_B)
  q, do, lse, delta, q_off, q_mask = _load_q_rows(q_ref, do_ref, lse_ref, delta_ref, b, h, qs,
                                                  ds, d_ok, H, SQ, D)
  dq = tl.zeros((BQ, DP), tl.float32)
  n_full = tl.load(fc_ref + row)
  n_all = n_full + tl.load(pc_ref + row)
  for s in range(0, n_all):
    j = _block_index(fi_ref, pi_ref, row * NK, s, n_full)
    for sub in range(0, BK, BKS):
      kvs = j * BK + sub + tl.arange(0, BKS)
      kt, vt, _, _ = _load_kv(k_ref, v_ref, b, hk, kvs, ds, d_ok, H // G, SKV, D)
      sc = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * SCALE
      ok = _allowed(bits_ref, bits_row, qs, kvs, s - n_full, SKV, W, HAS_MASK)
      p = tl.where(ok, tl.exp(sc - lse[:, None]), 0.0)
      dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
      dsc = p * (dp - delta[:, None])
      dq = tl.dot(dsc.to(kt.dtype), kt, dq, input_precision=PRECISION)
  tl.store(dq_ref + q_off, (dq * SCALE).to(dq_ref.dtype.element_ty), mask=q_mask)


@triton.jit
def dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, fc_ref, fi_ref, pc_ref, pi_ref,
               bits_ref, dk_ref, dv_ref,
               H: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
               SQ: tl.constexpr, SKV: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
               NQ: tl.constexpr, NK: tl.constexpr, MB: tl.constexpr, HM: tl.constexpr,
               HPM: tl.constexpr, BITS_B: tl.constexpr, W: tl.constexpr, HAS_MASK: tl.constexpr,
               SCALE: tl.constexpr, PRECISION: tl.constexpr, BKS: tl.constexpr,
               BQS: tl.constexpr):
  b = tl.program_id(0)
  hk = tl.program_id(1)
  j = tl.program_id(2)
  mb = b if MB > 1 else 0
  bits_row = (b if BITS_B > 1 else 0) * (NQ * BQ)
  kvs = j * BK + tl.arange(0, BK)
  ds = tl.arange(0, DP)
  d_ok = ds < D
  kt, vt, kv_off, kv_mask = _load_kv(k_ref, v_ref, b, hk, kvs, ds, d_ok, H // G, SKV, D)
  dk = tl.zeros((BK, DP), tl.float32)
  dv = tl.zeros((BK, DP), tl.float32)
  for gi in range(0, G):
    h = hk * G + gi
    row = (mb * HM + h // HPM) * NK + j
    n_full = tl.load(fc_ref + row)
    n_all = n_full + tl.load(pc_ref + row)
    for s in range(0, n_all):
      i = _block_index(fi_ref, pi_ref, row * NQ, s, n_full)
      for sub in range(0, BQ, BQS):  # the block's queries in sub-tiles of BQS
        qs = i * BQ + sub + tl.arange(0, BQS)
        q, do, lse, delta, _, _ = _load_q_rows(q_ref, do_ref, lse_ref, delta_ref, b, h, qs, ds,
                                               d_ok, H, SQ, D)
        sc = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * SCALE
        ok = _allowed(bits_ref, bits_row, qs, kvs, s - n_full, SKV, W, HAS_MASK)
        p = tl.where(ok, tl.exp(sc - lse[:, None]), 0.0)
        dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        dsc = p * (dp - delta[:, None])
        dk = tl.dot(tl.trans(dsc.to(q.dtype)), q, dk, input_precision=PRECISION)
  tl.store(dk_ref + kv_off, (dk * SCALE).to(dk_ref.dtype.element_ty), mask=kv_mask)
  tl.store(dv_ref + kv_off, dv.to(dv_ref.dtype.element_ty), mask=kv_mask)


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def token_mask_bits(block_mask: BlockMask, dims: Dims) -> jax.Array:
  """The mask function on every (query, key) position, packed 32 keys per int32 word.

  Returns int32 ``[B'', q_pad, ceil(kv_pad / 32)]`` (``B''`` = 1 without per-token data, else the
  mask batch); bit ``k % 32`` of word ``k // 32`` is whether query ``q`` may attend key ``k``.
  A ``[1, 1, 1]`` zero array when the mask has no ``mask_mod`` (no partial blocks).

  >>> from pallas_kernels.attention import causal_mask
  >>> from pallas_kernels.attention._common import check_inputs
  >>> m = causal_mask(32, q_block=16)
  >>> x = jnp.zeros((1, 32, 1, 16))
  >>> bits = token_mask_bits(m, check_inputs(x, x, x, m))
  >>> bits.shape, [int(w) & 0xF for w in bits[0, :4, 0]]
  ((1, 32, 1), [1, 3, 7, 15])
  """
  mm = block_mask.mask_mod
  if mm is None:
    return jnp.zeros((1, 1, 1), jnp.int32)
  words = -(-dims.kv_pad // 32)
  q_pos = jnp.arange(dims.q_pad, dtype=jnp.int32)[:, None]
  kv_pos = jnp.arange(words * 32, dtype=jnp.int32)[None, :]
  qd, kd = padded_mask_data(block_mask, dims)
  kd = tuple(jnp.pad(x, ((0, 0), (0, words * 32 - x.shape[1]))) for x in kd)

  def one(q_data, kv_data):
    allowed = mm.fn(q_pos, kv_pos, tuple(x[:, None] for x in q_data),
                    tuple(x[None, :] for x in kv_data))
    return jnp.broadcast_to(allowed, (dims.q_pad, words * 32))

  allowed = jax.vmap(one)(qd, kd) if (qd or kd) else one((), ())[None]
  shifts = jnp.arange(32, dtype=jnp.uint32)
  packed = jnp.sum(allowed.reshape(*allowed.shape[:2], words, 32).astype(jnp.uint32) << shifts,
                   axis=-1, dtype=jnp.uint32)
  return jax.lax.bitcast_convert_type(packed, jnp.int32)


def _constants(q, block_mask: BlockMask, dims: Dims, bits, scale: float):
  return dict(H=dims.num_heads, G=dims.group, D=dims.head_dim,
              DP=_next_pow2(max(dims.head_dim, 16)), SQ=dims.q_len, SKV=dims.kv_len,
              BQ=dims.q_block, BK=dims.kv_block, NQ=dims.nq, NK=dims.nk, MB=dims.mask_batch,
              HM=dims.mask_heads, HPM=dims.heads_per_mask_head, BITS_B=bits.shape[0],
              W=bits.shape[2], HAS_MASK=block_mask.mask_mod is not None, SCALE=float(scale),
              PRECISION="ieee" if q.dtype == jnp.float32 else "tf32",
              # Sub-tiles of a visited block, the tiles of the FlashAttention-2 Triton kernels on
              # sm_80: the forward and dQ take 64 keys at a time, dK/dV 32 queries at a time.
              BKS=min(dims.kv_block, 64), BQS=min(dims.q_block, 32))


def _warps(dims: Dims, num_warps: int | None) -> int:
  if num_warps is not None:
    return num_warps
  # 4 warps spill with 128-row tiles even at head_dim 64 (benchmarks/compile_jax_triton.py).
  return 8 if max(dims.q_block, dims.kv_block) >= 128 or dims.head_dim > 64 else 4


def flash_fwd(q, k, v, block_mask: BlockMask, dims: Dims, *, scale: float, interpret: bool = False,
              num_warps: int | None = None, num_stages: int | None = None):
  """Forward kernel; returns ``(out [B, Sq, H, D], lse [B, H, Sq] float32)``.

  >>> from pallas_kernels.attention import causal_mask
  >>> from pallas_kernels.attention._common import check_inputs
  >>> m = causal_mask(32, q_block=16)
  >>> x = jnp.ones((1, 32, 1, 16))
  >>> out, lse = flash_fwd(x, x, x, m, check_inputs(x, x, x, m), scale=0.25, interpret=True)
  >>> out.shape, round(float(lse[0, 0, 31]), 4)  # 32 equal logits of 4.0
  ((1, 32, 1, 16), 7.4657)
  """
  bits = token_mask_bits(block_mask, dims)
  bm = block_mask
  return _jax_triton.call(
      fwd_kernel, q, k, v, bm.full_kv_counts, bm.full_kv_indices, bm.partial_kv_counts,
      bm.partial_kv_indices, bits,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((dims.batch, dims.num_heads, dims.q_len), jnp.float32)],
      grid=(dims.batch, dims.num_heads, dims.nq), interpret=interpret,
      num_warps=_warps(dims, num_warps), num_stages=2 if num_stages is None else num_stages,
      name="block_sparse_attention_fwd", **_constants(q, bm, dims, bits, scale))


def flash_bwd(q, k, v, d_out, lse, delta, block_mask: BlockMask, dims: Dims, *, scale: float,
              interpret: bool = False, num_warps: int | None = None,
              num_stages: int | None = None):
  """dQ and dK/dV kernels; ``delta = rowsum(out * d_out) - d_lse`` ``[B, H, Sq]`` float32.

  >>> from pallas_kernels.attention import causal_mask
  >>> from pallas_kernels.attention._common import check_inputs
  >>> m = causal_mask(32, q_block=16)
  >>> x = jnp.ones((1, 32, 1, 16))
  >>> dims = check_inputs(x, x, x, m)
  >>> out, lse = flash_fwd(x, x, x, m, dims, scale=0.25, interpret=True)
  >>> delta = jnp.einsum("bqhd,bqhd->bhq", out, x)
  >>> dq, dk, dv = flash_bwd(x, x, x, x, lse, delta, m, dims, scale=0.25, interpret=True)
  >>> float(jnp.abs(dq).max()), round(float(dv[0, 0, 0, 0]), 4)  # H_31 = 1 + 1/2 + ... + 1/32
  (0.0, 4.0585)
  """
  bits = token_mask_bits(block_mask, dims)
  bm = block_mask
  consts = _constants(q, bm, dims, bits, scale)
  warps = _warps(dims, num_warps)
  stages = 2 if num_stages is None else num_stages
  lse = lse.astype(jnp.float32)
  delta = delta.astype(jnp.float32)
  (dq,) = _jax_triton.call(
      dq_kernel, q, k, v, d_out, lse, delta, bm.full_kv_counts, bm.full_kv_indices,
      bm.partial_kv_counts, bm.partial_kv_indices, bits,
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
      grid=(dims.batch, dims.num_heads, dims.nq), interpret=interpret, num_warps=warps,
      num_stages=stages, name="block_sparse_attention_dq", **consts)
  dk, dv = _jax_triton.call(
      dkv_kernel, q, k, v, d_out, lse, delta, bm.full_q_counts, bm.full_q_indices,
      bm.partial_q_counts, bm.partial_q_indices, bits,
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      grid=(dims.batch, dims.num_kv_heads, dims.nk), interpret=interpret, num_warps=warps,
      num_stages=stages, name="block_sparse_attention_dkv", **consts)
  return dq, dk, dv
