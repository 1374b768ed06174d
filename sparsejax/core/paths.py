"""Leaf paths and path-based selection of prunable leaves.

A leaf path is the ``/``-joined list of key names leading to the leaf
(``"fc1/kernel"``); the trailing ``value`` attribute of NNX variables is dropped,
so Linen param dicts, NNX states (``nnx.state(model, nnx.Param)``) and pure
dicts give the same paths. Sequence entries appear as their index (``"layers/0/kernel"``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["leaf_paths", "path_str", "paths_with_leaves", "select"]

Pattern = str | Sequence[str] | None


def _key_name(k) -> str:
  tu = jax.tree_util
  if isinstance(k, tu.DictKey):
    return str(k.key)
  if isinstance(k, tu.GetAttrKey):
    return str(k.name)
  if isinstance(k, tu.SequenceKey):
    return str(k.idx)
  if isinstance(k, tu.FlattenedIndexKey):
    return str(k.key)
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(key_path: Sequence[Any]) -> str:
  """``/``-joined key names of a ``jax.tree_util`` key path.

  A trailing NNX ``value`` attribute (``GetAttrKey('value')``) is dropped.

  Args:
    key_path: a key path from ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The path string, e.g. ``"fc1/kernel"``.

  >>> import jax
  >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({'fc1': {'kernel': 1}, 'h': (2,)})[0]]
  ['fc1/kernel', 'h/0']
  """
  key_path = tuple(key_path)
  if len(key_path) > 1 and isinstance(key_path[-1], jax.tree_util.GetAttrKey) and key_path[-1].name == "value":
    key_path = key_path[:-1]
  return "/".join(_key_name(k) for k in key_path)


def paths_with_leaves(tree: Any, *, is_leaf=None) -> list[tuple[str, Any]]:
  """``(path, leaf)`` pairs in ``jax.tree`` leaf order.

  Args:
    tree: any pytree.
    is_leaf: optional ``is_leaf`` predicate (e.g. ``lambda x: x is None`` for mask trees).

  Returns:
    List of ``(path string, leaf)``.

  >>> paths_with_leaves({'b': [1, 2]})
  [('b/0', 1), ('b/1', 2)]
  """
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return [(path_str(p), leaf) for p, leaf in flat]


def leaf_paths(tree: Any) -> list[str]:
  """Path strings of all leaves of ``tree``, in ``jax.tree`` leaf order.

  Args:
    tree: any pytree (Linen dict, NNX state, tuples, lists...).

  Returns:
    List of path strings.

  >>> import jax.numpy as jnp
  >>> leaf_paths({'dense': {'bias': jnp.zeros(2), 'kernel': jnp.zeros((3, 2))}})
  ['dense/bias', 'dense/kernel']
  """
  return [p for p, _ in paths_with_leaves(tree)]


def _compile(patterns: Pattern, name: str) -> list[tuple[str, re.Pattern]]:
  if patterns is None:
    return []
  if isinstance(patterns, (str, re.Pattern)):
    patterns = [patterns]
  out = []
  for p in patterns:
    if isinstance(p, re.Pattern):
      out.append((p.pattern, p))
      continue
    if not isinstance(p, str):
      raise TypeError(f"select: {name} must be a regex string or a sequence of regex strings, got {p!r}.")
    try:
      out.append((p, re.compile(p)))
    except re.error as e:
      raise ValueError(f"select: invalid {name} regex {p!r}: {e}.") from None
  return out


def _listing(paths: list[str]) -> str:
  shown = paths[:60]
  more = "" if len(paths) <= 60 else f", ... ({len(paths) - 60} more)"
  return ", ".join(shown) + more


def select(params: Any, include: Pattern = None, exclude: Pattern = None, *, min_ndim: int = 2) -> Any:
  """Static per-leaf selection of prunable leaves.

  A leaf is selected if ``(include is None and leaf.ndim >= min_ndim)`` or
  (an include regex matches its path and ``leaf.ndim >= 1``), and no exclude
  regex matches. Regexes use ``re.search`` on the path string.

  Args:
    params: parameter pytree (arrays or ``jax.ShapeDtypeStruct`` leaves).
    include: regex or sequence of regexes selecting leaves explicitly.
    exclude: regex or sequence of regexes removing leaves.
    min_ndim: minimum rank of a leaf selected by default (2: kernels, not biases).

  Returns:
    Tree like ``params`` with a Python bool per leaf.

  Raises:
    ValueError: a regex matches no leaf (the message lists the paths).
    TypeError: a selected leaf is not a real floating-point array.

  >>> import jax.numpy as jnp
  >>> p = {'fc': {'bias': jnp.zeros(4), 'kernel': jnp.zeros((3, 4))}, 'out': {'kernel': jnp.zeros((4, 2))}}
  >>> select(p, exclude='out')
  {'fc': {'bias': False, 'kernel': True}, 'out': {'kernel': False}}
  """
  pl = paths_with_leaves(params)
  paths = [p for p, _ in pl]
  inc = _compile(include, "include")
  exc = _compile(exclude, "exclude")
  for name, pats in (("include", inc), ("exclude", exc)):
    for src, rx in pats:
      if not any(rx.search(p) for p in paths):
        raise ValueError(f"select: {name} pattern {src!r} matches no leaf path. Available paths: {_listing(paths)}.")
  out = []
  for p, leaf in pl:
    ndim = len(np.shape(leaf))
    if inc:
      chosen = ndim >= 1 and any(rx.search(p) for _, rx in inc)
    else:
      chosen = ndim >= min_ndim
    if chosen and any(rx.search(p) for _, rx in exc):
      chosen = False
    if chosen:
      dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
          f"select: leaf '{p}' has dtype {dtype}; only real floating-point leaves can be pruned. "
          f"Exclude it (exclude={p!r}) or cast it.")
    out.append(bool(chosen))
  return jax.tree.unflatten(jax.tree.structure(params), out)
