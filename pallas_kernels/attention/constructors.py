"""Block-mask constructors: causal, sliding window, documents, prefix-LM, any mask_fn, any block matrix.

Token-level constructors classify every (q-block, kv-block) pair by evaluating
the token mask on the whole tile (one q-block row at a time, so memory stays at
``q_block * kv_len``): empty, full (every in-bounds pair attends) or partial.
They are jit-able, and data such as segment ids or prefix lengths may be traced.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.block_mask import EMPTY, FULL, PARTIAL, BlockMask
from pallas_kernels.attention.mask_fns import (CausalFn, MaskMod, PrefixLMFn, SegmentFn,
                                               SlidingWindowFn, UserFn)

__all__ = [
    "classify_blocks",
    "causal_mask",
    "sliding_window_mask",
    "document_mask",
    "segment_ids_from_lengths",
    "prefix_lm_mask",
    "mask_from_fn",
    "mask_from_mod",
    "block_mask_from_blocks",
    "full_mask",
]


def _check_int(name: str, v, *, minimum: int = 1) -> int:
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
    raise ValueError(f"{name}: expected a Python int >= {minimum}, got {v!r}")
  return int(v)


def _blocks(q_len, kv_len, q_block, kv_block):
  q_len = _check_int("q_len", q_len)
  kv_len = q_len if kv_len is None else _check_int("kv_len", kv_len)
  q_block = _check_int("q_block", q_block)
  kv_block = q_block if kv_block is None else _check_int("kv_block", kv_block)
  return q_len, kv_len, q_block, kv_block


@functools.partial(jax.jit, static_argnames=("q_len", "kv_len", "q_block", "kv_block"))
def classify_blocks(mask_mod: MaskMod, *, q_len: int, kv_len: int, q_block: int,
                    kv_block: int) -> jax.Array:
  """Block states ``[B', 1, nq, nk]`` (0 empty, 1 partial, 2 full) of a token mask.

  A block is full when every in-bounds token pair attends, empty when none does.

  >>> classify_blocks(MaskMod(CausalFn()), q_len=4, kv_len=4, q_block=2, kv_block=2)[0, 0].tolist()
  [[1, 0], [2, 1]]
  """
  nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
  qp, kp = nq * q_block - q_len, nk * kv_block - kv_len
  q_data = tuple(jnp.pad(x, ((0, 0), (0, qp))).reshape(x.shape[0], nq, q_block)
                 for x in mask_mod.q_data)
  kv_data = tuple(jnp.pad(x, ((0, 0), (0, kp))) for x in mask_mod.kv_data)
  kv_pos = jnp.arange(nk * kv_block, dtype=jnp.int32)[None, :]
  kv_valid = kv_pos < kv_len

  def one_batch(qd, kd):
    kd = tuple(x[None, :] for x in kd)

    def row(args):
      i, qrow = args
      q_pos = i * q_block + jnp.arange(q_block, dtype=jnp.int32)[:, None]
      q_valid = q_pos < q_len
      m = mask_mod.fn(q_pos, kv_pos, tuple(x[:, None] for x in qrow), kd)
      m = jnp.broadcast_to(m, (q_block, nk * kv_block)) & kv_valid
      in_bounds = jnp.broadcast_to(q_valid & kv_valid, m.shape)
      any_ = jnp.any((m & q_valid).reshape(q_block, nk, kv_block), axis=(0, 2))
      all_ = jnp.all((m | ~in_bounds).reshape(q_block, nk, kv_block), axis=(0, 2))
      return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int8)

    rows_at_once = max(1, min(nq, (1 << 22) // (q_block * nk * kv_block)))
    xs = (jnp.arange(nq, dtype=jnp.int32), qd)
    return jax.lax.map(row, xs, batch_size=rows_at_once)

  if q_data or kv_data:
    states = jax.vmap(one_batch)(q_data, kv_data)
  else:
    states = one_batch((), ())[None]
  return states[:, None]


def mask_from_mod(mask_mod: MaskMod, q_len: int, kv_len: int | None = None, *,
                  q_block: int = 128, kv_block: int | None = None) -> BlockMask:
  """Block mask of a :class:`MaskMod` (token function + per-token data).

  >>> m = mask_from_mod(MaskMod(CausalFn()), 8, q_block=4)
  >>> m.block_states()[0, 0].tolist()
  [[1, 0], [2, 1]]
  """
  q_len, kv_len, q_block, kv_block = _blocks(q_len, kv_len, q_block, kv_block)
  if not isinstance(mask_mod, MaskMod):
    raise TypeError(f"mask_mod: expected a MaskMod, got {type(mask_mod).__name__}")
  states = classify_blocks(mask_mod, q_len=q_len, kv_len=kv_len, q_block=q_block,
                           kv_block=kv_block)
  return BlockMask.from_states(states, q_len=q_len, kv_len=kv_len, q_block=q_block,
                               kv_block=kv_block, mask_mod=mask_mod)


def causal_mask(q_len: int, kv_len: int | None = None, *, q_block: int = 128,
                kv_block: int | None = None, q_offset: int = 0) -> BlockMask:
  """Causal mask: query ``i`` (at absolute position ``i + q_offset``) sees keys ``<=`` it.

  ``q_offset=kv_len - q_len`` aligns the queries with the end of the keys
  (chunked prefill); the default aligns them with the start.

  >>> causal_mask(8, q_block=4).block_states()[0, 0].tolist()
  [[1, 0], [2, 1]]
  """
  return mask_from_mod(MaskMod(CausalFn(int(q_offset))), q_len, kv_len, q_block=q_block,
                       kv_block=kv_block)


def sliding_window_mask(q_len: int, kv_len: int | None = None, *, window: int,
                        causal: bool = True, q_block: int = 128, kv_block: int | None = None,
                        q_offset: int = 0) -> BlockMask:
  """Local attention of size ``window``: keys ``q - window < k <= q`` (or ``|q - k| < window``).

  >>> m = sliding_window_mask(16, window=4, q_block=4)
  >>> m.block_states()[0, 0].tolist()
  [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
  """
  window = _check_int("window", window)
  return mask_from_mod(MaskMod(SlidingWindowFn(window, int(q_offset), bool(causal))), q_len,
                       kv_len, q_block=q_block, kv_block=kv_block)


def segment_ids_from_lengths(lengths, seq_len: int) -> jax.Array:
  """Segment ids ``[..., seq_len]`` for documents of the given lengths; -1 past their sum.

  >>> segment_ids_from_lengths(jnp.array([2, 3]), 6).tolist()
  [0, 0, 1, 1, 1, -1]
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  ends = jnp.cumsum(lengths, axis=-1)
  pos = jnp.arange(seq_len, dtype=jnp.int32)
  seg = jnp.sum(pos[..., None, :] >= ends[..., :, None], axis=-2, dtype=jnp.int32)
  return jnp.where(pos < ends[..., -1:], seg, -1)


def document_mask(segment_ids, kv_segment_ids=None, *, causal: bool = False,
                  q_block: int = 128, kv_block: int | None = None, q_offset: int = 0) -> BlockMask:
  """Block-diagonal document (packed sequence) mask from segment ids.

  Args:
    segment_ids: int ``[q_len]`` or ``[batch, q_len]`` query segment ids; a negative
      id marks padding (attends to nothing).
    kv_segment_ids: key segment ids (default: ``segment_ids``, self-attention).
    causal: also apply a causal mask inside the documents.
    q_block, kv_block: block sizes.
    q_offset: absolute position of query 0 for ``causal``.

  >>> m = document_mask(jnp.array([0, 0, 0, 1, 1, 1, 2, 2]), q_block=2)
  >>> m.block_states()[0, 0].tolist()
  [[2, 1, 0, 0], [1, 1, 1, 0], [0, 1, 2, 0], [0, 0, 0, 2]]
  """
  q_seg = jnp.asarray(segment_ids)
  kv_seg = q_seg if kv_segment_ids is None else jnp.asarray(kv_segment_ids)
  for name, x in (("segment_ids", q_seg), ("kv_segment_ids", kv_seg)):
    if x.ndim not in (1, 2) or not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name}: expected integer ids of shape [len] or [batch, len], got "
                       f"{x.dtype}{list(x.shape)}")
  q_seg = jnp.atleast_2d(q_seg).astype(jnp.int32)
  kv_seg = jnp.atleast_2d(kv_seg).astype(jnp.int32)
  if q_seg.shape[0] != kv_seg.shape[0] and 1 not in (q_seg.shape[0], kv_seg.shape[0]):
    raise ValueError(f"kv_segment_ids: batch {kv_seg.shape[0]} does not match segment_ids "
                     f"batch {q_seg.shape[0]}")
  b = max(q_seg.shape[0], kv_seg.shape[0])
  q_seg = jnp.broadcast_to(q_seg, (b, q_seg.shape[1]))
  kv_seg = jnp.broadcast_to(kv_seg, (b, kv_seg.shape[1]))
  mm = MaskMod(SegmentFn(bool(causal), int(q_offset)), (q_seg,), (kv_seg,))
  return mask_from_mod(mm, q_seg.shape[1], kv_seg.shape[1], q_block=q_block, kv_block=kv_block)


