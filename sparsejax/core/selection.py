"""Exact, sharding-safe top-k selection across the leaves of a pytree.

Global (cross-leaf) top-k never concatenates scores. Scores are mapped to an
order-preserving unsigned-integer image (:func:`ordered_keys`) and the k-th
largest key is found by radix selection over all leaves at once:

* ``method="radix"`` (default above 65536 candidates): a 20-bit then a 12-bit
  digit pass; each pass scatter-adds the digit of every candidate key (whose
  higher digits match the prefix found so far) into a histogram, leaf by leaf
  (the last pass keeps one 4096-bin histogram per leaf, which also gives the
  per-leaf tie counts). Under sharding each device histograms its shard and an
  all-reduce of the histogram (4 MiB at most) follows.
* ``method="bisect"``: 32 steps, each one fused ``count(key >= candidate)``
  reduction per leaf, summed over leaves (an all-reduce of a scalar).

Both are exact and give identical masks. Ties at the threshold are broken by
(leaf order, flat index): the first tied elements win, exactly as if the leaves
had been flattened and concatenated. The tie cut-off is found by bisection on
counts inside the single leaf that holds it (never by a cumsum over a sharded
axis). The final masks are elementwise comparisons, so they keep the scores'
shardings and no parameter is ever gathered.

Keys are recomputed inside every pass (never stored), so the extra memory is
a few bytes per element of the largest leaf plus the masks themselves.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

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
  Backends that flush subnormals to zero (XLA:CPU with newer jax) may give
  subnormal scores the key of 0, i.e. rank them as ties with zero.

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
  return _num_to_keep(size, jnp.asarray(density, jnp.float32), int(minimum))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _num_to_keep(size, density, minimum):
  d = jnp.clip(density, 0.0, 1.0)
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

  >>> import jax.numpy as jnp
  >>> th = global_threshold([jnp.array([1., 5., 5.])], k=2)
  >>> bool(th.key == ordered_keys(jnp.float32(5.))), int(th.count)
  (True, 2)
  """
  key: jax.Array
  cutoffs: tuple
  count: jax.Array


def _opaque_zero(token) -> jax.Array:
  """A uint32 zero that XLA cannot prove is zero, data-dependent on ``token``.

  ``(v * v) & 2 == 0`` for every integer ``v`` (squares are 0 or 1 mod 4).
  ``token`` must hold small replicated values (scalars, histograms), never a
  (possibly sharded) parameter-sized array.
  XOR-ing keys with it makes a pass depend on ``token``: XLA then neither
  hoists key computations out of loops, nor merges the identical key
  computations of different passes into one materialised array, nor computes
  the temporaries of all leaves before the first is consumed.
  """
  leaves = jax.tree.leaves(token)
  if not leaves:
    return jnp.zeros((), jnp.uint32)
  v = jnp.ravel(jnp.asarray(leaves[0]))[0]
  v = lax.convert_element_type(v, jnp.uint32) if v.dtype != jnp.bool_ else v.astype(jnp.uint32)
  return (v * v) & jnp.uint32(2)


