"""N:M training with straight-through estimators: STE and SR-STE.

The stored weights stay dense; the forward pass uses the N:M-sparse weights
``W * m`` with ``m`` recomputed from ``|W|`` after every update (top-N of each
group of M along ``axis``, default -2: the input axis of Dense/Conv kernels,
the hardware 2:4 layout). Get the forward weights with
:func:`sparsejax.optim.forward_params` (straight-through gradient). SR-STE
adds ``decay * (1 - m) * W`` (``lambda_W``, default 2e-4) to the gradient
before the inner optimizer.

:func:`nm_training` is the general policy shared with the progressive
gradient flow methods (:mod:`sparsejax.optim.pgf`): a schedule of N:M
patterns, a forward decay ``beta_t`` for pruned weights, a dense warm-up and a
hard-mask fine-tune phase.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax import schedules
from sparsejax.core import masks as core_masks
from sparsejax.core import patterns as core_patterns
from sparsejax.core import paths as core_paths
from sparsejax.core import pruning as core_pruning
from sparsejax.optim.wrapper import MaskPolicy, selected_masks, sparse_wrapper

__all__ = ["nm_training", "ste", "srste"]


def _static_int(name: str, value: Any) -> int:
  v = schedules.concrete(value)
  if v is None:
    raise TypeError(f"{name} must be a static int here (with optax.inject_hyperparams "
                    f"list it in static_args=({name!r}, ...))")
  if v != int(v):
    raise ValueError(f"{name}={v} must be an integer")
  return int(v)


def grouping_axis(axis: Any, nm: Any) -> int:
  """The N:M grouping axis: ``axis`` (a static int), or for ``None`` the axis of
  ``nm`` if it is a :class:`~sparsejax.core.patterns.NM`, else -2.

  >>> from sparsejax.core.patterns import NM
  >>> grouping_axis(None, "2:4"), grouping_axis(None, NM(2, 4, axis=-1)), grouping_axis(0, "2:4")
  (-2, -1, 0)
  """
  if axis is None:
    return getattr(nm, "axis", -2)
  return _static_int("axis", axis)


def nm_training(
    inner: optax.GradientTransformation | None, *, patterns: Sequence[tuple[int, tuple[int, int]]],
    axis: int | None = None, decay=0.0, beta: Callable[[Any], Any] | None = None,
    dense_steps=0, finetune_start=None, include=None, exclude=None,
) -> optax.GradientTransformationExtraArgs:
  """General N:M training with forward masks recomputed every step.

  Args:
    inner: the optimizer (required: SR-STE's decay term is added to the
      gradient before it).
    patterns: ``((start_step, (n, m)), ...)``: pattern ``i`` is used from its
      start step on (a single ``((0, (2, 4)),)`` for plain STE); see
      :func:`sparsejax.schedules.sdgf_schedule`. Start steps may be traced.
    axis: grouping axis, a static int (with ``optax.inject_hyperparams``
      list it in ``static_args``); ``None``: the axis of the last pattern if
      it is an ``NM``, else -2 (the reduction axis of Flax kernels).
    decay: SR-STE ``lambda_W`` (0: plain STE).
    beta: ``step -> beta_t``, forward factor of pruned weights in the sparse
      phase (MDGF); ``None`` for 0.
    dense_steps: dense warm-up steps (all masks True, ``beta = 1``).
    finetune_start: step from which the mask is frozen and hard (pruned
      weights exactly zero, ``beta = 0``); ``None``: no fine-tune phase.
    include: regex(es) of leaf paths to sparsify (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and run the loss on :func:`~sparsejax.optim.forward_params`
    (NNX: :func:`~sparsejax.optim.forward_model`); see the rules in
    :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> tx = nm_training(optax.sgd(0.1), patterns=((0, (1, 2)), (2, (1, 4))))
  >>> p = {'w': jnp.arange(1., 9.).reshape(8, 1)}
  >>> s = tx.init(p)
  >>> from sparsejax.optim import get_masks
  >>> get_masks(s)['w'].ravel().tolist()
  [False, True, False, True, False, True, False, True]
  """
  if inner is None:
    raise TypeError("N:M straight-through training needs the optimizer as `inner`: "
                    "the SR-STE term is added to the gradient before it")
  if not patterns:
    raise ValueError("patterns must not be empty")
  axis = grouping_axis(axis, patterns[-1][1])
  pats = tuple((s, schedules.parse_nm(p)) for s, p in patterns)
  concrete_starts = [schedules.concrete(s) for s, _ in pats]
  if None not in concrete_starts and concrete_starts != sorted(concrete_starts):
    raise ValueError(f"pattern start steps {concrete_starts} must be increasing")
  schedules.check_range("decay", decay, 0.0, math.inf)
  schedules.check_step("dense_steps", dense_steps, 0)
  if finetune_start is not None:
    schedules.check_step("finetune_start", finetune_start, 0)
  for s, _ in pats:
    schedules.check_step("pattern start step", s, 0)

  makers = [functools.partial(core_patterns.nm_mask, n=n, m=m, axis=axis) for _, (n, m) in pats]

  def starts():
    return jnp.stack([jnp.asarray(s, jnp.int32) for s, _ in pats])

  def pattern_masks(step, params, template):
    def one(mask, w):
      scores = core_pruning.abs_nonfinite_high(w)  # a NaN weight is never pruned
      if len(makers) == 1:
        return makers[0](scores)
      idx = schedules.sdgf_index(step, starts())
      return lax.switch(idx, makers, scores)
    return core_masks.map_masked(one, template, params)

  def in_dense(step):
    return jnp.asarray(step) < dense_steps

  def frozen(step):  # mask computed at finetune_start is kept afterwards
    if finetune_start is None:
      return jnp.asarray(False)
    return jnp.asarray(step) > finetune_start

  def forward_masks(step, params, old):
    new = pattern_masks(step, params, old)
    dense, fz = in_dense(step), frozen(step)
    return jax.tree.map(
        lambda n, o: None if o is None else jnp.where(fz, o, n | dense),
        new, old, is_leaf=core_masks.is_none)

  def init_masks(params, key):
    del key
    sel = selected_masks(params, include, exclude)
    for path, m in core_paths.paths_with_leaves(sel, is_leaf=core_masks.is_none):
      if m is None:
        continue
      for _, (n, mm) in pats:
        core_patterns.NM(n, mm, axis).check(path, tuple(m.shape))
    return forward_masks(jnp.zeros((), jnp.int32), params, sel)

  densities = jnp.asarray([n / m for _, (n, m) in pats], jnp.float32)

  def target(step):
    idx = schedules.sdgf_index(step, starts())
    s = 1.0 - densities[idx]
    return jnp.where(in_dense(step), 0.0, s)

  def beta_at(step):
    b = jnp.zeros((), jnp.float32) if beta is None else jnp.asarray(beta(step), jnp.float32)
    b = jnp.where(in_dense(step), 1.0, b)
    if finetune_start is not None:
      b = jnp.where(jnp.asarray(step) >= finetune_start, 0.0, b)
    return b

  def hard(step):
    return jnp.asarray(step) >= finetune_start

  policy = MaskPolicy(
      init_masks=init_masks, forward_masks=forward_masks,
      hard=False if finetune_start is None else hard,
      target=target, beta=beta_at, decay=decay)
  return sparse_wrapper(inner, policy)


def ste(inner: optax.GradientTransformation, *, nm="2:4", axis: int | None = None,
        include=None, exclude=None) -> optax.GradientTransformationExtraArgs:
  """N:M training with the straight-through estimator.

  Args:
    inner: the optimizer.
    nm: the pattern, ``"2:4"``, ``(2, 4)`` or ``sparsejax.core.patterns.NM``.
    axis: grouping axis (``None``: the pattern's axis or -2, the input axis
      of Dense/Conv kernels).
    include: regex(es) of leaf paths to sparsify (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and run the loss on :func:`~sparsejax.optim.forward_params`
    (NNX: :func:`~sparsejax.optim.forward_model`); see the rules in
    :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> from sparsejax.optim import forward_params
  >>> p = {'w': jnp.array([[1.], [4.], [2.], [3.]])}
  >>> tx = ste(optax.sgd(0.1), nm="2:4")
  >>> forward_params(p, tx.init(p))['w'].ravel().tolist()
  [0.0, 4.0, 0.0, 3.0]
  """
  return nm_training(inner, patterns=((0, nm),), axis=axis, include=include, exclude=exclude)


def srste(inner: optax.GradientTransformation, *, nm="2:4", decay=2e-4, axis: int | None = None,
          include=None, exclude=None) -> optax.GradientTransformationExtraArgs:
  """SR-STE (Zhou et al. 2021): STE plus ``decay * (1 - m) * W`` in the gradient.

  Args:
    inner: the optimizer (the term is added before it; with Adam it gets
      rescaled, which changes its strength).
    decay: ``lambda_W`` (default 2e-4).
    nm, axis, include, exclude: as in :func:`ste`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and run the loss on :func:`~sparsejax.optim.forward_params`
    (NNX: :func:`~sparsejax.optim.forward_model`); see the rules in
    :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> p = {'w': jnp.array([[1.], [4.], [2.], [3.]])}
  >>> tx = srste(optax.sgd(1.0), nm="2:4", decay=0.5)
  >>> u, _ = tx.update({'w': jnp.zeros((4, 1))}, tx.init(p), p)
  >>> u['w'].ravel().tolist()   # -decay * W on the pruned weights
  [-0.5, -0.0, -1.0, -0.0]
  """
  return nm_training(inner, patterns=((0, nm),), axis=axis, decay=decay,
                     include=include, exclude=exclude)
