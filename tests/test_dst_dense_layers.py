"""SET/RigL leave dense layers alone, and a weight dropped and grown back keeps its value.

The reference for every untouched weight is plain ``optax.adam`` fed the same
gradients: a weight that stays active through every mask update is trained
exactly as without sparsity (Adam is elementwise), with the same moments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.optim as so


def _grads(params, t):
  leaves, tdef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1000 + t), len(leaves))
  return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"fc": {"kernel": jax.random.normal(k1, (64, 64)), "bias": jnp.zeros(64)},
          "out": {"kernel": jax.random.normal(k2, (64, 4)), "bias": jnp.zeros(4)}}


def _run(tx, params, steps):
  """(params, state) after each step, with gradients independent of the params."""
  state = tx.init(params)
  params = so.apply_state_masks(params, state)
  update = jax.jit(tx.update)
  out = []
  for t in range(steps):
    u, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
    out.append((params, state))
  return out


def _adam_state(state):
  return so.get_sparse_state(state).sparse_inner[0]


def test_issue_minimal_case_sparsity_zero_keeps_every_weight():
  # rigl at sparsity 0 with an lr-0 SGD: nothing may change, however often masks update.
  tx = so.rigl(optax.sgd(0.0), sparsity=0.0, distribution="uniform", update_every=1,
               begin_step=0, end_step=10)
  w = jnp.arange(1.0, 17.0).reshape(4, 4)
  p, s, update = {"w": w}, tx.init({"w": w}), jax.jit(tx.update)
  for t in range(10):
    u, s = update(_grads(p, t), s, p)
    p = optax.apply_updates(p, u)
    assert bool(so.get_masks(s)["w"].all())
    np.testing.assert_array_equal(np.asarray(p["w"]), np.asarray(w))


@pytest.mark.parametrize("method", [so.rigl, so.set_training])
def test_erk_dense_layer_trains_like_plain_adam_through_mask_updates(method):
  params = _params()
  tx = method(optax.adam(1e-2), sparsity=0.8, update_every=1, begin_step=0, end_step=100,
              drop_fraction=0.5)
  runs = _run(tx, params, 5)
  masks = so.get_masks(runs[0][1])
  assert bool(masks["out"]["kernel"].all()), "precondition: ERK leaves 'out' dense"
  assert not bool(masks["fc"]["kernel"].all())
  ref_tx = optax.adam(1e-2)
  ref_p, ref_s = params, ref_tx.init(params)
  for t, (p, s) in enumerate(runs):
    u, ref_s = ref_tx.update(_grads(ref_p, t), ref_s, ref_p)
    ref_p = optax.apply_updates(ref_p, u)
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(p["out"][leaf], ref_p["out"][leaf], rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(_adam_state(s).mu["out"][leaf], ref_s[0].mu["out"][leaf],
                                 rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(_adam_state(s).nu["out"][leaf], ref_s[0].nu["out"][leaf],
                                 rtol=1e-6, atol=1e-9)
    assert bool(so.get_masks(s)["out"]["kernel"].all())
    assert np.count_nonzero(np.asarray(p["out"]["kernel"])) == 64 * 4


def _first_update(method, reinit_when_same):
  """(params, state) before and after the first mask update (step 3) of a small layer."""
  params = {"w": jax.random.normal(jax.random.key(7), (8, 8))}
  tx = method(optax.adam(1e-2), sparsity=0.5, update_every=10, begin_step=3, end_step=10**6,
              drop_fraction=0.9, distribution="uniform", reinit_when_same=reinit_when_same,
              include="w")
  runs = _run(tx, params, 4)
  return runs[2], runs[3]


@pytest.mark.parametrize("method", [so.rigl, so.set_training])
def test_dropped_and_regrown_weight_keeps_value_and_moments(method):
  (p0, s0), (p1, s1) = _first_update(method, reinit_when_same=False)
  (_, r0), (q1, r1) = _first_update(method, reinit_when_same=True)
  m0, m1 = np.asarray(so.get_masks(s0)["w"]), np.asarray(so.get_masks(s1)["w"])
  np.testing.assert_array_equal(m1, np.asarray(so.get_masks(r1)["w"]))  # same decision
  grown = m1 & ~m0
  # With the reset, a dropped-and-regrown weight restarts at 0: that reveals drop & grow.
  again = m0 & m1 & (np.asarray(q1["w"]) == 0)
  assert grown.any() and again.any(), "precondition: some weights are dropped and regrown"
  # Default: those weights take the ordinary Adam step from their old value and moments,
  # exactly like a weight that was never dropped (plain Adam on the same gradient).
  g = _grads(p0, 3)["w"]
  ref = optax.adam(1e-2)
  ref_u, ref_s = ref.update({"w": g}, so.get_sparse_state(s0).sparse_inner, {"w": p0["w"]})
  ref_s = ref_s[0]
  want_p = np.asarray(p0["w"] + ref_u["w"])
  kept_all = m0 & m1
  np.testing.assert_allclose(np.asarray(p1["w"])[kept_all], want_p[kept_all], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(_adam_state(s1).mu["w"])[kept_all],
                             np.asarray(ref_s.mu["w"])[kept_all], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(_adam_state(s1).nu["w"])[kept_all],
                             np.asarray(ref_s.nu["w"])[kept_all], rtol=1e-6)
  assert np.all(np.asarray(p1["w"])[again] != 0)
  # Newly grown weights start at 0 with zero moments (both settings).
  for p, s in ((p1, s1), (q1, r1)):
    assert np.all(np.asarray(p["w"])[grown] == 0)
    assert np.all(np.asarray(_adam_state(s).mu["w"])[grown] == 0)
  # reinit_when_same=True: the regrown weights restart like new ones, moments included.
  assert np.all(np.asarray(_adam_state(r1).mu["w"])[again] == 0)
  assert np.all(np.asarray(_adam_state(r1).nu["w"])[again] == 0)
  del r0


def test_skip_gradient_on_update_ordinary_steps_equal_plain():
  # skip_gradient_on_update changes update steps only: ordinary steps are identical to
  # skip=False, and an update step leaves the Adam state as it was (count included).
  params = _params(1)
  make = lambda s: so.rigl(optax.adam(1e-2), sparsity=0.8, update_every=3, begin_step=2,
                           end_step=100, skip_gradient_on_update=s)
  plain = _run(make(False), params, 3)
  runs = _run(make(True), params, 3)
  for t in (0, 1):  # ordinary steps before the first update
    for a, b in zip(jax.tree.leaves(runs[t]), jax.tree.leaves(plain[t])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(_adam_state(plain[2][1]).count) == int(_adam_state(plain[1][1]).count) + 1
  before, after = _adam_state(runs[1][1]), _adam_state(runs[2][1])
  assert int(after.count) == int(before.count)
  m = so.get_masks(runs[2][1])["fc"]["kernel"]
  kept = np.asarray(m & so.get_masks(runs[1][1])["fc"]["kernel"])
  np.testing.assert_array_equal(np.asarray(after.mu["fc"]["kernel"])[kept],
                                np.asarray(before.mu["fc"]["kernel"])[kept])
  np.testing.assert_array_equal(np.asarray(runs[2][0]["out"]["kernel"]),
                                np.asarray(runs[1][0]["out"]["kernel"]))
