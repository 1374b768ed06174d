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
    "get_masked_nonzero",
    "forward_params",
    "forward_model",
    "apply_state_masks",
    "check_masked_zero",
    "check_forward_params",
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
    sparse_masked_nonzero: int32 number of weights outside the incoming masks
      that were non-zero in the params given to ``update``, measured (hard
      methods only) on every mask-update step and on step 1; ``-1`` until
      first measured. Non-zero from step 1 on means that something after the
      sparse transformation changed its updates (it is not the outermost
      transformation): see :func:`get_masked_nonzero`.
    sparse_owed: int32 scalar per masked leaf (``None`` on dense leaves): the
      step of a mask update this leaf still owes because its gradient was
      non-finite then (``-1``: none). Only methods whose mask updates read
      gradients (RigL) ever owe one; it runs at the next finite step.
  """
  sparse_step: jax.Array
  sparse_masks: Any
  sparse_key: jax.Array
  sparse_target: jax.Array
  sparse_beta: jax.Array
  sparse_inner: Any
  sparse_masked_nonzero: jax.Array
  sparse_owed: Any


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


def get_masked_nonzero(opt_state: Any) -> jax.Array:
  """How many masked-out weights were non-zero at the last check (``-1``: none yet).

  Hard-sparse methods (pruning, static, SET, RigL) land pruned weights on
  exact zeros with every update, so from step 1 on the params they receive
  must be zero outside the masks. They count the non-zero ones on every
  mask-update step and on step 1 (a cheap reduction, skipped on other steps).
  A positive count after step 0 means the sparse transformation is not the
  outermost one: e.g. ``optax.chain(rigl(adam), optax.scale(0.5))`` halves
  its ``-W`` updates and leaves pruned weights at ``W / 2``. Put the sparse
  transformation outermost (``rigl(optax.chain(adam, optax.scale(0.5)))``),
  or inside update-preserving wrappers only (``MultiSteps``,
  ``apply_if_finite``, ``inject_hyperparams``). At step 0 the count is the
  number of weights that :func:`apply_state_masks` would zero. Eager (not
  jitted) updates raise a ``ValueError`` when the count is positive after
  step 0; under ``jit`` read this accessor (or call
  :func:`check_masked_zero` outside the step) in your loop.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> p = {'w': jnp.array([[1., 2.], [3., 4.]])}
  >>> tx = so.static_sparse(optax.sgd(0.1), sparsity=0.5, scores="magnitude",
  ...                       distribution="uniform")
  >>> s = tx.init(p)
  >>> int(get_masked_nonzero(s))
  -1
  >>> u, s = tx.update(p, s, p)
  >>> u, s = tx.update(p, s, optax.apply_updates(p, u))  # step 1: checked
  >>> int(get_masked_nonzero(s))
  0
  """
  return get_sparse_state(opt_state).sparse_masked_nonzero


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


def _is_module(x) -> bool:
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover - flax is a dependency
    return False
  return isinstance(x, nnx.Module)


def forward_model(model: Any, opt_state: Any, *, straight_through: bool = True) -> Any:
  """An NNX model whose ``nnx.Param`` weights are :func:`forward_params`.

  For STE, SR-STE, MDGF and SDGF with Flax NNX: call it inside the loss on
  the model being differentiated, and run the returned model instead
  (gradients reach the original weights). Without it the forward pass is
  dense and the model trains dense in silence; :func:`check_forward_params`
  detects that.

  Args:
    model: an ``nnx.Module`` (e.g. the argument of the loss under ``nnx.grad``).
    opt_state: the optimizer state, e.g. ``nnx.Optimizer(...).opt_state``.
    straight_through: as in :func:`forward_params`.

  Returns:
    A new module (same graph) with the forward weights.

  >>> import jax, jax.numpy as jnp, optax, sparsejax.optim as so
  >>> from flax import nnx
  >>> model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
  >>> opt = nnx.Optimizer(model, so.ste(optax.sgd(0.1), nm="2:4"), wrt=nnx.Param)
  >>> fwd = forward_model(model, opt.opt_state)
  >>> int((fwd.kernel[...] != 0).sum()), int((model.kernel[...] != 0).sum())
  (4, 8)
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if not _is_module(model):
    raise TypeError(f"forward_model expects an nnx.Module, got {type(model).__name__}; "
                    "for a params pytree use forward_params(params, opt_state)")
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  return nnx.merge(graphdef, forward_params(params, opt_state,
                                            straight_through=straight_through), rest)