def prefix_lm_mask(q_len: int, kv_len: int | None = None, *, prefix_len, q_block: int = 128,
                   kv_block: int | None = None, q_offset: int = 0) -> BlockMask:
  """Prefix-LM: bidirectional over the first ``prefix_len`` keys, causal after.

  Args:
    q_len, kv_len: sequence lengths.
    prefix_len: int, or int array ``[batch]`` (may be traced: one trace for all values).
    q_block, kv_block: block sizes.
    q_offset: absolute position of query 0.

  >>> prefix_lm_mask(8, prefix_len=6, q_block=4).block_states()[0, 0].tolist()
  [[2, 1], [2, 1]]
  """
  q_len, kv_len, q_block, kv_block = _blocks(q_len, kv_len, q_block, kv_block)
  prefix = jnp.asarray(prefix_len, jnp.int32)
  if prefix.ndim > 1:
    raise ValueError(f"prefix_len: expected an int or an int array [batch], got shape "
                     f"{prefix.shape}")
  prefix = jnp.atleast_1d(prefix)
  is_prefix = (jnp.arange(kv_len, dtype=jnp.int32)[None, :] < prefix[:, None]).astype(jnp.int32)
  mm = MaskMod(PrefixLMFn(int(q_offset)), (), (is_prefix,))
  return mask_from_mod(mm, q_len, kv_len, q_block=q_block, kv_block=kv_block)


