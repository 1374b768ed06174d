"""Mask dynamics of dynamic sparse training: distance, overlap, exploration, survival.

Every function takes mask trees (see :mod:`sparsejax.core.masks`: bool arrays on masked
leaves, ``None`` on dense leaves). Dense leaves are ignored; the trees must have the same
structure and the same masked leaves. Results are scalar arrays, so everything works under
``jax.jit`` (the structure checks are static and run at trace time).

References: Liu et al. 2021, "Do We Actually Need Dense Over-Parameterization? In-Time
Over-Parameterization in Sparse Training" (ICML) for the ITOP rate; Evci et al. 2020,
"Rigging the Lottery: Making All Tickets Winners" (ICML) for drop-and-grow.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import paths as _paths
from sparsejax.core.masks import is_none, mask_or

__all__ = [
  "ever_active",
  "hamming_distance",
  "itop_rate",
  "mask_iou",
  "regrown_count",
  "regrown_survival",
]


def _count_dtype():
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def _masked_leaves(fn: str, *trees: Any) -> list[tuple[str, tuple]]:
  """``(path, (leaf_of_tree_0, leaf_of_tree_1, ...))`` for the masked leaves shared by ``trees``.

  Raises a ValueError naming the leaf path when the trees differ in structure, in which leaves
  are masked, or in a mask's shape; a TypeError when a mask is not a bool array.
  """
  flats = [_paths.paths_with_leaves(t, is_leaf=is_none) for t in trees]
  ref = [p for p, _ in flats[0]]
  for i, flat in enumerate(flats[1:], start=1):
    got = [p for p, _ in flat]
    if got != ref:
      only_a = sorted(set(ref) - set(got))
      only_b = sorted(set(got) - set(ref))
      raise ValueError(f"{fn}: mask tree {i} has leaf paths that differ from mask tree 0 "
                       f"(only in tree 0: {only_a[:5]}, only in tree {i}: {only_b[:5]}); "
                       "pass mask trees of the same model.")
  out = []
  for j, path in enumerate(ref):
    leaves = tuple(flat[j][1] for flat in flats)
    nones = [x is None for x in leaves]
    if all(nones):
      continue
    if any(nones):
      raise ValueError(f"{fn}: leaf '{path}' is masked in some mask trees and None (dense) in others; "
                       "the trees must mask the same leaves.")
    shapes = {tuple(np.shape(x)) for x in leaves}
    if len(shapes) != 1:
      raise ValueError(f"{fn}: mask at '{path}' has different shapes across the trees: {sorted(shapes)}.")
    for x in leaves:
      if not hasattr(x, "dtype") or x.dtype != jnp.bool_:
        raise TypeError(f"{fn}: mask at '{path}' must be a bool array, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}; use mask.astype(bool).")
    out.append((path, leaves))
  if not out:
    raise ValueError(f"{fn}: the mask trees have no masked (non-None) leaf.")
  return out


def _sum(x) -> jax.Array:
  return jnp.sum(x, dtype=_count_dtype())


def _ratio(num, den) -> jax.Array:
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  return num / den


def hamming_distance(masks_a: Any, masks_b: Any) -> jax.Array:
  """Number of positions where two mask trees differ, summed over masked leaves.

  Args:
    masks_a: mask tree.
    masks_b: mask tree with the same structure and masked leaves.

  Returns:
    Scalar integer array.

  Raises:
    ValueError: the trees differ in structure, masked leaves or shapes (names the leaf path).

  >>> import jax.numpy as jnp
  >>> a = {'w': jnp.array([True, True, False, False]), 'b': None}
  >>> b = {'w': jnp.array([True, False, True, False]), 'b': None}
  >>> int(hamming_distance(a, b))
  2
  """
  total = jnp.zeros((), _count_dtype())
  for _, (a, b) in _masked_leaves("hamming_distance", masks_a, masks_b):
    total = total + _sum(a != b)
  return total


def mask_iou(masks_a: Any, masks_b: Any) -> jax.Array:
  """Intersection over union ``|a & b| / |a | b|`` of the kept sets, over all masked leaves.

  Two empty masks (union 0) have IoU 1 (they are identical).

  Args:
    masks_a: mask tree.
    masks_b: mask tree with the same structure and masked leaves.

  Returns:
    Scalar float32 array in [0, 1].

  >>> import jax.numpy as jnp
  >>> a = {'w': jnp.array([True, True, False, False])}
  >>> b = {'w': jnp.array([True, False, True, False])}
  >>> float(mask_iou(a, b))
  0.3333333432674408
  """
  inter = jnp.zeros((), _count_dtype())
  union = jnp.zeros((), _count_dtype())
  for _, (a, b) in _masked_leaves("mask_iou", masks_a, masks_b):
    inter = inter + _sum(a & b)
    union = union + _sum(a | b)
  return jnp.where(union > 0, _ratio(inter, jnp.maximum(union, 1)), jnp.float32(1.0))


def ever_active(acc: Any, masks: Any) -> Any:
  """OR-accumulates the masks seen so far (the incremental form of :func:`itop_rate`).

  Args:
    acc: accumulated mask tree, or None to start from ``masks``.
    masks: the current mask tree.

  Returns:
    Mask tree: True where a weight has been active in any mask seen so far.

  >>> import jax.numpy as jnp
  >>> acc = ever_active(None, {'w': jnp.array([True, False, False])})
  >>> ever_active(acc, {'w': jnp.array([False, True, False])})['w']
  Array([ True,  True, False], dtype=bool)
  """
  if acc is None:
    _masked_leaves("ever_active", masks)
    return masks
  _masked_leaves("ever_active", acc, masks)
  return mask_or(acc, masks)


def itop_rate(mask_history: Sequence[Any]) -> jax.Array:
  """In-time over-parameterisation rate: fraction of maskable weights ever active.

  ``R = |m_1 | m_2 | ... | m_T| / (number of entries of the masked leaves)`` (Liu et al. 2021).
  For long runs, accumulate with :func:`ever_active` and call ``itop_rate([acc])``.

  Args:
    mask_history: non-empty sequence (list/tuple) of mask trees seen during training.

  Returns:
    Scalar float32 array in [0, 1].

  Raises:
    ValueError: empty history, or trees that do not match (names the leaf path).

  >>> import jax.numpy as jnp
  >>> h = [{'w': jnp.array([True, False, False, False])}, {'w': jnp.array([False, True, False, False])}]
  >>> float(itop_rate(h))
  0.5
  """
  if not isinstance(mask_history, (list, tuple)) or not mask_history:
    raise ValueError("itop_rate: mask_history must be a non-empty list or tuple of mask trees, got "
                     f"{type(mask_history).__name__}{'' if mask_history else ' (empty)'}.")
  acc = None
  for masks in mask_history:
    acc = ever_active(acc, masks)
  kept = jnp.zeros((), _count_dtype())
  total = 0
  for _, (m,) in _masked_leaves("itop_rate", acc):
    kept = kept + _sum(m)
    total += int(np.prod(np.shape(m)))
  return _ratio(kept, max(total, 1))


def regrown_count(masks_before: Any, masks_after: Any, masks_next: Any) -> jax.Array:
  """Number of weights grown between ``before`` and ``after`` that are still active in ``next``.

  Args:
    masks_before: mask tree before a drop-and-grow update.
    masks_after: mask tree right after it.
    masks_next: mask tree at a later time (e.g. after the next update).

  Returns:
    Scalar integer array: ``sum(~before & after & next)``.

  >>> import jax.numpy as jnp
  >>> b = {'w': jnp.array([True, True, False, False])}
  >>> a = {'w': jnp.array([True, False, True, True])}
  >>> n = {'w': jnp.array([True, False, True, False])}
  >>> int(regrown_count(b, a, n))
  1
  """
  total = jnp.zeros((), _count_dtype())
  for _, (b, a, n) in _masked_leaves("regrown_count", masks_before, masks_after, masks_next):
    total = total + _sum(~b & a & n)
  return total


def regrown_survival(masks_before: Any, masks_after: Any, masks_next: Any) -> jax.Array:
  """Fraction of the weights grown between ``before`` and ``after`` still active in ``next``.

  ``sum(~before & after & next) / sum(~before & after)``; NaN when nothing was grown.

  Args:
    masks_before: mask tree before a drop-and-grow update.
    masks_after: mask tree right after it.
    masks_next: mask tree at a later time (e.g. after the next update).

  Returns:
    Scalar float32 array in [0, 1], or NaN if no weight was grown.

  >>> import jax.numpy as jnp
  >>> b = {'w': jnp.array([True, True, False, False])}
  >>> a = {'w': jnp.array([True, False, True, True])}
  >>> n = {'w': jnp.array([True, False, True, False])}
  >>> float(regrown_survival(b, a, n))
  0.5
  """
  grown = jnp.zeros((), _count_dtype())
  kept = jnp.zeros((), _count_dtype())
  for _, (b, a, n) in _masked_leaves("regrown_survival", masks_before, masks_after, masks_next):
    g = ~b & a
    grown = grown + _sum(g)
    kept = kept + _sum(g & n)
  return jnp.where(grown > 0, _ratio(kept, jnp.maximum(grown, 1)), jnp.float32(jnp.nan))
