"""Mask trees: create, apply, combine, count, summarise, validate, export.

A *mask tree* has the exact tree structure of the params. A masked leaf holds a
``bool`` array of the param's shape (True = kept); an unmasked (dense) leaf holds
``None``. Map over mask trees with ``is_leaf=lambda x: x is None`` (or use
:func:`map_masked`).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import paths as _paths

__all__ = [
  "apply_masks",
  "export_masks",
  "global_sparsity",
  "import_masks",
  "init_masks",
  "is_none",
  "leaf_sparsity",
  "map_masked",
  "mask_and",
  "mask_or",
  "nnz",
  "summary",
  "validate_masks",
]


def is_none(x: Any) -> bool:
  """``is_leaf`` predicate for mask trees (``None`` marks a dense leaf).

  >>> is_none(None), is_none(1)
  (True, False)
  """
  return x is None


def _count_dtype():
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def _mask_leaves(masks: Any) -> list[tuple[str, Any]]:
  return _paths.paths_with_leaves(masks, is_leaf=is_none)


def init_masks(params: Any, selection: Any = None) -> Any:
  """All-True masks on selected leaves, None elsewhere.

  Args:
    params: parameter pytree.
    selection: tree of Python bools like ``params`` (see
      :func:`sparsejax.core.paths.select`), or a regex / list of regexes used as
      ``select(params, include=...)``. Default: ``select(params)`` (ndim >= 2).

  Returns:
    Mask tree.

  >>> import jax.numpy as jnp
  >>> m = init_masks({'b': jnp.zeros(2), 'w': jnp.zeros((2, 2))})
  >>> m['b'] is None, m['w'].dtype.name, bool(m['w'].all())
  (True, 'bool', True)
  """
  if selection is None:
    selection = _paths.select(params)
  elif isinstance(selection, (str, list, tuple)) and all(isinstance(s, str) for s in jax.tree.leaves(selection)) \
      and (isinstance(selection, str) or len(jax.tree.leaves(selection)) == len(selection)):
    selection = _paths.select(params, include=selection)

  def one(path, p, s):
    if not isinstance(s, (bool, np.bool_)):
      raise TypeError(f"init_masks: selection at '{path}' must be a Python bool, got {type(s).__name__}.")
    return jnp.ones_like(p, dtype=jnp.bool_) if s else None

  try:
    return jax.tree_util.tree_map_with_path(lambda kp, p, s: one(_paths.path_str(kp), p, s), params, selection)
  except ValueError as e:
    raise ValueError(f"init_masks: selection tree does not match params: {e}") from None


def apply_masks(params: Any, masks: Any) -> Any:
  """Zeros params where the mask is False; dense (None) leaves are returned as is.

  Uses ``jnp.where`` (exact zeros, dtype kept, no NaN propagation from ``0 * inf``).

  Args:
    params: parameter pytree.
    masks: mask tree matching ``params``.

  Returns:
    Masked params.

  Raises:
    ValueError / TypeError: as :func:`validate_masks` (structure, shape, non-bool mask leaves
      such as float masks); the message names the leaf path.

  >>> import jax.numpy as jnp
  >>> apply_masks({'w': jnp.array([1., 2.]), 'b': jnp.ones(1)}, {'w': jnp.array([True, False]), 'b': None})['w']
  Array([1., 0.], dtype=float32)
  """
  _validate(masks, params, "apply_masks")

  def one(m, p):
    if m is None:
      return p
    return jnp.where(m, p, jnp.zeros((), jnp.result_type(p)))
  return jax.tree.map(one, masks, params, is_leaf=is_none)


def map_masked(fn: Callable[..., Any], masks: Any, *trees: Any) -> Any:
  """``fn(mask, *leaves)`` on masked leaves; None on dense leaves.

  Args:
    fn: function of a mask leaf and the matching leaves of ``trees``.
    masks: mask tree.
    *trees: trees with the structure of ``masks``.

  Returns:
    Tree like ``masks``.

  >>> import jax.numpy as jnp
  >>> map_masked(lambda m, p: jnp.sum(p * m), {'w': jnp.array([True, False]), 'b': None},
  ...            {'w': jnp.array([1., 2.]), 'b': jnp.ones(1)})
  {'b': None, 'w': Array(1., dtype=float32)}
  """
  return jax.tree.map(lambda m, *xs: None if m is None else fn(m, *xs), masks, *trees, is_leaf=is_none)


def mask_and(a: Any, b: Any) -> Any:
  """Elementwise AND of two mask trees; None means all True.

  >>> import jax.numpy as jnp
  >>> mask_and({'w': jnp.array([True, True])}, {'w': jnp.array([True, False])})['w']
  Array([ True, False], dtype=bool)
  """
  def one(x, y):
    if x is None:
      return y
    if y is None:
      return x
    return jnp.logical_and(x, y)
  return jax.tree.map(one, a, b, is_leaf=is_none)


def mask_or(a: Any, b: Any) -> Any:
  """Elementwise OR of two mask trees; None (all True) absorbs.

  >>> import jax.numpy as jnp
  >>> mask_or({'w': jnp.array([True, False]), 'b': None}, {'w': jnp.array([False, False]), 'b': jnp.array([False])})
  {'b': None, 'w': Array([ True, False], dtype=bool)}
  """
  def one(x, y):
    if x is None or y is None:
      return None
    return jnp.logical_or(x, y)
  return jax.tree.map(one, a, b, is_leaf=is_none)


def nnz(masks: Any) -> jax.Array:
  """Total number of kept entries over masked leaves (dense leaves not counted).

  >>> import jax.numpy as jnp
  >>> int(nnz({'w': jnp.array([True, False, True]), 'b': None}))
  2
  """
  total = jnp.zeros((), _count_dtype())
  for _, m in _mask_leaves(masks):
    if m is not None:
      total = total + jnp.sum(m, dtype=_count_dtype())
  return total


def leaf_sparsity(masks: Any) -> dict[str, jax.Array]:
  """Fraction of zeros per masked leaf, keyed by leaf path.

  >>> import jax.numpy as jnp
  >>> {k: float(v) for k, v in leaf_sparsity({'w': jnp.array([True, False, False, False]), 'b': None}).items()}
  {'w': 0.75}
  """
  out = {}
  for path, m in _mask_leaves(masks):
    if m is not None:
      size = int(np.prod(np.shape(m)))
      out[path] = 1.0 - jnp.sum(m, dtype=_count_dtype()) / max(size, 1)
  return out


def global_sparsity(masks: Any, params: Any = None) -> jax.Array:
  """Fraction of zeros over all masked entries (and dense leaves if ``params`` is given).

  Args:
    masks: mask tree.
    params: optional params; when given, dense (None) leaves count as fully dense.

  Returns:
    Scalar float array.

  >>> import jax.numpy as jnp
  >>> m = {'w': jnp.array([True, False, False, False]), 'b': None}
  >>> float(global_sparsity(m)), float(global_sparsity(m, {'w': jnp.zeros(4), 'b': jnp.zeros(4)}))
  (0.75, 0.375)
  """
  kept = jnp.zeros((), _count_dtype())
  total = 0
  if params is None:
    for _, m in _mask_leaves(masks):
      if m is not None:
        kept = kept + jnp.sum(m, dtype=_count_dtype())
        total += int(np.prod(np.shape(m)))
  else:
    validate_masks(masks, params)
    for (_, m), (_, p) in zip(_mask_leaves(masks), _paths.paths_with_leaves(params)):
      size = int(np.prod(np.shape(p)))
      total += size
      kept = kept + (size if m is None else jnp.sum(m, dtype=_count_dtype()))
  if total == 0:
    return jnp.zeros((), jnp.float32)
  return 1.0 - kept / total


def _err_tree(msg_prefix: str, masks: Any, params: Any) -> None:
  """Raises a ValueError naming the first path present in one tree only."""
  mp = [p for p, _ in _mask_leaves(masks)]
  pp = [p for p, _ in _paths.paths_with_leaves(params, is_leaf=is_none)]
  sm, sp = set(mp), set(pp)
  for p in pp:
    if p not in sm:
      if any(q.startswith(p + "/") for q in mp):
        raise TypeError(f"{msg_prefix}: mask at '{p}' is a subtree (e.g. a list), expected a bool array or None. "
                        f"Convert it with jnp.asarray(mask, bool).")
      raise ValueError(f"{msg_prefix}: mask tree has no leaf '{p}' (params have it). "
                       f"Build masks with init_masks(params) or put None there for a dense leaf.")
  for p in mp:
    if p not in sp:
      raise ValueError(f"{msg_prefix}: mask tree has a leaf '{p}' that params do not have.")
  raise ValueError(f"{msg_prefix}: mask tree and params have the same leaf paths but different container types "
                   f"(e.g. dict vs State, tuple vs list): {jax.tree.structure(masks, is_leaf=is_none)} vs "
                   f"{jax.tree.structure(params, is_leaf=is_none)}.")


def validate_masks(masks: Any, params: Any) -> None:
  """Checks that ``masks`` is a valid mask tree for ``params``.

  Raises:
    ValueError: structure mismatch or a mask shape differing from its param
      (the message names the leaf path).
    TypeError: a mask leaf that is not a bool array or None (names the leaf path).

  >>> import jax.numpy as jnp
  >>> validate_masks({'w': jnp.ones(2, bool)}, {'w': jnp.zeros(3)})
  Traceback (most recent call last):
  ...
  ValueError: validate_masks: mask at 'w' has shape (2,) but the param has shape (3,); build masks with init_masks(params).
  """
  _validate(masks, params, "validate_masks")


def _validate(masks: Any, params: Any, pre: str) -> None:
  # A None param (an absent leaf) is a leaf position too: its mask must be None.
  if jax.tree.structure(masks, is_leaf=is_none) != jax.tree.structure(params, is_leaf=is_none):
    _err_tree(pre, masks, params)
  for (path, m), (_, p) in zip(_mask_leaves(masks), _paths.paths_with_leaves(params, is_leaf=is_none)):
    if m is None:
      continue
    if p is None:
      raise ValueError(f"{pre}: mask at '{path}' is an array but the param there is None; put None "
                       "in the mask tree for absent leaves.")
    _check_mask_leaf(pre, path, m, np.shape(p))


def _check_mask_leaf(fn: str, path: str, m: Any, param_shape) -> None:
  """Raises (naming ``fn`` and ``path``) unless ``m`` is a bool array of ``param_shape``."""
  if not hasattr(m, "shape") or not hasattr(m, "dtype"):
    raise TypeError(f"{fn}: mask at {path!r} is a {type(m).__name__}; expected a bool array or None.")
  if tuple(m.shape) != tuple(param_shape):
    raise ValueError(f"{fn}: mask at {path!r} has shape {tuple(m.shape)} but the param has shape "
                     f"{tuple(param_shape)}; build masks with init_masks(params).")
  if m.dtype != jnp.bool_:
    raise TypeError(f"{fn}: mask at {path!r} has dtype {m.dtype}; expected bool (use m.astype(bool)).")


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n}"


def summary(params: Any, masks: Any) -> str:
  """Text table of per-leaf sparsity and two totals.

  Columns: path, shape, sparsity, nnz (kept entries), dense bytes, sparse bytes
  (kept values + a 1-bit-per-entry bitmap), and matmul FLOPs per input row
  (``2 * nnz`` multiply-adds for leaves with ndim >= 2: per token for a Dense
  kernel, per output position for a conv kernel; ``-`` for 1-D leaves).
  The two total rows differ in what they count: ``masked leaves`` only the
  masked leaves (its sparsity is :func:`global_sparsity` ``(masks)``), ``all
  leaves`` every leaf, dense ones (biases, norms) as fully kept (its sparsity
  is :func:`global_sparsity` ``(masks, params)``).

  Args:
    params: parameter pytree.
    masks: mask tree for ``params``.

  Returns:
    The table as a string (host values; not for use under jit).

  >>> import jax.numpy as jnp
  >>> print(summary({'w': jnp.zeros((2, 2))}, {'w': jnp.array([[True, False], [False, False]])}))
  path           shape   sparsity  nnz  bytes  sparse bytes  FLOPs/row
  w              (2, 2)  0.7500    1    16 B   5 B           2
  masked leaves          0.7500    1    16 B   5 B           2
  all leaves             0.7500    1    16 B   5 B           2
  """
  validate_masks(masks, params)
  rows = [("path", "shape", "sparsity", "nnz", "bytes", "sparse bytes", "FLOPs/row")]
  t_size = t_nnz = t_bytes = t_sparse = t_flops = 0
  m_size = m_nnz = m_bytes = m_sparse = m_flops = 0
  for (path, m), (_, p) in zip(_mask_leaves(masks), _paths.paths_with_leaves(params)):
    shape = tuple(np.shape(p))
    size = int(np.prod(shape))
    itemsize = jnp.dtype(jnp.result_type(p)).itemsize
    if m is None:
      k = size
      sparse_b = size * itemsize
    else:
      k = int(jax.device_get(jnp.sum(m, dtype=_count_dtype())))
      sparse_b = k * itemsize + -(-size // 8)
    dense_b = size * itemsize
    flops = 2 * k if len(shape) >= 2 else None
    rows.append((path, str(shape), f"{1 - k / max(size, 1):.4f}", str(k), _fmt_bytes(dense_b), _fmt_bytes(sparse_b),
                 "-" if flops is None else str(flops)))
    t_size += size
    t_nnz += k
    t_bytes += dense_b
    t_sparse += sparse_b
    t_flops += flops or 0
    if m is not None:
      m_size += size
      m_nnz += k
      m_bytes += dense_b
      m_sparse += sparse_b
      m_flops += flops or 0
  rows.append(("masked leaves", "", f"{1 - m_nnz / max(m_size, 1):.4f}", str(m_nnz),
               _fmt_bytes(m_bytes), _fmt_bytes(m_sparse), str(m_flops)))
  rows.append(("all leaves", "", f"{1 - t_nnz / max(t_size, 1):.4f}", str(t_nnz), _fmt_bytes(t_bytes),
               _fmt_bytes(t_sparse), str(t_flops)))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  return "\n".join(lines)


def export_masks(masks: Any) -> dict[str, np.ndarray]:
  """Flat ``{path: numpy bool array}`` dict of the masked leaves (for npz/json/orbax).

  >>> import jax.numpy as jnp
  >>> export_masks({'w': jnp.array([True, False]), 'b': None})
  {'w': array([ True, False])}
  """
  out = {}
  for path, m in _mask_leaves(masks):
    if m is None:
      continue
    if path in out:
      raise ValueError(f"export_masks: two leaves share the path '{path}'; rename one key.")
    arr = np.asarray(jax.device_get(m))
    if arr.dtype != np.bool_:
      raise TypeError(f"export_masks: mask at '{path}' has dtype {arr.dtype}, expected bool.")
    out[path] = arr
  return out


def import_masks(flat: dict[str, Any], params: Any) -> Any:
  """Rebuilds a mask tree for ``params`` from :func:`export_masks` output.

  Leaves missing from ``flat`` are dense (None). Masks are placed with the
  param's sharding when the param is a concrete ``jax.Array``.

  Args:
    flat: ``{path: bool array}`` (0/1 integer arrays are accepted).
    params: parameter pytree defining the structure.

  Returns:
    Mask tree.

  Raises:
    ValueError: unknown path, shape mismatch, or non-0/1 values (names the path).

  >>> import jax.numpy as jnp
  >>> p = {'w': jnp.zeros(2), 'b': jnp.zeros(2)}
  >>> import_masks(export_masks({'w': jnp.array([True, False]), 'b': None}), p)
  {'b': None, 'w': Array([ True, False], dtype=bool)}
  """
  pl = _paths.paths_with_leaves(params)
  known = {p for p, _ in pl}
  for k in flat:
    if k not in known:
      raise ValueError(f"import_masks: mask path '{k}' is not a leaf of params. Param paths: "
                       f"{', '.join(sorted(known)[:60])}.")
  out = []
  for path, p in pl:
    if path not in flat:
      out.append(None)
      continue
    arr = np.asarray(flat[path])
    if arr.shape != tuple(np.shape(p)):
      raise ValueError(f"import_masks: mask at '{path}' has shape {arr.shape} but the param has shape "
                       f"{tuple(np.shape(p))}.")
    if arr.dtype != np.bool_:
      if not (np.issubdtype(arr.dtype, np.integer) and np.isin(arr, (0, 1)).all()):
        raise ValueError(f"import_masks: mask at '{path}' has dtype {arr.dtype} with values other than 0/1; "
                         f"expected a bool array.")
      arr = arr.astype(bool)
    sharding = getattr(p, "sharding", None)
    if isinstance(p, jax.Array) and not isinstance(p, jax.core.Tracer) and sharding is not None:
      out.append(jax.device_put(arr, sharding))
    else:
      out.append(jnp.asarray(arr))
  return jax.tree.unflatten(jax.tree.structure(params), out)
