"""skip_gradient_on_update: exact for any optax optimizer, on both kinds of step.

References: ``inner.update`` itself (ordinary steps must equal it bit for bit,
to a few ulps for optimizers with reductions) and the incoming state (skipped steps must return it unchanged, with zero
updates); through RigL, the moment reset applied to the incoming state and
``-W`` updates of exactly the untrained weights.
"""

from __future__ import annotations

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.optim as so
from sparsejax.optim import moments, skip_update
from sparsejax.optim.skip_update import update_or_skip


def _jitted_adam():
  # The whole update inside a nested jit: still exact (a select after it).
  adam = optax.adam(1e-2)
  return optax.GradientTransformation(adam.init, jax.jit(adam.update))


OPTIMIZERS = {
    "adam": lambda: optax.adam(1e-2),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "lion": lambda: optax.lion(1e-3),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=8),
    "chain_inject": lambda: optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=1e-3)),
    "jitted_adam": _jitted_adam,
}


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc": {"kernel": jax.random.normal(k1, (16, 16)), "bias": jnp.zeros(16)},
          "out": {"kernel": jax.random.normal(k2, (16, 8)), "bias": jnp.zeros(8)}}


def _grads(params, t):
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(100 + t), len(leaves))
  return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


# Optimizers with reductions (Adafactor's factored moments, a global norm): two
# differently fused XLA programs may round those differently (so does a plain
# select after the update), so they are compared to a few ulps; the others bit
# for bit. Skipped steps are bit for bit for every optimizer.
HAS_REDUCTIONS = {"adafactor", "chain_inject"}


def _assert_bitwise(a, b, rtol=0.0):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.atleast_1d(np.asarray(x)), np.atleast_1d(np.asarray(y))
    assert x.dtype == y.dtype and x.shape == y.shape
    if rtol and np.issubdtype(x.dtype, np.floating):
      np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-30)
    else:
      np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_update_or_skip_is_update_or_identity(name):
  tx = OPTIMIZERS[name]()
  p = _params()
  s = tx.init(p)
  update = jax.jit(tx.update)
  for t in range(2):  # a non-trivial state (moments, counts) to start from
    u, s = update(_grads(p, t), s, p)
    p = optax.apply_updates(p, u)
  g = _grads(p, 5)
  both = jax.jit(lambda skip, g, s, p: update_or_skip(tx, skip, g, s, p))
  ref_u, ref_s = update(g, s, p)
  rtol = 1e-6 if name in HAS_REDUCTIONS else 0.0
  u, s_new = both(jnp.asarray(False), g, s, p)
  _assert_bitwise(u, ref_u, rtol)
  _assert_bitwise(s_new, ref_s, rtol)
  u, s_kept = both(jnp.asarray(True), g, s, p)
  _assert_bitwise(s_kept, s)
  _assert_bitwise(u, jax.tree.map(jnp.zeros_like, ref_u))


def test_update_or_skip_eager_and_bad_state():
  tx = optax.sgd(1e-2, momentum=0.9)
  p = _params()
  s = tx.init(p)
  u, s2 = update_or_skip(tx, True, _grads(p, 0), s, p)  # concrete flag, no jit
  _assert_bitwise(s2, s)
  assert all(not np.asarray(x).any() for x in jax.tree.leaves(u))
  grows = optax.GradientTransformation(lambda p: (), lambda g, s, p=None: (g, (s, jnp.zeros(()))))
  with pytest.raises(ValueError, match="same structure"):
    update_or_skip(grows, False, _grads(p, 0), (), p)


def test_rigl_skip_update_steps():
  """rigl(skip=True) on mask updates: new masks, the untrained weights land on 0, the
  others do not move, and the inner state is as it came in (moments of untrained
  entries reset). Its ordinary steps equal skip=False's
  (test_dst_dense_layers.py::test_skip_gradient_on_update_ordinary_steps_equal_plain)."""
  tx = so.rigl(optax.adam(1e-2), skip_gradient_on_update=True, sparsity=0.7, update_every=2,
               begin_step=1, end_step=20, distribution="uniform")
  p = _params()
  s = tx.init(p)
  p = so.apply_state_masks(p, s)
  update = jax.jit(tx.update)
  kinds = []
  for t in range(4):  # steps 0, 2: ordinary; 1, 3: mask updates
    u, s_next = update(_grads(p, t), s, p)
    old, new = so.get_masks(s), so.get_masks(s_next)
    changed = any(np.any(np.asarray(a) != np.asarray(b))
                  for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new)))
    kinds.append(changed)
    inner_old = so.get_sparse_state(s).sparse_inner
    inner_new = so.get_sparse_state(s_next).sparse_inner
    if not changed:
      assert int(inner_new[0].count) == int(inner_old[0].count) + 1
    else:
      # kept = trained before and after this update (a dropped-and-regrown weight is kept)
      kept = jax.tree.map(lambda a, b: None if a is None else a & b, old, new,
                          is_leaf=lambda x: x is None)
      untrained = jax.tree.map(lambda k: None if k is None else ~k, kept,
                               is_leaf=lambda x: x is None)
      _assert_bitwise(inner_new, moments.reset_moments(optax.adam(1e-2), inner_old, untrained))
      want_u = jax.tree.map(lambda k, w: jnp.zeros_like(w) if k is None
                            else jnp.where(k, 0.0, -w), kept, p, is_leaf=lambda x: x is None)
      for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want_u)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = optax.apply_updates(p, u)
    s = s_next
  assert kinds == [False, True, False, True]


def test_doctests():
  res = doctest.testmod(skip_update, optionflags=doctest.ELLIPSIS)
  assert res.failed == 0 and res.attempted > 0
