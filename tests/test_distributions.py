"""Tests for sparsejax.core.distributions (uniform, ER, ERK, overrides)."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsejax.core import distributions
from sparsejax.core.distributions import (erdos_renyi, global_magnitude,
                                          global_normalized_magnitude, uniform)
from sparsejax.core.paths import path_str

LENET = {"fc1": {"kernel": jnp.zeros((784, 300)), "bias": jnp.zeros(300)},
         "fc2": {"kernel": jnp.zeros((300, 100)), "bias": jnp.zeros(100)},
         "fc3": {"kernel": jnp.zeros((100, 10)), "bias": jnp.zeros(10)}}
LENET_K = ("fc1", "fc2", "fc3")
CONV = {"conv1": {"kernel": jnp.zeros((3, 3, 3, 64)), "bias": jnp.zeros(64)},
        "conv2": {"kernel": jnp.zeros((3, 3, 64, 128)), "bias": jnp.zeros(128)},
        "dense": {"kernel": jnp.zeros((8192, 10)), "bias": jnp.zeros(10)}}
CONV_K = ("conv1", "conv2", "dense")


def _kernels(tree, names):
  return np.array([float(tree[n]["kernel"]) for n in names])


def _sizes(params, names):
  return np.array([params[n]["kernel"].size for n in names], float)


# ------------------------------------- ERK vectors (Evci et al. 2020, Mocanu et al. 2018)


@pytest.mark.parametrize("s, expected", [
    (0.90, (0.92043, 0.76981, 0.0)),
    (0.95, (0.96152, 0.88867, 0.08149)),
    (0.98, (0.98461, 0.95547, 0.63260)),
])
def test_erk_lenet_vectors(s, expected):
  out = erdos_renyi(LENET, s)
  got = _kernels(out, LENET_K)
  np.testing.assert_allclose(got, expected, atol=1e-5)
  for n in LENET_K:
    assert out[n]["bias"] is None
  n = _sizes(LENET, LENET_K)
  # Global sparsity exactly s (the reference floors s * N_l per layer, which is exact here).
  np.testing.assert_allclose(np.sum(got * n) / np.sum(n), s, atol=1e-7)


def test_erk_lenet_eps():
  out = erdos_renyi(LENET, 0.9)
  raw = (784 + 300) / (784 * 300)
  eps = (1.0 - float(out["fc1"]["kernel"])) / raw
  assert abs(eps - 17.264) < 1e-3
  raw2 = (300 + 100) / (300 * 100)
  assert abs((1.0 - float(out["fc2"]["kernel"])) / raw2 - eps) < 1e-3


@pytest.mark.parametrize("kernel, expected", [
    (True, (0.92153, 0.99501, 0.81403)),
    (False, (0.47860, 0.96498, 0.85040)),
])
def test_conv_vectors(kernel, expected):
  out = erdos_renyi(CONV, 0.9, kernel=kernel)
  np.testing.assert_allclose(_kernels(out, CONV_K), expected, atol=1e-5)
  n = _sizes(CONV, CONV_K)
  # floor(s * N_l) per layer: exact up to one element per layer.
  np.testing.assert_allclose(np.sum(_kernels(out, CONV_K) * n), 0.9 * n.sum(), atol=len(n))


# ---------------------------------------------------------------- traced path


@pytest.mark.parametrize("kernel", [True, False])
def test_traced_matches_python_and_traces_once(kernel):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(s):
    return erdos_renyi(CONV, s, kernel=kernel)

  for s in (0.5, 0.8, 0.9, 0.95, 0.99, 0.0):
    traced = f(jnp.float32(s))
    eager = erdos_renyi(CONV, s, kernel=kernel)
    for n in CONV_K:
      np.testing.assert_allclose(float(traced[n]["kernel"]), float(eager[n]["kernel"]), atol=2e-6)
      assert traced[n]["bias"] is None


def test_traced_lenet_redistribution():
  f = jax.jit(lambda s: erdos_renyi(LENET, s))
  for s, exp in ((0.9, (0.92043, 0.76981, 0.0)), (0.98, (0.98461, 0.95547, 0.63260))):
    np.testing.assert_allclose(_kernels(f(s), LENET_K), exp, atol=1e-5)


def test_uniform_traced_once():
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(s):
    return uniform(LENET, s)

  for s in (0.1, 0.7):
    out = f(s)
    np.testing.assert_allclose(_kernels(out, LENET_K), s, atol=1e-7)
    assert out["fc1"]["bias"] is None


# ---------------------------------------------------------------- properties


def _reference_erk(shapes, s, kernel, power):
  """Independent reference: densities by bisection on eps with capping at 1."""
  n = np.array([np.prod(sh) for sh in shapes], float)
  dims = [sh if kernel else sh[-2:] for sh in shapes]
  raw = np.array([(np.sum(d) / np.prod(d)) ** power for d in dims])
  target = np.sum(n - np.floor(s * n))  # kept weights in total

  def kept(eps):
    return np.sum(np.minimum(eps * raw, 1.0) * n)

  lo, hi = 0.0, 1.0 / raw.min() + 1.0
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if kept(mid) < target else (lo, mid)
  return 1.0 - np.minimum(hi * raw, 1.0)


shape_st = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.tuples(st.integers(1, 5), st.integers(1, 5), st.integers(1, 64), st.integers(1, 64)))


@given(shapes=st.lists(shape_st, min_size=1, max_size=5),
       s=st.floats(0.0, 0.995), kernel=st.booleans(), power=st.sampled_from([0.0, 0.5, 1.0, 2.0]))
def test_erk_property(shapes, s, kernel, power):
  params = {f"l{i}": jnp.zeros(sh) for i, sh in enumerate(shapes)}
  out = erdos_renyi(params, s, kernel=kernel, power=power)
  got = np.array([float(out[f"l{i}"]) for i in range(len(shapes))])
  n = np.array([np.prod(sh) for sh in shapes], float)
  assert np.all(got >= 0.0) and np.all(got < 1.0)
  # The free layers' kept count equals the target (continuous solution, no rounding to elements).
  np.testing.assert_allclose(np.sum((1 - got) * n), np.sum(n - np.floor(s * n)), rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(got, _reference_erk(shapes, s, kernel, power), atol=1e-5)


@given(s=st.floats(0.0, 0.99))
def test_power_zero_is_uniform(s):
  params = {"a": jnp.zeros((64, 32)), "b": jnp.zeros((3, 3, 8, 16))}
  out = erdos_renyi(params, s, power=0.0)
  n = np.array([64 * 32, 3 * 3 * 8 * 16], float)
  expected = 1.0 - np.sum(n - np.floor(s * n)) / n.sum()
  np.testing.assert_allclose([float(out["a"]), float(out["b"])], expected, atol=1e-6)


# ---------------------------------------------------------------- overrides / selection


def test_overrides_excluded_from_solve():
  out = erdos_renyi(LENET, 0.9, overrides={"fc3": 0.5})
  assert float(out["fc3"]["kernel"]) == 0.5
  n = _sizes(LENET, ("fc1", "fc2"))
  got = _kernels(out, ("fc1", "fc2"))
  np.testing.assert_allclose(np.sum(got * n) / n.sum(), 0.9, atol=1e-6)
  # The free leaves alone are solved as if fc3 did not exist.
  alone = erdos_renyi({"fc1": LENET["fc1"], "fc2": LENET["fc2"]}, 0.9)
  np.testing.assert_allclose(got, _kernels(alone, ("fc1", "fc2")), atol=1e-7)


def test_uniform_overrides_and_selection():
  sel = jax.tree.map(lambda x: x.ndim >= 2, LENET)
  sel["fc3"]["kernel"] = False
  out = uniform(LENET, 0.8, selection=sel, overrides={r"fc1/kernel$": 0.25})
  assert out["fc3"]["kernel"] is None and out["fc2"]["bias"] is None
  assert float(out["fc1"]["kernel"]) == 0.25
  assert np.isclose(float(out["fc2"]["kernel"]), 0.8)


def test_selection_can_be_a_mask_tree():
  masks = {"a": jnp.ones((4, 4), bool), "b": None}
  out = erdos_renyi({"a": jnp.zeros((4, 4)), "b": jnp.zeros((8, 8))}, 0.5, selection=masks)
  assert out["b"] is None and np.isclose(float(out["a"]), 0.5)


def test_flax_linen_and_nnx_params():
  from flax import linen as nn
  from flax import nnx

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(300)(x))
      x = nn.relu(nn.Dense(100)(x))
      return nn.Dense(10)(x)

  lp = MLP().init(jax.random.key(0), jnp.zeros((1, 784)))["params"]
  lout = erdos_renyi(lp, 0.9)
  np.testing.assert_allclose([float(lout[f"Dense_{i}"]["kernel"]) for i in range(3)],
                             (0.92043, 0.76981, 0.0), atol=1e-5)
  assert all(lout[f"Dense_{i}"]["bias"] is None for i in range(3))

  class NMLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(784, 300, rngs=rngs)
      self.fc2 = nnx.Linear(300, 100, rngs=rngs)
      self.fc3 = nnx.Linear(100, 10, rngs=rngs)

  state = nnx.state(NMLP(nnx.Rngs(0)), nnx.Param)
  nout = erdos_renyi(state, 0.9)
  flat = dict((jax.tree_util.keystr(k), v) for k, v in
              jax.tree_util.tree_flatten_with_path(nout, is_leaf=lambda x: x is None)[0])
  vals = {k: (None if v is None else float(v)) for k, v in flat.items()}
  kern = {k: v for k, v in vals.items() if "kernel" in k}
  bias = {k: v for k, v in vals.items() if "bias" in k}
  assert len(kern) == 3 and all(v is None for v in bias.values())
  np.testing.assert_allclose(sorted(kern.values()), sorted([0.92043, 0.76981, 0.0]), atol=1e-5)
  over = erdos_renyi(state, 0.9, overrides={"fc3": 0.3})
  oflat = {path_str(k): v for k, v in
           jax.tree_util.tree_flatten_with_path(over, is_leaf=lambda x: x is None)[0]}
  assert np.isclose(float(oflat["fc3/kernel"]), 0.3) and oflat["fc3/bias"] is None


# ---------------------------------------------------------------- global magnitude


def _two_scales():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"big": {"kernel": 10.0 * jax.random.normal(k1, (20, 10)), "bias": jnp.ones(10)},
          "small": {"kernel": jax.random.normal(k2, (10, 30))},
          "mid": (jax.random.normal(k3, (3, 3, 2, 4)),)}


@pytest.mark.parametrize("fn, normalize", [(global_magnitude, False),
                                           (global_normalized_magnitude, True)])
def test_global_distributions_match_prune_global(fn, normalize):
  from sparsejax.core.pruning import prune, prune_global
  chex.clear_trace_counter()
  params = _two_scales()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(p, s):
    return fn(p, s)

  collapsed = 0
  for s in (0.5, 0.9):
    tree = f(params, s)
    assert tree["big"]["bias"] is None
    _, m_global = prune_global(params, None, s, normalize=normalize)
    _, m_leaf = prune(params, None, tree)
    for path in (("big", "kernel"), ("small", "kernel"), ("mid", 0)):
      g, l = m_global[path[0]][path[1]], m_leaf[path[0]][path[1]]
      if not bool(g.any()):  # layer collapse: the per-leaf tree keeps the single best weight
        assert int(l.sum()) == 1 and np.isclose(float(tree[path[0]][path[1]]), 1 - 1 / g.size)
        assert not normalize  # only raw global magnitude collapses a low-magnitude leaf here
        collapsed += 1
      else:
        chex.assert_trees_all_equal(l, g)
    # numpy reference of the per-leaf counts
    leaves = [np.abs(np.asarray(x)) for x in (params["big"]["kernel"], params["mid"][0],
                                               params["small"]["kernel"])]
    if normalize:
      leaves = [x / np.linalg.norm(x) for x in leaves]
    flat = np.concatenate([x.ravel() for x in leaves])
    thr = np.sort(flat)[::-1][int(np.floor(flat.size * (1 - s) + 0.5)) - 1]
    for x, got in zip(leaves, (tree["big"]["kernel"], tree["mid"][0], tree["small"]["kernel"])):
      np.testing.assert_allclose(float(got), 1 - max(np.sum(x >= thr), 1) / x.size, atol=1e-6)
  assert collapsed == (0 if normalize else 2)  # raw, s=0.9: "mid" and "small" (std 1 vs 10) collapse
  raw, nrm = global_magnitude(params, 0.9), global_normalized_magnitude(params, 0.9)
  assert float(raw["big"]["kernel"]) < float(nrm["big"]["kernel"])  # raw favours large weights


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("fn", [uniform, erdos_renyi])
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(fn, bad):
  with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
    fn(LENET, bad)


def test_override_matching_nothing_lists_paths():
  with pytest.raises(ValueError, match=r"'nope' matches no selected leaf.*fc1/kernel"):
    erdos_renyi(LENET, 0.9, overrides={"nope": 0.5})


def test_override_matching_only_dense_leaf():
  with pytest.raises(ValueError, match=r"matches no selected leaf"):
    uniform(LENET, 0.9, overrides={"fc1/bias": 0.5})


def test_two_overrides_same_leaf():
  with pytest.raises(ValueError, match=r"leaf 'fc2/kernel' matches two override patterns"):
    erdos_renyi(LENET, 0.9, overrides={"fc2": 0.5, "kernel": 0.1})


def test_bad_override_value_names_leaf():
  with pytest.raises(ValueError, match=r"fc3/kernel.*sparsity must be in \[0, 1\)"):
    erdos_renyi(LENET, 0.9, overrides={"fc3": 1.0})


def test_overrides_must_be_mapping():
  with pytest.raises(TypeError, match="overrides must be a mapping"):
    uniform(LENET, 0.9, overrides=[("fc1", 0.5)])


def test_nonscalar_sparsity():
  with pytest.raises(ValueError, match="scalar"):
    uniform(LENET, np.array([0.5, 0.5]))


def test_doctests():
  res = doctest.testmod(distributions, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