def _xor_bits(x, z) -> jax.Array:
  """``x + z`` for the runtime zero ``z``: equal keys to ``x``, data-dependent on ``z``.

  (For floats ``x + 0`` only turns -0.0 into +0.0, which have the same key.)
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x ^ (z != 0)
  return x + z.astype(x.dtype)


class _LazyKeys:
  """Ordered keys of each leaf, recomputed inside every pass that uses them.

  Computing keys once would materialise a full-size copy of all scores.
  ``refresh(token)`` / ``key_after(i, token)`` tie each pass (and each leaf
  within a pass) to a value of the previous step through :func:`_opaque_zero`.
  """

  def __init__(self, leaves, eligible, score_fn=None, dtype=None, zero=None):
    self.leaves = list(leaves)
    self.eligible = list(eligible)
    self.score_fn = score_fn
    if dtype is None:
      dts = {jax.eval_shape(self._raw, x).dtype for x in self.leaves}
      dtype = np.dtype(np.uint64) if np.dtype(np.uint64) in dts else np.dtype(np.uint32)
    self.dtype = dtype
    self.zero = zero
    self.shapes = [tuple(np.shape(x)) for x in self.leaves]

  def _raw(self, x):
    if self.score_fn is not None:
      x = self.score_fn(x)
    return ordered_keys(x)

  def refresh(self, token) -> "_LazyKeys":
    return _LazyKeys(self.leaves, self.eligible, self.score_fn, self.dtype, _opaque_zero(token))

  def key_after(self, i, token=None):
    """Keys and eligibility of leaf i, computed only after ``token`` exists."""
    z = self.zero
    if token is not None:
      tz = _opaque_zero(token)
      z = tz if z is None else z | tz
    x = self.leaves[i] if z is None else _xor_bits(self.leaves[i], z)
    return self._raw(x).astype(self.dtype), self.eligible[i]

  def __len__(self):
    return len(self.leaves)

  def __getitem__(self, i):
    return self.key_after(i)[0]

  def count(self, i, pred, token=None) -> jax.Array:
    """``sum(pred(keys_i, flat_index) & eligible_i)`` over leaf i."""
    key, el = self.key_after(i, token)
    c = pred(key, lambda: _leaf_iota(self.shapes[i]))
    if el is not None:
      c = c & el
    return jnp.sum(c, dtype=_count_dtype())

  def total(self, pred) -> jax.Array:
    out = jnp.zeros((), _count_dtype())
    for i in range(len(self)):
      out = out + self.count(i, pred, out)
    return out


def _bisect_select(keys, k):
  """Largest key t with count(key >= t) >= k: one fused count pass per bit."""
  kdt = keys.dtype
  nbits = 8 * kdt.itemsize

  def step(i, t):
    cand = t | (jnp.asarray(1, kdt) << (nbits - 1 - i).astype(kdt))
    total = keys.refresh(t).total(lambda key, idx: key >= cand)
    return jnp.where(total >= k, cand, t)

  t = lax.fori_loop(0, nbits, step, jnp.zeros((), kdt))
  kk = keys.refresh(t)
  gt = kk.total(lambda key, idx: key > t)
  eq = kk.total(lambda key, idx: key == t)
  return t, gt, eq


def _radix_schedule(nbits: int, bits: int | None) -> list[int]:
  if bits is None:
    return [20, 12] if nbits == 32 else [20, 20, 12, 12]
  if bits not in (4, 8, 16) or nbits % bits:
    raise ValueError(f"radix_bits must be None, 4, 8 or 16, got {bits}.")
  return [bits] * (nbits // bits)


def _suffix_pick(h, k_rem, base):
  """Largest j with base + sum(h[j:]) >= k_rem (0 if none), and base + sum(h[j+1:])."""
  suffix = jnp.cumsum(h[::-1])[::-1] + base
  j = jnp.maximum(jnp.sum(suffix >= k_rem, dtype=jnp.int32) - 1, 0)
  above = jnp.concatenate([suffix, jnp.reshape(base, (1,))])[j + 1]
  return j, above


def _select_digit(h, k_rem, bits):
  """Digit j of the k_rem-th largest candidate from a histogram, via a two-level suffix sum.

  (A cumsum over 2**20 bins is slow on CPU; block sums then one block's cumsum are not.)
  """
  b1 = bits // 2
  b2 = bits - b1
  zero = jnp.zeros((), h.dtype)
  if b1 == 0:
    return _suffix_pick(h, k_rem, zero)
  h2 = h.reshape(1 << b1, 1 << b2)
  jb, above_b = _suffix_pick(h2.sum(axis=1), k_rem, zero)
  jr, above = _suffix_pick(h2[jb], k_rem, above_b)
  return jb * (1 << b2) + jr, above


def _radix_select(keys, k, bits):
  """Same result as :func:`_bisect_select` with a few histogram passes.

  Pass i histograms digit i (MSB first) of the keys whose higher digits equal
  the threshold's digits found so far: a scatter-add into a small replicated
  histogram (local per shard, then an all-reduce). The last pass keeps one
  histogram per leaf (``n_leaves * 2**bits`` bins), which gives the per-leaf
  count of keys equal to the threshold for free.

  Returns:
    ``(t, count(key > t), per-leaf count(key == t))``.
  """
  kdt = keys.dtype
  nbits = 8 * kdt.itemsize
  cdt = _count_dtype()
  sched = _radix_schedule(nbits, bits)
  n = len(keys)
  t = jnp.zeros((), kdt)
  k_rem = k
  gt = jnp.zeros((), cdt)
  shift = nbits
  for i, b in enumerate(sched):
    shift -= b
    nb = 1 << b
    last = i == len(sched) - 1
    kk = keys.refresh((t, k_rem))
    h = jnp.zeros((n * nb if last else nb,), cdt)
    for li in range(n):
      key, el = kk.key_after(li, h)
      d = ((key >> jnp.asarray(shift, kdt)) & jnp.asarray(nb - 1, kdt)).astype(jnp.int32)
      valid = None
      if i > 0:
        hi = jnp.asarray(shift + b, kdt)
        valid = (key >> hi) == (t >> hi)
      if el is not None:
        valid = el if valid is None else valid & el
      if last:
        d = d + li * nb
      if valid is not None:
        d = jnp.where(valid, d, h.shape[0])  # out of range: dropped
      # The update's broadcast is per leaf and pass too (a shared constant would stay live).
      one = jnp.asarray(1, cdt) + _opaque_zero(h).astype(cdt)
      h = h.at[d].add(one, mode="drop")
    per_leaf = h.reshape(n, nb) if last else None
    if last:
      h = per_leaf.sum(axis=0)
    j, above = _select_digit(h, k_rem, b)
    gt = gt + above
    k_rem = k_rem - above
    t = t | (j.astype(kdt) << jnp.asarray(shift, kdt))
  return t, gt, per_leaf[:, j]


def _tie_cutoffs(keys, t, r_l, which):
  """Tie cut-off of leaf ``which``: smallest c with count(key == t & idx < c) >= r_l[which].

  Bisection on the flat index, each step one fused count over that leaf only
  (``lax.switch`` picks the leaf inside the loop body).
  """
  n = len(keys)
  sizes = [int(np.prod(s)) for s in keys.shapes]
  nb = max(1, max(sizes).bit_length())
  size_w = jnp.asarray(sizes, jnp.int32)[which]
  r = r_l[which]

  def step(i, p):
    cand = p + (jnp.int32(1) << (nb - 1 - i))
    kk = keys.refresh(p)
    branches = [lambda c, li=li: kk.count(li, lambda key, idx: (key == t) & (idx() < c)) for li in range(n)]
    f = lax.switch(which, branches, cand)
    return jnp.where((cand <= size_w) & (f < r), cand, p)

  return lax.fori_loop(0, nb, step, jnp.zeros((), jnp.int32)) + 1


_METHODS = ("auto", "radix", "bisect")


def _threshold(keys, k, method="auto", radix_bits=None):
  n = len(keys)
  cdt = _count_dtype()
  k = jnp.maximum(jnp.asarray(k, cdt), 0)
  sizes_py = [int(np.prod(shape)) for shape in keys.shapes]
  if method not in _METHODS:
    raise ValueError(f"global selection: method must be one of {_METHODS}, got {method!r}.")
  if method == "auto":
    method = "radix" if sum(sizes_py) > (1 << 16) else "bisect"
  if method == "radix":
    t, gt, eq_leaf = _radix_select(keys, k, radix_bits)
    total_eq = jnp.sum(eq_leaf)
  else:
    t, gt, total_eq = _bisect_select(keys, k)
    eq_leaf = None
  r = jnp.clip(k - gt, 0, total_eq)  # ties to keep
  sizes = jnp.asarray(sizes_py, jnp.int32)

  def none_kept():
    return jnp.zeros((n,), jnp.int32)

  def all_kept():
    return sizes

  def some_kept():
    kk = keys.refresh(r)
    if eq_leaf is None:
      eq = []
      for i in range(n):
        eq.append(kk.count(i, lambda key, idx: key == t, eq[-1] if eq else None))
      eq = jnp.stack(eq)
    else:
      eq = eq_leaf
    before = jnp.cumsum(eq) - eq  # over leaves: a short vector of scalars
    r_l = jnp.clip(r - before, 0, eq)
    cut = jnp.where(r_l >= eq, sizes, 0).astype(jnp.int32)
    partial = (r_l > 0) & (r_l < eq)
    which = jnp.argmax(partial).astype(jnp.int32)  # exactly one leaf is partial here
    return cut.at[which].set(_tie_cutoffs(kk, t, r_l, which))

  case = jnp.where(r >= total_eq, 1, jnp.where(r == 0, 0, 2))
  cutoffs = lax.switch(case, [none_kept, all_kept, some_kept])
  return t, cutoffs, gt + r


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


def _flatten(scores, masks, score_fn=None):
  s_paths, s_leaves = [], []
  for p, leaf in jax.tree_util.tree_flatten_with_path(scores)[0]:
    s_paths.append(_paths.path_str(p))
    s_leaves.append(leaf)
  if not s_leaves:
    raise ValueError("global selection: the score tree has no leaves.")
  for p, leaf in zip(s_paths, s_leaves):
    dt = jnp.result_type(leaf) if score_fn is None else jax.eval_shape(score_fn, leaf).dtype
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
                     score_fn=None, method: str = "auto", radix_bits: int | None = None) -> GlobalThreshold:
  """Exact global top-k threshold over all leaves of ``scores``, by reductions.

  Args:
    scores: pytree of real arrays (None leaves are ignored).
    k_or_density: an integer ``k`` (number kept) or a float density; or use
      ``k=``/``density=``. Density keeps ``num_to_keep(total, density)`` elements.
    k: number of elements to keep (may be traced).
    density: fraction of all score elements to keep (may be traced).
    masks: optional eligibility tree (bool arrays, None = all eligible): only
      eligible elements compete and can be kept.
    score_fn: optional elementwise function applied to each leaf to get the
      scores (e.g. ``jnp.abs`` with params as ``scores``); it is fused into
      every pass so no full-size score tree is materialised. It must give
      the same score for -0.0 and +0.0.
    method: ``"radix"`` (2 histogram passes for 32-bit keys; temporaries of
      about 8 bytes per element of the largest leaf), ``"bisect"`` (one fused
      count per key bit: 32 passes, about 4 bytes per element of the largest
      leaf) or ``"auto"`` (radix above 65536 candidates). Both give identical
      results.
    radix_bits: digit width of every radix pass (4, 8 or 16); default None:
      a 20-bit then a 12-bit pass (the last pass keeps ``2**bits`` bins per leaf).

  Returns:
    A :class:`GlobalThreshold`.

  >>> import jax.numpy as jnp
  >>> th = global_threshold({'a': jnp.array([3., 1.]), 'b': jnp.array([2., 2.])}, 2)
  >>> [int(c) for c in th.cutoffs], int(th.count)
  ([2, 1], 2)
  """
  _, leaves, eligible = _flatten(scores, masks, score_fn)
  total = sum(int(np.prod(np.shape(x))) for x in leaves)
  kk = _k_from(k_or_density, k, density, total)
  _check_method(method, radix_bits)
  t, cutoffs, count = _run(leaves, eligible, kk, score_fn, method, radix_bits, False)
  return GlobalThreshold(t, tuple(cutoffs[i] for i in range(len(leaves))), count)


def global_topk_masks(scores: Any, k_or_density=None, *, k=None, density=None, masks: Any = None,
                      score_fn=None, method: str = "auto", radix_bits: int | None = None) -> Any:
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
    score_fn: optional elementwise function applied to each leaf to get the
      scores (e.g. ``jnp.abs`` with params as ``scores``); it is fused into
      every pass so no full-size score tree is materialised.
    method: ``"auto"``, ``"radix"`` or ``"bisect"`` (see :func:`global_threshold`).
    radix_bits: digit width of the radix passes (see :func:`global_threshold`).

  Returns:
    Tree of bool arrays shaped like ``scores``.

  >>> import jax.numpy as jnp
  >>> m = global_topk_masks({'a': jnp.array([3., 1.]), 'b': jnp.array([2., 2.])}, 2)
  >>> m['a'].tolist(), m['b'].tolist()
  ([True, False], [True, False])
  """
  _, leaves, eligible = _flatten(scores, masks, score_fn)
  total = sum(int(np.prod(np.shape(x))) for x in leaves)
  kk = _k_from(k_or_density, k, density, total)
  _check_method(method, radix_bits)
  out = _run(leaves, eligible, kk, score_fn, method, radix_bits, True)
  return jax.tree.unflatten(jax.tree.structure(scores), out)


def _check_method(method, radix_bits):
  if method not in _METHODS:
    raise ValueError(f"global selection: method must be one of {_METHODS}, got {method!r}.")
  if radix_bits not in (None, 4, 8, 16):
    raise ValueError(f"global selection: radix_bits must be None, 4, 8 or 16, got {radix_bits!r}.")


@functools.partial(jax.jit, static_argnames=("score_fn", "method", "radix_bits", "want_masks"))
def _run(leaves, eligible, k, score_fn, method, radix_bits, want_masks):
  """Jitted core (inlined under an outer jit; compiled once per shape when eager)."""
  keys = _LazyKeys(leaves, eligible, score_fn)
  t, cutoffs, count = _threshold(keys, k, method, radix_bits)
  if not want_masks:
    return t, cutoffs, count
  out = []
  for i in range(len(keys)):
    key, el = keys.key_after(i, cutoffs)  # elementwise: fused, no temporaries
    m = (key > t) | ((key == t) & (_leaf_iota(key.shape) < cutoffs[i]))
    if el is not None:
      m = m & el
    out.append(m)
  return out
