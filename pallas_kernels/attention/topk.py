"""Dynamic top-k kv-block selection per q-block (SeerAttention-style), jit-able with a fixed k.

Scores for every (q-block, kv-block) pair come from pooled queries and keys
(:func:`pooled_block_scores`, optionally through a learned gate that projects
the pooled vectors first); :func:`topk_block_mask` keeps the ``k`` best kv-blocks
of every q-block among those a base mask allows (e.g. causal), so the result is
``and_masks(selection, base)``. :func:`block_attention_targets` gives the
pooled attention map SeerAttention distils a learned gate towards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention.block_mask import EMPTY, BlockMask
from pallas_kernels.attention.combinators import and_masks
from pallas_kernels.attention.constructors import block_mask_from_blocks

__all__ = ["pool_blocks", "pooled_block_scores", "topk_block_mask", "block_attention_targets"]


def pool_blocks(x: jax.Array, block: int, *, pool: str = "mean") -> jax.Array:
  """Pools ``[batch, seq, heads, dim]`` into ``[batch, heads, n_blocks, dim]``.

  ``pool`` is ``"mean"`` (over the in-bounds tokens of each block) or ``"max"``.

  >>> pool_blocks(jnp.arange(6.).reshape(1, 6, 1, 1), 4)[0, 0, :, 0].tolist()
  [1.5, 4.5]
  """
  b, s, h, d = x.shape
  n = -(-s // block)
  valid = (jnp.arange(n * block) < s).reshape(n, block)
  xp = jnp.pad(x, ((0, 0), (0, n * block - s), (0, 0), (0, 0))).reshape(b, n, block, h, d)
  if pool == "mean":
    xs = jnp.sum(xp.astype(jnp.float32), axis=2)
    out = xs / jnp.sum(valid, axis=1)[None, :, None, None]
  elif pool == "max":
    neg = jnp.finfo(jnp.float32).min
    out = jnp.max(jnp.where(valid[None, :, :, None, None], xp.astype(jnp.float32), neg), axis=2)
  else:
    raise ValueError(f"pool: expected 'mean' or 'max', got {pool!r}")
  return jnp.transpose(out, (0, 2, 1, 3))


def pooled_block_scores(q: jax.Array, k: jax.Array, *, q_block: int, kv_block: int | None = None,
                        pool: str = "mean", scale: float | None = None) -> jax.Array:
  """Block scores ``[batch, heads, nq, nk]`` from pooled queries and keys (GQA aware).

  >>> q = jnp.ones((1, 8, 2, 4)); k = jnp.ones((1, 8, 1, 4))
  >>> pooled_block_scores(q, k, q_block=4).shape
  (1, 2, 2, 2)
  """
  kv_block = q_block if kv_block is None else kv_block
  hq, hk = q.shape[2], k.shape[2]
  if hq % hk:
    raise ValueError(f"k: {hk} kv heads do not divide {hq} query heads")
  qp = pool_blocks(q, q_block, pool=pool)
  kp = pool_blocks(k, kv_block, pool=pool)
  kp = jnp.repeat(kp, hq // hk, axis=1)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return jnp.einsum("bhid,bhjd->bhij", qp, kp, precision="highest") * scale


def topk_block_mask(scores: jax.Array, k: int, *, q_len: int, kv_len: int | None = None,
                    q_block: int = 128, kv_block: int | None = None,
                    base: BlockMask | None = None) -> BlockMask:
  """Keeps the ``k`` highest-scoring kv-blocks of every q-block (fewer if ``base`` allows fewer).

  Args:
    scores: float ``[nq, nk]``, ``[H', nq, nk]`` or ``[B', H', nq, nk]`` block scores.
    k: static number of kv-blocks per q-block.
    q_len, kv_len, q_block, kv_block: sizes of the mask.
    base: optional mask restricting the candidates; the result is intersected with it.

  >>> s = jnp.array([[3., 1., 2.], [0., 5., 4.]])
  >>> topk_block_mask(s, 2, q_len=8, kv_len=12, q_block=4).full_kv_indices[0, 0, :, :2].tolist()
  [[0, 2], [1, 2]]
  """
  kv_len = q_len if kv_len is None else kv_len
  kv_block = q_block if kv_block is None else kv_block
  nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
  scores = jnp.asarray(scores, jnp.float32)
  if scores.ndim not in (2, 3, 4) or scores.shape[-2:] != (nq, nk):
    raise ValueError(f"scores: expected [..., {nq}, {nk}] block scores for q_len={q_len}, "
                     f"kv_len={kv_len}, q_block={q_block}, kv_block={kv_block}; got "
                     f"{scores.shape}")
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ValueError(f"k: expected a static Python int >= 1, got {k!r}")
  scores = scores.reshape((1,) * (4 - scores.ndim) + scores.shape)
  allowed = jnp.ones(scores.shape, bool)
  if base is not None:
    bs = base.block_states()
    heads = max(bs.shape[1], scores.shape[1])
    if heads % bs.shape[1] or heads % scores.shape[1]:
      raise ValueError(f"base: {bs.shape[1]} mask heads and {scores.shape[1]} score heads "
                       "do not divide each other")
    bs = jnp.repeat(bs, heads // bs.shape[1], axis=1)
    scores = jnp.repeat(scores, heads // scores.shape[1], axis=1)
    allowed = bs != EMPTY
    shape = jnp.broadcast_shapes(allowed.shape, scores.shape)
    allowed, scores = jnp.broadcast_to(allowed, shape), jnp.broadcast_to(scores, shape)
  masked = jnp.where(allowed, scores, -jnp.inf)
  kk = min(k, nk)
  top_vals, top_idx = jax.lax.top_k(masked, kk)
  hit = jax.nn.one_hot(top_idx, nk, dtype=jnp.int8) * (top_vals > -jnp.inf)[..., None]
  selected = jnp.sum(hit, axis=-2) > 0
  sel = block_mask_from_blocks(selected, q_len=q_len, kv_len=kv_len, q_block=q_block,
                               kv_block=kv_block)
  return sel if base is None else and_masks(sel, base)


def block_attention_targets(q: jax.Array, k: jax.Array, *, q_block: int,
                            kv_block: int | None = None, base: BlockMask | None = None,
                            scale: float | None = None) -> jax.Array:
  """Max-pooled softmax attention per block ``[batch, heads, nq, nk]`` (gate distillation target).

  Row-normalised over kv-blocks, as SeerAttention's training target for the
  gate. Computed one q-block at a time (memory ``q_block * kv_len`` per head);
  a ``base`` mask is expanded to tokens (``q_len * kv_len``), so keep it small.

  >>> q = jnp.ones((1, 8, 1, 4)); k = jnp.ones((1, 8, 1, 4))
  >>> block_attention_targets(q, k, q_block=4)[0, 0].tolist()
  [[0.5, 0.5], [0.5, 0.5]]
  """
  kv_block = q_block if kv_block is None else kv_block
  b, sq, hq, d = q.shape
  sk, hk = k.shape[1], k.shape[2]
  nq, nk = -(-sq // q_block), -(-sk // kv_block)
  scale = d ** -0.5 if scale is None else scale
  dense = None if base is None else base.to_dense()
  qp = jnp.pad(q, ((0, 0), (0, nq * q_block - sq), (0, 0), (0, 0))).astype(jnp.float32)
  kf = jnp.repeat(k.astype(jnp.float32), hq // hk, axis=2)

  def row(i):
    qi = jax.lax.dynamic_slice_in_dim(qp, i * q_block, q_block, axis=1)
    s = jnp.einsum("bqhd,bkhd->bhqk", qi, kf, precision="highest") * scale
    if dense is not None:
      rows = jax.lax.dynamic_slice_in_dim(
          jnp.pad(dense, ((0, 0), (0, 0), (0, nq * q_block - sq), (0, 0))), i * q_block,
          q_block, axis=2)
      s = jnp.where(rows, s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0))
    p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
    p = jnp.pad(p, ((0, 0), (0, 0), (0, 0), (0, nk * kv_block - sk)))
    pooled = jnp.max(p.reshape(p.shape[:-1] + (nk, kv_block)), axis=-1)
    q_valid = (i * q_block + jnp.arange(q_block)) < sq
    pooled = jnp.max(jnp.where(q_valid[None, None, :, None], pooled, 0.0), axis=2)
    return pooled

  t = jax.lax.map(row, jnp.arange(nq))
  t = jnp.transpose(t, (1, 2, 0, 3))
  return t / jnp.maximum(jnp.sum(t, axis=-1, keepdims=True), 1e-30)

