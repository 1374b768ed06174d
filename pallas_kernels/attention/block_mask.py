"""The block mask: which kv-blocks each (batch, head, q-block) visits, full or partial.

A :class:`BlockMask` follows FlexAttention's layout. For every mask batch row
``b < B'``, mask head ``h < H'`` and q-block ``i`` it lists the visited
kv-blocks in two sorted, padded lists: *full* blocks (every in-bounds token
pair attends, no token-level masking) and *partial* blocks (the token-level
:class:`~pallas_kernels.attention.mask_fns.MaskMod` is evaluated inside the
block). Keys past ``kv_len`` in a ragged last kv-block are always masked. The transposed lists (for each kv-block, the
q-blocks that visit it) drive the dK/dV backward pass.

Broadcasting: ``B'`` is 1 or the batch size; ``H'`` divides the number of query
heads and query head ``h`` uses mask head ``h // (num_heads // H')`` (so
``H' == 1``, ``H' == num_kv_heads`` for one mask per GQA group, and
``H' == num_heads`` all work).

Padding: entries past a list's count repeat its last valid index (0 for an
empty list), so a TPU pipeline that walks the padded list issues no new DMA.

Visit orders: the mask also stores its rows longest first (most visited blocks first, ties
in ascending row order), computed once when the lists are built (as the block-sparse matmul
format stores its row and column orders), so that the persistent Mosaic GPU kernels need no
sort per call (:func:`pallas_kernels.attention._common.q_block_items`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention.mask_fns import MaskMod

__all__ = ["BlockMask", "EMPTY", "PARTIAL", "FULL"]

EMPTY, PARTIAL, FULL = 0, 1, 2

_ARRAY_FIELDS = (
    "full_kv_counts", "full_kv_indices", "partial_kv_counts", "partial_kv_indices",
    "full_q_counts", "full_q_indices", "partial_q_counts", "partial_q_indices",
    "q_block_order", "kv_block_order",
)


def _is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def index_lists(selected: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Sorted, padded column lists of a boolean ``[..., n]`` selection.

  Returns ``(counts [...], indices [..., n])`` as int32; positions past the count
  repeat the last selected column (0 when none is selected).

  >>> c, i = index_lists(jnp.array([[False, True, False, True]]))
  >>> c.tolist(), i.tolist()
  ([2], [[1, 3, 3, 3]])
  """
  n = selected.shape[-1]
  counts = jnp.sum(selected, axis=-1, dtype=jnp.int32)
  order = jnp.argsort(jnp.logical_not(selected).astype(jnp.int8), axis=-1, stable=True)
  order = order.astype(jnp.int32)
  last = jnp.take_along_axis(order, jnp.maximum(counts - 1, 0)[..., None], axis=-1)
  pos = jnp.arange(n, dtype=jnp.int32)
  return counts, jnp.where(pos < counts[..., None], order, last)


@jax.jit
def _scatter_states(full_counts, full_idx, partial_counts, partial_idx):
  n = full_idx.shape[-1]
  pos = jnp.arange(n, dtype=jnp.int32)
  lead = full_idx.shape[:-1]
  grids = jnp.meshgrid(*[jnp.arange(s) for s in lead], indexing="ij")
  grids = [g[..., None] for g in grids]
  states = jnp.zeros(lead + (n,), jnp.int8)
  full_val = jnp.where(pos < full_counts[..., None], FULL, EMPTY).astype(jnp.int8)
  part_val = jnp.where(pos < partial_counts[..., None], PARTIAL, EMPTY).astype(jnp.int8)
  states = states.at[(*grids, partial_idx)].max(part_val)
  return states.at[(*grids, full_idx)].max(full_val)


