"""An optimizer update that can be skipped at run time, at no cost when it is not.

:func:`update_or_skip` runs ``inner.update`` and, where a traced ``skip`` flag
is set, returns zero updates and the state exactly as it came in. It serves
``sparse_wrapper(..., skip_gradient_on_update=True)`` (TF RigL takes no
gradient step on mask-update iterations).

Why not ``jnp.where(skip, old_state, new_state)`` after the update: the
optimizer's updates read its new state (Adam's updates read the new moments),
so XLA computes that state twice, once for the updates from the old state and
once for the select, which overwrites the old state in place (donated
buffers). Nothing orders the two, so XLA:CPU copies the whole old state first
(for Adam on a 4.2M-parameter MLP: 32 MiB of copies, XLA temp 26 -> 46 MiB,
about 1.5x the step time). Here the selected value replaces the new state
*inside* the optimizer's computation, at the point where it is defined: the
updates then read the selected state, as they read the new one without the
skip, and the program has the plain update's buffers and copies. On ordinary
steps the selected value is the new state, bit for bit, so the updates are
unchanged; on skipped steps they are discarded (zeros).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.extend import core as jex_core

__all__ = ["update_or_skip"]


def _keep_if(skip, old, new):
  out = jnp.where(skip, old, new)
  return out if out.dtype == new.dtype else out.astype(new.dtype)


def _eval_with_selected(jaxpr, consts, args, selected):
  """Evaluates ``jaxpr``; a var in ``selected`` gets ``selected[var](value)``
  as soon as it is defined, so every later use (and the output) sees it."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  def write(v, value):
    select = selected.get(v)
    env[v] = value if select is None else select(value)

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    params = eqn.primitive.get_bind_params(eqn.params)  # jaxpr params -> callables
    with eqn.ctx.manager:  # the equation's context (e.g. compute_on)
      out = eqn.primitive.bind(*map(read, eqn.invars), **params)
    if eqn.primitive.multiple_results:
      for v, value in zip(eqn.outvars, out):
        write(v, value)
    else:
      write(eqn.outvars[0], out)
  return [read(v) for v in jaxpr.outvars]


def update_or_skip(inner: optax.GradientTransformation, skip: Any, updates: Any,
                   state: Any, params: Any = None, **extra_args) -> tuple[Any, Any]:
  """``inner.update``, or, where ``skip`` is True, zero updates and ``state`` unchanged.

  Exact for any optax transformation: with ``skip`` False the updates and
  the new state are those of ``inner.update`` bit for bit; with ``skip``
  True the updates are zeros and every state leaf is its incoming value.
  Ordinary (``skip`` False) steps cost what ``inner.update`` costs: the
  selected state replaces the new state inside the optimizer's computation
  (see the module docstring), so no copy of the state is made. A state leaf
  that a nested ``jax.jit`` inside the optimizer computes together with the
  updates is still exact, at the cost of a select after the update.

  Args:
    inner: the optimizer.
    skip: bool scalar (traced or not).
    updates: gradients (the pytree given to ``inner.update``).
    state: ``inner``'s state.
    params: params, passed on to ``inner.update``.
    **extra_args: passed on to ``inner.update``.

  Returns:
    ``(updates, new_state)``.

  Raises:
    ValueError: if ``inner.update`` returns a state of another structure
      than ``state`` (optax transformations keep it).

  >>> import jax.numpy as jnp, optax
  >>> tx = optax.sgd(0.1, momentum=0.9)
  >>> p = {'w': jnp.ones(2)}
  >>> s = tx.init(p)
  >>> u, s2 = update_or_skip(tx, jnp.asarray(True), p, s, p)
  >>> u['w'].tolist(), s2[0].trace['w'].tolist()
  ([0.0, 0.0], [0.0, 0.0])
  >>> u, s2 = update_or_skip(tx, jnp.asarray(False), p, s, p)
  >>> [round(x, 3) for x in u['w'].tolist()], s2[0].trace['w'].tolist()
  ([-0.1, -0.1], [1.0, 1.0])
  """
  skip = jnp.asarray(skip, bool)
  grad_leaves, grad_tree = jax.tree.flatten(updates)
  old_leaves, state_tree = jax.tree.flatten(state)

  def update(grad_leaves, old_leaves):
    return inner.update(jax.tree.unflatten(grad_tree, grad_leaves),
                        jax.tree.unflatten(state_tree, old_leaves), params, **extra_args)

  closed, (out_updates, out_state) = jax.make_jaxpr(update, return_shape=True)(
      grad_leaves, old_leaves)
  new_state_tree = jax.tree.structure(out_state)
  if new_state_tree != state_tree:
    raise ValueError(
        "skip_gradient_on_update needs an inner optimizer whose update returns a state "
        f"of the same structure as its input: got {new_state_tree}, expected {state_tree}.")
  jaxpr = closed.jaxpr
  n_updates = len(jax.tree.leaves(out_updates))
  state_vars = jaxpr.outvars[n_updates:]
  own_invar = {v: len(grad_leaves) + i for i, v in enumerate(jaxpr.invars[len(grad_leaves):])}
  all_invars = set(jaxpr.invars)
  selected = {}  # new-state var -> its select, applied where the var is defined
  after = {}  # state leaf -> old value, selected after the update
  for i, v in enumerate(state_vars):
    if isinstance(v, jex_core.Literal) or v in all_invars or v in selected:
      if own_invar.get(v) != len(grad_leaves) + i:  # not this leaf passed through
        after[i] = old_leaves[i]
      continue
    selected[v] = lambda value, old=old_leaves[i]: _keep_if(skip, old, value)
  out = _eval_with_selected(jaxpr, closed.consts, [*grad_leaves, *old_leaves], selected)
  new_updates = [_keep_if(skip, jnp.zeros((), u.dtype), u) for u in out[:n_updates]]
  new_state = [_keep_if(skip, after[i], s) if i in after else s
               for i, s in enumerate(out[n_updates:])]
  return (jax.tree.unflatten(jax.tree.structure(out_updates), new_updates),
          jax.tree.unflatten(new_state_tree, new_state))
