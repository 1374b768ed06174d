"""Exact, sharding-safe top-k selection across the leaves of a pytree.

Global (cross-leaf) top-k never concatenates scores. Scores are mapped to an
order-preserving unsigned-integer image (:func:`ordered_keys`) and the k-th
largest key is found by radix selection over all leaves at once:

* ``method="radix"`` (default above 65536 candidates): two digit passes for
  32-bit keys (four for 64-bit keys), 16-bit digits, or a 20-bit then a 12-bit
  digit above 2**22 candidates; each pass scatter-adds the digit of every
  candidate key whose higher digits match the prefix found so far into a
  histogram (a 12-bit last pass keeps one 4096-bin histogram per leaf: the
  per-leaf tie counts). Under sharding each device histograms its shard and
  an all-reduce of the histogram (4 MiB at most) follows.
* ``method="bisect"``: 32 steps, each one ``count(key >= candidate)`` per
  leaf, summed over leaves (an all-reduce of a scalar).

Both are exact and give identical masks. Ties at the threshold are broken by
(leaf order, flat index): the first tied elements win, exactly as if the leaves
had been flattened and concatenated. The tie cut-off is found by bisection on
counts inside the single leaf that holds it (never by a cumsum over a sharded
axis). The final masks are elementwise comparisons, so they keep the scores'
shardings and no parameter is ever gathered.

Memory: keys are recomputed inside every pass from the score operands (never
stored; :class:`LazyScores` extends this to scores such as ``|g|``), and a
large leaf is visited as up to 64 interleaved slabs of >= 65536 entries, one
slab per loop iteration. The scratch of a pass is a few bytes per slab entry
plus the histogram, instead of a few bytes per parameter.
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
  "LazyScores",
  "count_nonzero",
  "global_threshold",
  "global_topk_masks",
  "leafwise_topk_masks",
  "num_to_keep",
  "keep_counts",
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
  return keep_counts(np.asarray([size]), jnp.reshape(density, (1,)), minimum)[0]


def keep_counts(sizes, densities, minimum: int = 1) -> jax.Array:
  """:func:`num_to_keep` of many leaves in one vector operation (same values).

  Per-leaf scalar arithmetic compiles to one kernel per leaf on XLA:CPU
  (~15 ms each); this is one kernel for all of them.

  Args:
    sizes: static sizes (a sequence of ints, each < 2**31).
    densities: float vector (may be traced), one per size; clipped to [0, 1].
    minimum: lower bound of every count.

  Returns:
    Integer vector of counts.

  >>> keep_counts([10, 100], jnp.array([0.25, 0.5])).tolist()
  [3, 50]
  """
  sizes = np.asarray(sizes, np.int64)
  if sizes.size and sizes.max() >= 2**31:
    raise ValueError(f"keep_counts: a size >= 2**31 is not supported ({int(sizes.max())}).")
  d = jnp.clip(jnp.asarray(densities, jnp.float32), 0.0, 1.0)
  dq = jnp.round(d * jnp.float32(2.0**31)).astype(jnp.uint32)
  k = _mulhi_round(sizes.astype(np.uint32), dq, 31).astype(jnp.int32)
  return jnp.clip(k, np.minimum(minimum, sizes).astype(np.int32),
                  sizes.astype(np.int32)).astype(_count_dtype())


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


class LazyScores:
  """Scores of one leaf as an elementwise function of leaf-shaped arrays.

  Selection evaluates ``fn`` slab by slab inside every pass (and once more,
  fused, for the final mask), so no full-size score array is ever stored:
  ``LazyScores(jnp.abs, w)`` ranks ``|w|`` at the memory cost of ``w`` itself.
  Accepted wherever a score leaf is (:func:`global_topk_masks`, the pruning
  functions of :mod:`sparsejax.core.pruning`). A pytree: ``operands`` are its
  children, ``fn`` is static.

  Args:
    fn: elementwise function, ``fn(*operands)``, or ``fn(*operands, index)``
      with ``index=True`` (``index``: int32 row-major flat index of every
      entry, e.g. for counter-hash random scores).
    *operands: arrays of the leaf's shape (visited slab by slab) or scalars
      (passed whole, e.g. a norm or a PRNG word).
    shape: the leaf's shape (default: the shape of the first non-scalar
      operand; required when there is none).
    index: pass the flat index as the last argument of ``fn``.

  >>> import jax.numpy as jnp
  >>> s = LazyScores(jnp.abs, jnp.array([-3., 1., 2.]))
  >>> global_topk_masks([s], k=2)[0].tolist()
  [True, False, True]
  """

  def __init__(self, fn, *operands, shape=None, index: bool = False):
    self.fn = fn
    self.operands = tuple(operands)
    self.index = bool(index)
    if shape is None:
      shapes = [np.shape(x) for x in operands if np.ndim(x)]
      if not shapes:
        raise ValueError("LazyScores: give shape= when no operand has the leaf's shape.")
      shape = shapes[0]
    self.shape = tuple(int(d) for d in shape)
    for x in self.operands:
      if np.ndim(x) and tuple(np.shape(x)) != self.shape:
        raise ValueError(f"LazyScores: operand shape {np.shape(x)} differs from the leaf shape "
                         f"{self.shape}; operands must have the leaf's shape or be scalars.")

  @property
  def dtype(self):
    args = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in self.operands]
    if self.index:
      args.append(jax.ShapeDtypeStruct(self.shape, jnp.int32))
    return jax.eval_shape(lambda *a: self.fn(*a), *args).dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  def evaluate(self, operands=None, index=None) -> jax.Array:
    """The scores of (a slab of) the leaf: ``fn`` applied to ``operands``."""
    ops = self.operands if operands is None else operands
    if not self.index:
      return self.fn(*ops)
    return self.fn(*ops, _flat_index(self.shape) if index is None else index)

  def map(self, f) -> "LazyScores":
    """``f`` applied to the scores, still lazily.

    >>> import jax.numpy as jnp
    >>> LazyScores(jnp.abs, jnp.array([-2.])).map(lambda s: s * 3).evaluate().tolist()
    [6.0]
    """
    return LazyScores(_Then(self.fn, f), *self.operands, shape=self.shape, index=self.index)

  def __repr__(self):
    return f"LazyScores({getattr(self.fn, '__name__', self.fn)}, shape={self.shape})"


class _Then(NamedTuple):
  """``g(f(*args))``; hashable and equal by value, so jit caches keep hitting."""
  f: Any
  g: Any

  def __call__(self, *args):
    return self.g(self.f(*args))


jax.tree_util.register_pytree_node(
    LazyScores,
    lambda s: (s.operands, (s.fn, s.shape, s.index)),
    lambda aux, ops: LazyScores(aux[0], *ops, shape=aux[1], index=aux[2]))


def is_lazy(x) -> bool:
  return isinstance(x, LazyScores)


def materialize(scores) -> jax.Array:
  """An array of scores from an array or :class:`LazyScores`."""
  return scores.evaluate() if isinstance(scores, LazyScores) else jnp.asarray(scores)


def _flat_index(shape, axis: int = 0, slabs: int = 1, j=0) -> jax.Array:
  """Row-major flat index (int32) of every entry of slab ``j`` (see :class:`_Group`)."""
  cshape = list(shape)
  if slabs > 1:
    cshape[axis] //= slabs
  idx = jnp.zeros(cshape, jnp.int32)
  stride = 1
  for d in range(len(shape) - 1, -1, -1):
    i = lax.broadcasted_iota(jnp.int32, cshape, d)
    if d == axis and slabs > 1:
      i = i * slabs + jnp.asarray(j, jnp.int32)
    idx = idx + i * stride
    stride *= shape[d]
  return idx


# Leaves of more than _WHOLE entries are visited slab by slab in every pass,
# in up to _MAX_SLABS slabs of at least _SLAB entries: XLA:CPU materialises the
# input of every reduction and the indices and updates of every scatter, so a
# pass over a whole leaf needs ~8-12 bytes of scratch per entry, a pass over a
# slab that per slab entry only. (A large scratch buffer costs on every call,
# not only when the pass runs: XLA allocates one temp buffer for the whole
# program, e.g. sized by a mask-update branch that runs every 100 steps.)
# Smaller leaves are visited whole: each slab loop costs ~0.1 ms on CPU.
_WHOLE = 1 << 19
_SLAB = 1 << 16
_MAX_SLABS = 64


def _slabs(shape) -> tuple[int, int]:
  """``(axis, c)``: visit the leaf as ``c`` interleaved slabs along ``axis``.

  Slab ``j`` holds the entries whose index along ``axis`` is ``j`` mod ``c``:
  splitting ``axis`` into ``(size // c, c)`` keeps a sharding of ``axis`` on
  the outer factor, so taking a slab moves no data between devices. ``c`` is
  the largest divisor of an axis length up to ``size // _SLAB`` (at most
  ``_MAX_SLABS``); 1 (the whole leaf at once) up to ``_WHOLE`` entries.
  """
  n = int(np.prod(shape)) if shape else 1
  want = min(_MAX_SLABS, n // _SLAB)
  if n <= _WHOLE or want < 2:
    return 0, 1
  best_c, best_a = 1, 0
  for a, s in enumerate(shape):
    c = max(d for d in range(1, want + 1) if s % d == 0)
    if c > best_c or (c == best_c and c > 1 and s > shape[best_a]):
      best_c, best_a = c, a
  return best_a, best_c


def _evaluate(scores: LazyScores, operands, index_thunk):
  return scores.evaluate(operands, index_thunk() if scores.index else None)


def count_nonzero(x) -> jax.Array:
  """``jnp.count_nonzero(x)`` of an array or :class:`LazyScores`, slab by slab.

  XLA:CPU stores the input of every reduction; this visits a large leaf in
  slabs (as the selection passes do), so its scratch is one slab's.

  >>> import jax.numpy as jnp
  >>> int(count_nonzero(jnp.array([0., 2., -1.]))), int(count_nonzero(LazyScores(jnp.isnan, jnp.ones(4))))
  (2, 0)
  """
  scores = x if isinstance(x, LazyScores) else LazyScores(_identity, jnp.asarray(x))
  group = _Group([scores.map(_is_nonzero)], [None], (0,), np.dtype(np.uint32))
  return group.count(lambda key, idx: key != 0)


def _is_nonzero(v):
  return v != 0


def _opaque_zero(token) -> jax.Array:
  """A uint32 zero that XLA cannot prove is zero, data-dependent on every leaf of ``token``.

  ``(v * v) & 2 == 0`` for every integer ``v`` (squares are 0 or 1 mod 4).
  ``token`` must hold small values (scalars, histograms), never a (possibly
  sharded) parameter-sized array: one element of each leaf is read.
  """
  z = jnp.zeros((), jnp.uint32)
  for leaf in jax.tree.leaves(token):
    v = jnp.ravel(jnp.asarray(leaf))[0]
    v = v.astype(jnp.uint32) if v.dtype == jnp.bool_ else lax.convert_element_type(v, jnp.uint32)
    z = z | ((v * v) & jnp.uint32(2))
  return z


def _xor_bits(x, z) -> jax.Array:
  """``x`` plus the runtime zero ``z``: the same keys as ``x``, data-dependent on ``z``.

  (For floats ``x + 0`` only turns -0.0 into +0.0, which have the same key.)
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    return x ^ (z != 0)
  return x + z.astype(x.dtype)


