"""Layer-wise sparsity distributions: how a global sparsity is split over leaves.

Each function returns a *sparsity tree*: the structure of ``params`` with a float32 scalar
(the leaf's sparsity) on every selected leaf and ``None`` on dense leaves. Feed it to
:func:`sparsejax.core.pruning.prune` (or any function taking per-leaf sparsities).

- :func:`uniform`: every selected leaf gets ``sparsity``.
- :func:`erdos_renyi`: ER (``kernel=False``) and ERK (``kernel=True``, Evci et al. 2020) with
  the dense redistribution loop of ``google-research/rigl`` (``rigl/sparse_utils.py``).
- :func:`global_magnitude` / :func:`global_normalized_magnitude`: the per-leaf sparsities that
  one global magnitude ranking produces, raw or with each leaf's ``|w|`` divided by its L2
  norm first (jaxpruner's default "global" method). Two different methods, named apart.

Per-path ``overrides`` (``{regex: sparsity}``, matched with ``re.search`` on ``/``-joined leaf
paths such as ``"Dense_0/kernel"``) pin the sparsity of matching selected leaves; those leaves
are excluded from the solve, and ``sparsity`` is then the exact sparsity of the *other*
selected leaves taken together. To prune directly with a global ranking use
:func:`sparsejax.core.pruning.prune_global`.

``sparsity`` may be a Python float (solved in float64 NumPy) or a traced scalar under
``jax.jit`` (solved with a fixed number of ``jnp`` iterations, in float32 unless x64 is on);
both agree to float32 precision.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.scores import _path, _selection_flags

PyTree = Any

__all__ = ["uniform", "erdos_renyi", "global_magnitude", "global_normalized_magnitude"]


def _concrete(x) -> float | None:
  """A Python float if ``x`` is a concrete scalar, None if traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  arr = np.asarray(x)
  if arr.size != 1:
    raise ValueError(f"sparsity must be a scalar, got an array of shape {arr.shape}.")
  return float(arr.reshape(()))


def _check_sparsity(value, where: str) -> None:
  v = _concrete(value)
  if v is not None and not 0.0 <= v < 1.0:
    raise ValueError(f"{where}: sparsity must be in [0, 1), got {v}; sparsity is the fraction of "
                     "zeros (0.9 keeps 10% of the weights).")


def _layers(params: PyTree, selection, overrides: Mapping[str, Any] | None, fn: str):
  """Flattened leaves, selected flags, paths and per-leaf override values (or None)."""
  flags = _selection_flags(params, selection, fn)
  kl, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [_path(kp) for kp, _ in kl]
  shapes = [tuple(np.shape(x)) for _, x in kl]
  over: list = [None] * len(kl)
  if overrides:
    if not isinstance(overrides, Mapping):
      raise TypeError(f"{fn}: overrides must be a mapping {{regex: sparsity}}, got "
                      f"{type(overrides).__name__}.")
    selected_paths = [p for p, f in zip(paths, flags) if f]
    owner: dict[int, str] = {}
    for pattern, value in overrides.items():
      rx = re.compile(pattern)
      hits = [i for i, (p, f) in enumerate(zip(paths, flags)) if f and rx.search(p)]
      if not hits:
        raise ValueError(
            f"{fn}: override pattern {pattern!r} matches no selected leaf; selected leaf paths "
            f"are {selected_paths} (use sparsejax.core.paths.select(..., include=...) to select "
            "more leaves).")
      for i in hits:
        if i in owner:
          raise ValueError(
              f"{fn}: leaf {paths[i]!r} matches two override patterns, {owner[i]!r} and "
              f"{pattern!r}; make the patterns disjoint.")
        owner[i] = pattern
        _check_sparsity(value, f"{fn}: override {pattern!r} for leaf {paths[i]!r}")
        over[i] = value
  return kl, treedef, flags, paths, shapes, over


def _as_scalar(v):
  return jnp.asarray(v, jnp.float32)


