"""Low-memory exact per-leaf top-k for the mask-update branch (private).

The mask-update branch lives inside the training step's ``lax.cond``; XLA
sizes the step's scratch memory for its largest branch, so a selection that
needs several leaf-sized temporaries makes *every* step slower (on CPU a
scratch buffer above ~32 MB is freshly mapped and page-faulted on each call:
measured +10-20% per ordinary step of a 4 x 1024^2 MLP). This selection keeps
one ``uint32`` key array and one bool array per leaf, counts with ``uint8``
partial sums (no ``int32`` copy of a predicate), and finds the threshold by 32
bisection passes plus, only when ties straddle it, a bisection over flat
indices. Same result as ``sparsejax.core`` selection: exactly ``k`` kept, ties
to the lower flat index, NaN lowest.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core import selection as core_selection

def _as2d(x):
  """(rows, cols) view of ``x`` (a free reshape): rows = prod(shape[:-1])."""
  if x.ndim == 0:
    return x.reshape(1, 1)
  return x.reshape(-1, x.shape[-1])


def _count(pred) -> jax.Array:
  """Number of True entries of a 2-D predicate, via narrow row partial sums.

  The row sums accumulate in the narrowest exact unsigned type, so the
  predicate's converted copy that XLA materialises is 1-2 bytes per entry.
  """
  cols = pred.shape[-1]
  acc = jnp.uint8 if cols <= 255 else (jnp.uint16 if cols <= 65535 else jnp.int32)
  return jnp.sum(jnp.sum(pred.astype(acc), axis=-1, dtype=acc), dtype=jnp.int32)


def topk_among(k, eligible, score_fn, *operands) -> jax.Array:
  """The ``min(k, n_eligible)`` eligible entries with the largest scores.

  Args:
    k: number to keep (int, possibly traced).
    eligible: bool array or None (all entries).
    score_fn: exact elementwise function of ``operands`` (abs, where, integer
      ops) giving a real or unsigned array; it is recomputed in every counting
      pass instead of being stored.
    *operands: arrays of the leaf's shape.

  Returns:
    Bool mask of the scores' shape.

  >>> topk_among(2, None, lambda x: x, jnp.array([1., 3., 3., 2.])).tolist()
  [False, True, True, False]
  >>> topk_among(2, jnp.array([True, True, True, False]), jnp.abs,
  ...            jnp.array([5., -5., 5., 9.])).tolist()
  [True, True, False, False]
  """
  shape = jax.eval_shape(score_fn, *operands).shape
  size = int(np.prod(shape))
  ops2 = tuple(_as2d(jnp.asarray(o)) for o in operands)
  el = None if eligible is None else _as2d(eligible)
  rows, cols = ops2[0].shape

  def keys(salt):
    # ``salt`` is a non-negative int32, so ``salt >> 31 == 0``: a zero XLA
    # cannot prove, which keeps it from hoisting (in loops) or sharing (CSE)
    # one materialised key array; the keys are recomputed inside each fusion.
    kk = core_selection.ordered_keys(score_fn(*ops2)).astype(jnp.uint32)
    return kk | (jnp.asarray(salt, jnp.int32) >> 31).astype(jnp.uint32)

  def masked(pred):
    return pred if el is None else pred & el

  k = jnp.clip(jnp.asarray(k, jnp.int32), 0,
               size if el is None else _count(el))

  def bit_step(i, t):
    cand = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(_count(masked(keys(i) >= cand)) >= k, cand, t)

  t = lax.fori_loop(0, 32, bit_step, jnp.uint32(0))  # the k-th largest key
  need = k - _count(masked(keys(k) > t))  # ties at t to keep, lowest flat index first
  r_iota = lax.broadcasted_iota(jnp.int32, (rows, 1), 0)
  c_iota = lax.broadcasted_iota(jnp.int32, (1, cols), 1)

  def below(c):  # flat index < c, from small row / column iotas
    r, q = c // cols, c % cols
    return (r_iota < r) | ((r_iota == r) & (c_iota < q))

  nbits = max(1, int(size).bit_length())

  def cutoff(_):
    def idx_step(i, c):
      cand = c + (jnp.int32(1) << (nbits - 1 - i))
      n = _count(masked((keys(i) == t) & below(cand)))
      return jnp.where(n < need, cand, c)
    return lax.fori_loop(0, nbits, idx_step, jnp.int32(0)) + 1

  n_ties = _count(masked(keys(need) == t))
  c = lax.cond(n_ties <= need, lambda _: jnp.int32(size), cutoff, None)
  kk = keys(c)
  keep = masked((kk > t) | ((kk == t) & below(c))) & (k > 0)
  return keep.reshape(shape)


def count_true(x) -> jax.Array:
  """Number of True entries of a bool array (low-memory)."""
  return _count(_as2d(x))


def after(x: jax.Array, *deps) -> jax.Array:
  """``x`` made data-dependent on ``deps`` (its value is unchanged).

  Chains the per-leaf selections so that XLA runs them one after another and
  reuses one leaf's scratch memory for the next.
  """
  flag = jnp.asarray(False)
  for d in deps:
    flag = flag | (jnp.sum(d.reshape(-1)[:1].astype(jnp.int32)) < 0)  # never true
  return jnp.where(flag, jnp.zeros_like(x), x)


def num_to_keep(size: int, density) -> jax.Array:
  """``clip(round(size * density), 1, size)`` (the library-wide rule)."""
  return core_selection.num_to_keep(size, density).astype(jnp.int32)


def drop_count(fraction, n_active) -> jax.Array:
  """``floor(n_active * fraction)`` in the run's float precision."""
  dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  return jnp.floor(n_active.astype(dt) * jnp.asarray(fraction, dt)).astype(jnp.int32)
