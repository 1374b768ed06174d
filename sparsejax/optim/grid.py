"""Structured patterns in training: mask selection on the block-reduced grid.

A structured pattern turns each masked leaf into its *grid*, one entry per
unit that is kept or removed as a whole:

- ``Block(r, c)``: a leaf of shape ``(..., R, C)`` has the grid
  ``(..., R // r, C // c)`` (one entry per ``r x c`` block of the last two dims);
- ``Channel(axis)``: the grid is the ``axis`` dim (one entry per slice).

:func:`on_grid` runs an *unstructured* selection (exact top-k among eligible
entries, per-leaf distributions, global top-k, drop-and-grow) on the grid
trees and expands the resulting masks back to the leaves' shapes. Every
mask-learning transformation (gradual and one-shot pruning, static sparse,
SET, RigL) selects through it, so a block count is exact exactly where an
element count is exact in the unstructured case, ERK / uniform / global
distributions apply at block granularity (ERK and ER use the grid's shape:
for 2-D kernels with square blocks that equals the kernel's own ERK
distribution), and growth stays on the grid. Grid scores are block sums:
``|W|`` for magnitude pruning and drop, ``|g|`` for RigL growth, the given
scores for SNIP / random init; SET draws one random score per block.

Under a device mesh, pick blocks that divide each device's shard of the last
two dims: the block sums are then shard-local (otherwise the reduction needs
communication). Patterns are callables: with ``optax.inject_hyperparams`` list
``"pattern"`` in ``static_args``.

Shapes and the block-constancy of given masks are checked eagerly (the error
names the leaf path). A traced mask cannot be checked: inside ``jit`` a mask
that is not constant on blocks is reduced by "any" (a block is kept if any of
its entries is).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import masks as core_masks
from sparsejax.core.paths import path_str
from sparsejax.core.patterns import NM, Block, Channel, Unstructured, as_pattern
from sparsejax.core.selection import LazyScores, _concrete_ints, materialize

__all__ = ["is_grid_pattern", "check_pattern", "check_masks", "grid_sum", "grid_any", "expand",
           "on_grid", "absolute"]

_is_none = core_masks.is_none


def is_grid_pattern(pattern: Any) -> bool:
  """Whether ``pattern`` selects whole units on a reduced grid (``Block``, ``Channel``).

  >>> from sparsejax.core.patterns import Block, NM
  >>> is_grid_pattern(Block(2, 2)), is_grid_pattern(NM(2, 4)), is_grid_pattern(None)
  (True, False, False)
  """
  return isinstance(pattern, (Block, Channel))


def check_pattern(pattern: Any, fn: str = "pattern") -> Any:
  """Validates a training ``pattern`` argument; returns it (``None`` for unstructured).

  An ``"n:m"`` string is ``NM(n, m)`` (parsed by
  :func:`sparsejax.core.patterns.as_pattern`, as in ``sparsejax.prune``).
  ``fn`` names the caller in the errors.

  >>> check_pattern("2:4")
  NM(n=2, m=4, axis=-2)
  >>> check_pattern("2x2", "static_sparse")
  Traceback (most recent call last):
  ...
  ValueError: static_sparse: unknown pattern '2x2'; use 'n:m' (e.g. '2:4'), NM(n, m), Block(r, c), Channel(axis) or Unstructured().
  """
  if pattern is None:
    return None
  pattern = as_pattern(pattern, fn=fn)
  if isinstance(pattern, Unstructured):
    return None
  if isinstance(pattern, (Block, Channel, NM)):
    return pattern
  raise TypeError(f"{fn}: pattern={pattern!r}: pass sparsejax.Block(r, c), sparsejax.NM(n, m) or "
                  "'n:m', sparsejax.Channel(axis), sparsejax.Unstructured() or None.")


def _channel_axis(pattern: Channel, ndim: int) -> int:
  return pattern.axis % ndim


def grid_sum(pattern: Any, x: Any) -> jax.Array:
  """Sums of ``x`` (an array or ``LazyScores``) per grid unit, in float32 or wider.

  >>> import jax.numpy as jnp
  >>> grid_sum(Block(1, 2), jnp.array([[1., 2., 3., 4.]])).tolist()
  [[3.0, 7.0]]
  """
  x = materialize(x)
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  if isinstance(pattern, Block):
    *lead, rows, cols = x.shape
    r, c = pattern.r, pattern.c
    return x.reshape(*lead, rows // r, r, cols // c, c).sum(axis=(-3, -1))
  ax = _channel_axis(pattern, x.ndim)
  return x.sum(axis=tuple(i for i in range(x.ndim) if i != ax))


def grid_any(pattern: Any, m: jax.Array) -> jax.Array:
  """Bool grid: a unit is set if any of its entries is.

  >>> import jax.numpy as jnp
  >>> grid_any(Block(1, 2), jnp.array([[True, True, False, False]])).tolist()
  [[True, False]]
  """
  if isinstance(pattern, Block):
    *lead, rows, cols = m.shape
    r, c = pattern.r, pattern.c
    return m.reshape(*lead, rows // r, r, cols // c, c).any(axis=(-3, -1))
  ax = _channel_axis(pattern, m.ndim)
  return m.any(axis=tuple(i for i in range(m.ndim) if i != ax))


def expand(pattern: Any, g: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """A grid mask broadcast back to the leaf ``shape`` (constant on units).

  >>> import jax.numpy as jnp
  >>> expand(Block(1, 2), jnp.array([[True, False]]), (1, 4)).tolist()
  [[True, True, False, False]]
  """
  shape = tuple(shape)
  if isinstance(pattern, Block):
    *lead, rows, cols = shape
    r, c = pattern.r, pattern.c
    full = jnp.broadcast_to(g[..., :, None, :, None], (*lead, rows // r, r, cols // c, c))
    return full.reshape(shape)
  ax = _channel_axis(pattern, len(shape))
  view = [1] * len(shape)
  view[ax] = shape[ax]
  return jnp.broadcast_to(g.reshape(view), shape)


def _np_grid(pattern, m: np.ndarray, reduce) -> np.ndarray:
  """``reduce`` (np.any / np.all) over each unit, kept broadcastable to ``m.shape``."""
  if isinstance(pattern, Block):
    *lead, rows, cols = m.shape
    g = m.reshape(*lead, rows // pattern.r, pattern.r, cols // pattern.c, pattern.c)
    return reduce(g, axis=(-3, -1), keepdims=True).repeat(pattern.r, -3).repeat(
        pattern.c, -1).reshape(m.shape)
  ax = _channel_axis(pattern, m.ndim)
  return reduce(m, axis=tuple(i for i in range(m.ndim) if i != ax), keepdims=True)


def check_masks(pattern: Any, masks: Any) -> None:
  """Raises ``ValueError`` (naming the leaf) for shapes ``pattern`` does not fit or
  concrete masks that are not constant on its units (traced masks: shapes only).

  >>> import jax.numpy as jnp
  >>> check_masks(Block(2, 2), {'w': jnp.ones((4, 4), bool), 'b': None})
  >>> check_masks(Block(2, 2), {'w': jnp.eye(4, dtype=bool)})
  Traceback (most recent call last):
  ...
  ValueError: mask at 'w' is not constant on the units of Block(r=2, c=2); pass masks built with that pattern (e.g. sparsejax.prune(..., pattern=Block(r=2, c=2))) or train without pattern=.
  """
  if not is_grid_pattern(pattern):
    return
  for kp, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]:
    if m is None:
      continue
    path = path_str(kp)
    pattern.check(path, tuple(np.shape(m)))
    c = _concrete_ints(m)
    if c is None:
      continue
    c = c.astype(bool)  # NumPy: no compilation for a check on concrete masks
    if not np.array_equal(np.broadcast_to(_np_grid(pattern, c, np.any), c.shape),
                          np.broadcast_to(_np_grid(pattern, c, np.all), c.shape)):
      raise ValueError(f"mask at {path!r} is not constant on the units of {pattern!r}; pass masks "
                       f"built with that pattern (e.g. sparsejax.prune(..., pattern={pattern!r})) "
                       "or train without pattern=.")


def absolute(masks: Any, tree: Any) -> Any:
  """``LazyScores(jnp.abs, x)`` on the masked leaves of ``tree`` (dense leaves unchanged).

  Reduced by :func:`on_grid`, these give block sums of ``|x|`` without a
  full-size ``|x|`` buffer (the absolute value fuses into the reduction).

  >>> import jax.numpy as jnp
  >>> a = absolute({'w': jnp.ones((1, 2), bool), 'b': None}, {'w': -jnp.ones((1, 2)), 'b': jnp.ones(2)})
  >>> grid_sum(Block(1, 2), a['w']).tolist(), a['b'].tolist()
  ([[2.0]], [1.0, 1.0])
  """
  return jax.tree.map(lambda m, x: x if m is None else LazyScores(jnp.abs, x), masks, tree,
                      is_leaf=_is_none)


def on_grid(pattern: Any, select: Callable[..., Any], masks: Any, *trees: Any) -> Any:
  """Runs ``select`` on the grid of ``pattern`` and expands the masks it returns.

  Args:
    pattern: ``Block(r, c)`` or ``Channel(axis)``; anything else (``None``,
      unstructured, ``NM``) calls ``select(masks, *trees)`` unchanged.
    select: ``(grid_masks, *grid_trees) -> mask tree`` or a tuple of mask
      trees (params structure, ``None`` on dense leaves), e.g. an unstructured
      top-k or drop-and-grow.
    masks: element mask tree (``None`` on dense leaves): the eligible
      entries; reduced by "any".
    *trees: element trees (arrays or ``LazyScores`` on masked leaves) reduced
      to per-unit sums; their dense leaves are passed through unchanged.

  Returns:
    ``select``'s mask tree(s), expanded to the leaves' shapes.

  Raises:
    ValueError: a masked leaf's shape does not fit ``pattern``, or a concrete
      mask is not constant on its units (the message names the leaf path).

  >>> import jax.numpy as jnp
  >>> from sparsejax.core import pruning
  >>> w = {'w': jnp.array([[1., 1., 0., 5.], [1., 1., 0., 0.]])}
  >>> top = lambda m, s: pruning.prune(s, s, 0.5, masks=m)[1]
  >>> on_grid(Block(2, 2), top, {'w': jnp.ones((2, 4), bool)}, w)['w'].astype(int).tolist()
  [[0, 0, 1, 1], [0, 0, 1, 1]]
  """
  if not is_grid_pattern(pattern):
    return select(masks, *trees)
  check_masks(pattern, masks)
  grid_masks = jax.tree.map(lambda m: None if m is None else grid_any(pattern, m), masks,
                            is_leaf=_is_none)
  grid_trees = [jax.tree.map(lambda m, x: x if m is None else grid_sum(pattern, x), masks, t,
                             is_leaf=_is_none) for t in trees]
  out = select(grid_masks, *grid_trees)

  def back(tree):
    return jax.tree.map(lambda m, g: None if m is None else expand(pattern, g, m.shape), masks,
                        tree, is_leaf=_is_none)

  return tuple(back(t) for t in out) if isinstance(out, tuple) else back(out)
