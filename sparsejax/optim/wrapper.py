"""The one mechanism behind every sparsity transformation: :func:`sparse_wrapper`.

A sparse method is a small :class:`MaskPolicy` (how masks start, when and how
they change, whether pruned weights are hard zeros) plus this wrapper, which
owns the inner optimizer. Each update:

1. on mask-update steps only (``lax.cond``, one trace serves both kinds of
   step), the policy computes new masks (and the newly grown positions) from
   the weights, the incoming dense gradients and a PRNG key. For policies
   that read gradients (RigL), a masked leaf whose gradient is non-finite
   keeps its mask and owes the update, which runs at the next step with a
   finite gradient on that leaf (``SparseState.sparse_owed``); NaN in other
   leaves (a dense bias) blocks nothing, and magnitude pruning and SET never
   skip an update. Non-finite weights are never pruned by magnitude (they
   could not land on zero: ``w + (-w)`` is NaN);
2. the gradients given to the inner optimizer are masked (hard methods), or
   get SR-STE's decay term ``decay * (1 - m) * W`` (STE-like methods);
3. the inner optimizer runs; moments of grown weights are reset with
   :func:`~sparsejax.optim.reset_moments` (generic ``tree_map_params``) just
   before it, and grown weights get a zero gradient on that step;
4. the updates of pruned (and grown) weights become ``-params`` so that plain
   ``optax.apply_updates`` lands them on exact zeros -- no post-step hook;
5. STE-like policies recompute the forward masks from the updated weights.

The wrapper must produce the final updates: use it as the outermost
transformation or inside update-preserving wrappers (``MultiSteps``,
``apply_if_finite``, ``inject_hyperparams``), or as the last element of an
``optax.chain`` with ``inner=None`` (then the moments of the earlier chain
elements are not reset and growth scores are the incoming updates).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax

from sparsejax import schedules
from sparsejax.core import masks as core_masks
from sparsejax.core import paths as core_paths
from sparsejax.core import selection as core_selection
from sparsejax.optim import moments, skip_update
from sparsejax.optim.state import SparseState, _unwrap

__all__ = ["MaskPolicy", "sparse_wrapper", "make_key", "selected_masks"]

_is_none = core_masks.is_none


def make_key(key: Any) -> jax.Array:
  """Raw PRNG key data from an int seed or a (typed or raw) key.

  >>> make_key(0).dtype.name
  'uint32'
  """
  if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(key)
  arr = jnp.asarray(key)
  if arr.ndim == 0:
    return jax.random.key_data(jax.random.key(arr.astype(jnp.uint32)))
  return arr.astype(jnp.uint32)


def _wrap_key(data):
  return jax.random.wrap_key_data(data)


def selected_masks(params: Any, include=None, exclude=None, masks: Any = None) -> Any:
  """All-True masks on the selected leaves, or the given ``masks`` (validated).

  Args:
    params: parameter pytree.
    include: regex(es) of leaf paths to mask (default: every leaf with ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.
    masks: explicit initial mask tree; checked against ``params``.

  Returns:
    Mask tree.

  >>> import jax.numpy as jnp
  >>> m = selected_masks({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)})
  >>> m['b'] is None, m['w'].shape
  (True, (2, 2))
  """
  if masks is not None:
    masks = _unwrap(masks)
    core_masks.validate_masks(masks, params)
    return masks
  return core_masks.init_masks(params, core_paths.select(params, include, exclude))


@dataclasses.dataclass(frozen=True)
class MaskPolicy:
  """How one sparse method chooses its masks (all callables pure and jit-able).

  Attributes:
    init_masks: ``(params, key) -> masks``, the initial mask tree.
    is_update_step: ``step -> bool`` array, mask-update steps (pre-gradient);
      ``None`` if masks never change before the gradient step.
    update_masks: ``(step, masks, params, grads, key) -> (masks, grown)``,
      run under ``lax.cond`` on update steps only; ``grown`` is a mask tree of
      newly grown positions (zeroed, moments reset) or ``None``.
    forward_masks: ``(step, new_params, masks) -> masks`` run after every
      update for STE-like methods (masks of the next forward pass), or ``None``.
    hard: pruned weights are exact zeros: ``True``, ``False`` or a function of
      the step (e.g. a hard-mask fine-tune phase).
    target: ``step -> float``, the scheduled sparsity at a step.
    beta: ``step -> float``, the forward factor of pruned weights (MDGF), or
      ``None`` for 0.
    decay: SR-STE's ``lambda_W``: ``decay * (1 - m) * W`` is added to the
      gradient before the inner optimizer.
    regrows: ``update_masks`` grows weights (moments of untrained entries
      are reset).
    uses_grads: ``update_masks`` reads the gradients. Then a masked leaf
      whose gradient is non-finite (NaN/inf anywhere in it) at a mask update
      keeps its mask, and the update is owed (``SparseState.sparse_owed``):
      it runs, with the owed step's schedule, at the next step whose gradient
      on that leaf is finite (a newer scheduled update supersedes it). Other
      leaves, including dense ones, never block it. ``False``: gradients are
      not judged (magnitude pruning, SET), so no mask update is ever skipped.
  """
  init_masks: Callable[..., Any]
  is_update_step: Callable[[Any], Any] | None = None
  update_masks: Callable[..., Any] | None = None
  forward_masks: Callable[..., Any] | None = None
  hard: bool | Callable[[Any], Any] = True
  target: Callable[[Any], Any] = lambda step: 0.0
  beta: Callable[[Any], Any] | None = None
  decay: Any = 0.0
  regrows: bool = False
  uses_grads: bool = True


def _leaf_finite(x) -> jax.Array:
  """Whether every entry of ``x`` is finite: one fused ``isfinite`` reduction
  over the existing buffer (no scratch copy, and unlike a sum it cannot
  overflow)."""
  if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
    return jnp.asarray(True)
  return jnp.all(jnp.isfinite(x))


def init_owed(masks) -> Any:
  """``SparseState.sparse_owed`` with nothing owed: ``-1`` on every masked leaf.

  >>> import jax.numpy as jnp
  >>> o = init_owed({'w': jnp.ones((2, 2), bool), 'b': None})
  >>> int(o['w']), o['b']
  (-1, None)
  """
  return jax.tree.map(lambda m: None if m is None else jnp.full((), -1, jnp.int32),
                      masks, is_leaf=_is_none)


def _owed_step(owed) -> jax.Array:
  # All owed leaves owe the same (latest) scheduled update: a newer update
  # supersedes an older one still owed.
  leaves = jax.tree.leaves(owed)
  if not leaves:
    return jnp.full((), -1, jnp.int32)
  return jnp.max(jnp.stack(leaves))


def _owed_after(old, grads, owed, is_upd, step, uses_grads):
  """Per masked leaf: (accept the new mask, owed step after this update).

  A leaf takes part in this mask update if it is a scheduled step or the leaf
  owes one. It accepts the new mask iff the policy does not read gradients or
  the leaf's gradient is finite; otherwise it keeps its mask and owes the
  update (``-1``: nothing owed).
  """
  def accept_leaf(m, g, o):
    if m is None:
      return None
    wanted = is_upd | (o >= 0)
    return wanted & _leaf_finite(g) if uses_grads else wanted

  def owed_leaf(a, o):
    if a is None:
      return None
    return jnp.where(a, -1, jnp.where(is_upd, step, o)).astype(jnp.int32)

  accept = jax.tree.map(accept_leaf, old, grads, owed, is_leaf=_is_none)
  return accept, jax.tree.map(owed_leaf, accept, owed, is_leaf=_is_none)


def _nonzero_outside(w, m):
  return (w != 0) & ~m


def _count_masked_nonzero(masks, params) -> jax.Array:
  """Non-zero weights outside ``masks`` (int32), over the masked leaves.

  Counted slab by slab (``core.selection.count_nonzero``): a plain ``sum`` of
  the bool array stores it as int32 first on XLA:CPU (16 MiB of scratch for the
  benchmark MLP's four 1024x1024 kernels).
  """
  counts = jax.tree.leaves(jax.tree.map(
      lambda m, w: None if m is None else core_selection.count_nonzero(
          core_selection.LazyScores(_nonzero_outside, w, m)).astype(jnp.int32),
      masks, params, is_leaf=_is_none))
  return sum(counts, jnp.zeros((), jnp.int32))


def _after_grads(x, grads):
  """``x`` unchanged, but data-dependent on one entry of every gradient leaf.

  A conditional that reads it waits for the whole backward pass, and with it
  for the backward pass's reads of the donated params, which the in-place
  updates (reading the conditional's results) must follow: without that
  order XLA:CPU copies every kernel the backward pass reads, on every step
  (plain ``optax.adam`` pays those copies). Read inside a branch only, so an
  ordinary step reads nothing (the first entry of a sharded leaf is one
  scalar to broadcast). ``(v * v) & 2 == 0`` for every integer ``v``
  (squares are 0 or 1 mod 4), which XLA cannot prove.
  """
  z = jnp.zeros((), jnp.uint32)
  for g in jax.tree.leaves(grads):
    if not jnp.size(g) or not jnp.issubdtype(jnp.result_type(g), jnp.number):
      continue
    v = jnp.real(g[(0,) * jnp.ndim(g)])  # indexed, not raveled: no gather of a sharded leaf
    v = lax.convert_element_type(v, jnp.uint32)
    z = z | ((v * v) & jnp.uint32(2))
  return x | z.astype(x.dtype)


def _count_now(policy, state, is_upd) -> jax.Array | None:
  """Whether this step counts ``SparseState.sparse_masked_nonzero``.

  Hard methods count, on mask-update steps and on step 1 only, the weights
  outside the incoming masks that are non-zero: positive from step 1 on iff a
  later transformation changed the updates. ``None``: never counted (soft
  policies, no masked leaf).
  """
  if policy.hard is not True or not jax.tree.leaves(state.sparse_masks):
    return None
  step = state.sparse_step
  return step == 1 if is_upd is None else (step == 1) | is_upd


def _raise_if_masked_nonzero(count, step) -> None:
  """Eager updates raise on a positive count (jitted ones record it)."""
  if isinstance(count, jax.core.Tracer) or isinstance(step, jax.core.Tracer):
    return
  if int(step) >= 1 and int(count) > 0:
    raise ValueError(
        f"{int(count)} weights outside the masks are non-zero at step {int(step)}: "
        "the sparse transformation is not the outermost one (e.g. "
        "optax.chain(rigl(adam), optax.scale(0.5)) rescales its -W updates). Put it "
        "outermost, e.g. rigl(optax.chain(adam, optax.scale(0.5))), or only inside "
        "MultiSteps / apply_if_finite / inject_hyperparams; or the params were "
        "changed outside the optimizer (then zero them with apply_state_masks).")


def _no_grown(masks):
  return jax.tree.map(lambda m: None if m is None else jnp.zeros_like(m), masks,
                      is_leaf=_is_none)


def _zero_decay(decay) -> bool:
  c = schedules.concrete(decay)
  return c is not None and c == 0.0


def sparse_wrapper(inner: optax.GradientTransformation | None, policy: MaskPolicy, *,
                   key: Any = 0, reset_moments: bool = True,
                   skip_gradient_on_update: bool = False,
                   ) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` so that its updates follow ``policy``'s masks.

  Args:
    inner: the optimizer (any ``optax.GradientTransformation``), or ``None``
      for the identity (use the result as the last element of a chain).
    policy: the sparse method's :class:`MaskPolicy`.
    key: int seed or PRNG key for random masks and random growth.
    reset_moments: for regrowing policies, zero the inner optimizer's moments
      of every untrained entry (pruned or just grown) before each update, so
      grown weights start from a fresh parameter's state.
    skip_gradient_on_update: on mask-update steps, only update the masks (no
      gradient step: zero inner updates, inner state unchanged except the
      moment reset above), as TF RigL does. Ordinary steps compute the same
      values at the same cost as without it (no copy of the inner state:
      :func:`~sparsejax.optim.skip_update.update_or_skip`).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose state holds a
    :class:`~sparsejax.optim.SparseState`. It must produce the final
    updates (outermost, see the module docstring); hard policies count
    violations in ``SparseState.sparse_masked_nonzero``.

  >>> import jax.numpy as jnp, optax
  >>> pol = MaskPolicy(init_masks=lambda p, k: {'w': jnp.array([True, False])})
  >>> tx = sparse_wrapper(optax.sgd(1.0), pol)
  >>> p = {'w': jnp.array([1., 2.])}
  >>> u, _ = tx.update({'w': jnp.array([0.5, 0.5])}, tx.init(p), p)
  >>> optax.apply_updates(p, u)['w'].tolist()
  [0.5, 0.0]
  """
  inner = optax.identity() if inner is None else inner
  inner = optax.with_extra_args_support(inner)
  hard = policy.hard
  has_decay = not _zero_decay(policy.decay)

  def beta_at(step):
    if policy.beta is None:
      return jnp.zeros((), jnp.float32)
    return jnp.asarray(policy.beta(step), jnp.float32)

  def init_fn(params):
    pure = _unwrap(params)
    k = make_key(key)
    k_init, k_state = jax.random.split(_wrap_key(k))
    masks = policy.init_masks(pure, k_init)
    core_masks.validate_masks(masks, pure)
    zero = jnp.zeros((), jnp.int32)
    return SparseState(
        sparse_step=zero,
        sparse_masks=masks,
        sparse_key=jax.random.key_data(k_state),
        sparse_target=jnp.asarray(policy.target(zero), jnp.float32),
        sparse_beta=beta_at(zero),
        sparse_inner=inner.init(pure),
        sparse_masked_nonzero=jnp.full((), -1, jnp.int32),
        sparse_owed=init_owed(masks),
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("sparsejax transformations need the params: call "
                       "tx.update(grads, opt_state, params).")
    # NNX states hold Variables: work on the bare arrays (as init does) and
    # give the updates back in the structure they came in.
    structure = jax.tree.structure(updates)
    updates, params = _unwrap(updates), _unwrap(params)
    step = state.sparse_step
    masks = state.sparse_masks
    key_data = state.sparse_key
    target = state.sparse_target
    train = None  # where the inner optimizer trains (None: the masks)
    owed = state.sparse_owed
    is_upd = None
    if policy.update_masks is not None:
      is_upd = jnp.asarray(policy.is_update_step(step), bool)
    count_now = _count_now(policy, state, is_upd)
    masked_nonzero = state.sparse_masked_nonzero
    if count_now is not None:
      masked_nonzero = lax.cond(
          count_now, lambda ops: _after_grads(_count_masked_nonzero(*ops[:2]), ops[2]),
          lambda ops: masked_nonzero, (masks, params, updates))

    if policy.update_masks is not None:

      # Owed updates (see _owed_after): a masked leaf whose gradient was
      # non-finite at a mask update keeps its mask and is updated at the next
      # step whose gradient on it is finite, with the owed step's schedule.
      owed_step = _owed_step(owed)
      run = is_upd | (owed_step >= 0)
      mask_step = jnp.where(is_upd, step, owed_step)

      def do_update(operands):
        old, kd, p, g, ow = operands
        k, sub = jax.random.split(_wrap_key(_after_grads(kd, g)))
        new, new_grown = policy.update_masks(mask_step, old, p, g, sub)
        accept, new_owed = _owed_after(old, g, ow, is_upd, step, policy.uses_grads)
        new = jax.tree.map(lambda n, o, a: None if o is None else jnp.where(a, n, o),
                           new, old, accept, is_leaf=_is_none)
        if policy.regrows:  # trainable = kept, not newly grown (grown start at 0)
          train = jax.tree.map(lambda n, g, a: None if n is None else n & ~(g & a),
                               new, new_grown, accept, is_leaf=_is_none)
          # ``train`` is within ``new``, so this is ``new``; it orders every
          # read of the old masks (``new_grown`` may read them) before ``new``
          # is written over them in place (the masks are donated). Without it
          # XLA:CPU copies all incoming masks on every step.
          new = jax.tree.map(lambda n, t: None if n is None else n | t, new, train,
                             is_leaf=_is_none)
        else:
          train = None
        return new, train, jax.random.key_data(k), new_owed

      def no_update(operands):
        old, kd, _, _, ow = operands
        return old, (old if policy.regrows else None), kd, ow

      # As cond operands, params and grads are materialised once, so the
      # selection passes inside the branch all see the same values.
      operands = (masks, key_data, params, updates, owed)
      if count_now is not None:
        # Always the same predicate (the count is >= -1), but it orders the
        # count's reads of the masks before this conditional, which updates
        # them in place (the masks are donated); without that XLA:CPU copies
        # every incoming mask on every step.
        run = run & (masked_nonzero >= -1)
      masks, train, key_data, owed = lax.cond(run, do_update, no_update, operands)
      target = jnp.where(is_upd, jnp.asarray(policy.target(step), jnp.float32), target)

    if count_now is not None:
      _raise_if_masked_nonzero(masked_nonzero, step)
    # Always True, but XLA cannot know: the final updates of masked leaves
    # read it, so the count is ordered before the step overwrites the donated
    # params in place. Without that data dependence XLA:CPU copies every
    # counted kernel first (16 MiB per step on the 4.2M-parameter benchmark MLP).
    checked = masked_nonzero >= -1

    hard_now = hard(step) if callable(hard) else hard

    def keep_grad(m):  # where gradients reach the inner optimizer
      if hard_now is True:
        return m
      return m | ~hard_now

    # 2. gradients for the inner optimizer (grown weights get a zero gradient)
    if train is None:
      train = masks

    def grad_leaf(m_old, m, g, w):
      if m is None:
        return g
      if has_decay:
        g = g + jnp.where(m_old, jnp.zeros((), g.dtype),
                          jnp.asarray(policy.decay, g.dtype) * w.astype(g.dtype))
      if hard_now is False:
        return g
      return jnp.where(keep_grad(m), g, jnp.zeros((), g.dtype))

    inner_grads = jax.tree.map(grad_leaf, state.sparse_masks, train, updates, params,
                               is_leaf=_is_none)

    # 3. the inner optimizer. For regrowing methods the moments of every
    # untrained position (pruned, or grown on this step) are zeroed *before* it
    # runs, and their gradient is zero: grown weights start from the state of a
    # fresh parameter (exactly 0 for SGD momentum, Adam(W), Lion, RMSProp), and
    # the reset fuses into the optimizer's own elementwise pass.
    inner_in = state.sparse_inner
    if policy.regrows and reset_moments:
      inner_in = moments.reset_moments(
          inner, inner_in, jax.tree.map(lambda t: None if t is None else ~t, train,
                                        is_leaf=_is_none))
    if skip_gradient_on_update and is_upd is not None:
      # No gradient step on mask updates: zero updates, inner state as it came
      # in (moments of untrained entries reset). update_or_skip selects the
      # state where the optimizer defines it, so ordinary steps copy nothing.
      inner_updates, inner_state = skip_update.update_or_skip(
          inner, is_upd, inner_grads, inner_in, params, **extra_args)
    else:
      inner_updates, inner_state = inner.update(inner_grads, inner_in, params, **extra_args)

    # 4. land pruned (and grown) weights on exact zeros
    def project(m, u, w):
      if m is None or hard_now is False:
        return u
      keep = m if hard_now is True else (m | ~hard_now)
      return jnp.where(keep & checked, u, -w.astype(u.dtype))

    out = jax.tree.map(project, train, inner_updates, params, is_leaf=_is_none)

    # 5. next forward masks (STE-like)
    new_step = optax.safe_increment(step)
    if policy.forward_masks is not None:
      # (The N:M selection reads each entry once per reduction, so it stays
      # exact even though XLA may recompute p + u with different rounding.)
      new_params = optax.apply_updates(params, out)
      masks = policy.forward_masks(new_step, new_params, masks)
      target = jnp.asarray(policy.target(new_step), jnp.float32)

    return jax.tree.unflatten(structure, jax.tree.leaves(out)), SparseState(
        sparse_step=new_step,
        sparse_masks=masks,
        sparse_key=key_data,
        sparse_target=target,
        sparse_beta=beta_at(new_step),
        sparse_inner=inner_state,
        sparse_masked_nonzero=masked_nonzero,
        sparse_owed=owed,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