@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Block-sparse attention mask (a pytree: index arrays are leaves, sizes static).

  Attributes:
    full_kv_counts: int32 ``[B', H', nq]``, number of full kv-blocks per q-block.
    full_kv_indices: int32 ``[B', H', nq, nk]``, their kv-block ids, ascending, padded.
    partial_kv_counts, partial_kv_indices: same for partial kv-blocks.
    full_q_counts: int32 ``[B', H', nk]``, transposed: full q-blocks per kv-block.
    full_q_indices: int32 ``[B', H', nk, nq]``.
    partial_q_counts, partial_q_indices: same for partial q-blocks.
    q_block_order: int32 ``[B' * H' * nq]``, the mask rows ``(b * H' + h) * nq + i`` by
      decreasing visited kv-blocks (full + partial), ties in ascending row order: the order of
      the forward / dQ work items, computed when the lists are built.
    kv_block_order: int32 ``[B' * H' * nk]``, the transposed rows ``(b * H' + h) * nk + j``
      by decreasing visiting q-blocks, ties ascending (the dK/dV work items).
    mask_mod: token-level mask for partial blocks, or ``None`` for a block-level
      mask (then every visited block is full).
    q_len, kv_len: sequence lengths; q_block, kv_block: block sizes.

  Build one with the constructors (``causal_mask``, ``sliding_window_mask``,
  ``document_mask``, ``prefix_lm_mask``, ``mask_from_fn``, ``block_mask_from_blocks``,
  ``topk_block_mask``) or :meth:`from_states`; they compute every array field (the kernels
  assume the fields agree, which :meth:`validate` checks on concrete masks). Slicing the
  arrays of a mask does not give a mask: rebuild from sliced lists with :meth:`from_kv_lists`.

  >>> from pallas_kernels.attention import MaskMod, CausalFn
  >>> states = jnp.array([[[[1, 0], [2, 1]]]], jnp.int8)  # [B'=1, H'=1, nq=2, nk=2]
  >>> m = BlockMask.from_states(states, q_len=8, kv_len=8, q_block=4, kv_block=4,
  ...                           mask_mod=MaskMod(CausalFn()))
  >>> m.full_kv_counts.tolist(), m.partial_kv_indices.tolist(), m.full_q_indices.tolist()
  ([[[0, 1]]], [[[[0, 0], [1, 1]]]], [[[[1, 1], [0, 0]]]])
  >>> m.q_block_order.tolist(), m.kv_block_order.tolist()  # q-block 1 visits 2 kv-blocks
  ([1, 0], [0, 1])
  """

  full_kv_counts: jax.Array
  full_kv_indices: jax.Array
  partial_kv_counts: jax.Array
  partial_kv_indices: jax.Array
  full_q_counts: jax.Array
  full_q_indices: jax.Array
  partial_q_counts: jax.Array
  partial_q_indices: jax.Array
  q_block_order: jax.Array
  kv_block_order: jax.Array
  mask_mod: MaskMod | None
  q_len: int
  kv_len: int
  q_block: int
  kv_block: int

  # ------------------------------------------------------------------ sizes
  @property
  def num_q_blocks(self) -> int:
    """``nq = ceil(q_len / q_block)``."""
    return -(-self.q_len // self.q_block)

  @property
  def num_kv_blocks(self) -> int:
    """``nk = ceil(kv_len / kv_block)``."""
    return -(-self.kv_len // self.kv_block)

  @property
  def batch(self) -> int:
    """Leading mask batch size ``B'`` (1 broadcasts over the batch)."""
    return self.full_kv_counts.shape[0]

  @property
  def num_heads(self) -> int:
    """Number of mask heads ``H'`` (divides the number of query heads)."""
    return self.full_kv_counts.shape[1]

  def head_index(self, q_head, num_q_heads: int):
    """Mask head used by query head ``q_head`` (works on traced values)."""
    return q_head // (num_q_heads // self.num_heads)

  # -------------------------------------------------------------- building
  @classmethod
  def from_states(cls, states, *, q_len: int, kv_len: int, q_block: int, kv_block: int,
                  mask_mod: MaskMod | None = None) -> "BlockMask":
    """Builds the lists from block states (0 empty, 1 partial, 2 full), jit-able.

    Args:
      states: integer ``[B', H', nq, nk]`` (or ``[nq, nk]``) block states.
      q_len, kv_len: sequence lengths (static).
      q_block, kv_block: block sizes (static).
      mask_mod: token mask for partial blocks; ``None`` for a block-level mask.

    "Full" means that every token pair *inside the sequence bounds* attends: the
    kernels always mask the keys past ``kv_len`` of a ragged last kv-block. Without
    a ``mask_mod`` there is no token-level mask, so partial states become full.

    >>> m = BlockMask.from_states(jnp.ones((2, 2), jnp.int8), q_len=8, kv_len=7,
    ...                           q_block=4, kv_block=4)
    >>> m.full_kv_counts.tolist(), m.partial_kv_counts.tolist()
    ([[[2, 2]]], [[[0, 0]]])
    """
    for name, v in (("q_len", q_len), ("kv_len", kv_len), ("q_block", q_block),
                    ("kv_block", kv_block)):
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"block_mask/{name}: expected a positive Python int, got {v!r}")
    states = jnp.asarray(states)
    if states.ndim == 2:
      states = states[None, None]
    nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
    if states.ndim != 4 or states.shape[2:] != (nq, nk):
      raise ValueError(
          f"block_mask/states: expected shape [B', H', {nq}, {nk}] for q_len={q_len}, "
          f"kv_len={kv_len}, q_block={q_block}, kv_block={kv_block}; got {states.shape}")
    if not jnp.issubdtype(states.dtype, jnp.integer):
      raise TypeError(f"block_mask/states: expected integer states 0/1/2, got {states.dtype}")
    states = states.astype(jnp.int8)
    if mask_mod is None:
      states = jnp.where(states == PARTIAL, jnp.int8(FULL), states)
    else:
      bm, bs = mask_mod.batch, states.shape[0]
      if bm != bs and 1 not in (bm, bs):
        raise ValueError(
            f"block_mask/mask_mod: data batch {bm} does not match the block states' batch {bs}; "
            "use 1 or the same batch size")
      b = max(bm, bs)
      states = jnp.broadcast_to(states, (b,) + states.shape[1:])
      mask_mod = mask_mod.broadcast_batch(b)
    return cls(*_lists_from_states(states), mask_mod,
               int(q_len), int(kv_len), int(q_block), int(kv_block))

  @classmethod
  def from_kv_lists(cls, full_kv_counts, full_kv_indices, partial_kv_counts, partial_kv_indices,
                    *, q_len: int, kv_len: int, q_block: int, kv_block: int,
                    mask_mod: MaskMod | None = None) -> "BlockMask":
    """Builds a mask from FlexAttention-style kv lists (computes the transposed lists).

    >>> m = BlockMask.from_kv_lists(jnp.array([[[1]]]), jnp.array([[[[0]]]]),
    ...                             jnp.array([[[0]]]), jnp.array([[[[0]]]]),
    ...                             q_len=4, kv_len=4, q_block=4, kv_block=4)
    >>> m.full_q_counts.tolist()
    [[[1]]]
    """
    states = _scatter_states(*(jnp.asarray(x, jnp.int32) for x in (
        full_kv_counts, full_kv_indices, partial_kv_counts, partial_kv_indices)))
    return cls.from_states(states, q_len=q_len, kv_len=kv_len, q_block=q_block,
                           kv_block=kv_block, mask_mod=mask_mod)

  # ----------------------------------------------------------------- views
  def block_states(self) -> jax.Array:
    """int8 ``[B', H', nq, nk]``: 0 empty, 1 partial, 2 full.

    >>> from pallas_kernels.attention import causal_mask
    >>> causal_mask(8, q_block=4).block_states()[0, 0].tolist()
    [[1, 0], [2, 1]]
    """
    return _scatter_states(self.full_kv_counts, self.full_kv_indices,
                           self.partial_kv_counts, self.partial_kv_indices)

  def kv_schedule(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Merged per-q-block kv schedule: full blocks first, then partial blocks.

    Returns ``(indices, kinds, counts)``: ``indices`` int32 ``[B', H', nq, nk]``
    (padded with the last visited block), ``kinds`` int32 (2 full, 1 partial,
    0 past the end) and ``counts`` int32 ``[B', H', nq]``.
    """
    return _merge(self.full_kv_counts, self.full_kv_indices,
                  self.partial_kv_counts, self.partial_kv_indices)

  def q_schedule(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Transposed merged schedule (per kv-block q-blocks), as :meth:`kv_schedule`."""
    return _merge(self.full_q_counts, self.full_q_indices,
                  self.partial_q_counts, self.partial_q_indices)

  def to_dense(self) -> jax.Array:
    """Token-level boolean mask ``[B', H', q_len, kv_len]`` (tests, small sizes).

    >>> from pallas_kernels.attention import causal_mask
    >>> causal_mask(3, q_block=2).to_dense()[0, 0].astype(int).tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    """
    return _to_dense(self)

  def _to_dense_impl(self) -> jax.Array:
    states = self.block_states()
    st = jnp.repeat(jnp.repeat(states, self.q_block, axis=2), self.kv_block, axis=3)
    st = st[:, :, :self.q_len, :self.kv_len]
    if self.mask_mod is None:
      return st != EMPTY
    q_pos = jnp.arange(self.q_len, dtype=jnp.int32)[:, None]
    kv_pos = jnp.arange(self.kv_len, dtype=jnp.int32)[None, :]

    def one(qd, kd):
      return jnp.broadcast_to(
          self.mask_mod.fn(q_pos, kv_pos, tuple(x[:, None] for x in qd),
                           tuple(x[None, :] for x in kd)), (self.q_len, self.kv_len))

    mm = jax.vmap(one)(self.mask_mod.q_data, self.mask_mod.kv_data) if (
        self.mask_mod.q_data or self.mask_mod.kv_data) else one((), ())[None]
    return (st == FULL) | ((st == PARTIAL) & mm[:, None])

  def num_visited_blocks(self) -> jax.Array:
    """Visited (full + partial) blocks summed over ``B'``, ``H'`` and q-blocks."""
    return jnp.sum(self.full_kv_counts) + jnp.sum(self.partial_kv_counts)

  def density(self) -> jax.Array:
    """Fraction of the ``B' * H' * nq * nk`` blocks that are visited.

    >>> from pallas_kernels.attention import causal_mask
    >>> float(causal_mask(8, q_block=4).density())
    0.75
    """
    total = self.batch * self.num_heads * self.num_q_blocks * self.num_kv_blocks
    return self.num_visited_blocks() / total

  def __repr__(self) -> str:
    mm = None if self.mask_mod is None else type(self.mask_mod.fn).__name__
    return (f"BlockMask(B'={self.batch}, H'={self.num_heads}, q_len={self.q_len}, "
            f"kv_len={self.kv_len}, q_block={self.q_block}, kv_block={self.kv_block}, "
            f"mask_mod={mm})")

  # ------------------------------------------------------------ validation
  def validate(self, *, batch: int | None = None, num_heads: int | None = None,
               q_len: int | None = None, kv_len: int | None = None,
               check_values: bool = True) -> "BlockMask":
    """Checks shapes (always) and index values (when concrete); returns ``self``.

    Raises:
      ValueError / TypeError naming the offending ``block_mask/<field>`` and the fix.

    >>> from pallas_kernels.attention import causal_mask
    >>> causal_mask(8, q_block=4).validate(batch=2, num_heads=4, q_len=8, kv_len=8)
    BlockMask(B'=1, H'=1, q_len=8, kv_len=8, q_block=4, kv_block=4, mask_mod=CausalFn)
    """
    _validate(self, batch, num_heads, q_len, kv_len, check_values)
    return self


jax.tree_util.register_dataclass(
    BlockMask, data_fields=list(_ARRAY_FIELDS) + ["mask_mod"],
    meta_fields=["q_len", "kv_len", "q_block", "kv_block"])


def longest_first(full_counts, partial_counts) -> jax.Array:
  """Flat rows of ``[B', H', n]`` count arrays by decreasing ``full + partial``, ties ascending.

  >>> longest_first(jnp.array([[[1, 0, 2]]]), jnp.array([[[1, 1, 0]]])).tolist()
  [0, 2, 1]
  """
  total = (full_counts + partial_counts).reshape(-1)
  return jnp.argsort(-total, stable=True).astype(jnp.int32)


@jax.jit
def _lists_from_states(states):
  fc, fi = index_lists(states == FULL)
  pc, pi = index_lists(states == PARTIAL)
  st = jnp.swapaxes(states, -1, -2)
  tfc, tfi = index_lists(st == FULL)
  tpc, tpi = index_lists(st == PARTIAL)
  return fc, fi, pc, pi, tfc, tfi, tpc, tpi, longest_first(fc, pc), longest_first(tfc, tpc)


@jax.jit
def _to_dense(mask: BlockMask):
  return mask._to_dense_impl()  # pylint: disable=protected-access


@jax.jit
def _merge(fc, fi, pc, pi):
  n = fi.shape[-1]
  s = jnp.arange(n, dtype=jnp.int32)
  total = fc + pc
  from_partial = jnp.take_along_axis(pi, jnp.clip(s - fc[..., None], 0, n - 1), axis=-1)
  idx = jnp.where(s < fc[..., None], fi, from_partial)
  last = jnp.take_along_axis(idx, jnp.maximum(total - 1, 0)[..., None], axis=-1)
  idx = jnp.where(s < total[..., None], idx, last)
  kinds = jnp.where(s < fc[..., None], FULL, jnp.where(s < total[..., None], PARTIAL, EMPTY))
  return idx.astype(jnp.int32), kinds.astype(jnp.int32), total.astype(jnp.int32)


def _scatter_states_np(fc, fi, pc, pi):
  """NumPy twin of ``_scatter_states`` (validation must not trace under jit)."""
  n = fi.shape[-1]
  pos = np.arange(n)
  states = np.zeros(fi.shape[:-1] + (n,), np.int8)
  lead = np.indices(fi.shape[:-1])
  lead = tuple(x[..., None] for x in lead)
  np.maximum.at(states, lead + (pi,), np.where(pos < pc[..., None], PARTIAL, EMPTY).astype(np.int8))
  np.maximum.at(states, lead + (fi,), np.where(pos < fc[..., None], FULL, EMPTY).astype(np.int8))
  return states


def _validate(m: BlockMask, batch, num_heads, q_len, kv_len, check_values):
  fix = ("build masks with the pallas_kernels.attention constructors or "
         "BlockMask.from_states / BlockMask.from_kv_lists")
  if q_len is not None and m.q_len != q_len:
    raise ValueError(f"block_mask/q_len: the mask was built for q_len={m.q_len} but the "
                     f"queries have length {q_len}; rebuild the mask for this length")
  if kv_len is not None and m.kv_len != kv_len:
    raise ValueError(f"block_mask/kv_len: the mask was built for kv_len={m.kv_len} but the "
                     f"keys have length {kv_len}; rebuild the mask for this length")
  nq, nk = m.num_q_blocks, m.num_kv_blocks
  lead = m.full_kv_counts.shape[:2] if getattr(m.full_kv_counts, "ndim", 0) == 3 else None
  if lead is None:
    raise ValueError(f"block_mask/full_kv_counts: expected int32 [B', H', {nq}], got shape "
                     f"{getattr(m.full_kv_counts, 'shape', None)}; {fix}")
  expected = {
      "full_kv_counts": lead + (nq,), "full_kv_indices": lead + (nq, nk),
      "partial_kv_counts": lead + (nq,), "partial_kv_indices": lead + (nq, nk),
      "full_q_counts": lead + (nk,), "full_q_indices": lead + (nk, nq),
      "partial_q_counts": lead + (nk,), "partial_q_indices": lead + (nk, nq),
      "q_block_order": (lead[0] * lead[1] * nq,), "kv_block_order": (lead[0] * lead[1] * nk,),
  }
  for name, shape in expected.items():
    x = getattr(m, name)
    if not hasattr(x, "shape") or tuple(x.shape) != shape:
      raise ValueError(f"block_mask/{name}: expected shape {shape} (q_len={m.q_len}, "
                       f"q_block={m.q_block}, kv_len={m.kv_len}, kv_block={m.kv_block}), got "
                       f"{getattr(x, 'shape', type(x).__name__)}; {fix}")
    if x.dtype != jnp.int32:
      raise TypeError(f"block_mask/{name}: expected int32, got {x.dtype}; cast with "
                      f".astype(jnp.int32) or {fix}")
  bm, hm = lead
  if batch is not None and bm not in (1, batch):
    raise ValueError(f"block_mask/full_kv_counts: mask batch {bm} must be 1 or the batch "
                     f"size {batch}; rebuild the mask with per-example data of batch {batch}")
  if num_heads is not None and num_heads % hm:
    raise ValueError(f"block_mask/full_kv_counts: {hm} mask heads do not divide the "
                     f"{num_heads} query heads; use 1, num_kv_heads or num_heads mask heads")
  mm = m.mask_mod
  if mm is not None:
    if not isinstance(mm, MaskMod):
      raise TypeError(f"block_mask/mask_mod: expected a MaskMod or None, got {type(mm).__name__}")
    if not callable(mm.fn):
      raise TypeError(f"block_mask/mask_mod/fn: expected a callable, got {mm.fn!r}")
    for kind, data, length in (("q_data", mm.q_data, m.q_len), ("kv_data", mm.kv_data, m.kv_len)):
      for i, x in enumerate(data):
        if not hasattr(x, "shape") or tuple(x.shape) != (bm, length):
          raise ValueError(f"block_mask/mask_mod/{kind}/{i}: expected shape ({bm}, {length}), "
                           f"got {getattr(x, 'shape', None)}; per-token data must be [B', len]")
        if not jnp.issubdtype(x.dtype, jnp.integer):
          raise TypeError(f"block_mask/mask_mod/{kind}/{i}: expected an integer array, got "
                          f"{x.dtype}; cast with .astype(jnp.int32)")
  if not check_values or any(_is_tracer(getattr(m, f)) for f in _ARRAY_FIELDS):
    return
  arrs = {f: np.asarray(getattr(m, f)) for f in _ARRAY_FIELDS}
  for kind, n_other in (("kv", nk), ("q", nq)):
    for part in ("full", "partial"):
      c, idx = arrs[f"{part}_{kind}_counts"], arrs[f"{part}_{kind}_indices"]
      name = f"block_mask/{part}_{kind}"
      if c.min(initial=0) < 0 or c.max(initial=0) > n_other:
        raise ValueError(f"{name}_counts: counts must lie in [0, {n_other}], got "
                         f"[{c.min()}, {c.max()}]; {fix}")
      if idx.size and (idx.min() < 0 or idx.max() >= n_other):
        raise ValueError(f"{name}_indices: block ids must lie in [0, {n_other}), got "
                         f"[{idx.min()}, {idx.max()}]; {fix}")
      valid = np.arange(n_other) < c[..., None]
      d = np.diff(idx, axis=-1)
      both = valid[..., 1:]
      if np.any(both & (d <= 0)):
        raise ValueError(f"{name}_indices: the first count entries of each list must be "
                         f"strictly increasing (sorted, no duplicates); {fix}")
    fc, pc = arrs[f"full_{kind}_counts"], arrs[f"partial_{kind}_counts"]
    if np.any(fc + pc > n_other):
      raise ValueError(f"block_mask/partial_{kind}_counts: full + partial blocks exceed "
                       f"{n_other} in some list; {fix}")
  states = _scatter_states_np(*(arrs[f] for f in (
      "full_kv_counts", "full_kv_indices", "partial_kv_counts", "partial_kv_indices")))
  n_listed = arrs["full_kv_counts"].sum() + arrs["partial_kv_counts"].sum()
  if (states != EMPTY).sum() != n_listed:
    raise ValueError("block_mask/partial_kv_indices: a kv-block is listed both as full and "
                     f"partial for the same q-block; {fix}")
  t_states = _scatter_states_np(*(arrs[f] for f in (
      "full_q_counts", "full_q_indices", "partial_q_counts", "partial_q_indices")))
  if not np.array_equal(np.swapaxes(t_states, -1, -2), states):
    raise ValueError("block_mask/full_q_indices: the transposed (q) lists do not match the kv "
                     "lists; rebuild with BlockMask.from_kv_lists to derive them")
  if m.mask_mod is None and arrs["partial_kv_counts"].sum():
    raise ValueError("block_mask/partial_kv_counts: partial blocks need a token-level "
                     "mask_mod; without one, list the blocks as full (BlockMask.from_states "
                     "does this)")
  for name, kind in (("q_block_order", "kv"), ("kv_block_order", "q")):
    total = arrs[f"full_{kind}_counts"] + arrs[f"partial_{kind}_counts"]
    if not np.array_equal(arrs[name], np.argsort(-total.reshape(-1), kind="stable")):
      raise ValueError(f"block_mask/{name}: not the longest-first order of the {kind} lists' "
                       f"counts (was an array field sliced or replaced?); {fix}")
