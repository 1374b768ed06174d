"""Combinators: intersection and union of block masks.

Block states combine exactly (``and``: min, ``or``: max of 0 empty < 1 partial
< 2 full); token functions combine with :class:`AndFn` / :class:`OrFn`.

Rules that keep the token-level result exact:
  * ``and_masks`` accepts any masks. Intersecting with a block-level mask (no
    token function, e.g. top-k or an arbitrary block matrix) makes the result's
    token function *inexact* (it is only right inside the visited blocks).
  * ``or_masks`` needs every part to be either token-level and exact, or all parts
    block-level: a union must know each part's token mask in blocks that part
    does not visit.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.attention.block_mask import BlockMask
from pallas_kernels.attention.mask_fns import AndFn, MaskMod, OrFn

__all__ = ["and_masks", "or_masks"]


def _common(masks, name):
  if not masks:
    raise ValueError(f"{name}: expected at least one BlockMask")
  for i, m in enumerate(masks):
    if not isinstance(m, BlockMask):
      raise TypeError(f"{name}: argument {i} is a {type(m).__name__}, expected a BlockMask")
  ref = masks[0]
  for i, m in enumerate(masks[1:], 1):
    a = (m.q_len, m.kv_len, m.q_block, m.kv_block)
    b = (ref.q_len, ref.kv_len, ref.q_block, ref.kv_block)
    if a != b:
      raise ValueError(f"{name}: mask {i} has (q_len, kv_len, q_block, kv_block)={a} but mask 0 "
                       f"has {b}; build all masks with the same lengths and block sizes")
  batch = {m.batch for m in masks} - {1}
  if len(batch) > 1:
    raise ValueError(f"{name}: mask batch sizes {sorted(batch)} differ; use 1 or one batch size")
  b = batch.pop() if batch else 1
  heads = max(m.num_heads for m in masks)
  for i, m in enumerate(masks):
    if heads % m.num_heads:
      raise ValueError(f"{name}: mask {i} has {m.num_heads} heads, which does not divide "
                       f"{heads} (another mask's heads); use head counts that divide each other")
  states = []
  for m in masks:
    s = m.block_states()
    s = jnp.repeat(s, heads // m.num_heads, axis=1)
    states.append(jnp.broadcast_to(s, (b,) + s.shape[1:]))
  return states, b


def _combine_mods(mods, b, cls, exact):
  mods = [mm.broadcast_batch(b) for mm in mods]
  if len(mods) == 1:
    return MaskMod(mods[0].fn, mods[0].q_data, mods[0].kv_data, exact)
  fn = cls(tuple(mm.fn for mm in mods), tuple(len(mm.q_data) for mm in mods),
           tuple(len(mm.kv_data) for mm in mods))
  q_data = sum((mm.q_data for mm in mods), ())
  kv_data = sum((mm.kv_data for mm in mods), ())
  return MaskMod(fn, q_data, kv_data, exact)


def and_masks(*masks: BlockMask) -> BlockMask:
  """Intersection: a token attends when it attends in every mask.

  >>> from pallas_kernels.attention import causal_mask, sliding_window_mask
  >>> m = and_masks(causal_mask(16, q_block=4),
  ...               sliding_window_mask(16, window=4, causal=False, q_block=4))
  >>> m.block_states()[0, 0, 3].tolist()
  [0, 0, 1, 1]
  """
  states, b = _common(masks, "and_masks")
  out = states[0]
  for s in states[1:]:
    out = jnp.minimum(out, s)
  mods = [m.mask_mod for m in masks if m.mask_mod is not None]
  mm = None
  if mods:
    exact = all(m.mask_mod is not None and m.mask_mod.exact for m in masks)
    mm = _combine_mods(mods, b, AndFn, exact)
  r = masks[0]
  return BlockMask.from_states(out, q_len=r.q_len, kv_len=r.kv_len, q_block=r.q_block,
                               kv_block=r.kv_block, mask_mod=mm)


def or_masks(*masks: BlockMask) -> BlockMask:
  """Union: a token attends when it attends in any mask.

  Raises:
    ValueError: when a part has an inexact token function, or token-level and
      block-level parts are mixed (express the block-level part with
      ``mask_from_fn``, or apply ``and_masks`` with block-level masks last).

  >>> from pallas_kernels.attention import sliding_window_mask, mask_from_fn
  >>> sink = lambda q, k: k < 4
  >>> m = or_masks(sliding_window_mask(16, window=4, q_block=4),
  ...              mask_from_fn(sink, 16, q_block=4))
  >>> m.block_states()[0, 0, 3].tolist()
  [2, 0, 1, 1]
  """
  states, b = _common(masks, "or_masks")
  has_mod = [m.mask_mod is not None for m in masks]
  if any(has_mod) and not all(has_mod):
    raise ValueError(
        "or_masks: cannot mix block-level masks (no token function, e.g. top-k or "
        "block_mask_from_blocks) with token-level masks; express the block-level part as a "
        "token mask with mask_from_fn, or intersect with block-level masks (and_masks) after "
        "the union")
  for i, m in enumerate(masks):
    if m.mask_mod is not None and not m.mask_mod.exact:
      raise ValueError(
          f"or_masks: mask {i} has an inexact token function (it was intersected with a "
          "block-level mask); take the union of the token-level masks first and apply "
          "and_masks with the block-level mask last")
  out = states[0]
  for s in states[1:]:
    out = jnp.maximum(out, s)
  mm = _combine_mods([m.mask_mod for m in masks], b, OrFn, True) if all(has_mod) else None
  r = masks[0]
  return BlockMask.from_states(out, q_len=r.q_len, kv_len=r.kv_len, q_block=r.q_block,
                               kv_block=r.kv_block, mask_mod=mm)