def uniform(params: PyTree, sparsity, *, selection: PyTree | None = None,
            overrides: Mapping[str, Any] | None = None) -> PyTree:
  """Uniform distribution: every selected leaf gets ``sparsity`` (overrides excepted).

  Args:
    params: parameter pytree (only shapes are used).
    sparsity: scalar in [0, 1) (Python float or traced).
    selection: tree of static bools marking prunable leaves (default
      ``sparsejax.core.paths.select(params)``: ``ndim >= 2``); a mask tree works too.
    overrides: ``{regex: sparsity}`` for specific leaves.

  Returns:
    A sparsity tree (float32 scalars on selected leaves, None on dense leaves).

  Raises:
    ValueError: sparsity outside [0, 1), or an override matching no selected leaf / a leaf
      matching two overrides (the message names the leaf path or lists the available ones).

  >>> import jax.numpy as jnp
  >>> p = {"fc": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}, "out": jnp.zeros((3, 2))}
  >>> s = uniform(p, 0.5, overrides={"out": 0.0})
  >>> float(s["fc"]["kernel"]), s["fc"]["bias"], float(s["out"])
  (0.5, None, 0.0)
  """
  _check_sparsity(sparsity, "uniform")
  kl, treedef, flags, _, _, over = _layers(params, selection, overrides, "uniform")
  out = [None if not f else _as_scalar(o if o is not None else sparsity)
         for f, o in zip(flags, over)]
  return jax.tree.unflatten(treedef, out)


def _raw_density(shape, kernel: bool, power: float) -> float:
  dims = shape if kernel else shape[-2:]
  return float((np.sum(dims) / np.prod(dims, dtype=np.float64)) ** power)


def _solve_numpy(s: float, n: np.ndarray, raw: np.ndarray):
  """rigl's ERK solve in float64 with the dense redistribution loop."""
  dense = np.zeros(len(n), bool)
  n_zeros = np.floor(s * n)
  eps = 0.0
  for _ in range(len(n) + 1):
    rhs = np.sum(np.where(dense, -n_zeros, n - n_zeros))
    div = np.sum(np.where(dense, 0.0, raw * n))
    eps = rhs / div if div > 0 else 0.0
    if dense.all():
      break
    mx = raw[~dense].max()
    if mx * eps > 1.0:
      dense |= raw == mx
    else:
      break
  return np.where(dense, 0.0, np.maximum(1.0 - eps * raw, 0.0)), eps


def _solve_jnp(s, n: np.ndarray, raw: np.ndarray):
  """The same solve as fixed-iteration jnp code (for a traced sparsity)."""
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  s = jnp.asarray(s, dtype)
  n_j = jnp.asarray(n, dtype)
  raw_j = jnp.asarray(raw, dtype)
  n_zeros = jnp.floor(s * n_j)

  def eps_of(dense):
    rhs = jnp.sum(jnp.where(dense, -n_zeros, n_j - n_zeros))
    div = jnp.sum(jnp.where(dense, 0.0, raw_j * n_j))
    return jnp.where(div > 0, rhs / jnp.where(div > 0, div, 1.0), 0.0)

  def step(_, dense):
    eps = eps_of(dense)
    mx = jnp.max(jnp.where(dense, -jnp.inf, raw_j))
    grow = (mx * eps > 1.0) & ~jnp.all(dense)
    return dense | (grow & (raw_j == mx))

  dense = jax.lax.fori_loop(0, len(n), step, jnp.zeros(len(n), bool))
  eps = eps_of(dense)
  return jnp.where(dense, 0.0, jnp.maximum(1.0 - eps * raw_j, 0.0)), eps


def erdos_renyi(params: PyTree, sparsity, *, kernel: bool = True, power: float = 1.0,
                selection: PyTree | None = None,
                overrides: Mapping[str, Any] | None = None) -> PyTree:
  """Erdos-Renyi (ER) and Erdos-Renyi-Kernel (ERK) layer-wise sparsities.

  Each free leaf ``l`` gets density ``eps * raw_l`` with ``raw_l = (sum(dims) / prod(dims)) **
  power``, where ``dims`` is the whole shape for ERK (``kernel=True``) and the last two dims for
  ER (``kernel=False``). ``eps`` is solved so that the free leaves keep exactly
  ``sum(N_l - floor(s * N_l))`` weights; while a leaf would get density > 1, the leaves with the
  largest ``raw`` are made dense and ``eps`` is solved again (rigl's redistribution loop).
  ``power=0`` gives the uniform distribution.

  Args:
    params: parameter pytree (only shapes are used).
    sparsity: target sparsity of the free selected leaves, in [0, 1) (Python float or traced).
    kernel: ERK (True) or ER (False).
    power: exponent applied to the raw densities.
    selection: tree of static bools marking prunable leaves (default: ``ndim >= 2``).
    overrides: ``{regex: sparsity}`` pinned sparsities, excluded from the solve.

  Returns:
    A sparsity tree (float32 scalars on selected leaves, None on dense leaves).

  Raises:
    ValueError: sparsity outside [0, 1), bad overrides (naming the leaf path), or nothing to
      solve for.

  >>> import jax.numpy as jnp
  >>> p = {"fc1": jnp.zeros((784, 300)), "fc2": jnp.zeros((300, 100)), "fc3": jnp.zeros((100, 10))}
  >>> s = erdos_renyi(p, 0.9)
  >>> [round(float(s[k]), 5) for k in ("fc1", "fc2", "fc3")]
  [0.92043, 0.76981, 0.0]
  """
  fn = "erdos_renyi"
  _check_sparsity(sparsity, fn)
  kl, treedef, flags, paths, shapes, over = _layers(params, selection, overrides, fn)
  free = [i for i, (f, o) in enumerate(zip(flags, over)) if f and o is None]
  out: list = [None] * len(kl)
  for i, (f, o) in enumerate(zip(flags, over)):
    if f and o is not None:
      out[i] = _as_scalar(o)
  if free:
    for i in free:
      if len(shapes[i]) == 0 or 0 in shapes[i]:
        raise ValueError(f"{fn}: leaf {paths[i]!r} has shape {shapes[i]}, which has no weights to "
                         "distribute; exclude it from the selection.")
    n = np.array([np.prod(shapes[i], dtype=np.float64) for i in free])
    raw = np.array([_raw_density(shapes[i], kernel, power) for i in free])
    s = _concrete(sparsity)
    if s is not None:
      sl, _ = _solve_numpy(s, n, raw)
      vals = [_as_scalar(v) for v in sl]
    else:
      sl, _ = _solve_jnp(sparsity, n, raw)
      vals = [sl[j].astype(jnp.float32) for j in range(len(free))]
    for i, v in zip(free, vals):
      out[i] = v
  return jax.tree.unflatten(treedef, out)


