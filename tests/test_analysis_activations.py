"""sparsejax.analysis activation capture, statistics, top-k activation and CETT."""

import doctest
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax import analysis


class _NNXMLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(3, 6, rngs=rngs)
    self.fc2 = nnx.Linear(6, 2, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.fc1(x))
    self.sow(nnx.Intermediate, "hidden", h)
    return self.fc2(h)


class _LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(6, name="fc1")(x))
    self.sow("intermediates", "hidden", h)
    return nn.Dense(2, name="fc2")(h)


def test_capture_nnx_module_outputs_and_sown():
  m = _NNXMLP(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (5, 3))
  out, acts = analysis.capture_activations(m, x)
  assert {"fc1", "fc2", "hidden"} <= set(acts)
  pre = x @ m.fc1.kernel[...] + m.fc1.bias[...]
  np.testing.assert_allclose(acts["fc1"], pre, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(acts["hidden"], jax.nn.relu(pre), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out, jax.nn.relu(pre) @ m.fc2.kernel[...] + m.fc2.bias[...], rtol=1e-5, atol=1e-6)
  _, sel = analysis.capture_activations(m, x, include=r"^fc1$", transform=jax.nn.relu)
  assert list(sel) == ["fc1"]
  np.testing.assert_allclose(sel["fc1"], acts["hidden"], rtol=1e-6, atol=1e-6)
  # Under nnx.jit (a closed-over NNX module cannot be mutated from inside jax.jit).
  got = nnx.jit(lambda m, x: analysis.capture_activations(m, x, include="hidden")[1])(m, x)
  np.testing.assert_allclose(got["hidden"], acts["hidden"], rtol=1e-6, atol=1e-6)


def test_capture_linen_module_outputs_and_sown():
  model = _LinenMLP()
  x = jax.random.normal(jax.random.key(1), (5, 3))
  v = model.init(jax.random.key(0), x)
  _, acts = analysis.capture_activations(model, x, variables=v, include=["fc1", "hidden"])
  assert set(acts) == {"fc1", "hidden"}
  p = v["params"]["fc1"]
  np.testing.assert_allclose(acts["fc1"], x @ p["kernel"] + p["bias"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(acts["hidden"], jax.nn.relu(acts["fc1"]), rtol=1e-6)


def test_capture_errors():
  m = _NNXMLP(nnx.Rngs(0))
  with pytest.raises(ValueError, match="matches no captured tensor.*fc1"):
    analysis.capture_activations(m, jnp.ones((2, 3)), include="attn")
  with pytest.raises(ValueError, match="variables="):
    analysis.capture_activations(_LinenMLP(), jnp.ones((2, 3)))
  with pytest.raises(TypeError, match="nnx.Module or linen.Module"):
    analysis.capture_activations(lambda x: x, jnp.ones(2))


def test_statistics_hand_computed():
  a = jnp.array([[[0., 1., 0., 0.], [2., 3., 0., 0.]], [[0., 0., 0., 4.], [0., 5., 0., 0.]]])  # (2, 2, 4)
  assert float(analysis.nonzero_fraction(a)) == pytest.approx(5 / 16)
  np.testing.assert_allclose(analysis.nonzero_per_token(a), [[0.25, 0.5], [0.25, 0.25]])
  np.testing.assert_allclose(analysis.nonzero_per_neuron(a), [0.25, 0.75, 0.0, 0.25])
  assert int(analysis.dead_neurons(a)) == 1
  assert float(analysis.nonzero_fraction(a, threshold=2.5)) == pytest.approx(3 / 16)
  st_ = analysis.activation_sparsity({"l0": a, "l1": -a})
  assert set(st_) == {"l0", "l1"} and int(st_["l1"].dead_neurons) == 1
  assert float(st_["l1"].nonzero_fraction) == pytest.approx(5 / 16)


@settings(max_examples=10)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_topk_activation_keeps_exactly_k_largest(k, seed):
  x = jax.random.normal(jax.random.key(seed), (3, 2, 6))
  y = analysis.topk_activation(x, k)
  kept = y != 0
  assert (kept.sum(-1) == k).all()
  ref = np.sort(np.asarray(x), -1)[..., -k][..., None]
  np.testing.assert_array_equal(kept, np.asarray(x) >= ref)
  np.testing.assert_array_equal(np.where(kept, x, 0), y)


def test_topk_activation_ties_gradient_and_errors():
  y = analysis.topk_activation(jnp.array([[1., 1., 1., 0.]]), 2)
  np.testing.assert_array_equal(y, [[1., 1., 0., 0.]])
  g = jax.grad(lambda x: analysis.topk_activation(x, 1).sum())(jnp.array([[1., 3., 2.]]))
  np.testing.assert_array_equal(g, [[0., 1., 0.]])
  np.testing.assert_array_equal(analysis.topk_activation(jnp.array([[-5., 1.]]), 1, by_magnitude=True), [[-5., 0.]])
  with pytest.raises(ValueError, match=r"k must be .* \[1, 3\]"):
    analysis.topk_activation(jnp.ones((2, 3)), 4)


def _cett_ref(a, w, tau):
  n = np.asarray(analysis.neuron_contributions(a, w))  # float32 contributions decide ties at tau
  a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
  full = np.linalg.norm(a @ w, axis=-1)
  tail = np.linalg.norm(np.where(n <= tau, a, 0) @ w, axis=-1)
  return np.mean(np.where(full > 0, tail / np.where(full > 0, full, 1), 0))


def test_cett_against_float64_reference_and_threshold():
  a = jax.nn.gelu(jax.random.normal(jax.random.key(0), (2, 64, 32)))
  w = jax.random.normal(jax.random.key(1), (32, 8))
  n = np.asarray(analysis.neuron_contributions(a, w))
  for tau in [0.0, float(np.median(n)), float(n.max())]:
    assert float(analysis.cett(a, w, tau)) == pytest.approx(_cett_ref(a, w, tau), rel=1e-5, abs=1e-6)
  assert float(analysis.cett(a, w, float(n.max()))) == pytest.approx(1.0)
  find = jax.jit(analysis.cett_threshold)
  for target in [0.05, 0.3]:
    tau = float(find(a, w, target))
    assert _cett_ref(a, w, tau) <= target + 1e-5
    # The next contribution above tau pushes CETT over the target: tau is the largest threshold.
    nxt = n[n > tau].min()
    assert _cett_ref(a, w, nxt) > target
    assert float(analysis.activation_ratio(a, w, tau)) == pytest.approx(np.mean(n > tau))
  trunc = analysis.truncate_activations(a, w, tau)
  np.testing.assert_array_equal(trunc != 0, (n > tau) & (np.asarray(a) != 0))
  with pytest.raises(ValueError, match="d_ff"):
    analysis.cett(a, w.T, 0.1)


def test_cett_sweep_and_ppl_point():
  a = jax.nn.relu(jax.random.normal(jax.random.key(0), (64, 32)))
  w = jax.random.normal(jax.random.key(1), (32, 8))
  y = a @ w

  def ppl(taus):  # a perplexity-like metric: grows with the truncation error
    err = jnp.mean(jnp.sum((analysis.truncate_activations(a, w, taus["ffn"]) @ w - y) ** 2, -1))
    return jnp.exp(err / jnp.mean(jnp.sum(y ** 2, -1)))

  c = analysis.cett_sweep(ppl, {"ffn": (a, w)}, [0.0, 0.05, 0.1, 0.2, 0.4])
  assert np.all(np.diff(c.activation_ratio) <= 0) and np.all(np.diff(c.metric) >= -1e-6)
  assert c.metric[0] == pytest.approx(1.0)
  cett_p, ratio_p = analysis.ppl_p_point(c, 1.0)
  i = list(c.cett).index(cett_p)
  assert c.metric[i] <= c.metric[0] * 1.01 and ratio_p == c.activation_ratio[i]
  assert all(c.metric[j] > c.metric[0] * 1.01 for j in range(len(c.cett)) if c.activation_ratio[j] < ratio_p)
  with pytest.raises(ValueError, match="CETT 0"):
    analysis.ppl_p_point(c._replace(cett=c.cett + 0.01), 1.0)


@pytest.mark.parametrize("name", ["activations", "cett", "plotting"])
def test_doctests(name):
  pytest.importorskip("matplotlib")
  res = doctest.testmod(importlib.import_module(f"sparsejax.analysis.{name}"), optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
