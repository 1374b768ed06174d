"""sparsejax.core.pruning.random_prune: exact-count random masks from a keyed shuffle (no selection)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st  # noqa: I001

from sparsejax.core import distributions, pruning
from sparsejax.core.selection import num_to_keep
import sparsejax.optim as so


@pytest.mark.parametrize("n", [1, 2, 3, 97, 4099])
def test_shuffled_index_is_a_permutation(n):
  rng = np.random.default_rng(n)
  w0, w1 = (jnp.asarray(rng.integers(0, 2**32, (3, pruning._SHUFFLE_ROUNDS)), jnp.uint32)
            for _ in range(2))
  x = np.asarray(jax.jit(pruning._shuffled_index, static_argnums=(0, 1))(n, 3, w0 % jnp.uint32(n), w1))
  for row in x:
    assert sorted(row.tolist()) == list(range(n))


@settings(max_examples=10, deadline=None)
@given(shape=st.sampled_from([(1, 1), (3, 7), (16, 16), (5, 4, 3), (97,)]),
       sparsity=st.floats(0.0, 0.99), seed=st.integers(0, 1000))
def test_counts_are_exact(shape, sparsity, seed):
  p = {"w": jnp.ones(shape), "b": jnp.ones(3)}
  new_p, m = pruning.random_prune(p, sparsity, jax.random.key(seed),
                                  selection={"w": True, "b": False})
  n = int(np.prod(shape))
  assert int(m["w"].sum()) == int(num_to_keep(n, 1.0 - sparsity))
  assert m["b"] is None
  np.testing.assert_array_equal(np.asarray(new_p["w"]), np.asarray(m["w"], np.float32))


def test_uniform_over_positions_and_pairs():
  """Every position kept with probability k/n, every pair with k(k-1)/(n(n-1)) (4000 keys)."""
  f = jax.jit(jax.vmap(lambda k: pruning.random_prune({"w": jnp.ones((8, 8))}, 0.75, k)[1]["w"]))
  ms = np.asarray(f(jax.random.split(jax.random.key(1), 4000))).reshape(4000, 64).astype(np.float64)
  freq = ms.mean(0)
  sd = np.sqrt(0.25 * 0.75 / 4000)
  assert np.abs(freq - 0.25).max() < 4.5 * sd
  pair = (ms.T @ ms / 4000)[~np.eye(64, dtype=bool)]
  expected = 16 * 15 / (64 * 63)
  assert np.abs(pair - expected).max() < 4.5 * np.sqrt(expected * (1 - expected) / 4000)
  assert abs(pair.mean() - expected) < 1e-9 + 1e-3  # exact counts fix the mean of the pairs


def test_deterministic_per_key_and_jit_equals_eager():
  p = {"a": jnp.ones((32, 16)), "b": jnp.ones((16, 32)), "c": jnp.ones((7, 9))}
  a = pruning.random_prune(p, 0.8, jax.random.key(0))[1]
  b = jax.jit(lambda p, k: pruning.random_prune(p, 0.8, k)[1])(p, jax.random.key(0))
  c = pruning.random_prune(p, 0.8, jax.random.key(1))[1]
  for name in p:
    np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]))
  assert any(not np.array_equal(np.asarray(a[n]), np.asarray(c[n])) for n in p)
  # leaves of one size (a and b) get different masks
  assert not np.array_equal(np.asarray(a["a"]).ravel(), np.asarray(a["b"]).ravel())


def test_per_leaf_and_traced_sparsity():
  p = {"a": jnp.ones((10, 10)), "b": jnp.ones((4, 5))}
  m = pruning.random_prune(p, {"a": 0.9, "b": None}, jax.random.key(2))[1]
  assert int(m["a"].sum()) == 10 and m["b"] is None
  traced = jax.jit(lambda s: pruning.random_prune(p, s, jax.random.key(2))[1])(jnp.float32(0.5))
  assert int(traced["a"].sum()) == 50 and int(traced["b"].sum()) == 10


def test_bad_sparsity_names_the_leaf():
  p = {"a": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match="'a'"):
    pruning.random_prune(p, 1.5, jax.random.key(0))
  with pytest.raises(TypeError, match="string"):
    pruning.random_prune(p, "0.5", jax.random.key(0))


@pytest.mark.parametrize("make, erk", [
    (lambda: so.static_sparse(optax.sgd(0.1), sparsity=0.8), True),
    (lambda: so.rigl(optax.sgd(0.1), sparsity=0.8, end_step=1000), True),
    (lambda: so.set_training(optax.sgd(0.1), sparsity=0.8, end_step=1000, distribution="er"), False),
])
def test_random_init_masks_have_the_distributions_counts(make, erk):
  p = {"conv": jnp.ones((3, 3, 8, 16)), "fc": jnp.ones((256, 64)), "out": jnp.ones((64, 10)),
       "bias": jnp.ones(10)}
  m = so.get_masks(make().init(p))
  dens = distributions.erdos_renyi(p, 0.8, kernel=erk,
                                   selection={"conv": True, "fc": True, "out": True, "bias": False})
  want = {k: int(num_to_keep(p[k].size, 1.0 - float(dens[k]))) for k in ("conv", "fc", "out")}
  assert {k: int(m[k].sum()) for k in want} == want
  assert m["bias"] is None
