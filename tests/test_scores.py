"""Tests for sparsejax.core.scores."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from sparsejax.core import scores
from sparsejax.core.scores import (gradient_magnitude, grasp, magnitude, movement_update,
                                   random_scores, saliency, synflow_densities, synflow_masks,
                                   synflow_scores)


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"l1": {"kernel": jax.random.normal(k1, (5, 4)), "bias": jax.random.normal(k2, (4,))},
          "l2": {"kernel": jax.random.normal(k3, (4, 3))}}


# ---------------------------------------------------------------- simple scores


def test_magnitude_saliency_gradient():
  p = _params()
  g = _params(1)
  for got, ref in ((magnitude(p), lambda a, b: np.abs(a)),
                   (saliency(p, g), lambda a, b: np.abs(a * b)),
                   (gradient_magnitude(g), lambda a, b: np.abs(b))):
    for x, a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p), jax.tree.leaves(g)):
      np.testing.assert_allclose(x, ref(np.asarray(a), np.asarray(b)), rtol=1e-6)


def test_random_scores_deterministic_per_leaf():
  p = _params()
  a = random_scores(p, jax.random.key(3))
  b = random_scores(p, jax.random.key(3))
  c = random_scores(p, jax.random.key(4))
  chex.assert_trees_all_equal(a, b)
  assert all(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))
  for x in jax.tree.leaves(a):
    assert x.dtype == jnp.float32 and bool(jnp.all((x >= 0) & (x < 1)))
  # Leaf streams are independent of other leaves' shapes.
  p2 = dict(p, l2={"kernel": jnp.zeros((7, 7))})
  d = random_scores(p2, jax.random.key(3))
  chex.assert_trees_all_equal(d["l1"], a["l1"])
  jitted = jax.jit(random_scores)(p, jax.random.key(3))
  chex.assert_trees_all_equal(jitted, a)


def test_movement_accumulates():
  rng = np.random.default_rng(0)
  ws = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
  gs = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]
  s = None
  step = jax.jit(movement_update)
  for w, g in zip(ws, gs):
    s = step(s, {"w": jnp.asarray(w)}, {"w": jnp.asarray(g)}) if s is not None else \
        movement_update(None, {"w": jnp.asarray(w)}, {"w": jnp.asarray(g)})
  ref = -sum(g.astype(np.float64) * w for w, g in zip(ws, gs))
  np.testing.assert_allclose(s["w"], ref, rtol=1e-5, atol=1e-6)


def test_saliency_structure_error_names_leaf():
  p = _params()
  g = _params()
  g["l2"]["kernel"] = jnp.zeros((3, 4))
  with pytest.raises(ValueError, match=r"grads leaf 'l2/kernel' has shape \(3, 4\)"):
    saliency(p, g)
  with pytest.raises(ValueError, match=r"'l1/bias'"):
    saliency(p, {"l1": {"kernel": p["l1"]["kernel"]}, "l2": p["l2"]})


# ---------------------------------------------------------------- GraSP


def _mlp_loss(p, batch, t):
  x, y = batch
  h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
  logits = (h @ p["l2"]["kernel"]) / t
  return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])


def test_grasp_matches_explicit_hessian():
  p = _params(2)
  rng = np.random.default_rng(0)
  batch = (jnp.asarray(rng.normal(size=(8, 5)), jnp.float32), jnp.asarray(rng.integers(0, 3, 8)))
  got = grasp(_mlp_loss, p, batch, temperature=2.0)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), p)
    b64 = (jnp.asarray(np.asarray(batch[0]), jnp.float64), batch[1])
    flat, unravel = ravel_pytree(p64)
    f = lambda v: _mlp_loss(unravel(v), b64, 2.0)  # noqa: E731
    g = np.asarray(jax.grad(f)(flat))
    h = np.asarray(jax.hessian(f)(flat))
    theta = np.asarray(flat)
  s = -theta * (h @ g)  # GraSP score (remove the largest)
  expected = -s / (abs(s.sum()) + 1e-10)  # keep-largest convention
  got_flat = np.asarray(ravel_pytree(got)[0])
  np.testing.assert_allclose(got_flat, expected, rtol=2e-3, atol=2e-6 * np.abs(expected).max())
  # Keeping the largest returned scores removes the largest GraSP scores.
  assert np.argmax(got_flat) == np.argmin(s)


def test_grasp_jit_and_int_leaf_error():
  p = _params(3)
  batch = (jnp.ones((4, 5)), jnp.array([0, 1, 2, 0]))
  a = jax.jit(lambda p, b: grasp(_mlp_loss, p, b))(p, batch)
  b = grasp(_mlp_loss, p, batch)
  chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-7)
  bad = dict(p, step=jnp.array(3))
  with pytest.raises(TypeError, match=r"leaf 'step' has dtype int32"):
    grasp(lambda q, bt, t: _mlp_loss(q, bt, t), bad, batch)


# ---------------------------------------------------------------- SynFlow


def test_synflow_density_sequence():
  d = np.asarray(synflow_densities(0.01, 100))
  np.testing.assert_allclose(d[[0, 9, 49, 99]], [0.95499, 0.63096, 0.1, 0.01], atol=5e-6)
  np.testing.assert_allclose(d, 0.01 ** (np.arange(1, 101) / 100), rtol=1e-5)
  assert np.all(np.diff(d) < 0)
  with pytest.raises(ValueError, match="rounds"):
    synflow_densities(0.1, 0)


def _linear_net(p, x):
  return x @ p["a"] @ p["b"]


def test_synflow_scores_analytic():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(3, 4)).astype(np.float32)
  b = rng.normal(size=(4, 2)).astype(np.float32)
  s = synflow_scores(_linear_net, {"a": jnp.asarray(a), "b": jnp.asarray(b)}, (1, 3),
                     normalize=False)
  # R = 1^T |A| |B| 1: dR/dA_ij = sum_k |B_jk|, dR/dB_jk = sum_i |A_ij|.
  np.testing.assert_allclose(s["a"], np.abs(a) * np.abs(b).sum(1)[None, :], rtol=1e-5)
  np.testing.assert_allclose(s["b"], np.abs(b) * np.abs(a).sum(0)[:, None], rtol=1e-5)


def _deep_relu(p, x):
  for w in p["layers"]:
    x = jax.nn.relu(x @ w)
  return x


def _deep_params(depth=24, width=12, scale=40.0):
  ks = jax.random.split(jax.random.key(0), depth)
  return {"layers": [scale * jax.random.normal(k, (width, width)) for k in ks]}


def test_synflow_float32_overflow_guard():
  p = _deep_params()
  raw = synflow_scores(_deep_relu, p, (1, 12), normalize=False)
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(raw))  # overflows
  norm = synflow_scores(_deep_relu, p, (1, 12))
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda x: jnp.asarray(np.asarray(x), jnp.float64), p)
    ref = synflow_scores(_deep_relu, p64, (1, 12))
    assert jax.tree.leaves(ref)[0].dtype == jnp.float64
  n = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(norm)])
  r = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(ref)])
  assert np.all(np.isfinite(n)) and np.all(np.isfinite(r))
  # Bias-free ReLU net: normalised scores = float64 scores times one positive constant.
  nz = r > 0
  ratio = n[nz] / r[nz]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-3)
  np.testing.assert_array_equal(n == 0, r == 0)


def _ref_synflow_masks(a, b, density, rounds):
  """Float64 numpy SynFlow for x @ A @ B with analytic scores and a global top-k."""
  ma, mb = np.ones(a.shape, bool), np.ones(b.shape, bool)
  n = a.size + b.size
  for k in range(rounds):
    aa, bb = np.abs(a) * ma, np.abs(b) * mb
    sa = aa * bb.sum(1)[None, :]
    sb = bb * aa.sum(0)[:, None]
    s = np.concatenate([sa.ravel(), sb.ravel()])
    el = np.concatenate([ma.ravel(), mb.ravel()])
    keep = int(np.floor(n * np.float64(np.float32(density) ** np.float32((k + 1) / rounds)) + 0.5))
    order = [i for i in np.argsort(-s, kind="stable") if el[i]][:max(keep, 1)]
    new = np.zeros(n, bool)
    new[order] = True
    ma, mb = new[:a.size].reshape(a.shape), new[a.size:].reshape(b.shape)
  return ma, mb


def test_synflow_masks_match_reference_and_jit():
  chex.clear_trace_counter()
  rng = np.random.default_rng(1)
  a = rng.normal(size=(6, 10)).astype(np.float32)
  b = rng.normal(size=(10, 4)).astype(np.float32)
  p = {"a": jnp.asarray(a), "b": jnp.asarray(b), "bias": jnp.ones(4)}

  def net(q, x):
    return x @ q["a"] @ q["b"]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, d):
    return synflow_masks(net, q, (1, 6), d, rounds=8)

  for d in (0.3, 0.1):
    m = f(p, d)
    with jax.enable_x64(True):
      m64 = synflow_masks(net, p, (1, 6), d, rounds=8)
    ra, rb = _ref_synflow_masks(a, b, d, 8)
    np.testing.assert_array_equal(m64["a"], ra)
    np.testing.assert_array_equal(m64["b"], rb)
    np.testing.assert_array_equal(m["a"], ra)
    np.testing.assert_array_equal(m["b"], rb)
    assert m["bias"] is None
    assert int(m["a"].sum() + m["b"].sum()) == int(np.floor(100 * np.float32(d) + 0.5))


def test_synflow_flax_linen():
  from flax import linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(4)(x)

  model = MLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 8)))["params"]
  m = synflow_masks(lambda p, x: model.apply({"params": p}, x), params, (1, 8), 0.2, rounds=5)
  assert m["Dense_0"]["bias"] is None and m["Dense_1"]["bias"] is None
  kept = int(m["Dense_0"]["kernel"].sum() + m["Dense_1"]["kernel"].sum())
  assert kept == round(0.2 * (8 * 16 + 16 * 4))


def test_doctests():
  res = doctest.testmod(scores, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
