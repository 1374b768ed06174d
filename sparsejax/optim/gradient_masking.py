"""Dynamic gradient masking (SparCL-style): keep only the largest gradients.

Each step, in every selected leaf, only the ``fraction`` of the nonzero
gradient entries with the largest magnitude reach the optimizer; the rest are
zeroed. Counting *nonzero* entries makes it compose with the hard-sparse
methods: inside :func:`~sparsejax.optim.rigl` (whose inner optimizer only
sees the active weights' gradients) ``fraction`` is relative to the active
weights.

Composes either way: ``rigl(gradient_masking(optax.adam(1e-3), fraction=0.5),
...)`` or ``optax.chain(gradient_masking(fraction=0.5), optax.adam(1e-3))``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sparsejax import schedules
from sparsejax.core import paths as core_paths
from sparsejax.core.selection import LazyScores, count_nonzero, global_topk_masks

__all__ = ["GradientMaskingState", "gradient_masking", "top_gradient_mask"]


class GradientMaskingState(NamedTuple):
  """State of :func:`gradient_masking` (only the wrapped optimizer's state)."""
  gradmask_inner: Any


def _abs32(g):
  return jnp.abs(g).astype(jnp.float32)


def top_gradient_mask(g: jax.Array, fraction) -> jax.Array:
  """Bool mask of the ``round(fraction * nnz(g))`` largest ``|g|`` entries.

  >>> top_gradient_mask(jnp.array([0., 3., -1., 2., 0.]), 0.5).tolist()
  [False, True, False, True, False]
  """
  nz = count_nonzero(g).astype(jnp.int32)
  k = jnp.round(jnp.asarray(fraction, jnp.float32) * nz.astype(jnp.float32)).astype(jnp.int32)
  k = jnp.clip(k, 0, g.size)
  scores = LazyScores(_abs32, g)  # evaluated inside the selection passes
  return global_topk_masks([scores], k=k)[0]



def gradient_masking(inner: optax.GradientTransformation | None = None, *, fraction,
                     include=None, exclude=None) -> optax.GradientTransformationExtraArgs:
  """Keeps the top ``fraction`` of each selected leaf's nonzero gradients.

  Args:
    inner: optimizer receiving the masked gradients, or ``None`` (then the
      masked gradients are the output: put this first in an ``optax.chain``).
    fraction: kept fraction in ``(0, 1]`` (may be injected).
    include: regex(es) of leaf paths to mask (default: leaves with ndim >= 2).
    exclude: regex(es) of leaf paths to leave alone.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.

  >>> import jax.numpy as jnp, optax
  >>> tx = gradient_masking(fraction=0.5)
  >>> g = {'w': jnp.array([[1., -4.], [3., 2.]]), 'b': jnp.ones(2)}
  >>> u, _ = tx.update(g, tx.init(g))
  >>> u['w'].tolist(), u['b'].tolist()
  ([[0.0, -4.0], [3.0, 0.0]], [1.0, 1.0])
  """
  schedules.check_range("fraction", fraction, 0.0, 1.0, lo_open=True,
                        fix="keep a fraction in (0, 1] of the gradient entries")
  inner = optax.with_extra_args_support(optax.identity() if inner is None else inner)

  def init_fn(params):
    core_paths.select(params, include, exclude)  # errors at init, not mid-training
    return GradientMaskingState(gradmask_inner=inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    sel = core_paths.select(updates, include, exclude)

    def one(g, s):
      if not s:
        return g
      return jnp.where(top_gradient_mask(g, fraction), g, jnp.zeros((), g.dtype))

    masked = jax.tree.map(one, updates, sel)
    out, inner_state = inner.update(masked, state.gradmask_inner, params, **extra_args)
    return out, GradientMaskingState(gradmask_inner=inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