def _masked_paths(masks, params):
  from sparsejax.core import paths as core_paths  # pylint: disable=import-outside-toplevel
  flat_m = core_paths.paths_with_leaves(masks, is_leaf=lambda x: x is None)
  flat_p = jax.tree.leaves(params, is_leaf=lambda x: x is None)
  if len(flat_m) != len(flat_p):
    raise ValueError(f"params have {len(flat_p)} leaves but the optimizer's masks "
                     f"{len(flat_m)}: pass the params the optimizer was initialised with")
  return [(path, m, w) for (path, m), w in zip(flat_m, flat_p) if m is not None]


def check_masked_zero(params: Any, opt_state: Any) -> None:
  """Raises ``ValueError`` if a weight outside the masks is non-zero (host check).

  For hard-sparse methods (pruning, static, SET, RigL) from step 1 on, or at
  any step after :func:`apply_state_masks`. A failure means the sparse
  transformation is not the outermost one (see :func:`get_masked_nonzero`)
  or the params were changed outside the optimizer. It reads values back to
  the host: call it outside the jitted step, e.g. every few hundred steps.
  Not meaningful for STE-like methods (their stored weights stay dense).

  Args:
    params: the params pytree (or NNX state/module) the optimizer updates.
    opt_state: the optimizer state.

  Raises:
    ValueError: naming every offending leaf path and its count.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> p = {'w': jnp.array([[1., 2.], [3., 4.]])}
  >>> tx = so.static_sparse(optax.sgd(0.1), sparsity=0.5, scores="magnitude",
  ...                       distribution="uniform")
  >>> s = tx.init(p)
  >>> check_masked_zero(apply_state_masks(p, s), s)  # passes
  >>> check_masked_zero(p, s)
  Traceback (most recent call last):
  ...
  ValueError: 2 weights outside the masks are non-zero (w: 2). ...
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  if _is_module(params):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    params = nnx.state(params, nnx.Param)
  masks = get_masks(opt_state)
  bad = []
  for path, m, w in _masked_paths(masks, _unwrap(params)):
    n = int(np.count_nonzero(np.asarray(jax.device_get(w)) * ~np.asarray(jax.device_get(m))))
    if n:
      bad.append((path, n))
  if bad:
    total = sum(n for _, n in bad)
    listing = ", ".join(f"{p}: {n}" for p, n in bad)
    raise ValueError(
        f"{total} weights outside the masks are non-zero ({listing}). The sparse "
        "transformation must produce the final updates: make it the outermost one "
        "(rigl(optax.chain(adam, optax.scale(0.5))), not optax.chain(rigl(adam), "
        "optax.scale(0.5))), or wrap it only in MultiSteps / apply_if_finite / "
        "inject_hyperparams; right after init, zero them with apply_state_masks.")


def check_forward_params(loss_fn: Any, params: Any, opt_state: Any) -> None:
  """Raises ``ValueError`` if ``loss_fn`` does not run the forward weights.

  STE, SR-STE, MDGF and SDGF keep dense stored weights; only
  :func:`forward_params` (pytrees) or :func:`forward_model` (NNX) in the loss
  makes the forward pass sparse. This check sets the pruned weights' forward
  factor ``beta`` to 0, perturbs the weights outside the masks and calls
  ``loss_fn`` twice: a loss that uses the forward weights does not change.
  Call it once, outside ``jit``, before training (as the examples do).

  Args:
    loss_fn: ``(params, opt_state) -> scalar``, the loss as used in training,
      reading the masks from its ``opt_state`` argument (``params`` may be an
      NNX module; then it gets a modified copy).
    params: params pytree or NNX module.
    opt_state: the optimizer state.

  Raises:
    ValueError: the loss changed with the pruned weights (forward masks unused).

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> p = {'w': jnp.array([[1.], [-3.], [2.], [0.5]])}
  >>> s = so.ste(optax.sgd(0.1), nm="2:4").init(p)
  >>> check_forward_params(lambda q, st: forward_params(q, st)['w'].sum(), p, s)  # passes
  >>> check_forward_params(lambda q, st: q['w'].sum(), p, s)
  Traceback (most recent call last):
  ...
  ValueError: the loss does not use the sparse forward weights: ...
  """
  def zero_beta(x):
    if isinstance(x, SparseState):
      return x._replace(sparse_beta=jnp.zeros_like(_unwrap(x.sparse_beta)))
    return x
  state0 = jax.tree.map(zero_beta, opt_state, is_leaf=lambda x: isinstance(x, SparseState))
  masks = get_masks(opt_state)

  def perturb(w, m):
    if m is None:
      return w
    return jnp.where(m, w, 2.0 * w + jnp.ones((), w.dtype))

  if _is_module(params):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    graphdef, prm, rest = nnx.split(params, nnx.Param, ...)
    pure = _unwrap(prm)
    bumped = jax.tree.map(perturb, pure, masks, is_leaf=lambda x: x is None)
    a = loss_fn(nnx.merge(graphdef, pure, rest), state0)
    b = loss_fn(nnx.merge(graphdef, bumped, rest), state0)
  else:
    pure = _unwrap(params)
    bumped = jax.tree.map(perturb, pure, masks, is_leaf=lambda x: x is None)
    a, b = loss_fn(pure, state0), loss_fn(bumped, state0)
  if not bool(jnp.allclose(a, b, rtol=1e-6, atol=1e-6)):
    raise ValueError(
        "the loss does not use the sparse forward weights: it changed from "
        f"{float(a):.6g} to {float(b):.6g} when only pruned weights changed. Run the model "
        "on sparsejax.optim.forward_params(params, opt_state) (pytrees) or "
        "sparsejax.optim.forward_model(model, opt_state) (NNX) inside the loss.")


def apply_state_masks(params: Any, opt_state: Any) -> Any:
  """Zeros the weights outside the state's masks: call it right after ``init``.

  The transformations land pruned weights on exact zeros with every update,
  but until the first update (``k`` micro-steps under ``optax.MultiSteps``)
  the params are still dense. ``params = apply_state_masks(params,
  tx.init(params))`` starts from sparse weights. For an NNX model (e.g. after
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)``) pass the model: its params are
  zeroed in place and the model is returned. Methods whose masks start all
  True (gradual and one-shot pruning) have nothing to zero until they prune.
  Also exports the N:M-sparse weights of an STE-trained model.

  >>> import jax.numpy as jnp, optax, sparsejax.optim as so
  >>> params = {'w': jnp.array([[1., 2.], [3., 4.]])}
  >>> tx = so.one_shot_pruning(optax.sgd(0.1), sparsity=0.5)
  >>> apply_state_masks(params, tx.init(params))['w'].tolist()  # step 0 not yet run
  [[1.0, 2.0], [3.0, 4.0]]
  """
  masks = get_masks(opt_state)
  if _is_module(params):
    from flax import nnx  # pylint: disable=import-outside-toplevel
    nnx.update(params, apply_state_masks(nnx.state(params, nnx.Param), opt_state))
    return params
  return jax.tree.map(
      lambda m, w: w if m is None else jnp.where(m, w, jnp.zeros((), w.dtype)),
      masks, _unwrap(params), is_leaf=lambda x: x is None)
