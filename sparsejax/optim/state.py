"""The sparse optimizer state and its documented accessors.

Every sparsity transformation of :mod:`sparsejax.optim` keeps one
:class:`SparseState` in the optimizer state. Its field names are unique
(``sparse_*``), so ``optax.tree.get(opt_state, "sparse_masks")`` finds them
through any nesting (``chain``, ``inject_hyperparams``, ``MultiSteps``,
``apply_if_finite``). The accessors below do the same, also for the
``nnx.Optimizer.opt_state`` of Flax NNX (whose leaves are wrapped in
``nnx.OptState`` variables).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

__all__ = [
    "SparseState",
    "get_sparse_state",
    "get_masks",
    "get_step",
    "get_target_sparsity",
    "get_beta",
    "forward_params",
    "apply_state_masks",
]


class SparseState(NamedTuple):
  """State of a sparsity transformation.

  Attributes:
    sparse_step: int32 number of committed updates (the schedules' ``t``).
    sparse_masks: mask tree (params structure; bool on masked leaves, ``None``
      on dense leaves). For hard-sparse methods (pruning, static, SET, RigL)
      the weights outside the mask are exactly zero; for STE-like methods
      (STE, SR-STE, MDGF, SDGF) it is the mask for the next forward pass,
      recomputed from the updated weights.
    sparse_key: raw PRNG key data for random mask updates (SET growth).
    sparse_target: float32 target sparsity the current masks were built for.
    sparse_beta: float32 factor applied to pruned weights in the forward pass
      (``W * (m + (1 - m) * beta)``): 0 for hard masks, MDGF's decay otherwise.
    sparse_inner: the state of the wrapped optimizer.
  """
  sparse_step: jax.Array
  sparse_masks: Any
  sparse_key: jax.Array
  sparse_target: jax.Array
  sparse_beta: jax.Array
  sparse_inner: Any


def _is_variable(x) -> bool:
  return hasattr(x, "get_value") and hasattr(x, "get_metadata")


def _unwrap(tree):
  """Replaces Flax NNX variables by their values (pure arrays)."""
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree,
                      is_leaf=_is_variable)


def get_sparse_state(opt_state: Any) -> SparseState:
  """Finds the (unique) :class:`SparseState` in a nested optimizer state.

  Args:
    opt_state: any optimizer state containing one sparse transformation's
      state, e.g. from ``optax.chain``, ``optax.MultiSteps``,
      ``optax.inject_hyperparams`` or an ``nnx.Optimizer``'s ``opt_state``.

  Returns:
    The :class:`SparseState`, with NNX variables unwrapped to arrays.

  Raises:
    ValueError: no sparse state, or more than one (then index the state
      yourself).

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> tx = so.one_shot_pruning(optax.sgd(0.1), sparsity=0.5)
  >>> st = get_sparse_state(tx.init({'w': jnp.ones((2, 2))}))
  >>> int(st.sparse_step)
  0
  """
  found = [x for x in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, SparseState))
           if isinstance(x, SparseState)]
  if not found:
    raise ValueError("no sparsejax SparseState in this optimizer state: was the "
                     "optimizer built with a sparsejax.optim transformation?")
  if len(found) > 1:
    raise ValueError(f"{len(found)} SparseStates in this optimizer state (nested "
                     "sparse transformations): pick one, e.g. with "
                     "optax.tree.get_all_with_path(state, 'sparse_masks').")
  return _unwrap(found[0])


def get_masks(opt_state: Any) -> Any:
  """The current mask tree (``None`` on dense leaves).

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> tx = so.static_sparse(optax.sgd(0.1), sparsity=0.5, scores="magnitude",
  ...                       distribution="uniform")
  >>> m = get_masks(tx.init({'w': jnp.array([[1., 2.], [3., 4.]]), 'b': jnp.ones(2)}))
  >>> m['w'].tolist(), m['b']
  ([[False, False], [True, True]], None)
  """
  return get_sparse_state(opt_state).sparse_masks


def get_step(opt_state: Any) -> jax.Array:
  """The sparse schedule's step count (committed updates).

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> int(get_step(so.ste(optax.sgd(0.1), nm="1:2").init({'w': jnp.ones((2, 2))})))
  0
  """
  return get_sparse_state(opt_state).sparse_step


def get_target_sparsity(opt_state: Any) -> jax.Array:
  """The scheduled sparsity the current masks were built for.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> float(get_target_sparsity(so.ste(optax.sgd(0.1), nm="1:4").init({'w': jnp.ones((4, 2))})))
  0.75
  """
  return get_sparse_state(opt_state).sparse_target


def get_beta(opt_state: Any) -> jax.Array:
  """The forward factor of pruned weights (MDGF's ``beta_t``; 0 = hard mask).

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> float(get_beta(so.mdgf(optax.sgd(0.1), nm="1:2", rate=0.1).init({'w': jnp.ones((2, 2))})))
  1.0
  """
  return get_sparse_state(opt_state).sparse_beta


def forward_params(params: Any, opt_state: Any, *, straight_through: bool = True) -> Any:
  """The weights the forward pass should use: ``W * (m + (1 - m) * beta)``.

  Needed by STE, SR-STE, MDGF and SDGF, whose stored weights stay dense while
  the forward pass is N:M sparse; harmless (the identity on values) for hard
  methods whose pruned weights are already zero. With ``straight_through``
  (the reference STE behaviour) the gradient w.r.t. ``W`` is the gradient
  w.r.t. the forward weights, unchanged at pruned positions; otherwise it is
  scaled by ``m + (1 - m) * beta`` (MDGF's optional gradient scaling).

  Args:
    params: the params tree the optimizer sees.
    opt_state: the optimizer state.
    straight_through: STE gradient (default) or scaled gradient.

  Returns:
    A params tree.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> params = {'w': jnp.array([[1.], [-3.], [2.], [0.5]])}
  >>> tx = so.ste(optax.sgd(0.1), nm="2:4")
  >>> forward_params(params, tx.init(params))['w'].ravel().tolist()
  [0.0, -3.0, 2.0, 0.0]
  """
  st = get_sparse_state(opt_state)
  beta = st.sparse_beta

  def one(m, w):
    if m is None:
      return w
    k = jnp.where(m, jnp.ones((), w.dtype), beta.astype(w.dtype))
    w_eff = w * k
    if straight_through:
      return w + lax.stop_gradient(w_eff - w)
    return w_eff

  return jax.tree.map(one, st.sparse_masks, _unwrap(params),
                      is_leaf=lambda x: x is None)


def apply_state_masks(params: Any, opt_state: Any) -> Any:
  """Zeros the weights outside the state's masks (optional convenience).

  The transformations already land pruned weights on exact zeros with every
  update; use this once after ``init`` to start from sparse weights, or to
  export the N:M-sparse weights of an STE-trained model.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> params = {'w': jnp.array([[1., 2.], [3., 4.]])}
  >>> tx = so.one_shot_pruning(optax.sgd(0.1), sparsity=0.5)
  >>> apply_state_masks(params, tx.init(params))['w'].tolist()  # step 0 not yet run
  [[1.0, 2.0], [3.0, 4.0]]
  """
  masks = get_masks(opt_state)
  return jax.tree.map(
      lambda m, w: w if m is None else jnp.where(m, w, jnp.zeros((), w.dtype)),
      masks, _unwrap(params), is_leaf=lambda x: x is None)