def _signature(scores: LazyScores | None, kdt):
  """What a pass over the leaf compiles to: equal signatures share one compiled pass."""
  if scores is None:
    return None
  fn = scores.fn
  try:
    hash(fn)
  except TypeError:
    fn = ("id", id(fn))
  ops = tuple((tuple(np.shape(x)), np.dtype(jnp.result_type(x))) for x in scores.operands)
  return (fn, scores.shape, scores.index, ops, None if kdt is None else np.dtype(kdt))


class _Group:
  """Candidate leaves with one signature (score function, shapes, dtypes), visited by one pass.

  Keys are recomputed from the score operands in every pass. A group of
  several leaves (the same layer in every transformer block) is visited in a
  loop: the operands of the current member are picked by ``lax.switch``, a
  copy of one leaf at a time, so the compiled program has one pass per group,
  not per leaf. Leaves large enough to be visited in slabs (more than
  ``_WHOLE`` entries) are never grouped (a copy would cost a whole leaf of
  scratch). ``positions`` are the members' places in the selection (leaf
  order, which breaks ties).
  """

  def __init__(self, scores, eligible, positions, kdt):
    self.scores = list(scores)
    self.eligible = [_as_lazy(e) for e in eligible]
    self.positions = tuple(positions)
    self.kdt = kdt
    self.shape = self.scores[0].shape
    self.size = self.scores[0].size
    self.axis, self.slabs = _slabs(self.shape)

  @property
  def n(self) -> int:
    return len(self.scores)

  def view(self, member):
    """Member ``member`` (traced int) alone, as the only leaf of a selection.

    Its operands are picked once (a copy of one leaf: grouped leaves are small)
    and every pass of that selection reads the copy, so one ``lax.switch``
    serves the whole per-member selection.
    """
    if self.n == 1:
      return _Group(self.scores, self.eligible, (0,), self.kdt)
    ops, el_ops = self._pick(member, None)
    s0, e0 = self.scores[0], self.eligible[0]
    s = LazyScores(s0.fn, *ops, shape=s0.shape, index=s0.index)
    e = None if e0 is None else LazyScores(e0.fn, *el_ops, shape=e0.shape, index=e0.index)
    return _Group([s], [e], (0,), self.kdt)

  def _split(self, x):
    a, c = self.axis, self.slabs
    return jnp.reshape(x, self.shape[:a] + (self.shape[a] // c, c) + self.shape[a + 1:])

  def _take(self, x, j):
    if not np.ndim(x) or j is None:
      return x
    return lax.dynamic_index_in_dim(self._split(x), j, self.axis + 1, keepdims=False)

  def _pick(self, m, j):
    """(score operands, eligibility operands) of member ``m``, slab ``j`` (None: whole leaf)."""
    flat = [list(s.operands) + ([] if e is None else list(e.operands))
            for s, e in zip(self.scores, self.eligible)]
    n_s = len(self.scores[0].operands)
    if self.n == 1:
      out = [self._take(x, j) for x in flat[0]]
    else:
      arr = [i for i, x in enumerate(flat[0]) if np.ndim(x)]
      dts = [np.dtype(jnp.result_type(flat[0][i])) for i in arr]

      def branch(q):
        return lambda jj: tuple(lax.convert_element_type(
            self._take(flat[q][i], None if j is None else jj), dt)
                                for i, dt in zip(arr, dts))
      picked = lax.switch(m, [branch(q) for q in range(self.n)],
                          jnp.zeros((), jnp.int32) if j is None else j)
      out = list(flat[0])
      for i, x in zip(arr, picked):
        out[i] = x
      for i, x in enumerate(flat[0]):
        if not np.ndim(x):
          out[i] = jnp.stack([jnp.asarray(f[i]) for f in flat])[m]
    return out[:n_s], out[n_s:]

  def _visit(self, body, acc, ops, el_ops, j, pos):
    s0, e0 = self.scores[0], self.eligible[0]
    if j is None:
      idx = lambda: _flat_index(self.shape)  # noqa: E731
    else:
      idx = lambda: _flat_index(self.shape, self.axis, self.slabs, j)  # noqa: E731
    key = ordered_keys(s0.evaluate(ops, idx() if s0.index else None)).astype(self.kdt)
    el = None if e0 is None else _evaluate(e0, el_ops, idx)
    return body(acc, key, el, idx, pos)

  def fold(self, body, init, after=None):
    """``body(acc, keys, eligible, index, position)`` over the members, one slab at a time.

    ``index`` is a thunk giving the flat index of the slab's entries;
    ``eligible`` is None when every entry is eligible. Nothing of the pass
    starts before ``init`` and ``after`` exist, so XLA cannot run the passes
    of several leaves at once and hold all their temporaries together: a
    loop carries ``init``; a single whole leaf's operands get a runtime zero
    computed from ``init`` and ``after`` added (XLA:CPU drops optimisation
    barriers, but keeps data dependencies).
    """
    c = self.slabs
    if self.n * c == 1:
      z = _opaque_zero((init, after))
      ops, el_ops = self._pick(0, None)
      ops = [_xor_bits(x, z) for x in ops]
      el_ops = [_xor_bits(x, z) for x in el_ops]
      return self._visit(body, init, ops, el_ops, None, self.positions[0])
    pos_arr = np.asarray(self.positions, np.int32)

    def step(r, acc):
      q, j = (r // c, r % c) if c > 1 else (r, None)
      pos = jnp.asarray(pos_arr)[q] if self.n > 1 else self.positions[0]
      ops, el_ops = self._pick(q, j)
      return self._visit(body, acc, ops, el_ops, j, pos)

    return lax.fori_loop(0, self.n * c, step, init)

  def count(self, pred, init=None, after=None) -> jax.Array:
    """``init + sum(pred(keys, index) & eligible)`` over the members, after ``after`` exists."""
    def body(acc, key, el, idx, pos):
      del pos
      c = pred(key, idx)
      if el is not None:
        c = c & el
      return acc + jnp.sum(c, dtype=_count_dtype())
    return self.fold(body, jnp.zeros((), _count_dtype()) if init is None else init, after)

  def counts_into(self, pred, vec, after=None) -> jax.Array:
    """``vec`` with ``vec[position] = count(pred)`` of every member, one member after the other."""
    if self.n == 1:
      return vec.at[self.positions[0]].set(self.count(pred, after=(vec, after)))
    pos_arr = jnp.asarray(np.asarray(self.positions, np.int32))

    def one(m, v):
      return v.at[pos_arr[m]].set(self.view(m).count(pred, after=v))
    return lax.fori_loop(0, self.n, one, vec)


def _groups(scores, eligible, kdt_of) -> list[_Group]:
  """Leaves grouped by signature, groups in order of their first leaf."""
  by_sig: dict = {}
  for i, (s, e) in enumerate(zip(scores, eligible)):
    if e is not None and not isinstance(e, LazyScores):
      e = LazyScores(_identity, e)
    kdt = kdt_of(s)
    # Leaves visited in slabs stay alone: their passes already loop, and a
    # member copy would cost a whole large leaf of scratch memory.
    alone = i if _slabs(s.shape)[1] > 1 else None
    sig = (_signature(s, kdt), _signature(e, None), alone)
    by_sig.setdefault(sig, []).append((i, s, e, kdt))
  return [_Group([s for _, s, _, _ in g], [e for _, _, e, _ in g], [i for i, _, _, _ in g], g[0][3])
          for g in by_sig.values()]


def _total(groups, pred, after) -> jax.Array:
  out = jnp.zeros((), _count_dtype())
  for g in groups:
    out = g.count(pred, out, after)
  return out


def _bisect_select(groups, k):
  """Largest key t with count(key >= t) >= k: one count pass per bit.

  Returns:
    ``(t, count(key > t), count(key == t))``.
  """
  kdt = groups[0].kdt
  nbits = 8 * kdt.itemsize

  def step(i, t):
    cand = t | (jnp.asarray(1, kdt) << (nbits - 1 - i).astype(kdt))
    total = _total(groups, lambda key, idx: key >= cand, t)
    return jnp.where(total >= k, cand, t)

  t = lax.fori_loop(0, nbits, step, jnp.zeros((), kdt))
  gt = _total(groups, lambda key, idx: key > t, t)
  eq = _total(groups, lambda key, idx: key == t, gt)
  return t, gt, eq


def _radix_schedule(nbits: int, bits: int | None, total: int = 0) -> list[int]:
  """Digit widths, MSB first.

  Default: 16-bit digits (65536-bin histograms); above 2**22 candidates a
  20-bit then a 12-bit digit, whose last pass keeps one 4096-bin histogram per
  leaf (the per-leaf tie counts for free, instead of one more count pass).
  """
  if bits is None:
    if total > (1 << 22):
      return [20, 12] if nbits == 32 else [20, 20, 12, 12]
    bits = 16
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


def _radix_select(groups, n, total, k, bits):
  """Same result as :func:`_bisect_select` with a few histogram passes.

  Pass i histograms digit i (MSB first) of the keys whose higher digits equal
  the threshold's digits found so far: a scatter-add into a small replicated
  histogram (``2**bits`` bins; local per shard, then an all-reduce). A last
  digit of at most 12 bits is histogrammed per leaf (``n * 2**bits`` bins),
  which gives the per-leaf count of keys equal to the threshold.

  Returns:
    ``(t, count(key > t), count(key == t), per-leaf count(key == t) or None)``.
  """
  kdt = groups[0].kdt
  nbits = 8 * kdt.itemsize
  cdt = _count_dtype()
  t = jnp.zeros((), kdt)
  k_rem = k
  gt = jnp.zeros((), cdt)
  shift = nbits
  sched = _radix_schedule(nbits, bits, total)
  per_leaf = None
  for i, b in enumerate(sched):
    shift -= b
    nb = 1 << b
    split = i == len(sched) - 1 and b <= 12  # per-leaf histograms
    h = jnp.zeros((n * nb if split else nb,), cdt)

    def body(h, key, el, idx, pos, i=i, shift=shift, b=b, nb=nb, t=t, split=split):
      del idx
      d = ((key >> jnp.asarray(shift, kdt)) & jnp.asarray(nb - 1, kdt)).astype(jnp.int32)
      valid = None
      if i > 0:
        hi = jnp.asarray(shift + b, kdt)
        valid = (key >> hi) == (t >> hi)
      if el is not None:
        valid = el if valid is None else valid & el
      if split and not (isinstance(pos, int) and pos == 0):
        d = d + pos * nb
      if valid is not None:
        d = jnp.where(valid, d, h.shape[0])  # out of range: dropped
      # The update is data-dependent on h: a constant broadcast would be hoisted
      # out of every loop and held, one per leaf, for the whole program.
      one = jnp.ones((), cdt) + _opaque_zero(h).astype(cdt)
      return h.at[d].add(one, mode="drop")

    for g in groups:
      h = g.fold(body, h, t)
    if split:
      per_leaf = h.reshape(n, nb)
      h = per_leaf.sum(axis=0)
    j, above = _select_digit(h, k_rem, b)
    gt = gt + above
    k_rem = k_rem - above
    t = t | (j.astype(kdt) << jnp.asarray(shift, kdt))
  return t, gt, h[j], None if per_leaf is None else per_leaf[:, j]


def _tie_cutoffs(groups, sizes, t, r_l, which):
  """Tie cut-off of leaf ``which``: smallest c with count(key == t & idx < c) >= r_l[which].

  Bisection on the flat index, each step one count pass over that leaf only
  (``lax.switch`` picks the leaf's group inside the loop body, the group its
  member).
  """
  nb = max(1, max(sizes).bit_length())
  size_w = jnp.asarray(sizes, jnp.int32)[which]
  r = r_l[which]
  group_of = np.zeros(len(sizes), np.int32)
  member_of = np.zeros(len(sizes), np.int32)
  for gi, g in enumerate(groups):
    for mi, p in enumerate(g.positions):
      group_of[p], member_of[p] = gi, mi
  gw = jnp.asarray(group_of)[which]
  mw = jnp.asarray(member_of)[which]

  def step(i, p):
    cand = p + (jnp.int32(1) << (nb - 1 - i))
    branches = [lambda c, g=g: g.view(mw).count(lambda key, idx: (key == t) & (idx() < c), after=c)
                for g in groups]
    f = lax.switch(gw, branches, cand)
    return jnp.where((cand <= size_w) & (f < r), cand, p)

  return lax.fori_loop(0, nb, step, jnp.zeros((), jnp.int32)) + 1


_METHODS = ("auto", "radix", "bisect")


def _threshold(groups, sizes_py, k, method="auto", radix_bits=None):
  """``(t, per-leaf cutoffs, count)`` of the exact top-k over the leaves of ``groups``."""
  n = len(sizes_py)
  cdt = _count_dtype()
  k = jnp.maximum(jnp.asarray(k, cdt), 0)
  if method not in _METHODS:
    raise ValueError(f"global selection: method must be one of {_METHODS}, got {method!r}.")
  if method == "auto":
    method = "radix" if sum(sizes_py) > (1 << 16) else "bisect"
  if method == "radix":
    t, gt, total_eq, eq_leaf = _radix_select(groups, n, sum(sizes_py), k, radix_bits)
  else:
    (t, gt, total_eq), eq_leaf = _bisect_select(groups, k), None
  r = jnp.clip(k - gt, 0, total_eq)  # ties to keep
  sizes = jnp.asarray(sizes_py, jnp.int32)

  def none_kept():
    return jnp.zeros((n,), jnp.int32)

  def all_kept():
    return sizes

  def some_kept():
    if eq_leaf is not None:
      eq = eq_leaf
    else:
      eq = jnp.zeros((n,), cdt)
      for g in groups:  # one leaf's pass after the other
        eq = g.counts_into(lambda key, idx: key == t, eq, after=r)
    before = jnp.cumsum(eq) - eq  # over leaves: a short vector of scalars
    r_l = jnp.clip(r - before, 0, eq)
    cut = jnp.where(r_l >= eq, sizes, 0).astype(jnp.int32)
    partial = (r_l > 0) & (r_l < eq)
    which = jnp.argmax(partial).astype(jnp.int32)  # exactly one leaf is partial here
    return cut.at[which].set(_tie_cutoffs(groups, sizes_py, t, r_l, which))

  case = jnp.where(r >= total_eq, 1, jnp.where(r == 0, 0, 2))
  cutoffs = lax.switch(case, [none_kept, all_kept, some_kept])
  return t, cutoffs, gt + r


def _as_lazy(e):
  return e if e is None or isinstance(e, LazyScores) else LazyScores(_identity, e)


def _final_mask(scores: LazyScores, eligible, kdt, t, cut) -> jax.Array:
  """``key > t | (key == t & index < cut)``, eligible only: elementwise, fused into one pass."""
  idx = _flat_index(scores.shape)
  key = ordered_keys(scores.evaluate(None, idx if scores.index else None)).astype(kdt)
  m = (key > t) | ((key == t) & (idx < cut))
  if eligible is not None:
    m = m & _evaluate(_as_lazy(eligible), None, lambda: idx)
  return m


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
  """(paths, LazyScores leaves, eligibility leaves) of a score tree."""
  s_paths, s_leaves = [], []
  for p, leaf in jax.tree_util.tree_flatten_with_path(scores, is_leaf=is_lazy)[0]:
    s_paths.append(_paths.path_str(p))
    if not isinstance(leaf, LazyScores):
      leaf = LazyScores(_identity if score_fn is None else score_fn, jnp.asarray(leaf))
    elif score_fn is not None:
      leaf = leaf.map(score_fn)
    s_leaves.append(leaf)
  if not s_leaves:
    raise ValueError("global selection: the score tree has no leaves.")
  for p, leaf in zip(s_paths, s_leaves):
    dt = leaf.dtype
    if jnp.issubdtype(dt, jnp.complexfloating):
      raise TypeError(f"global selection: scores at '{p}' are complex ({dt}); pass real scores such as |x|.")
  if masks is None:
    return s_paths, s_leaves, [None] * len(s_leaves)
  flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None or is_lazy(x))[0]
  m_paths = {_paths.path_str(p): leaf for p, leaf in flat}
  eligible = []
  for p, leaf in zip(s_paths, s_leaves):
    if p not in m_paths:
      raise ValueError(f"global selection: masks have no leaf '{p}' (scores have it); masks must match scores.")
    m = m_paths[p]
    if m is not None:
      if tuple(np.shape(m)) != leaf.shape:
        raise ValueError(f"global selection: mask at '{p}' has shape {np.shape(m)} but scores have {leaf.shape}.")
      if not isinstance(m, LazyScores):
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
    method: ``"radix"`` (a histogram pass per 16-bit digit: 2 passes for
      32-bit keys), ``"bisect"`` (one count pass per key bit: 32 passes) or
      ``"auto"`` (radix above 65536 candidates). Both give identical results.
    radix_bits: digit width of every radix pass (4, 8 or 16; default None:
      16, or 20 then 12 above 2**22 candidates).

  Returns:
    A :class:`GlobalThreshold`.

  >>> import jax.numpy as jnp
  >>> th = global_threshold({'a': jnp.array([3., 1.]), 'b': jnp.array([2., 2.])}, 2)
  >>> [int(c) for c in th.cutoffs], int(th.count)
  ([2, 1], 2)
  """
  _, leaves, eligible = _flatten(scores, masks, score_fn)
  total = sum(leaf.size for leaf in leaves)
  kk = _k_from(k_or_density, k, density, total)
  _check_method(method, radix_bits)
  t, cutoffs, count = _run(leaves, eligible, kk, method, radix_bits, False)
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
  total = sum(leaf.size for leaf in leaves)
  kk = _k_from(k_or_density, k, density, total)
  _check_method(method, radix_bits)
  out = _run(leaves, eligible, kk, method, radix_bits, True)
  return jax.tree.unflatten(jax.tree.structure(scores, is_leaf=is_lazy), out)


def leafwise_topk_masks(scores: Any, k: Any, *, masks: Any = None, score_fn=None,
                        method: str = "auto", radix_bits: int | None = None) -> Any:
  """Boolean masks keeping the exact top-``k`` scores of every leaf on its own.

  The per-leaf counterpart of :func:`global_topk_masks` (same selection, same
  tie rule: the lower flat index wins). Leaves with the same shape, dtypes and
  score function (every block of a transformer) share one compiled selection,
  run in a loop, so compile time grows with the number of distinct leaf
  signatures, not with the number of leaves.

  Args:
    scores: pytree of real arrays or :class:`LazyScores`.
    k: number kept per leaf: an int (every leaf), a tree like ``scores`` of
      ints, or an integer vector with one entry per leaf (may be traced);
      clipped to ``[0, number of eligible entries]``.
    masks: optional eligibility tree (bool arrays, None = all eligible).
    score_fn: optional elementwise function applied to each leaf to get the
      scores (fused into every pass).
    method: ``"auto"``, ``"radix"`` or ``"bisect"`` (see :func:`global_threshold`).
    radix_bits: digit width of the radix passes (see :func:`global_threshold`).

  Returns:
    Tree of bool arrays shaped like ``scores``.

  Raises:
    ValueError: a concrete ``k`` outside ``[0, leaf size]`` (the message names
      the leaf), or a ``k`` tree that does not match ``scores``. A traced ``k``
      cannot be checked and is clipped.

  >>> import jax.numpy as jnp
  >>> s = {'a': jnp.array([3., 1., 3.]), 'b': jnp.array([0., 2., 5.])}
  >>> m = leafwise_topk_masks(s, {'a': 1, 'b': 2})
  >>> m['a'].tolist(), m['b'].tolist()
  ([True, False, False], [False, True, True])
  """
  paths, leaves, eligible = _flatten(scores, masks, score_fn)
  kv = _leaf_counts(k, paths, np.asarray([leaf.size for leaf in leaves]))
  _check_method(method, radix_bits)
  out = _run_leafwise(leaves, eligible, kv, method, radix_bits)
  return jax.tree.unflatten(jax.tree.structure(scores, is_leaf=is_lazy), out)


def _concrete_ints(x) -> np.ndarray | None:
  """``x`` as a NumPy array, or None where it is traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _leaf_counts(k, paths, sizes: np.ndarray) -> jax.Array:
  """The per-leaf counts of :func:`leafwise_topk_masks` as one checked, clipped vector.

  Every form of ``k`` becomes a vector first: an int is repeated, a tree like the
  scores is stacked (NumPy where all its entries are concrete), a vector is taken
  as it is. The checks (integer dtype, ``0 <= k <= size`` where concrete, naming
  the leaf) and the clipping then run once on that vector.
  """
  n, entries = len(paths), None
  if isinstance(k, bool):
    raise TypeError("leafwise selection: k must be an integer, got bool.")
  if isinstance(k, (int, np.integer)) or (hasattr(k, "dtype") and np.ndim(k) == 0):
    c = _concrete_ints(k)
    kv = jnp.broadcast_to(k, (n,)) if c is None else np.full((n,), c)
  elif hasattr(k, "dtype") and np.ndim(k) == 1:  # one count per leaf, as a vector
    if np.shape(k) != (n,):
      raise ValueError(f"leafwise selection: a k vector needs one entry per leaf ({n}), "
                       f"got shape {np.shape(k)}.")
    kv = k
  else:
    flat = jax.tree_util.tree_flatten_with_path(k)[0]
    k_paths = [_paths.path_str(p) for p, _ in flat]
    if k_paths != paths:
      raise ValueError(f"leafwise selection: k has leaves {k_paths} but scores have {paths}; pass an "
                       "int or a tree like scores.")
    ks = [x for _, x in flat]
    for p, kk in zip(paths, ks):  # the entries' own dtypes (a stack would promote them)
      dt = jnp.result_type(kk)
      if not jnp.issubdtype(dt, jnp.integer) or isinstance(kk, bool):
        raise TypeError(f"leafwise selection: k at '{p}' must be an integer, got {dt}.")
    entries = [_concrete_ints(kk) for kk in ks]
    kv = (np.stack(entries) if all(c is not None for c in entries)
          else jnp.stack([jnp.asarray(kk, _count_dtype()) for kk in ks]))
  if not jnp.issubdtype(jnp.result_type(kv), jnp.integer):
    raise TypeError(f"leafwise selection: k must be integers, got {jnp.result_type(kv)}.")
  values = _concrete_ints(kv)
  if values is None and entries is not None:  # a tree with traced entries: check the others
    values = np.stack([np.int64(0) if c is None else c for c in entries])
  if values is not None:  # traced entries cannot be checked: they are clipped
    bad = np.flatnonzero((values < 0) | (values > sizes))
    if bad.size:
      i = int(bad[0])
      raise ValueError(f"leafwise selection: k={int(values[i])} at '{paths[i]}' is outside "
                       f"[0, {int(sizes[i])}] (the leaf's size).")
  # One vector of counts (one kernel, not one scalar kernel per leaf).
  return jnp.clip(jnp.asarray(kv).astype(_count_dtype()), 0, sizes)


def _check_method(method, radix_bits):
  if method not in _METHODS:
    raise ValueError(f"global selection: method must be one of {_METHODS}, got {method!r}.")
  if radix_bits not in (None, 4, 8, 16):
    raise ValueError(f"global selection: radix_bits must be None, 4, 8 or 16, got {radix_bits!r}.")


def _identity(x):
  return x


@functools.partial(jax.jit, static_argnames=("method", "radix_bits", "want_masks"))
def _run(scores, eligible, k, method, radix_bits, want_masks):
  """Jitted core (inlined under an outer jit; compiled once per shape when eager)."""
  dts = {np.dtype(s.dtype) for s in scores}
  kdt = np.dtype(np.uint64) if any(d.itemsize == 8 for d in dts) else np.dtype(np.uint32)
  groups = _groups(scores, eligible, lambda s: kdt)
  t, cutoffs, count = _threshold(groups, [s.size for s in scores], k, method, radix_bits)
  if not want_masks:
    return t, cutoffs, count
  return [_final_mask(s, e, kdt, t, cutoffs[i]) for i, (s, e) in enumerate(zip(scores, eligible))]


def _leaf_kdt(scores) -> np.dtype:
  return _key_dtype(np.dtype(np.float64) if np.dtype(scores.dtype).itemsize == 8 else np.float32)


@functools.partial(jax.jit, static_argnames=("method", "radix_bits"))
def _run_leafwise(scores, eligible, ks, method, radix_bits):
  """Per-leaf top-k: one compiled selection per group of same-signature leaves, run in a loop."""
  n = len(scores)
  cdt = _count_dtype()
  t_of, cut_of = [None] * n, [None] * n
  token = ()
  for g in _groups(scores, eligible, _leaf_kdt):
    kg = ks[np.asarray(g.positions)].astype(cdt)  # ks: the counts of all leaves, a vector
    if g.n == 1:
      t, cut, _ = _threshold([g.view(0)], [g.size], kg[0], method, radix_bits)
      tv, cv = jnp.reshape(t, (1,)), cut
    else:
      def one(m, carry, g=g, kg=kg):
        tv, cv = carry
        t, cut, _ = _threshold([g.view(m)], [g.size], kg[m], method, radix_bits)
        return tv.at[m].set(t), cv.at[m].set(cut[0])
      z = _opaque_zero(token)  # groups one after the other
      init = (jnp.zeros((g.n,), g.kdt) + z.astype(g.kdt), jnp.zeros((g.n,), jnp.int32) + z.astype(jnp.int32))
      tv, cv = lax.fori_loop(0, g.n, one, init)
    token = (tv, cv)
    for mi, p in enumerate(g.positions):
      t_of[p], cut_of[p] = tv[mi], cv[mi]
  return [_final_mask(s, e, _leaf_kdt(s), t_of[i], cut_of[i])
          for i, (s, e) in enumerate(zip(scores, eligible))]