def mask_from_fn(mask_fn: Callable, q_len: int, kv_len: int | None = None, *,
                 q_block: int = 128, kv_block: int | None = None) -> BlockMask:
  """Block mask of an arbitrary token-level ``mask_fn(q_idx, kv_idx) -> bool``.

  ``mask_fn`` gets int32 absolute positions (broadcastable arrays) and must use
  elementwise jnp operations only; it is evaluated inside partial blocks by every
  kernel. Reuse the same function object to avoid retracing.

  >>> m = mask_from_fn(lambda q, k: k < 2, 8, q_block=4)
  >>> m.block_states()[0, 0].tolist()
  [[1, 0], [1, 0]]
  """
  if not callable(mask_fn):
    raise TypeError(f"mask_fn: expected a callable (q_idx, kv_idx) -> bool, got {mask_fn!r}")
  return mask_from_mod(MaskMod(UserFn(mask_fn)), q_len, kv_len, q_block=q_block,
                       kv_block=kv_block)


def block_mask_from_blocks(blocks, *, q_len: int, kv_len: int | None = None,
                           q_block: int = 128, kv_block: int | None = None) -> BlockMask:
  """Block-level mask from a boolean block matrix (every selected block is full).

  Args:
    blocks: bool ``[nq, nk]``, ``[H', nq, nk]`` or ``[B', H', nq, nk]``.
    q_len, kv_len: sequence lengths; q_block, kv_block: block sizes.

  >>> m = block_mask_from_blocks(jnp.array([[True, False], [True, True]]), q_len=8, q_block=4)
  >>> m.full_kv_counts.tolist()
  [[[1, 2]]]
  """
  q_len, kv_len, q_block, kv_block = _blocks(q_len, kv_len, q_block, kv_block)
  blocks = jnp.asarray(blocks)
  if blocks.dtype != jnp.bool_:
    raise TypeError(f"blocks: expected a boolean block matrix, got {blocks.dtype}")
  if blocks.ndim not in (2, 3, 4):
    raise ValueError(f"blocks: expected [nq, nk], [H', nq, nk] or [B', H', nq, nk], got "
                     f"shape {blocks.shape}")
  blocks = blocks.reshape((1,) * (4 - blocks.ndim) + blocks.shape)
  states = jnp.where(blocks, FULL, EMPTY).astype(jnp.int8)
  return BlockMask.from_states(states, q_len=q_len, kv_len=kv_len, q_block=q_block,
                               kv_block=kv_block)


def full_mask(q_len: int, kv_len: int | None = None, *, q_block: int = 128,
              kv_block: int | None = None) -> BlockMask:
  """Dense mask: every block visited and full.

  >>> float(full_mask(8, q_block=4).density())
  1.0
  """
  q_len, kv_len, q_block, kv_block = _blocks(q_len, kv_len, q_block, kv_block)
  nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
  return block_mask_from_blocks(jnp.ones((nq, nk), bool), q_len=q_len, kv_len=kv_len,
                                q_block=q_block, kv_block=kv_block)
