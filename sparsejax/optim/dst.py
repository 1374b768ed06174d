"""Dynamic sparse training: SET and RigL (drop and grow at a constant nnz).

Every ``update_every`` steps, per masked leaf, ``floor(n_active * alpha_t)``
active weights with the smallest magnitude are dropped and as many positions
are grown -- at random (SET) or by the magnitude of the dense gradient
(RigL). ``alpha_t`` follows :func:`sparsejax.schedules.cosine_drop_fraction`
and reaches 0 at ``end_step``. Newly grown weights start at exactly 0 and their
inner-optimizer moments are reset (generic, via ``tree_map_params``). A weight
that is dropped and grown back in the same update is not new: it keeps its
value and moments, as ``reinit_when_same=False`` in the reference RigL code
(Evci et al. 2020, github.com/google-research/rigl); pass
``reinit_when_same=True`` to restart it too. A leaf whose mask is all True
(e.g. a layer ERK leaves dense) is therefore never changed by a mask update.

The gradients passed to ``update`` must be the dense gradients w.r.t. the
stored (masked) weights: since pruned weights are stored as exact zeros, plain
``jax.grad`` of the model gives them.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import schedules
from sparsejax.core import pruning as core_pruning
from sparsejax.core.patterns import NM
from sparsejax.core.scores import hash_random_scores, hash_scores, hash_uniform
from sparsejax.core.selection import LazyScores
from sparsejax.optim import grid
from sparsejax.optim.pruning import (check_distribution, check_scores, check_sparsity,
                                     given_or_initial_masks)
from sparsejax.optim.wrapper import MaskPolicy, sparse_wrapper

__all__ = ["dynamic_sparse", "set_training", "rigl", "hash_uniform", "hash_scores"]


def dynamic_sparse(
    inner: optax.GradientTransformation | None = None, *, sparsity=None,
    grow: str = "gradient", update_every=100, drop_fraction=0.3, end_step,
    begin_step=None, distribution: Any = "erk", init_scores: Any = "random",
    key: Any = 0, skip_gradient_on_update: bool = False, reset_moments: bool = True,
    reinit_when_same: bool = False, pattern=None, include=None, exclude=None, masks=None,
) -> optax.GradientTransformationExtraArgs:
  """Drop-and-grow sparse training (the mechanism behind SET and RigL).

  Args:
    inner: the optimizer (required for gradient growth and moment reset; with
      ``None`` this is the last element of a chain and ``grow="gradient"``
      uses the incoming updates).
    sparsity: sparsity in ``[0, 1)`` of the initial masks (kept constant);
      optional when ``masks`` is given.
    grow: ``"gradient"`` (RigL: largest dense-gradient magnitude) or
      ``"random"`` (SET).
    update_every: ``dT``, steps between connectivity updates (``>= 1``).
    drop_fraction: initial drop fraction ``alpha`` in ``[0, 1]``.
    end_step: step from which masks stop changing (``alpha_t = 0``).
    begin_step: first update step (default ``update_every``).
    distribution: layer-wise distribution of the initial masks (``"erk"``,
      ``"er"``, ``"uniform"``, ``"global"`` or a callable).
    init_scores: scores of the initial masks (``"random"``, ``"magnitude"``,
      a tree or a callable ``(params, key) -> tree``).
    key: int seed or PRNG key (initial masks, random growth).
    skip_gradient_on_update: no gradient step on update iterations (TF RigL).
    reset_moments: zero the inner optimizer's moments of grown weights.
    reinit_when_same: also restart (value 0, moments reset) a weight that is
      dropped and grown back in the same update; by default it keeps its value
      and moments (reference RigL's ``reinit_when_same=False``).
    pattern: ``None`` (unstructured) or ``sparsejax.Block(r, c)``: masks of
      whole ``r x c`` blocks of the last two dims; ``n_drop`` is counted in
      blocks, blocks are dropped by the block sum of ``|W|`` and grown by the
      block sum of ``|g|`` (RigL) or one random score per block (SET), the
      moments of grown blocks are reset (``Channel(axis)`` works the same
      way). For N:M use :func:`~sparsejax.optim.ste` / ``srste`` / ``sdgf``.
      Patterns are callables: with ``optax.inject_hyperparams`` list
      ``"pattern"`` in ``static_args``.
    include: regex(es) of leaf paths to sparsify (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.
    masks: explicit initial mask tree.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and call :func:`~sparsejax.optim.apply_state_masks` right
    after ``init``; see the rules in :mod:`sparsejax.optim`.

  >>> import jax.numpy as jnp, optax
  >>> tx = dynamic_sparse(optax.adam(1e-2), sparsity=0.5, end_step=100, update_every=1,
  ...                     begin_step=0, distribution="uniform")
  >>> p = {'w': jnp.arange(1., 9.).reshape(4, 2)}
  >>> s = tx.init(p)
  >>> u, s = tx.update({'w': jnp.ones((4, 2))}, s, p)
  >>> from sparsejax.optim import get_masks
  >>> m, new_p = get_masks(s)['w'], optax.apply_updates(p, u)['w']
  >>> int(m.sum()), bool((new_p[~m] == 0).all())  # 4 kept; the others exactly zero
  (4, True)
  """
  if sparsity is None and masks is None:
    raise ValueError("dynamic sparse training needs a sparsity (or explicit masks)")
  if sparsity is not None:
    check_sparsity(sparsity)
  schedules.check_step("update_every", update_every, 1,
                       fix="update the masks at most once per step (update_every >= 1)")
  schedules.check_range("drop_fraction", drop_fraction, 0.0, 1.0)
  schedules.check_step("end_step", end_step, 0, lo_open=True)
  if begin_step is not None:
    schedules.check_step("begin_step", begin_step, 0)
  b = schedules.concrete(update_every if begin_step is None else begin_step)
  e = schedules.concrete(end_step)
  if b is not None and e is not None and e <= b:
    raise ValueError(f"dynamic sparse training: end_step={int(e)} <= begin_step={int(b)} "
                     f"({'begin_step' if begin_step is not None else 'default begin_step = update_every'}): "
                     "the masks would never change; pass end_step > begin_step")
  if grow not in ("gradient", "random"):
    raise ValueError(f"grow={grow!r}: use 'gradient' (RigL) or 'random' (SET)")
  check_distribution(distribution)
  check_scores(init_scores)
  pattern = grid.check_pattern(pattern, "dynamic_sparse")
  if isinstance(pattern, NM):
    raise ValueError(f"dynamic sparse training: pattern={pattern!r} is not supported by "
                     "drop-and-grow; train N:M masks with ste, srste, mdgf or sdgf.")
  begin = update_every if begin_step is None else begin_step

  init_masks = given_or_initial_masks(init_scores, sparsity, distribution, pattern, include,
                                      exclude, masks)

  def is_update_step(step):
    step = jnp.asarray(step)
    since = step - begin
    return (since >= 0) & (since % jnp.maximum(update_every, 1) == 0) & (step < end_step)

  def drop_grow(old, params, grads, k, alpha):
    # Lazy scores: evaluated inside the selection passes, never stored.
    if grow == "gradient":  # RigL: |dense gradient|
      grow_scores = jax.tree.map(lambda g: LazyScores(jnp.abs, g), grads)
    else:  # SET: uniform random growth (cheap counter hash, see hash_uniform)
      grow_scores = hash_random_scores(params, k)
    _, new, grown = core_pruning.drop_and_grow(params, old, None, grow_scores, alpha)
    return new, grown

  def update_masks(step, old, params, grads, k):
    alpha = schedules.cosine_drop_fraction(step, drop_fraction, end_step)
    if grid.is_grid_pattern(pattern):  # the same update on the block grid (block sums)
      new, grown = grid.on_grid(pattern, lambda m, p, g: drop_grow(m, p, g, k, alpha), old,
                                grid.absolute(old, params), grid.absolute(old, grads))
    else:
      new, grown = drop_grow(old, params, grads, k, alpha)
    if not reinit_when_same:  # dropped and grown back: kept, not new
      grown = jax.tree.map(lambda g, o: None if o is None else g & ~o, grown, old,
                           is_leaf=lambda x: x is None)
    return new, grown

  policy = MaskPolicy(
      init_masks=init_masks, is_update_step=is_update_step, update_masks=update_masks,
      target=(lambda step: jnp.nan) if sparsity is None else (lambda step: sparsity),
      regrows=True, uses_grads=grow == "gradient")
  return sparse_wrapper(inner, policy, key=key, reset_moments=reset_moments,
                        skip_gradient_on_update=skip_gradient_on_update)


def _variant(grow: str, name: str, doc: str):
  def variant(inner: optax.GradientTransformation | None = None, *, sparsity=None,
              update_every=100, drop_fraction=0.3, end_step, begin_step=None,
              distribution: Any = "erk", init_scores: Any = "random", key: Any = 0,
              skip_gradient_on_update: bool = False, reset_moments: bool = True,
              reinit_when_same: bool = False, pattern=None, include=None, exclude=None,
              masks=None,
              ) -> optax.GradientTransformationExtraArgs:
    return dynamic_sparse(
        inner, sparsity=sparsity, grow=grow, update_every=update_every,
        drop_fraction=drop_fraction, end_step=end_step, begin_step=begin_step,
        distribution=distribution, init_scores=init_scores, key=key,
        skip_gradient_on_update=skip_gradient_on_update, reset_moments=reset_moments,
        reinit_when_same=reinit_when_same, pattern=pattern, include=include, exclude=exclude,
        masks=masks)
  variant.__name__ = variant.__qualname__ = name
  variant.__doc__ = doc
  return variant


set_training = _variant("random", "set_training", """SET (Mocanu et al. 2018): magnitude drop, random growth.

  Keep it the outermost transformation and call
  :func:`~sparsejax.optim.apply_state_masks` right after ``init`` (see
  :func:`dynamic_sparse`, Returns). A dropped weight grown back in the same
  update keeps its value and moments (``reinit_when_same=False``).

  Arguments as in :func:`dynamic_sparse` (with ``grow="random"``). Explicit
  keyword arguments (no ``**kwargs``) keep it usable with
  ``optax.inject_hyperparams``.

  >>> import jax.numpy as jnp, optax
  >>> tx = set_training(optax.sgd(0.1), sparsity=0.9, end_step=1000)
  >>> from sparsejax.optim import get_masks
  >>> int(get_masks(tx.init({'w': jnp.ones((20, 50))}))['w'].sum())
  100
  """)

rigl = _variant("gradient", "rigl", """RigL (Evci et al. 2020): magnitude drop, dense-gradient growth.

  Keep it the outermost transformation and call
  :func:`~sparsejax.optim.apply_state_masks` right after ``init`` (see
  :func:`dynamic_sparse`, Returns). A dropped weight grown back in the same
  update keeps its value and moments (``reinit_when_same=False``).

  Arguments as in :func:`dynamic_sparse` (with ``grow="gradient"``); pass
  ``skip_gradient_on_update=True`` for TF RigL's behaviour (no gradient step
  on mask-update iterations).

  >>> import jax.numpy as jnp, optax
  >>> tx = rigl(optax.adam(1e-3), sparsity=0.9, end_step=1000)
  >>> from sparsejax.optim import get_masks
  >>> int(get_masks(tx.init({'w': jnp.ones((20, 50))}))['w'].sum())
  100
  """)
