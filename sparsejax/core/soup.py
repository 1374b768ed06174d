"""Sparse model soups (Zimmer et al. 2023): average models that share one mask.

Retrain several copies of one pruned model (different seeds, data orders or hyperparameters),
then average them. Because the masks are identical, the average is exactly as sparse as each
ingredient. :func:`sparse_soup` checks that the masks agree before averaging;
:func:`greedy_soup` adds ingredients in order of their own score and keeps each one only if
the soup does not get worse.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.pruning import _flat, _leaves_like, _masks_list

PyTree = Any

__all__ = ["sparse_soup", "greedy_soup"]


def _check_masks_equal(fn: str, paths, mask_lists) -> list:
  """Raises naming the first leaf where ingredient masks differ; returns the first mask list.

  Traced masks cannot be compared eagerly: then a per-leaf boolean "all equal" array is
  returned alongside (used to poison the soup with NaN).
  """
  ref = mask_lists[0]
  agree = [None] * len(paths)
  for j, ms in enumerate(mask_lists[1:], start=1):
    for i, (p, a, b) in enumerate(zip(paths, ref, ms)):
      if (a is None) != (b is None):
        raise ValueError(f"{fn}: masks differ at {p!r}: leaf is {'dense' if a is None else 'masked'} "
                         f"in model 0 but {'dense' if b is None else 'masked'} in model {j}; soups "
                         "need identical masks (retrain copies of one pruned model).")
      if a is None:
        continue
      if isinstance(a, jax.core.Tracer) or isinstance(b, jax.core.Tracer):
        eq = jnp.array_equal(a, b)
        agree[i] = eq if agree[i] is None else agree[i] & eq
        continue
      diff = int(np.sum(np.asarray(a) != np.asarray(b)))
      if diff:
        raise ValueError(f"{fn}: masks differ at {p!r} between model 0 and model {j} ({diff} "
                         "positions); soups need identical masks (retrain copies of one pruned "
                         "model).")
  return agree


def sparse_soup(params_list: Sequence[PyTree], masks_list: Sequence[PyTree] | None = None,
                weights: Sequence[float] | jax.Array | None = None) -> PyTree:
  """Weighted average of models that share a mask (uniform weights by default).

  The average is computed in at least float32 and cast back to each leaf's dtype; masked-out
  positions are set to exactly 0. With concrete masks, differing masks raise; under ``jax.jit``
  (traced masks) the leaves whose masks differ come out as NaN instead (a traced value cannot
  raise).

  Args:
    params_list: non-empty sequence of param trees with identical structure and shapes.
    masks_list: None (no mask check; positions that are zero in every model stay zero), or one
      mask tree per model, which must all be identical.
    weights: optional non-negative weights, one per model (normalised to sum 1).

  Returns:
    The soup params.

  Raises:
    ValueError: empty list, structure/shape mismatch, differing masks (naming the leaf path and
      the model), or bad weights.

  >>> import jax.numpy as jnp
  >>> m = {"w": jnp.array([True, False])}
  >>> sparse_soup([{"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 0.0])}], [m, m])["w"]
  Array([2., 0.], dtype=float32)
  """
  fn = "sparse_soup"
  if isinstance(params_list, dict) or not isinstance(params_list, Sequence) or not params_list:
    raise ValueError(f"{fn}: params_list must be a non-empty list of param trees.")
  n = len(params_list)
  paths, leaves0, treedef = _flat(params_list[0])
  all_leaves = [leaves0]
  for j, ps in enumerate(params_list[1:], start=1):
    lv = _leaves_like(paths, ps, f"params_list[{j}]", fn)
    for p, a, b in zip(paths, leaves0, lv):
      if b is None or tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"{fn}: params_list[{j}] at {p!r} has shape "
                         f"{None if b is None else tuple(np.shape(b))} but model 0 has "
                         f"{tuple(np.shape(a))}; soups average copies of one architecture.")
    all_leaves.append(lv)
  masks = [None] * len(paths)
  agree = [None] * len(paths)
  if masks_list is not None:
    if isinstance(masks_list, dict) or not isinstance(masks_list, Sequence) or len(masks_list) != n:
      raise ValueError(f"{fn}: masks_list must be a list with one mask tree per model ({n}).")
    mls = [_masks_list(fn, paths, leaves0, m) for m in masks_list]
    agree = _check_masks_equal(fn, paths, mls)
    masks = mls[0]
  if weights is None:
    w = jnp.full((n,), 1.0 / n, jnp.float32)
  else:
    if np.shape(weights) != (n,):
      raise ValueError(f"{fn}: weights must have one entry per model ({n}), got shape "
                       f"{np.shape(weights)}.")
    w = jnp.asarray(weights, jnp.float32)
    if not isinstance(w, jax.core.Tracer):
      wn = np.asarray(w)
      if np.any(wn < 0) or not wn.sum() > 0:
        raise ValueError(f"{fn}: weights must be non-negative with a positive sum, got {wn.tolist()}.")
    w = w / jnp.sum(w)
  out = []
  for i in range(len(paths)):
    xs = [lv[i] for lv in all_leaves]
    dt = jnp.result_type(xs[0])
    if not jnp.issubdtype(dt, jnp.inexact):
      raise TypeError(f"{fn}: leaf {paths[i]!r} has dtype {dt}; only floating-point leaves can be "
                      "averaged.")
    acc_dt = jnp.promote_types(dt, jnp.float32)
    avg = sum(w[j].astype(acc_dt) * jnp.asarray(x, acc_dt) for j, x in enumerate(xs))
    if masks[i] is not None:
      avg = jnp.where(masks[i], avg, jnp.zeros((), acc_dt))
    if agree[i] is not None:
      avg = jnp.where(agree[i], avg, jnp.asarray(jnp.nan, acc_dt))
    out.append(avg.astype(dt))
  return jax.tree.unflatten(treedef, out)


def greedy_soup(params_list: Sequence[PyTree], score_fn: Callable[[PyTree], Any],
                masks_list: Sequence[PyTree] | None = None) -> tuple[PyTree, list[int]]:
  """Greedy soup: rank models by ``score_fn`` (higher is better), add each if it does not hurt.

  Starts from the best single model; each next model joins the uniform soup if
  ``score_fn(soup)`` does not decrease. Runs on the host (``score_fn`` is typically a
  validation accuracy); masks are checked once as in :func:`sparse_soup`.

  Args:
    params_list: non-empty sequence of param trees sharing a mask.
    score_fn: ``score_fn(params) -> scalar``; higher is better.
    masks_list: optional mask trees, one per model (checked identical).

  Returns:
    ``(soup_params, chosen)`` with ``chosen`` the indices of the models in the soup.

  >>> import jax.numpy as jnp
  >>> models = [{"w": jnp.array([1.0])}, {"w": jnp.array([3.0])}, {"w": jnp.array([9.0])}]
  >>> soup, chosen = greedy_soup(models, lambda p: -float(jnp.abs(p["w"][0] - 2.0)))
  >>> chosen, soup["w"]
  ([0, 1], Array([2.], dtype=float32))
  """
  if masks_list is not None:
    sparse_soup(params_list, masks_list)  # validates masks and structures
  else:
    sparse_soup(params_list)
  scored = [float(score_fn(p)) for p in params_list]
  order = sorted(range(len(params_list)), key=lambda j: (-scored[j], j))
  chosen = [order[0]]
  best = scored[order[0]]
  soup = params_list[order[0]]
  for j in order[1:]:
    cand = sparse_soup([params_list[c] for c in chosen + [j]])
    s = float(score_fn(cand))
    if s >= best:
      chosen.append(j)
      best, soup = s, cand
  if masks_list is not None:
    soup = sparse_soup([soup], [masks_list[0]])
  return soup, sorted(chosen)