def _global(params, sparsity, normalize, selection, masks, fn):
  from sparsejax.core.pruning import prune_global  # pylint: disable=import-outside-toplevel
  _check_sparsity(sparsity, fn)
  if masks is None:
    flags = _selection_flags(params, selection, fn)
    leaves, treedef = jax.tree.flatten(params)
    masks = jax.tree.unflatten(
        treedef, [jnp.ones(np.shape(x), bool) if f else None for x, f in zip(leaves, flags)])
  _, m = prune_global(params, None, sparsity, normalize=normalize, masks=masks)
  def leaf(x):
    if x is None:
      return None
    kept = jnp.maximum(jnp.sum(x, dtype=jnp.int32), 1)
    return (1.0 - kept / x.size).astype(jnp.float32)

  return jax.tree.map(leaf, m, is_leaf=lambda x: x is None)


def global_magnitude(params: PyTree, sparsity, *, selection: PyTree | None = None,
                     masks: PyTree | None = None) -> PyTree:
  """Per-leaf sparsities of *raw* global magnitude pruning.

  One exact top-k of ``|w|`` over all selected leaves keeps ``round(n * (1 - sparsity))``
  weights; the result is each leaf's resulting sparsity. Pruning each leaf with it
  (``prune(params, None, tree)``) keeps the same weights as
  :func:`sparsejax.core.pruning.prune_global` (exact for leaves below ~5M elements; float32
  sparsities can be off by one element on larger leaves), except that a leaf the global
  ranking empties completely (layer collapse) gets sparsity ``1 - 1/size``: per-leaf
  sparsities live in [0, 1) and every leaf keeps at least one weight (use ``prune_global`` to
  allow collapse). With ``masks``, only kept weights compete.

  Args:
    params: parameter pytree.
    sparsity: global sparsity over the selected leaves, in [0, 1) (may be traced).
    selection: tree of static bools (default: ``ndim >= 2``), used when ``masks`` is None.
    masks: current mask tree.

  Returns:
    A sparsity tree.

  >>> import jax.numpy as jnp
  >>> p = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[30.0, 40.0]])}
  >>> s = global_magnitude(p, 0.5)  # the ranking empties "a": it keeps its best weight
  >>> float(s["a"]), float(s["b"])
  (0.5, 0.0)
  """
  return _global(params, sparsity, False, selection, masks, "global_magnitude")


def global_normalized_magnitude(params: PyTree, sparsity, *, selection: PyTree | None = None,
                                masks: PyTree | None = None) -> PyTree:
  """Per-leaf sparsities of global magnitude pruning on per-leaf L2-normalised ``|w|``.

  Like :func:`global_magnitude`, but each leaf's ``|w|`` is divided by its L2 norm before the
  global ranking (jaxpruner's ``GlobalMagnitudePruning`` with ``use_normalization=True``), so
  leaves with large weights do not keep all the budget.

  >>> import jax.numpy as jnp
  >>> p = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[30.0, 40.0]])}
  >>> s = global_normalized_magnitude(p, 0.5)
  >>> float(s["a"]), float(s["b"])
  (0.5, 0.5)
  """
  return _global(params, sparsity, True, selection, masks, "global_normalized_magnitude")
