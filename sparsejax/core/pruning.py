"""Prune, regrow and drop-and-grow: pure functions from (params, scores) to (params, masks).

All functions

- take any pytree of params (Linen dicts, NNX states, nested tuples) whose prunable leaves are
  given by a mask tree (``masks``), a per-leaf sparsity tree, or the default selection
  (``ndim >= 2``); dense leaves (biases, norms) pass through unchanged;
- keep exact counts (``clip(round(size * density), 1, size)`` per leaf, ties broken by the
  lower flat index), set removed weights to exactly zero and grown weights to exactly zero;
- are jit-able with traced sparsities / fractions and trace once per shape.

Out-of-range values: a concrete sparsity outside [0, 1) (fraction outside [0, 1]) raises a
``ValueError`` naming the leaf. A traced one cannot raise under ``jax.jit``; it is clamped, with
a documented meaning: a sparsity below 0 keeps every weight, one of 1 or more keeps one weight
per leaf, NaN prunes nothing (fractions: clamped to [0, 1], NaN moves nothing). To get an error
instead, run the step under ``jax.experimental.checkify.checkify``: every such value is checked
with ``checkify.debug_check`` (a no-op without checkify), e.g.
``err, out = checkify.checkify(jax.jit(step))(...); err.throw()``.

Non-finite weights: the default magnitude scores (``scores=None``) rank NaN and inf weights
highest (:func:`abs_nonfinite_high`), so magnitude pruning never removes a non-finite weight:
``w + (-w)`` is NaN for such ``w``, so a removed one could not become zero through
``optax.apply_updates``.

Scores follow the keep-largest convention of :mod:`sparsejax.core.scores`. A score leaf may also be
a :class:`sparsejax.core.selection.LazyScores` (e.g. ``LazyScores(jnp.abs, grads_leaf)``): the
selection then computes the scores inside each of its passes and never stores a full-size score
array (``None`` scores, i.e. ``|params|``, are always evaluated that way).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from sparsejax.core import scores as _scores
from sparsejax.core import selection as _sel
from sparsejax.core.masks import _check_mask_leaf
from sparsejax.core.paths import path_str, select
from sparsejax.core.patterns import Block, Channel, Unstructured, as_pattern

PyTree = Any

__all__ = ["prune", "random_prune", "prune_global", "drop_and_grow", "regrow"]


def _is_none(x) -> bool:
  return x is None


def _is_leaf(x) -> bool:
  return x is None or isinstance(x, _sel.LazyScores)


def _flat(params: PyTree):
  kl, treedef = jax.tree_util.tree_flatten_with_path(params)
  return [path_str(kp) for kp, _ in kl], [x for _, x in kl], treedef


def _leaves_like(paths: list[str], tree: PyTree, name: str, fn: str) -> list:
  """Leaves of ``tree`` (None kept) aligned with ``paths``; errors name the first bad path."""
  pset = set(paths)
  kl = [(path_str(kp), x) for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_leaf)[0]]
  # A None where params hold no leaf at all (a None param) is not an extra leaf.
  kl = [(p, x) for p, x in kl if x is not None or p in pset]
  tp = [p for p, _ in kl]
  if tp != paths:
    tset = set(tp)
    for p in paths:
      if p not in tset:
        raise ValueError(f"{fn}: {name} has no leaf {p!r} (params have it); pass a tree with the "
                         "structure of params (None on dense leaves).")
    for p in tp:
      if p not in pset:
        raise ValueError(f"{fn}: {name} has a leaf {p!r} that params do not have; pass a tree with "
                         "the structure of params.")
    raise ValueError(f"{fn}: {name} has the leaves of params in a different order ({tp} vs "
                     f"{paths}); pass a tree with the structure of params.")
  return [x for _, x in kl]


def _is_scalar(x) -> bool:
  if isinstance(x, (bool, int, float, np.number)):
    return True
  return isinstance(x, (jax.Array, np.ndarray)) and np.ndim(x) == 0


def _concrete(x) -> float | None:
  if isinstance(x, jax.core.Tracer):
    return None
  return float(np.asarray(x))


def _check_unit(value, what: str, fn: str, path: str | None, *, hi_open: bool = True) -> None:
  """Checks a concrete scalar is in [0, 1) (or [0, 1]); names the leaf path."""
  if value is None:
    return
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{fn}: {what}{_at(path)}={value!r} is a string; pass a number.")
  if not _is_scalar(value):
    raise ValueError(f"{fn}: {what}{_at(path)} must be a scalar, got shape {np.shape(value)}.")
  v = _concrete(value)
  if v is None:
    # Traced: cannot raise under jit. The value is clamped (see _unit_value); under
    # jax.experimental.checkify.checkify this check reports it as an error.
    x = jnp.asarray(value, jnp.float32)
    ok = (x >= 0) & ((x < 1) if hi_open else (x <= 1))
    checkify.debug_check(ok, f"{fn}: {what}{_at(path)} must be in {'[0, 1)' if hi_open else '[0, 1]'}"
                         ", got {v}", v=x)
    return
  ok = 0.0 <= v < 1.0 if hi_open else 0.0 <= v <= 1.0
  if not ok:
    rng = "[0, 1)" if hi_open else "[0, 1]"
    raise ValueError(f"{fn}: {what}{_at(path)} must be in {rng}, got {v}.")


def _unit_value(x) -> jax.Array:
  """A (possibly traced) sparsity or fraction as float32, NaN read as 0 (prune nothing).

  Values outside the range are clamped by the counts themselves: a sparsity below 0 keeps
  every weight, one of 1 or more keeps one weight per leaf (``num_to_keep``'s minimum).
  """
  x = jnp.asarray(x, jnp.float32)
  return jnp.where(jnp.isnan(x), jnp.zeros((), jnp.float32), x)


def _at(path: str | None) -> str:
  return f" at {path!r}" if path else ""


def _per_leaf(value, paths: list[str], active: list[bool], name: str, fn: str) -> list:
  """Broadcasts a scalar or aligns a per-leaf tree; None where a leaf is not active."""
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{fn}: {name}={value!r} is a string; pass a number (e.g. 0.5) or a per-leaf "
                    "tree of numbers.")
  if value is None or _is_scalar(value):
    return [value if a else None for a in active]
  vals = _leaves_like(paths, value, name, fn)
  for p, v, a in zip(paths, vals, active):
    if a and v is None:
      raise ValueError(f"{fn}: {name} is None at {p!r}, which is masked; give it a value (or make "
                       "the leaf dense).")
    if not a and v is not None:
      raise ValueError(f"{fn}: {name} has a value at {p!r}, but that leaf is dense (None in the "
                       "mask tree / not selected); put None there or mask the leaf.")
  return [v if a else None for v, a in zip(vals, active)]


def _check_float(fn: str, path: str, leaf) -> None:
  dt = jnp.result_type(leaf)
  if not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{fn}: leaf {path!r} has dtype {dt}; only real floating-point leaves can be "
                    "pruned. Make it dense (None in the mask tree / exclude it from the selection).")


def _masks_list(fn: str, paths, leaves, masks) -> list:
  ms = _leaves_like(paths, masks, "masks", fn)
  for p, leaf, m in zip(paths, leaves, ms):
    if m is None:
      continue
    _check_mask_leaf(fn, p, m, np.shape(leaf))
    _check_float(fn, p, leaf)
  return ms


def _scores_list(fn: str, paths, leaves, scores, active, name="scores") -> list:
  if scores is None:  # |params|, evaluated inside each selection pass (never stored)
    return [_sel.LazyScores(abs_nonfinite_high, x) if a else None
            for x, a in zip(leaves, active)]
  ss = _leaves_like(paths, scores, name, fn)
  for p, leaf, s, a in zip(paths, leaves, ss, active):
    if not a:
      continue
    if s is None:
      raise ValueError(f"{fn}: {name} is None at {p!r}, which is pruned; give scores for every "
                       "masked leaf.")
    if tuple(np.shape(s)) != tuple(np.shape(leaf)):
      raise ValueError(f"{fn}: {name} at {p!r} have shape {tuple(np.shape(s))} but the param has "
                       f"shape {tuple(np.shape(leaf))}.")
    dt = s.dtype if isinstance(s, _sel.LazyScores) else jnp.result_type(s)
    if jnp.issubdtype(dt, jnp.complexfloating):
      raise TypeError(f"{fn}: {name} at {p!r} are complex; pass real scores such as jnp.abs(x).")
  return ss


def abs_nonfinite_high(x) -> jax.Array:
  """``|x|`` with NaN ranked like ``inf``: the magnitude score of every pruning default.

  A non-finite weight is never pruned by magnitude: ``w + (-w)`` is NaN, not 0, for NaN or
  inf ``w``, so a pruned one could not land on zero through ``optax.apply_updates``. It keeps
  its place in the mask (and stays visible in the loss) instead.

  >>> abs_nonfinite_high(jnp.array([-2.0, jnp.nan, -jnp.inf])).tolist()
  [2.0, inf, inf]
  """
  a = jnp.abs(x)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    return a
  return jnp.where(jnp.isnan(a), jnp.asarray(jnp.inf, a.dtype), a)


def _as_scores(s):
  return s if isinstance(s, _sel.LazyScores) else jnp.asarray(s)


def _zero_out(p, m):
  return jnp.where(m, p, jnp.zeros((), jnp.result_type(p)))


def _topk_among(scores, k, eligible):
  """Exactly ``min(k, sum(eligible))`` of the eligible positions with the largest scores."""
  return _sel.global_topk_masks([scores], k=k, masks=[eligible])[0]


@functools.partial(jax.jit, static_argnames=("pattern", "fixed"))
def _prune_leaf(sc, s, m, *, pattern, fixed):
  """The mask of one leaf (jitted: one compile per shape, fast eager calls)."""
  density = None if s is None else 1.0 - _unit_value(s)
  if isinstance(pattern, Unstructured):
    return _topk_among(sc, _sel.num_to_keep(sc.size, density), m)
  sc = _sel.materialize(sc)
  if m is not None:
    fill = 0 if isinstance(pattern, (Block, Channel)) else -jnp.inf
    sc = jnp.where(m, sc, jnp.asarray(fill, jnp.result_type(sc)))
  mask = pattern(sc, None if fixed else density)
  return mask if m is None else mask & m


def _prunable(fn, params, masks, sparsity, selection):
  """paths, leaves, treedef, old mask list, active flags."""
  paths, leaves, treedef = _flat(params)
  if masks is not None:
    old = _masks_list(fn, paths, leaves, masks)
    active = [m is not None for m in old]
  elif sparsity is not None and not _is_scalar(sparsity):
    sp = _leaves_like(paths, sparsity, "sparsity", fn)
    active = [s is not None for s in sp]
    old = [None] * len(leaves)
  else:
    if selection is None:
      selection = select(params)
    flags = _leaves_like(paths, selection, "selection", fn)
    active = [f is not None and f is not False for f in flags]
    old = [None] * len(leaves)
  for p, leaf, a in zip(paths, leaves, active):
    if a:
      _check_float(fn, p, leaf)
  return paths, leaves, treedef, old, active


def prune(params: PyTree, scores: PyTree | None, sparsity, *, pattern=Unstructured(),
          masks: PyTree | None = None, selection: PyTree | None = None):
  """Per-leaf pruning: keeps the top ``1 - sparsity`` scores of each prunable leaf.

  Which leaves are pruned: the masked leaves of ``masks`` if given, else the non-None leaves of a
  per-leaf ``sparsity`` tree, else ``selection`` (default
  :func:`sparsejax.core.paths.select`: leaves with ``ndim >= 2``).

  Args:
    params: parameter pytree.
    scores: score tree like ``params`` (None on dense leaves is fine), or None for ``|params|``.
    sparsity: scalar in [0, 1) (may be traced), or a per-leaf tree such as the output of
      :func:`sparsejax.core.distributions.erdos_renyi`; None for patterns with a fixed density
      (``NM``).
    pattern: ``Unstructured()``, ``NM(n, m)``, ``Block(r, c)`` or ``Channel(axis)``.
    masks: current mask tree; if given only currently kept weights compete and masks shrink
      monotonically (fewer kept weights than requested: the mask is kept as is). The scores of
      removed positions are replaced by ``-inf`` (``0`` for block/channel sums, which assume
      non-negative scores).
    selection: tree of static bools (used when neither ``masks`` nor a sparsity tree is given).

  Returns:
    ``(params, masks)``: pruned params (removed weights exactly 0) and the new mask tree.

  Raises:
    ValueError / TypeError: structure or shape mismatches, sparsity outside [0, 1), non-float
      prunable leaves, or pattern violations; the message names the leaf path.

  >>> import jax.numpy as jnp
  >>> p = {"w": jnp.array([[1.0, -4.0], [3.0, 2.0]]), "b": jnp.ones(2)}
  >>> new_p, m = prune(p, None, 0.5)
  >>> new_p["w"], m["b"]
  (Array([[ 0., -4.],
         [ 3.,  0.]], dtype=float32), None)
  """
  fn = "prune"
  pattern = as_pattern(pattern, fn=fn)
  if isinstance(sparsity, (str, bytes)):
    raise TypeError(f"{fn}: sparsity={sparsity!r} is a string; pass a number in [0, 1) (e.g. 0.5) "
                    "or a per-leaf tree of numbers.")
  paths, leaves, treedef, old, active = _prunable(fn, params, masks, sparsity, selection)
  sp = _per_leaf(sparsity, paths, active, "sparsity", fn)
  ss = _scores_list(fn, paths, leaves, scores, active)
  fixed = getattr(pattern, "fixed_density", None)
  new_p, new_m, deferred = [], [], []
  for p, leaf, s, sc, m, a in zip(paths, leaves, sp, ss, old, active):
    if not a:
      new_p.append(leaf)
      new_m.append(None)
      continue
    if s is None and fixed is None:
      raise ValueError(f"{fn}: sparsity is None at {p!r} but pattern {pattern!r} has no fixed "
                       "density; pass a sparsity.")
    _check_unit(s, "sparsity", fn, p)
    pattern.check(p, tuple(np.shape(leaf)), s)
    if isinstance(pattern, Unstructured):  # selected below, all leaves in one call
      deferred.append((len(new_m), sc, s, m))
      new_m.append(None)
      new_p.append(leaf)
      continue
    mask = _prune_leaf(sc, s, m, pattern=pattern, fixed=fixed is not None)
    new_m.append(mask)
    new_p.append(_zero_out(leaf, mask))
  if deferred:
    got = _prune_unstructured([d[1] for d in deferred], [d[2] for d in deferred],
                              [d[3] for d in deferred])
    for (i, _, _, _), mask in zip(deferred, got):
      new_m[i] = mask
      new_p[i] = _zero_out(new_p[i], mask)
  return jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m)


@jax.jit
def _prune_unstructured(scores, sparsities, masks):
  """Unstructured masks of several leaves, each its own exact top-k.

  Same-shape leaves (every block of a transformer) share one compiled selection
  (:func:`sparsejax.core.selection.leafwise_topk_masks`), so compile time does not grow
  with the number of leaves.
  """
  sp = jnp.stack([jnp.asarray(s, jnp.float32) for s in sparsities])  # all leaves in one vector op
  ks = _sel.keep_counts([sc.size for sc in scores], 1.0 - jnp.where(jnp.isnan(sp), 0.0, sp))
  return _sel.leafwise_topk_masks(list(scores), ks, masks=list(masks))


# Rounds of the swap-or-not shuffle (Hoang, Morris and Rogaway 2012) behind random_prune: every
# round is an involution of [0, n), so any number of rounds gives a bijection (exact counts);
# more rounds only make the permutation closer to uniform.
_SHUFFLE_ROUNDS = 12


def _shuffled_index(n: int, count: int, round_keys, round_words) -> jax.Array:
  """``[count, n]``: row ``i`` a keyed pseudo-random permutation of ``[0, n)`` (swap-or-not).

  The rounds run in a loop (one small kernel whatever their number).
  """
  nn = jnp.uint32(n)

  def one_round(r, x):
    kr = lax.dynamic_index_in_dim(round_keys, r, 1)  # [count, 1]
    wr = lax.dynamic_index_in_dim(round_words, r, 1)
    partner = jnp.where(x <= kr, kr - x, kr + nn - x)  # (kr - x) mod n
    swap = (_scores._fmix32(jnp.maximum(x, partner) ^ wr) & jnp.uint32(1)) != 0
    return jnp.where(swap, partner, x)

  x = lax.broadcasted_iota(jnp.uint32, (count, n), 1)
  return lax.fori_loop(0, _SHUFFLE_ROUNDS, one_round, x)


@functools.partial(jax.jit, static_argnames=("shapes",))
def _random_masks(key, sparsities, *, shapes):
  """Exact-count uniform random masks: entry kept iff its shuffled index < k (no selection).

  Per-leaf scalars (counts, round keys) are computed for all leaves in one vector
  operation, and leaves of one size are shuffled together: on XLA:CPU every
  separate kernel costs compile time.
  """
  sizes = np.asarray([int(np.prod(sh)) for sh in shapes], np.int64)
  s = jnp.stack([jnp.asarray(x, jnp.float32) for x in sparsities])
  ks = _sel.keep_counts(sizes, 1.0 - jnp.where(jnp.isnan(s), 0.0, s)).astype(jnp.uint32)
  salts = np.arange(len(shapes) * _SHUFFLE_ROUNDS).reshape(len(shapes), _SHUFFLE_ROUNDS)
  w0, w1 = _scores._stream_words(key, salts)  # every leaf's round words in one vector op
  round_keys = w0 % jnp.asarray(np.maximum(sizes, 1).astype(np.uint32))[:, None]
  out = [None] * len(shapes)
  for n in dict.fromkeys(sizes.tolist()):
    members = np.flatnonzero(sizes == n)
    kept = _shuffled_index(int(n), len(members), round_keys[members], w1[members]) < ks[members][:, None]
    for row, i in enumerate(members):
      out[i] = kept[row].reshape(shapes[i])
  return out


def random_prune(params: PyTree, sparsity, key, *, masks: PyTree | None = None,
                 selection: PyTree | None = None):
  """Per-leaf random pruning with exact counts, without scores or a selection.

  Keeps ``clip(round(size * (1 - sparsity)), 1, size)`` entries of every
  prunable leaf (as :func:`prune`), chosen uniformly at random: an entry is
  kept iff its flat index, shuffled by a keyed swap-or-not permutation
  (Hoang, Morris and Rogaway 2012), is below that count. One elementwise pass
  per leaf, so it compiles and runs far faster than :func:`prune` with
  random scores (a selection per leaf shape); the masks differ from those,
  not their distribution. Which leaves are pruned: as in :func:`prune`
  (``masks`` only selects leaves here: their values are not read).

  Args:
    params: parameter pytree.
    sparsity: scalar or per-leaf tree in ``[0, 1)`` (may be traced; clamped).
    key: a ``jax.random`` key (or raw uint32 key data).
    masks: optional mask tree; its non-None leaves are the pruned ones.
    selection: optional bool tree of prunable leaves (default: ``ndim >= 2``).

  Returns:
    ``(pruned params, masks)``.

  >>> import jax, jax.numpy as jnp
  >>> p, m = random_prune({"w": jnp.ones((4, 8)), "b": jnp.ones(8)}, 0.75, jax.random.key(0))
  >>> int(m["w"].sum()), m["b"] is None, float(p["w"].sum())
  (8, True, 8.0)
  """
  fn = "random_prune"
  if isinstance(sparsity, (str, bytes)):
    raise TypeError(f"{fn}: sparsity={sparsity!r} is a string; pass a number in [0, 1) (e.g. 0.5) "
                    "or a per-leaf tree of numbers.")
  paths, leaves, treedef, _, active = _prunable(fn, params, masks, sparsity, selection)
  sp = _per_leaf(sparsity, paths, active, "sparsity", fn)
  chosen = [i for i, a in enumerate(active) if a]
  for i in chosen:
    _check_unit(sp[i], "sparsity", fn, paths[i])
  new_p, new_m = list(leaves), [None] * len(leaves)
  if chosen:
    got = _random_masks(key, [sp[i] for i in chosen],
                        shapes=tuple(tuple(np.shape(leaves[i])) for i in chosen))
    for i, m in zip(chosen, got):
      new_m[i] = m
      new_p[i] = _zero_out(leaves[i], m)
  return jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m)


def _l2_normalized(s, m) -> jax.Array:
  """Scores ``s`` (float32 or wider) divided by their L2 norm over the eligible entries ``m``."""
  s = _sel.materialize(s)
  s = s.astype(jnp.promote_types(s.dtype, jnp.float32))
  e = s if m is None else jnp.where(m, s, 0)
  norm = jnp.sqrt(jnp.sum(e * e))
  return s / jnp.where(norm > 0, norm, 1)


@functools.partial(jax.jit, static_argnames=("normalize",))
def _global_select(scores, masks, sparsity, *, normalize):
  sel = [_l2_normalized(s, m) if normalize else s for s, m in zip(scores, masks)]
  total = sum(s.size for s in scores)
  k = _sel.num_to_keep(total, 1.0 - _unit_value(sparsity))
  return _sel.global_topk_masks(sel, k=k, masks=list(masks))


def prune_global(params: PyTree, scores: PyTree | None, sparsity, *, normalize: bool = False,
                 masks: PyTree | None = None, selection: PyTree | None = None):
  """Global pruning: one exact top-k over all prunable leaves together.

  ``normalize=False`` is *raw* global pruning (e.g. global magnitude, SNIP, open_lth IMP);
  ``normalize=True`` divides each leaf's scores by their L2 norm first (over the eligible
  entries), jaxpruner's default "global magnitude" (``use_normalization=True``). The selection
  never concatenates leaves (:func:`sparsejax.core.selection.global_topk_masks`), so it is
  sharding-safe; ties go to the earlier leaf, then the lower flat index.

  Args:
    params: parameter pytree.
    scores: score tree like ``params``, or None for ``|params|``.
    sparsity: global sparsity over the prunable leaves, in [0, 1) (may be traced); exactly
      ``clip(round(n * (1 - sparsity)), 1, n)`` weights are kept.
    normalize: per-leaf L2 normalisation of the scores.
    masks: current mask tree (only kept weights compete; masks shrink monotonically).
    selection: tree of static bools (default ``select(params)``), used when ``masks`` is None.

  Returns:
    ``(params, masks)``.

  >>> import jax.numpy as jnp
  >>> p = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[30.0, 40.0]])}
  >>> prune_global(p, None, 0.5)[1]["a"].tolist(), prune_global(p, None, 0.5, normalize=True)[1]["a"].tolist()
  ([[False, False]], [[False, True]])
  """
  fn = "prune_global"
  if isinstance(sparsity, (str, bytes)):
    raise TypeError(f"{fn}: sparsity={sparsity!r} is a string; pass a number in [0, 1) (e.g. 0.5).")
  if not _is_scalar(sparsity):
    raise ValueError(f"{fn}: sparsity must be a scalar (a global target), got {type(sparsity)}; "
                     "use prune(...) for per-leaf sparsities.")
  _check_unit(sparsity, "sparsity", fn, None)
  paths, leaves, treedef, old, active = _prunable(fn, params, masks, None, selection)
  ss = _scores_list(fn, paths, leaves, scores, active)
  idx = [i for i, a in enumerate(active) if a]
  if not idx:
    raise ValueError(f"{fn}: no prunable leaf; leaf paths are {paths}.")
  got = _global_select([_as_scores(ss[i]) for i in idx], [old[i] for i in idx], sparsity,
                       normalize=normalize)
  new_m = [None] * len(leaves)
  new_p = list(leaves)
  for j, i in enumerate(idx):
    new_m[i] = got[j]
    new_p[i] = _zero_out(leaves[i], got[j])
  return jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m)


def _count_of(fraction, n_active):
  """floor(n_active * fraction) as int32, in the float precision of the run."""
  dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  f = jnp.clip(jnp.asarray(fraction, dt), 0, 1)  # traced: clamped, NaN -> 0 (nothing moves)
  f = jnp.where(jnp.isnan(f), jnp.zeros((), dt), f)
  return jnp.floor(n_active.astype(dt) * f).astype(jnp.int32)


def _n_true(m):
  return _sel.count_nonzero(m).astype(jnp.int32)


@jax.jit
def _drop_grow_leaves(leaves, ms, fs, ds, gs):
  """Drop then grow in every leaf; same-shape leaves share one compiled selection per step."""
  n_active = jnp.stack([_n_true(m) for m in ms])  # per-leaf counts as vectors: one kernel each
  n_drop = _count_of(jnp.stack([jnp.asarray(f, jnp.float32) for f in fs]), n_active)
  kept = _sel.leafwise_topk_masks(list(ds), n_active - n_drop, masks=list(ms))
  grow = _sel.leafwise_topk_masks(list(gs), n_drop,
                                  masks=[_sel.LazyScores(jnp.logical_not, k) for k in kept])
  return [(_zero_out(leaf, k), k | g, g) for leaf, k, g in zip(leaves, kept, grow)]


@functools.partial(jax.jit, static_argnames=("is_count",))
def _regrow_leaf(leaf, m, n, s, *, is_count):
  n_active = _n_true(m)
  k = jnp.asarray(n, jnp.int32) if is_count else _count_of(n, n_active)
  k = jnp.clip(k, 0, m.size - n_active)
  grow = _topk_among(s, k, _sel.LazyScores(jnp.logical_not, m))
  return _zero_out(leaf, m), m | grow, grow


def drop_and_grow(params: PyTree, masks: PyTree, drop_scores: PyTree | None,
                  grow_scores: PyTree, drop_fraction):
  """One SET / RigL connectivity update per masked leaf; the active count is unchanged.

  For each masked leaf: ``n_drop = floor(n_active * drop_fraction)``; the ``n_drop`` active
  positions with the smallest ``drop_scores`` are dropped, then the ``n_drop`` positions with
  the largest ``grow_scores`` among those not kept after the drop are grown (just-dropped
  positions are eligible, as in RigL, Evci et al. 2020, "Rigging the Lottery"). Grown weights
  are set to 0 (also a just-dropped one that is grown back; ``sparsejax.optim.rigl`` keeps
  those instead, ``reinit_when_same=False``); kept weights are unchanged; dropped weights
  become 0.

  SET: ``drop_scores=magnitude(params)`` (or None), ``grow_scores=random_scores(params, key)``.
  RigL: ``grow_scores=gradient_magnitude(dense_grads)`` (gradients w.r.t. the masked weights,
  not masked themselves).

  Args:
    params: parameter pytree.
    masks: mask tree (bool on prunable leaves, None on dense leaves).
    drop_scores: score tree (None for ``|params|``).
    grow_scores: score tree.
    drop_fraction: scalar in [0, 1] (may be traced), or a per-leaf tree.

  Returns:
    ``(params, masks, grown)``; ``grown`` is a mask tree of the grown positions.

  >>> import jax.numpy as jnp
  >>> p = {"w": jnp.array([4.0, 0.0, 1.0, 3.0])}
  >>> m = {"w": jnp.array([True, False, True, True])}
  >>> new_p, new_m, grown = drop_and_grow(p, m, None, {"w": jnp.array([0.0, 9.0, 0.0, 0.0])}, 0.34)
  >>> new_p["w"].tolist(), new_m["w"].tolist(), grown["w"].tolist()
  ([4.0, 0.0, 0.0, 3.0], [True, True, False, True], [False, True, False, False])
  """
  fn = "drop_and_grow"
  if grow_scores is None:
    raise ValueError(f"{fn}: grow_scores is required (random_scores(params, key) for SET, "
                     "gradient_magnitude(grads) for RigL).")
  paths, leaves, treedef = _flat(params)
  old = _masks_list(fn, paths, leaves, masks)
  active = [m is not None for m in old]
  fr = _per_leaf(drop_fraction, paths, active, "drop_fraction", fn)
  ds = _scores_list(fn, paths, leaves, drop_scores, active, "drop_scores")
  gs = _scores_list(fn, paths, leaves, grow_scores, active, "grow_scores")
  new_p, new_m, grown = list(leaves), [None] * len(leaves), [None] * len(leaves)
  todo = [i for i, m in enumerate(old) if m is not None]
  for i in todo:
    _check_unit(fr[i], "drop_fraction", fn, paths[i], hi_open=False)
  got = _drop_grow_leaves([leaves[i] for i in todo], [old[i] for i in todo],
                          [fr[i] for i in todo], [_as_scores(ds[i]) for i in todo],
                          [_as_scores(gs[i]) for i in todo]) if todo else []
  for i, (leaf_p, leaf_m, grow) in zip(todo, got):
    new_p[i], new_m[i], grown[i] = leaf_p, leaf_m, grow
  return (jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m),
          jax.tree.unflatten(treedef, grown))


def regrow(params: PyTree, masks: PyTree, scores: PyTree, n_or_fraction):
  """Grows inactive positions with the largest ``scores`` in every masked leaf.

  The number grown per leaf is ``min(n, n_inactive)`` for an integer ``n`` (Python int or an
  integer array) or ``floor(n_active * fraction)`` (clipped the same way) for a float fraction;
  a per-leaf tree of either works too. Grown weights are set to 0.

  Args:
    params: parameter pytree.
    masks: mask tree.
    scores: score tree (e.g. ``gradient_magnitude(grads)``).
    n_or_fraction: count or fraction (may be traced), or a per-leaf tree.

  Returns:
    ``(params, masks, grown)``.

  >>> import jax.numpy as jnp
  >>> p, m = {"w": jnp.array([1.0, 0.0, 0.0])}, {"w": jnp.array([True, False, False])}
  >>> _, new_m, grown = regrow(p, m, {"w": jnp.array([0.0, 1.0, 2.0])}, 1)
  >>> new_m["w"].tolist(), grown["w"].tolist()
  ([True, False, True], [False, False, True])
  """
  fn = "regrow"
  paths, leaves, treedef = _flat(params)
  old = _masks_list(fn, paths, leaves, masks)
  active = [m is not None for m in old]
  ns = _per_leaf(n_or_fraction, paths, active, "n_or_fraction", fn)
  ss = _scores_list(fn, paths, leaves, scores, active)
  new_p, new_m, grown = [], [], []
  for p, leaf, m, n, s in zip(paths, leaves, old, ns, ss):
    if m is None:
      new_p.append(leaf)
      new_m.append(None)
      grown.append(None)
      continue
    if not _is_scalar(n):
      raise ValueError(f"{fn}: n_or_fraction at {p!r} must be a scalar, got shape {np.shape(n)}.")
    dt = jnp.result_type(n)
    if jnp.issubdtype(dt, jnp.bool_):
      raise TypeError(f"{fn}: n_or_fraction at {p!r} is a bool; pass an int count or a float fraction.")
    is_count = bool(jnp.issubdtype(dt, jnp.integer) or isinstance(n, int))
    if is_count:
      nc = _concrete(n)
      if nc is not None and nc < 0:
        raise ValueError(f"{fn}: count at {p!r} must be >= 0, got {int(nc)}.")
    else:
      _check_unit(n, "fraction", fn, p, hi_open=False)
    leaf_p, leaf_m, grow = _regrow_leaf(leaf, m, n, _as_scores(s), is_count=is_count)
    new_m.append(leaf_m)
    grown.append(grow)
    new_p.append(leaf_p)
  return (jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m),
          jax.tree.unflatten(treedef, grown))
