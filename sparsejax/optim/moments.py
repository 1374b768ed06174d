"""Generic reset of optimizer moments at chosen positions (regrown weights)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["reset_moments"]


def reset_moments(inner: Any, inner_state: Any, positions: Any) -> Any:
  """Zeros every params-shaped entry of an optimizer state at ``positions``.

  Uses ``optax.tree_utils.tree_map_params`` to find every params-shaped
  subtree of the state (Adam/AdamW ``mu``/``nu``, momentum traces, Lion,
  RMSProp, ``inject_hyperparams``, ``chain``, ``MultiSteps`` accumulators...)
  without dispatching on known optimizer state classes. Leaves whose shape
  differs from the param's (e.g. Adafactor's factored row/column second
  moments) cannot be reset per element and are left unchanged.

  Args:
    inner: the optimizer (anything with ``init``) that produced ``inner_state``.
    inner_state: its state.
    positions: mask tree (params structure; ``None`` on dense leaves): True
      where moments must be zeroed.

  Returns:
    The state with those entries zeroed.

  >>> import jax.numpy as jnp, optax
  >>> opt = optax.adam(1e-3)
  >>> p = {'w': jnp.ones(3)}
  >>> _, s = opt.update({'w': jnp.ones(3)}, opt.init(p), p)
  >>> s = reset_moments(opt, s, {'w': jnp.array([True, False, False])})
  >>> (s[0].mu['w'] > 0).tolist()
  [False, True, True]
  """
  sentinel = jax.tree.map(lambda m: False if m is None else m, positions,
                          is_leaf=lambda x: x is None)

  def f(v, pos):
    if pos is False or not hasattr(v, "shape") or v.shape != pos.shape:
      return v
    return jnp.where(pos, jnp.zeros((), v.dtype), v)

  # is_leaf: a None param (absent leaf) is None in the state too; keep it.
  return optax.tree_utils.tree_map_params(inner, f, inner_state, sentinel,
                                          is_leaf=lambda x: x is None)
