"""Magnitude pruning during training (gradual, one-shot) and static sparse training.

All three are :class:`~sparsejax.optim.MaskPolicy` instances run by
:func:`~sparsejax.optim.sparse_wrapper`: pruned weights land on exact zeros
with every ``optax.apply_updates`` and never come back.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import schedules
from sparsejax.core.selection import LazyScores
from sparsejax.core import distributions as core_dist
from sparsejax.core import masks as core_masks
from sparsejax.core import pruning as core_pruning
from sparsejax.core import scores as core_scores
from sparsejax.core.patterns import NM
from sparsejax.optim import grid
from sparsejax.optim.wrapper import MaskPolicy, selected_masks, sparse_wrapper

__all__ = [
    "gradual_magnitude_pruning",
    "one_shot_pruning",
    "static_sparse",
    "DISTRIBUTIONS",
]

DISTRIBUTIONS = ("uniform", "erk", "er", "global")


def check_distribution(distribution: Any) -> None:
  """Raises ``ValueError`` for an unknown layer-wise distribution name."""
  if callable(distribution):
    return
  if distribution not in DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {distribution!r}: use one of "
                     f"{DISTRIBUTIONS} or a callable (params, sparsity) -> "
                     "per-leaf sparsity tree")


def check_sparsity(sparsity: Any) -> None:
  """Raises ``ValueError`` for a concrete ``sparsity`` outside ``[0, 1)``.

  >>> check_sparsity(1.0)
  Traceback (most recent call last):
  ...
  ValueError: sparsity=1.0 is outside [0, 1); sparsity is the fraction of zeros, in [0, 1)
  """
  schedules.check_range("sparsity", sparsity, 0.0, 1.0, hi_open=True,
                        fix="sparsity is the fraction of zeros, in [0, 1)")


def _flags(masks, params):
  # False on dense leaves, None where the param itself is None (no leaf there).
  return jax.tree.map(lambda m, p: None if p is None else m is not None, masks, params,
                      is_leaf=core_masks.is_none)


def prune_to(params, scores, sparsity, distribution, masks, pattern=None):
  """Masks keeping the top ``1 - sparsity`` of ``scores`` among ``masks``.

  ``distribution``: ``"uniform"`` (every masked leaf at ``sparsity``),
  ``"erk"``/``"er"`` (Erdos-Renyi(-Kernel) per-leaf sparsities), ``"global"``
  (one top-k over all masked leaves) or a callable
  ``(params, sparsity) -> per-leaf sparsity tree``.
  ``pattern``: ``None`` (unstructured), ``NM`` (``n`` of every ``m``; the
  fixed density makes ``sparsity`` and ``distribution`` unused) or
  ``Block``/``Channel`` (the same selection on the block-reduced grid of
  :mod:`sparsejax.optim.grid`, block scores = block sums of ``scores``).
  """
  if isinstance(pattern, NM):
    return core_pruning.prune(params, scores, None, pattern=pattern, masks=masks)[1]
  if grid.is_grid_pattern(pattern):
    def on_blocks(grid_masks, grid_scores):
      grid_params = jax.tree.map(lambda m, p, s: p if m is None else s, masks, params,
                                 grid_scores, is_leaf=core_masks.is_none)
      return prune_to(grid_params, grid_scores, sparsity, distribution, grid_masks)
    return grid.on_grid(pattern, on_blocks, masks, scores)
  if distribution == "global":
    return core_pruning.prune_global(params, scores, sparsity, masks=masks)[1]
  per_leaf = _per_leaf_sparsity(params, sparsity, distribution, masks)
  return core_pruning.prune(params, scores, per_leaf, masks=masks)[1]


def _per_leaf_sparsity(params, sparsity, distribution, masks):
  if distribution == "uniform":
    return sparsity
  if distribution in ("erk", "er"):
    return core_dist.erdos_renyi(params, sparsity, kernel=distribution == "erk",
                                 selection=_flags(masks, params))
  return distribution(params, sparsity)


def initial_masks(params, scores, key, sparsity, distribution, masks, pattern=None):
  """Init-time masks: :func:`prune_to` with :func:`initial_scores`.

  Random unstructured masks with per-leaf counts (every distribution but
  ``"global"``) skip the scores and the selection:
  :func:`sparsejax.core.pruning.random_prune` draws them with exact counts in
  one elementwise pass per leaf size (``tx.init`` compiles in a fraction of
  the time).
  """
  if (isinstance(scores, str) and scores == "random" and pattern is None
      and distribution != "global"):
    per_leaf = _per_leaf_sparsity(params, sparsity, distribution, masks)
    return core_pruning.random_prune(params, per_leaf, key, masks=masks)[1]
  return prune_to(params, initial_scores(params, scores, key), sparsity, distribution, masks,
                  pattern)


def given_or_initial_masks(scores, sparsity, distribution, pattern, include, exclude, masks):
  """``init_masks(params, key)`` of a policy whose masks are chosen at ``init``.

  The given ``masks`` (validated against the params and ``pattern``) or, without
  them, :func:`initial_masks` on the leaves ``include``/``exclude`` select.

  >>> import jax.numpy as jnp
  >>> init = given_or_initial_masks("magnitude", 0.5, "uniform", None, None, None, None)
  >>> init({'w': jnp.array([[1., -4.], [3., 2.]]), 'b': jnp.ones(2)}, None)['w'].tolist()
  [[False, True], [True, False]]
  """
  def init_masks(params, key):
    if masks is not None:
      given = selected_masks(params, masks=masks)
      grid.check_masks(pattern, given)
      return given
    sel = selected_masks(params, include, exclude)
    return initial_masks(params, scores, key, sparsity, distribution, sel, pattern)
  return init_masks


def _kept_magnitude(m, p):
  # Removed weights never come back: rank them below every kept one.
  # (Non-finite kept weights rank highest: never pruned, see abs_nonfinite_high.)
  return jnp.where(m, core_pruning.abs_nonfinite_high(p), -1.0).astype(jnp.float32)


def _magnitude_scores(masks, params):
  # Lazy: the selection computes them inside its passes, no full-size copy.
  return jax.tree.map(
      lambda m, p: None if m is None else LazyScores(_kept_magnitude, m, p),
      masks, params, is_leaf=core_masks.is_none)


def pattern_sparsity(method: str, pattern, sparsity):
  """The sparsity a ``pattern`` trains at: ``N:M`` fixes it to ``1 - n/m``.

  >>> from sparsejax.core.patterns import NM
  >>> pattern_sparsity("one_shot_pruning", NM(1, 4), None)
  0.75
  """
  if not isinstance(pattern, NM):
    return sparsity
  fixed = 1.0 - pattern.n / pattern.m
  c = schedules.concrete(sparsity) if sparsity is not None else None
  if sparsity is not None and (c is None or abs(c - fixed) > 1e-6):
    raise ValueError(f"{method}: sparsity={sparsity!r} but pattern {pattern!r} fixes the "
                     f"sparsity to {fixed}; pass sparsity=None (or {fixed}).")
  return fixed


def _magnitude_policy(sparsity_at, is_update_step, distribution, include, exclude, masks,
                      pattern=None):
  def init_masks(params, key):
    del key
    sel = selected_masks(params, include, exclude, masks)
    grid.check_masks(pattern, sel)
    return sel

  def update_masks(step, old, params, grads, key):
    del grads, key
    scores = _magnitude_scores(old, params)
    return prune_to(params, scores, sparsity_at(step), distribution, old, pattern), None

  # Magnitude masks never read gradients: a non-finite gradient cannot block them.
  return MaskPolicy(init_masks=init_masks, is_update_step=is_update_step,
                    update_masks=update_masks, target=sparsity_at, uses_grads=False)


def gradual_magnitude_pruning(
    inner: optax.GradientTransformation | None = None, *, sparsity, end_step,
    begin_step=0, frequency=100, initial_sparsity=0.0, power=3,
    distribution: Any = "uniform", pattern=None, include=None, exclude=None, masks=None,
) -> optax.GradientTransformationExtraArgs:
  """Gradual magnitude pruning (Zhu & Gupta 2017) around an optimizer.

  Every ``frequency`` steps from ``begin_step`` to ``end_step`` (and at
  ``end_step``) the smallest-magnitude kept weights are pruned so that the
  sparsity follows :func:`sparsejax.schedules.polynomial_sparsity`; pruned
  weights become exact zeros and stay zero.

  Args:
    inner: the optimizer, or ``None`` to use this as the last element of an
      ``optax.chain``.
    sparsity: final sparsity in ``[0, 1)`` (may be injected).
    end_step: step at which ``sparsity`` is reached.
    begin_step: first pruning step.
    frequency: steps between mask updates (``>= 1``).
    initial_sparsity: sparsity at ``begin_step``.
    power: exponent of the polynomial ramp (3: cubic).
    distribution: ``"uniform"``, ``"erk"``, ``"er"``, ``"global"`` or a
      callable ``(params, sparsity) -> per-leaf sparsity tree``.
    pattern: ``None`` (unstructured) or ``sparsejax.Block(r, c)``: whole
      ``r x c`` blocks of the last two dims are pruned, ranked by the block
      sum of ``|W|``, with exact block counts (``Channel(axis)`` works the
      same way). For a gradual N:M schedule use :func:`~sparsejax.optim.sdgf`.
      Patterns are callables: with ``optax.inject_hyperparams`` list
      ``"pattern"`` in ``static_args``.
    include: regex(es) of leaf paths to prune (default: leaves with ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.
    masks: initial mask tree (default all True on the selected leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and call :func:`~sparsejax.optim.apply_state_masks` right
    after ``init``; see the rules in :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> tx = gradual_magnitude_pruning(optax.sgd(0.0), sparsity=0.5, end_step=2, frequency=1)
  >>> p = {'w': jnp.arange(1., 9.).reshape(4, 2)}
  >>> s, update = tx.init(p), jax.jit(tx.update)
  >>> for _ in range(3):
  ...   u, s = update(jax.tree.map(jnp.zeros_like, p), s, p)
  ...   p = optax.apply_updates(p, u)
  >>> p['w'].ravel().tolist()
  [0.0, 0.0, 0.0, 0.0, 5.0, 6.0, 7.0, 8.0]
  """
  check_sparsity(sparsity)
  schedules.check_step("frequency", frequency, 1,
                       fix="prune at least every 1 step (frequency >= 1)")
  schedules.check_step("begin_step", begin_step, 0)
  schedules.check_step("end_step", end_step, 0)
  si, sf = schedules.concrete(initial_sparsity), schedules.concrete(sparsity)
  if si is not None and sf is not None and si > sf:
    raise ValueError(f"gradual_magnitude_pruning: initial_sparsity={si!r} > sparsity={sf!r}; "
                     "pruning only removes weights, so the ramp must not decrease (use "
                     "initial_sparsity <= sparsity)")
  b, e = schedules.concrete(begin_step), schedules.concrete(end_step)
  if b is not None and e is not None and e <= b:
    raise ValueError(f"gradual_magnitude_pruning: end_step={int(e)} <= begin_step={int(b)}; the "
                     "ramp needs end_step > begin_step (for pruning at one step use "
                     "one_shot_pruning(step=...))")
  check_distribution(distribution)
  pattern = grid.check_pattern(pattern, "gradual_magnitude_pruning")
  if isinstance(pattern, NM):
    raise ValueError(f"gradual_magnitude_pruning: pattern={pattern!r} has a fixed sparsity, "
                     "which a gradual schedule cannot follow; use one_shot_pruning(pattern=...), "
                     "static_sparse(pattern=...) or the N:M methods (ste, srste, sdgf).")
  # Validates begin/end and initial sparsity.
  schedules.polynomial_sparsity(0, sparsity, begin_step, end_step, initial_sparsity, power)

  def sparsity_at(step):
    return schedules.polynomial_sparsity(step, sparsity, begin_step, end_step,
                                         initial_sparsity, power)

  def is_update_step(step):
    return schedules.periodic(step, frequency, begin_step, end_step)

  policy = _magnitude_policy(sparsity_at, is_update_step, distribution, include,
                             exclude, masks, pattern)
  return sparse_wrapper(inner, policy)


def one_shot_pruning(
    inner: optax.GradientTransformation | None = None, *, sparsity=None, step=0,
    distribution: Any = "uniform", pattern=None, include=None, exclude=None, masks=None,
) -> optax.GradientTransformationExtraArgs:
  """One-shot magnitude pruning at ``step``; training continues sparse.

  Args:
    inner: the optimizer, or ``None`` (last element of an ``optax.chain``).
    sparsity: sparsity in ``[0, 1)`` reached at ``step`` (required unless
      ``pattern`` is ``NM``, which fixes it).
    step: the update at which pruning happens (0: before the first update).
    distribution: ``"uniform"``, ``"erk"``, ``"er"``, ``"global"`` or a callable.
    pattern: ``None`` (unstructured), ``sparsejax.Block(r, c)`` (whole blocks
      ranked by the block sum of ``|W|``, exact block counts; also
      ``Channel(axis)``) or ``sparsejax.NM(n, m)`` or ``"n:m"`` (the ``n``
      largest ``|W|`` of every group of ``m``).
      Patterns are callables: with ``optax.inject_hyperparams`` list
      ``"pattern"`` in ``static_args``.
    include: regex(es) of leaf paths to prune (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.
    masks: initial mask tree (default all True on the selected leaves).

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and call :func:`~sparsejax.optim.apply_state_masks` right
    after ``init``; see the rules in :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> tx = one_shot_pruning(optax.sgd(0.0), sparsity=0.75)
  >>> p = {'w': jnp.array([[1., -4.], [3., 2.]]), 'b': jnp.ones(2)}
  >>> u, s = tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p)
  >>> optax.apply_updates(p, u)['w'].tolist()
  [[0.0, -4.0], [0.0, 0.0]]
  """
  pattern = grid.check_pattern(pattern, "one_shot_pruning")
  sparsity = pattern_sparsity("one_shot_pruning", pattern, sparsity)
  if sparsity is None:
    raise ValueError("one_shot_pruning needs a sparsity (or pattern=NM(n, m)).")
  check_sparsity(sparsity)
  schedules.check_step("step", step, 0)
  check_distribution(distribution)

  def sparsity_at(t):
    return schedules.one_shot_sparsity(t, sparsity, step)

  def is_update_step(t):
    return jnp.asarray(t) == step

  policy = _magnitude_policy(sparsity_at, is_update_step, distribution, include,
                             exclude, masks, pattern)
  return sparse_wrapper(inner, policy)


def initial_scores(params, scores, key):
  """Score tree for init-time masks: ``"random"``, ``"magnitude"``, a tree, or a
  callable ``(params, key) -> tree``."""
  if isinstance(scores, str):
    if scores == "random":  # lazy counter-hash scores: nothing stored, no Threefry per leaf
      return core_scores.hash_random_scores(params, key)
    if scores == "magnitude":  # non-finite weights rank highest (never pruned)
      return jax.tree.map(core_pruning.abs_nonfinite_high, params)
    raise ValueError(f"unknown scores {scores!r}: use 'random', 'magnitude', a "
                     "score tree like params (e.g. sparsejax.core.scores.saliency"
                     "(params, grads) for SNIP) or a callable (params, key) -> tree")
  if callable(scores):
    return scores(params, key)
  return scores


def check_scores(scores: Any) -> None:
  if isinstance(scores, str) and scores not in ("random", "magnitude"):
    initial_scores(None, scores, None)


def static_sparse(
    inner: optax.GradientTransformation | None = None, *, sparsity=None,
    scores: Any = "random", distribution: Any = "erk", key: Any = 0, pattern=None,
    include=None, exclude=None, masks=None,
) -> optax.GradientTransformationExtraArgs:
  """Static sparse training: masks chosen once at ``init``, then fixed.

  Random pruning (``scores="random"``, ERK by default), magnitude, or SNIP
  (``scores=sparsejax.core.scores.saliency(params, grads)`` with
  ``distribution="global"``); or pass ``masks`` directly.

  Args:
    inner: the optimizer, or ``None`` (last element of an ``optax.chain``).
    sparsity: target sparsity in ``[0, 1)`` over the selected leaves
      (optional when ``masks`` is given).
    scores: ``"random"``, ``"magnitude"``, a score tree like params, or a
      callable ``(params, key) -> score tree``.
    distribution: ``"erk"``, ``"er"``, ``"uniform"``, ``"global"`` or a callable.
    key: int seed or PRNG key (random scores).
    pattern: ``None`` (unstructured), ``sparsejax.Block(r, c)`` (whole blocks
      ranked by the block sum of the scores -- random, ``|W|`` or SNIP --
      with exact block counts and the distribution over blocks; also
      ``Channel(axis)``) or ``sparsejax.NM(n, m)`` or ``"n:m"``
      (``sparsity`` and ``distribution`` then unused).
      Patterns are callables: with ``optax.inject_hyperparams`` list
      ``"pattern"`` in ``static_args``.
    include: regex(es) of leaf paths to prune (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.
    masks: explicit mask tree (then ``scores``/``distribution`` are unused).

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and call :func:`~sparsejax.optim.apply_state_masks` right
    after ``init``; see the rules in :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> p = {'w': jnp.ones((100, 100)), 'b': jnp.ones(100)}
  >>> s = static_sparse(optax.adam(1e-3), sparsity=0.9).init(p)
  >>> from sparsejax.optim import get_masks
  >>> int(get_masks(s)['w'].sum())
  1000
  """
  pattern = grid.check_pattern(pattern, "static_sparse")
  sparsity = pattern_sparsity("static_sparse", pattern, sparsity)
  if sparsity is None:
    if masks is None:
      raise ValueError("static_sparse needs a sparsity (or explicit masks)")
    sparsity = core_masks.global_sparsity(masks)
  check_sparsity(sparsity)
  check_distribution(distribution)
  check_scores(scores)

  init_masks = given_or_initial_masks(scores, sparsity, distribution, pattern, include, exclude,
                                      masks)
  policy = MaskPolicy(init_masks=init_masks, target=lambda step: sparsity)
  return sparse_wrapper(inner, policy, key=key)

