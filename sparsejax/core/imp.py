"""Iterative magnitude pruning (Lottery Ticket) helpers: prune the remaining weights, rewind.

One IMP round: train; ``imp_prune`` a fraction ``p`` of the *remaining* weights (masks only
shrink); ``rewind`` the survivors to saved weights (``theta_0`` for the lottery ticket, or
``theta_k`` early in training for rewinding; also rewind the optimizer state and learning-rate
schedule yourself); retrain. After ``r`` rounds the density is about ``(1 - p) ** r``
(``p = 0.2``: 0.328 after 5 rounds, 0.107 after 10, 0.0115 after 20).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import selection as _sel
from sparsejax.core.masks import init_masks
from sparsejax.core.pruning import (_as_scores, _check_unit, _flat, _is_scalar, _l2_normalized,
                                    _leaves_like, _masks_list, _scores_list, _zero_out)

PyTree = Any

__all__ = ["imp_prune", "rewind", "imp_density"]


def _n_keep(n_remaining, fraction):
  """n_remaining - round(fraction * n_remaining) (float32, or float64 with x64)."""
  dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  n_prune = jnp.round(n_remaining.astype(dt) * jnp.asarray(fraction, dt)).astype(n_remaining.dtype)
  return n_remaining - n_prune


@jax.jit
def _imp_leaf(score, old, fraction):
  remaining = jnp.sum(old, dtype=jnp.int32)
  return _sel.global_topk_masks([score], k=_n_keep(remaining, fraction), masks=[old])[0]


@functools.partial(jax.jit, static_argnames=("normalize",))
def _imp_global(scores, olds, fraction, *, normalize):
  sc = [_l2_normalized(s, m) if normalize else s for s, m in zip(scores, olds)]
  remaining = sum(jnp.sum(m, dtype=jnp.int32) for m in olds)
  return _sel.global_topk_masks(sc, k=_n_keep(remaining, fraction), masks=list(olds))


def imp_prune(params: PyTree, masks: PyTree | None, fraction, *, scores: PyTree | None = None,
              global_prune: bool = False, normalize: bool = False):
  """Prunes ``round(fraction * n_remaining)`` of the remaining weights (one IMP round).

  Per leaf by default (each masked leaf loses the fraction of its own remaining weights), or
  over all masked leaves together with ``global_prune=True`` (open_lth's ``sparse_global``;
  ``normalize=True`` L2-normalises each leaf's scores first). Only currently kept weights
  compete, so masks are monotone (``new <= old``).

  Args:
    params: parameter pytree (the trained weights).
    masks: current mask tree, or None to start from ``init_masks(params)``.
    fraction: fraction of the remaining weights to remove, in [0, 1) (may be traced).
    scores: score tree, default ``|params|`` (magnitude).
    global_prune: one global ranking instead of per-leaf rankings.
    normalize: per-leaf L2 normalisation of the scores (global only).

  Returns:
    ``(params, masks)`` with the pruned weights set to 0.

  >>> import jax.numpy as jnp
  >>> p = {"w": jnp.arange(1.0, 11.0).reshape(2, 5), "b": jnp.ones(5)}
  >>> p, m = imp_prune(p, None, 0.2)
  >>> p, m = imp_prune(p, m, 0.2)
  >>> int(m["w"].sum()), m["b"]
  (6, None)
  """
  fn = "imp_prune"
  if masks is None:
    masks = init_masks(params)
  paths, leaves, treedef = _flat(params)
  old = _masks_list(fn, paths, leaves, masks)
  active = [m is not None for m in old]
  if not _is_scalar(fraction):
    raise ValueError(f"{fn}: fraction must be a scalar, got shape {np.shape(fraction)}.")
  _check_unit(fraction, "fraction", fn, None)
  ss = _scores_list(fn, paths, leaves, scores, active)
  idx = [i for i, a in enumerate(active) if a]
  if not idx:
    raise ValueError(f"{fn}: the mask tree has no masked leaf; leaf paths are {paths}.")
  if normalize and not global_prune:
    raise ValueError(f"{fn}: normalize=True only applies to global_prune=True (a per-leaf "
                     "ranking is unchanged by scaling).")
  new_m = list(old)
  if global_prune:
    got = _imp_global([_as_scores(ss[i]) for i in idx], [old[i] for i in idx], fraction,
                      normalize=normalize)
    for j, i in enumerate(idx):
      new_m[i] = got[j]
  else:
    for i in idx:
      new_m[i] = _imp_leaf(_as_scores(ss[i]), old[i], fraction)
  new_p = [x if m is None else _zero_out(x, m) for x, m in zip(leaves, new_m)]
  return jax.tree.unflatten(treedef, new_p), jax.tree.unflatten(treedef, new_m)


def rewind(params: PyTree, masks: PyTree, rewind_params: PyTree) -> PyTree:
  """Resets every weight to ``rewind_params`` and re-applies ``masks`` (removed weights stay 0).

  Dense leaves (biases, norms) are rewound too, as in the lottery-ticket procedure. The result
  has the dtypes of ``params``.

  Args:
    params: current params (used for structure, shapes and dtypes).
    masks: mask tree.
    rewind_params: saved params (``theta_0`` or ``theta_k``) with the structure of ``params``.

  Returns:
    The rewound, masked params.

  Raises:
    ValueError: structures or shapes differ (the message names the leaf path).

  >>> import jax.numpy as jnp
  >>> out = rewind({"w": jnp.array([5.0, 6.0])}, {"w": jnp.array([True, False])},
  ...              {"w": jnp.array([1.0, 2.0])})
  >>> out["w"]
  Array([1., 0.], dtype=float32)
  """
  fn = "rewind"
  paths, leaves, treedef = _flat(params)
  ms = _masks_list(fn, paths, leaves, masks)
  rs = _leaves_like(paths, rewind_params, "rewind_params", fn)
  out = []
  for p, leaf, m, r in zip(paths, leaves, ms, rs):
    if r is None or tuple(np.shape(r)) != tuple(np.shape(leaf)):
      raise ValueError(f"{fn}: rewind_params at {p!r} has shape {np.shape(r) if r is not None else None} "
                       f"but params have {tuple(np.shape(leaf))}; save the rewind point from the same "
                       "model.")
    r = jnp.asarray(r).astype(jnp.result_type(leaf))
    out.append(r if m is None else _zero_out(r, m))
  return jax.tree.unflatten(treedef, out)


def imp_density(fraction: float, rounds: int) -> float:
  """Nominal density ``(1 - fraction) ** rounds`` after ``rounds`` IMP rounds.

  >>> round(imp_density(0.2, 5), 3), round(imp_density(0.2, 10), 3), round(imp_density(0.2, 20), 4)
  (0.328, 0.107, 0.0115)
  """
  return float((1.0 - fraction) ** rounds)
