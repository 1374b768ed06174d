"""Essential sparsity: one-shot magnitude-pruning sweeps and their knee.

Jaiswal et al. 2023, "The Emergence of Essential Sparsity in Large Pre-trained Models: The
Weights that Matter" (NeurIPS): pruning a trained model once by weight magnitude, without
retraining, barely changes its quality up to a sparsity (the *essential sparsity*), after which
quality falls sharply. This module measures that curve for unstructured (global or per-layer)
and N:M pruning, using :func:`sparsejax.core.pruning.prune_global`,
:func:`sparsejax.core.pruning.prune` and :class:`sparsejax.core.patterns.NM` for the selection.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.patterns import NM
from sparsejax.core.pruning import prune, prune_global

__all__ = ["EssentialCurve", "knee", "magnitude_sweep", "nm_sweep"]


class EssentialCurve(NamedTuple):
  """Metric of the one-shot pruned model at each sparsity (``labels`` name N:M points)."""
  sparsity: np.ndarray
  metric: np.ndarray
  labels: tuple[str, ...]


def magnitude_sweep(params: Any, eval_fn: Callable[[Any], jax.Array], sparsities: Sequence[float], *,
                    scope: str = "global", selection: Any = None, batch: str = "map") -> EssentialCurve:
  """One-shot magnitude pruning of ``params`` at every sparsity, scored by ``eval_fn``.

  Args:
    params: trained parameter pytree.
    eval_fn: ``eval_fn(pruned_params) -> scalar`` (accuracy, loss, ...). With ``batch`` "map"
      or "vmap" it is traced once with a traced sparsity, so it must be jax-traceable.
    sparsities: sparsities in [0, 1), e.g. ``np.linspace(0, 0.95, 20)``.
    scope: ``"global"`` (one magnitude threshold over all prunable leaves, as in the paper)
      or ``"layer"`` (the same sparsity in every leaf).
    selection: static bool tree of prunable leaves (default: ``ndim >= 2``).
    batch: ``"map"`` (``lax.map``, one compile, low memory), ``"vmap"`` (all sparsities at
      once) or ``"loop"`` (Python loop; ``eval_fn`` may be any Python function).

  Returns:
    :class:`EssentialCurve`.

  >>> import jax.numpy as jnp
  >>> p = {'w': jnp.arange(1., 9.).reshape(4, 2)}
  >>> c = magnitude_sweep(p, lambda q: jnp.sum(q['w']), [0.0, 0.5, 0.75])
  >>> c.metric.tolist()  # the largest weights survive
  [36.0, 26.0, 15.0]
  """
  sp = np.asarray(sparsities, np.float32)
  if sp.ndim != 1 or not sp.size or np.any(sp < 0) or np.any(sp >= 1):
    raise ValueError(f"magnitude_sweep: sparsities must be a non-empty 1-D sequence in [0, 1), got {sparsities!r}.")
  if scope not in ("global", "layer"):
    raise ValueError(f"magnitude_sweep: scope must be 'global' or 'layer', got {scope!r}.")
  def pruned(p, s):
    if scope == "global":
      return prune_global(p, None, s, selection=selection)[0]
    return prune(p, None, s, selection=selection)[0]

  pruned(params, float(sp[0]))  # static checks (structure, dtypes) with a concrete sparsity, outside tracing

  def one(p, s):
    return jnp.asarray(eval_fn(pruned(p, s)))

  # params are passed as arguments, not closed over: XLA would constant-fold the selection otherwise.
  if batch == "map":
    metric = jax.jit(lambda p, s: jax.lax.map(lambda si: one(p, si), s))(params, jnp.asarray(sp))
  elif batch == "vmap":
    metric = jax.jit(jax.vmap(one, in_axes=(None, 0)))(params, jnp.asarray(sp))
  elif batch == "loop":
    metric = [eval_fn(pruned(params, float(s))) for s in sp]
  else:
    raise ValueError(f"magnitude_sweep: batch must be 'map', 'vmap' or 'loop', got {batch!r}.")
  return EssentialCurve(sp.astype(np.float64), np.asarray(metric, np.float64), tuple(f"{s:.3g}" for s in sp))


def nm_sweep(params: Any, eval_fn: Callable[[Any], jax.Array], patterns: Sequence[tuple[int, int]], *,
             axis: int = -2, selection: Any = None, include_dense: bool = True) -> EssentialCurve:
  """One-shot magnitude N:M pruning for each ``(n, m)`` pattern, scored by ``eval_fn``.

  Every prunable leaf keeps the ``n`` largest-magnitude weights of each group of ``m`` along
  ``axis`` (default: the reduction axis of Dense/Conv kernels, the hardware layout). Points are
  sorted by sparsity ``1 - n/m``.

  Args:
    params: trained parameter pytree.
    eval_fn: ``eval_fn(pruned_params) -> scalar``.
    patterns: ``(n, m)`` pairs, e.g. ``[(2, 4), (1, 4), (1, 8), (1, 16)]``.
    axis: grouping axis.
    selection: static bool tree of prunable leaves (default: ``ndim >= 2``).
    include_dense: prepend the unpruned model at sparsity 0.

  Returns:
    :class:`EssentialCurve` with labels ``"n:m"`` (``"dense"`` for the unpruned point).

  >>> import jax.numpy as jnp
  >>> p = {'w': jnp.arange(1., 9.).reshape(4, 2)}
  >>> c = nm_sweep(p, lambda q: jnp.sum(q['w']), [(1, 2), (1, 4)])  # groups run down the columns
  >>> c.labels, c.sparsity.tolist(), c.metric.tolist()
  (('dense', '1:2', '1:4'), [0.0, 0.5, 0.75], [36.0, 22.0, 15.0])
  """
  if not patterns:
    raise ValueError("nm_sweep: patterns is empty; pass (n, m) pairs such as [(2, 4), (1, 8)].")
  pts = sorted({(int(n), int(m)) for n, m in patterns}, key=lambda nm: (1 - nm[0] / nm[1], nm[1]))
  ev = jax.jit(eval_fn)
  sp, metric, labels = [], [], []
  if include_dense:
    sp.append(0.0)
    metric.append(ev(params))
    labels.append("dense")
  for n, m in pts:
    q, _ = prune(params, None, None, pattern=NM(n, m, axis), selection=selection)
    sp.append(1.0 - n / m)
    metric.append(ev(q))
    labels.append(f"{n}:{m}")
  return EssentialCurve(np.asarray(sp, np.float64), np.asarray(metric, np.float64), tuple(labels))


def knee(curve: EssentialCurve, tolerance: float, *, higher_is_better: bool = True,
         reference: float | None = None) -> float:
  """Essential sparsity: the largest sparsity up to which the metric stays within ``tolerance``.

  Walks the curve in order of increasing sparsity and stops at the first point whose drop from
  ``reference`` exceeds ``tolerance``; returns the sparsity of the point before it. ``reference``
  defaults to the metric at sparsity 0 (which must then be on the curve).

  Args:
    curve: an :class:`EssentialCurve`.
    tolerance: allowed drop in metric units (e.g. 0.01 for one accuracy point on [0, 1]).
    higher_is_better: False for losses (a rise is a drop in quality).
    reference: metric of the dense model.

  Returns:
    The knee sparsity (float); NaN if even the sparsest-but-first point fails.

  >>> c = EssentialCurve(np.array([0., .5, .7, .9]), np.array([.95, .95, .94, .60]), ())
  >>> knee(c, 0.02)
  0.7
  """
  order = np.argsort(curve.sparsity, kind="stable")
  s, v = np.asarray(curve.sparsity)[order], np.asarray(curve.metric)[order]
  if reference is None:
    if not s.size or s[0] != 0:
      raise ValueError("knee: the curve has no sparsity-0 point; pass reference= (the dense metric).")
    reference = float(v[0])
  drop = (reference - v) if higher_is_better else (v - reference)
  ok = np.cumprod(drop <= tolerance).astype(bool)
  if not ok.any():
    return float("nan")
  return float(s[np.flatnonzero(ok)[-1]])
