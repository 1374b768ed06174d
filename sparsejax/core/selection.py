"""Exact, sharding-safe top-k selection across the leaves of a pytree.

Global (cross-leaf) top-k never concatenates scores. Scores are mapped to an
order-preserving unsigned-integer image (``ordered_keys``); the k-th largest key
is then found by radix selection, each step a fused ``count(key >= candidate)``
reduction per leaf summed over leaves. Reductions of sharded arrays compile to
local reductions plus an all-reduce of a scalar, so no parameter is gathered and
the final masks (elementwise comparisons) keep the scores' shardings.

Ties at the threshold are broken by (leaf order, flat index): the first tied
elements win, exactly as if the leaves had been flattened and concatenated.
The tie cut-off is found by bisection on counts inside the single leaf that
holds it (never by a cumsum over a sharded axis).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core import paths as _paths

__all__ = [
  "GlobalThreshold",
  "global_threshold",
  "global_topk_masks",
  "num_to_keep",
  "ordered_keys",
]


def _count_dtype():
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def _key_dtype(dtype) -> np.dtype:
  dtype = np.dtype(dtype)
  if dtype.itemsize == 8:
    return np.dtype(np.uint64)
  return np.dtype(np.uint32)


def ordered_keys(x: jax.Array) -> jax.Array:
  """Maps an array to unsigned integers with the same order.

  ``a < b`` (as numbers) iff ``ordered_keys(a) < ordered_keys(b)``. Floats of
  16/32 bits map to ``uint32``, 64-bit types to ``uint64``. ``-0.0`` and ``0.0``
  map to the same key; NaN maps to 0, below every number (never preferred).

  Args:
    x: array of a real floating, integer or bool dtype.

  Returns:
    Unsigned integer array of ``x``'s shape.

  >>> import jax.numpy as jnp
  >>> k = ordered_keys(jnp.array([-2.0, -0.0, 0.0, 1.5, jnp.inf]))
  >>> bool((k[:-1] <= k[1:]).all()), bool(k[1] == k[2])
  (True, True)
  """
  x = jnp.asarray(x)
  dtype = x.dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(f"ordered_keys: complex scores ({dtype}) have no order; pass |x| or x.real.")
  if dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(dtype, jnp.floating):
    if dtype.itemsize < 4:
      x = x.astype(jnp.float32)
    udt = jnp.uint64 if x.dtype.itemsize == 8 else jnp.uint32
    nbits = 64 if udt == jnp.uint64 else 32
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # -0.0 -> +0.0
    b = lax.bitcast_convert_type(x, udt)
    sign = jnp.asarray(1 << (nbits - 1), udt)
    key = jnp.where((b & sign) != 0, ~b, b | sign)
    return jnp.where(jnp.isnan(x), jnp.zeros_like(key), key)
  if jnp.issubdtype(dtype, jnp.unsignedinteger):
    return x.astype(jnp.uint64 if dtype.itemsize == 8 else jnp.uint32)
  if jnp.issubdtype(dtype, jnp.signedinteger):
    if dtype.itemsize == 8:
      return lax.bitcast_convert_type(x, jnp.uint64) ^ jnp.asarray(1 << 63, jnp.uint64)
    x = x.astype(jnp.int32)
    return lax.bitcast_convert_type(x, jnp.uint32) ^ jnp.asarray(1 << 31, jnp.uint32)
  raise TypeError(f"ordered_keys: unsupported dtype {dtype}.")


def _mulhi_round(a: int, b: jax.Array, shift: int) -> jax.Array:
  """floor((a * b + 2**(shift-1)) / 2**shift) in uint32 limb arithmetic (a, b < 2**32)."""
  u = jnp.uint32
  a = jnp.asarray(a, u)
  al, ah = a & u(0xFFFF), a >> u(16)
  bl, bh = b & u(0xFFFF), b >> u(16)
  p0, p1, p2, p3 = al * bl, ah * bl, al * bh, ah * bh
  mid = p1 + p2
  c_mid = (mid < p1).astype(u)
  lo = p0 + (mid << u(16))
  c_lo = (lo < p0).astype(u)
  hi = p3 + (mid >> u(16)) + (c_mid << u(16)) + c_lo
  half = u(1 << (shift - 1))
  lo2 = lo + half
  hi = hi + (lo2 < lo).astype(u)
  return (hi << u(32 - shift)) | (lo2 >> u(shift))


def num_to_keep(size: int, density, *, minimum: int = 1) -> jax.Array:
  """Number of kept elements ``clip(round(size * density), minimum, size)``.

  ``density`` is taken as its float32 value ``d`` (as under jit) and
  ``round(size * d)`` is computed exactly in integer arithmetic (a float32
  product would drift by several elements at 1e8); halves round up. Works with traced ``density``. Exact for density >= 2**-8,
  within one element below that.

  Args:
    size: static number of candidates (< 2**31).
    density: fraction kept, scalar (may be traced), clipped to [0, 1].
    minimum: lower bound of the result (default 1, as in the reference libraries).

  Returns:
    Scalar integer array.

  >>> int(num_to_keep(100_000_000, 0.25)), int(num_to_keep(10, 0.25)), int(num_to_keep(10, 0.0))
  (25000000, 3, 1)
  """
  size = int(size)
  if size >= 2**31:
    raise ValueError(f"num_to_keep: size {size} >= 2**31 is not supported.")
  d = jnp.clip(jnp.asarray(density, jnp.float32), 0.0, 1.0)
  dq = jnp.round(d * jnp.float32(2.0**31)).astype(jnp.uint32)
  k = _mulhi_round(size, dq, 31).astype(jnp.int32)
  return jnp.clip(k, min(minimum, size), size).astype(_count_dtype())


def _leaf_iota(shape) -> jax.Array:
  """Row-major flat index of every element (int32)."""
  idx = jnp.zeros(shape, jnp.int32)
  stride = 1
  for d in range(len(shape) - 1, -1, -1):
    idx = idx + lax.broadcasted_iota(jnp.int32, shape, d) * stride
    stride *= shape[d]
  return idx


class GlobalThreshold(NamedTuple):
  """Result of :func:`global_threshold`.

  Attributes:
    key: the k-th largest ordered key (see :func:`ordered_keys`).
    cutoffs: per leaf, elements with ``key == threshold`` and flat index below the
      cutoff are kept (tie-breaking by leaf order, then flat index).
    count: number of selected elements (``k`` clipped to the candidates).
  """
  key: jax.Array
  cutoffs: tuple
  count: jax.Array


def _count_cmp(keys, eligible, cand, op) -> jax.Array:
  total = jnp.zeros((), _count_dtype())
  for key, el in zip(keys, eligible):
    c = op(key, cand)
    if el is not None:
      c = c & el
    total = total + jnp.sum(c, dtype=_count_dtype())
  return total


def _select_key(keys, eligible, k, digit_bits: int):
  """Largest key t with count(key >= t) >= k (radix selection, MSB first)."""
  kdt = keys[0].dtype
  nbits = 8 * kdt.itemsize
  digit_bits = max(1, min(digit_bits, nbits))
  n_steps = -(-nbits // digit_bits)

  def step(t, shift, width):
    n_cand = (1 << width) - 1
    cands = t | (jnp.arange(1, n_cand + 1, dtype=kdt) << jnp.asarray(shift, kdt))
    counts = jnp.zeros((n_cand,), _count_dtype())
    for key, el in zip(keys, eligible):
      c = key[..., None] >= cands
      if el is not None:
        c = c & el[..., None]
      counts = counts + jnp.sum(c.reshape(-1, n_cand), axis=0, dtype=_count_dtype())
    j = jnp.sum(counts >= k, dtype=jnp.int32)  # counts are monotone in the candidate
    return t | (j.astype(kdt) << jnp.asarray(shift, kdt))

  if digit_bits == 1:
    def step1(i, t):
      bit = (nbits - 1 - i).astype(kdt)
      cand = t | (jnp.asarray(1, kdt) << bit)
      return jnp.where(_count_cmp(keys, eligible, cand, lambda a, b: a >= b) >= k, cand, t)
    return lax.fori_loop(0, nbits, step1, jnp.zeros((), kdt))
  t = jnp.zeros((), kdt)
  for i in range(n_steps):
    shift = max(nbits - (i + 1) * digit_bits, 0)
    width = nbits - i * digit_bits - shift
    t = step(t, shift, width)
  return t


def _tie_cutoff(key, el, t, r, size):
  """Smallest c with count(key == t & idx < c) >= r (bisection on counts); r >= 1."""
  idx = _leaf_iota(key.shape)
  nb = max(1, int(size).bit_length())

  def step(i, p):
    cand = p + (jnp.int32(1) << (nb - 1 - i))
    eq = (key == t) & (idx < cand)
    if el is not None:
      eq = eq & el
    f = jnp.sum(eq, dtype=_count_dtype())
    return jnp.where((cand <= size) & (f < r), cand, p)

  p = lax.fori_loop(0, nb, step, jnp.zeros((), jnp.int32))
  return p + 1


def _threshold(keys, eligible, k, digit_bits):
  n = len(keys)
  cdt = _count_dtype()
  k = jnp.asarray(k, cdt)
  t = _select_key(keys, eligible, k, digit_bits)
  gt = []
  eq = []
  for key, el in zip(keys, eligible):
    g = key > t
    e = key == t
    if el is not None:
      g, e = g & el, e & el
    gt.append(jnp.sum(g, dtype=cdt))
    eq.append(jnp.sum(e, dtype=cdt))
  gt = jnp.stack(gt)
  eq = jnp.stack(eq)
  total_eq = jnp.sum(eq)
  r = jnp.clip(k - jnp.sum(gt), 0, total_eq)
  before = jnp.cumsum(eq) - eq  # over leaves (a short vector of scalars)
  r_l = jnp.clip(r - before, 0, eq)
  sizes_py = [int(np.prod(key.shape)) for key in keys]
  sizes = jnp.asarray(sizes_py, jnp.int32)
  # Cutoffs for leaves with all or none of their ties kept are trivial.
  trivial = jnp.where(r_l >= eq, sizes, 0).astype(jnp.int32)
  partial = (r_l > 0) & (r_l < eq)
  which = jnp.where(jnp.any(partial), jnp.argmax(partial), n).astype(jnp.int32)

  def make_branch(i):
    def branch():
      c = _tie_cutoff(keys[i], eligible[i], t, r_l[i], sizes_py[i])
      return trivial.at[i].set(c)
    return branch

  branches = [make_branch(i) for i in range(n)] + [lambda: trivial]
  cutoffs = lax.switch(which, branches)
  return t, cutoffs, jnp.sum(gt) + r


def _k_from(k_or_density, k, density, total):
  given = [v is not None for v in (k_or_density, k, density)]
  if sum(given) != 1:
    raise ValueError("global selection: pass exactly one of k_or_density, k= or density=.")
  if k_or_density is not None:
    v = k_or_density
    dt = jnp.result_type(v) if not isinstance(v, (int, float, bool)) else None
    if isinstance(v, bool):
      raise TypeError("global selection: k_or_density must be an int (k) or a float (density), got bool.")
    if isinstance(v, int) or (dt is not None and jnp.issubdtype(dt, jnp.integer)):
      k = v
    else:
      density = v
  if k is not None:
    if isinstance(k, (int, np.integer)) and not 0 <= int(k) <= total:
      raise ValueError(f"global selection: k={int(k)} outside [0, {total}] (total number of candidates).")
    return jnp.clip(jnp.asarray(k, _count_dtype()), 0, total)
  if isinstance(density, (int, float, np.floating)) and not 0.0 <= float(density) <= 1.0:
    raise ValueError(f"global selection: density={float(density)} outside [0, 1].")
  return num_to_keep(total, density)


def _flatten(scores, masks):
  s_paths, s_leaves = [], []
  for p, leaf in jax.tree_util.tree_flatten_with_path(scores)[0]:
    s_paths.append(_paths.path_str(p))
    s_leaves.append(leaf)
  if not s_leaves:
    raise ValueError("global selection: the score tree has no leaves.")
  for p, leaf in zip(s_paths, s_leaves):
    dt = jnp.result_type(leaf)
    if jnp.issubdtype(dt, jnp.complexfloating):
      raise TypeError(f"global selection: scores at '{p}' are complex ({dt}); pass real scores such as |x|.")
  if masks is None:
    return s_paths, s_leaves, [None] * len(s_leaves)
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]
  m_paths = {_paths.path_str(p): leaf for p, leaf in flat}
  eligible = []
  for p, leaf in zip(s_paths, s_leaves):
    if p not in m_paths:
      raise ValueError(f"global selection: masks have no leaf '{p}' (scores have it); masks must match scores.")
    m = m_paths[p]
    if m is not None:
      if tuple(np.shape(m)) != tuple(np.shape(leaf)):
        raise ValueError(f"global selection: mask at '{p}' has shape {np.shape(m)} but scores have {np.shape(leaf)}.")
      m = jnp.asarray(m)
      if m.dtype != jnp.bool_:
        raise TypeError(f"global selection: mask at '{p}' has dtype {m.dtype}, expected bool.")
    eligible.append(m)
  return s_paths, s_leaves, eligible


def global_threshold(scores: Any, k_or_density=None, *, k=None, density=None, masks: Any = None,
                     digit_bits: int = 1) -> GlobalThreshold:
  """Exact global top-k threshold over all leaves of ``scores``, by reductions.

  Args:
    scores: pytree of real arrays (None leaves are ignored).
    k_or_density: an integer ``k`` (number kept) or a float density; or use
      ``k=``/``density=``. Density keeps ``num_to_keep(total, density)`` elements.
    k: number of elements to keep (may be traced).
    density: fraction of all score elements to keep (may be traced).
    masks: optional eligibility tree (bool arrays, None = all eligible): only
      eligible elements compete and can be kept.
    digit_bits: radix digit width; 1 = bisection (one fused count per step).

  Returns:
    A :class:`GlobalThreshold`.

  >>> import jax.numpy as jnp
  >>> th = global_threshold({'a': jnp.array([3., 1.]), 'b': jnp.array([2., 2.])}, 2)
  >>> [int(c) for c in th.cutoffs], int(th.count)
  ([2, 1], 2)
  """
  _, leaves, eligible = _flatten(scores, masks)
  total = sum(int(np.prod(np.shape(x))) for x in leaves)
  kk = _k_from(k_or_density, k, density, total)
  keys = [ordered_keys(x) for x in leaves]
  if len({kk_.dtype for kk_ in keys}) > 1:
    keys = [x.astype(jnp.uint64) for x in keys]
  t, cutoffs, count = _threshold(keys, eligible, kk, digit_bits)
  return GlobalThreshold(t, tuple(cutoffs[i] for i in range(len(keys))), count)


def global_topk_masks(scores: Any, k_or_density=None, *, k=None, density=None, masks: Any = None,
                      digit_bits: int = 1) -> Any:
  """Boolean masks keeping the exact global top-k scores across all leaves.

  Ties are broken by leaf order (``jax.tree`` order), then lower flat index.
  No concatenation: with sharded scores the result has the scores' shardings
  and no parameter is gathered.

  Args:
    scores: pytree of real arrays; None leaves stay None in the output.
    k_or_density: int ``k`` or float density (see :func:`global_threshold`).
    k: number kept (may be traced).
    density: fraction of all score elements kept (may be traced).
    masks: optional eligibility tree; ineligible elements are never kept.
    digit_bits: radix digit width (1 = bisection).

  Returns:
    Tree of bool arrays shaped like ``scores``.

  >>> import jax.numpy as jnp
  >>> m = global_topk_masks({'a': jnp.array([3., 1.]), 'b': jnp.array([2., 2.])}, 2)
  >>> m['a'].tolist(), m['b'].tolist()
  ([True, False], [True, False])
  """
  _, leaves, eligible = _flatten(scores, masks)
  total = sum(int(np.prod(np.shape(x))) for x in leaves)
  kk = _k_from(k_or_density, k, density, total)
  keys = [ordered_keys(x) for x in leaves]
  if len({x.dtype for x in keys}) > 1:
    keys = [x.astype(jnp.uint64) for x in keys]
  t, cutoffs, _ = _threshold(keys, eligible, kk, digit_bits)
  out = []
  for i, (key, el) in enumerate(zip(keys, eligible)):
    m = (key > t) | ((key == t) & (_leaf_iota(key.shape) < cutoffs[i]))
    if el is not None:
      m = m & el
    out.append(m)
  treedef = jax.tree.structure(scores)
  return jax.tree.unflatten(treedef, out)
