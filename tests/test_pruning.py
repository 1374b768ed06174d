"""Tests for sparsejax.core.pruning: prune, prune_global, drop_and_grow, regrow."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsejax.core import pruning
from sparsejax.core.distributions import erdos_renyi
from sparsejax.core.patterns import NM, Block, Channel
from sparsejax.core.pruning import drop_and_grow, prune, prune_global, regrow
from sparsejax.core.scores import magnitude, random_scores


# ---------------------------------------------------------------- references


def ref_k(size, sparsity):
  """clip(round-half-up(size * d), 1, size) with d the float32 density used by the library."""
  d = np.float64(np.float32(1.0) - np.float32(sparsity))
  return int(min(max(np.floor(size * d + 0.5), 1), size))


def ref_topk(scores, k, eligible=None):
  """Numpy top-k with ties to the lower flat index, among eligible positions."""
  s = np.asarray(scores, np.float64).ravel()
  el = np.ones(s.shape, bool) if eligible is None else np.asarray(eligible).ravel()
  order = [i for i in np.argsort(-s, kind="stable") if el[i]]
  out = np.zeros(s.shape, bool)
  out[order[:k]] = True
  return out.reshape(np.shape(scores))


def mixed_params(key=0):
  ks = jax.random.split(jax.random.key(key), 5)
  return {
      "dense": {"kernel": jax.random.normal(ks[0], (32, 16)), "bias": jnp.ones(16)},
      "conv": {"kernel": jax.random.normal(ks[1], (3, 3, 4, 8))},
      "norm": {"scale": jnp.full((16,), 2.0)},
      "pair": (jax.random.normal(ks[2], (16, 8)), jax.random.normal(ks[3], (8,))),
  }


KERNELS = (("dense", "kernel"), ("conv", "kernel"))


def get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


# ---------------------------------------------------------------- prune


@given(shape=st.sampled_from([(1, 1), (3, 5), (12, 12), (7, 2)]), s=st.floats(0.0, 0.99),
       seed=st.integers(0, 2**16), tie_range=st.sampled_from([2, 5, 1000]))
def test_prune_matches_reference(shape, s, seed, tie_range):
  rows, cols = shape  # a few shapes: one compile each
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(size=(rows, cols)), jnp.float32)
  sc = jnp.asarray(rng.integers(0, tie_range, size=(rows, cols)), jnp.float32)  # many ties
  params = {"w": w, "b": jnp.arange(cols, dtype=jnp.float32)}
  new_p, m = prune(params, {"w": sc, "b": None}, s)
  expected = ref_topk(sc, ref_k(rows * cols, s))
  np.testing.assert_array_equal(np.asarray(m["w"]), expected)
  np.testing.assert_array_equal(np.asarray(new_p["w"]), np.where(expected, np.asarray(w), 0.0))
  assert m["b"] is None and new_p["b"] is params["b"]


def test_prune_mixed_tree_counts_and_exact_zeros():
  params = mixed_params()
  new_p, m = prune(params, None, 0.75)
  for path in KERNELS + (("pair", 0),):
    leaf, mask = get(params, path), get(m, path)
    assert int(mask.sum()) == ref_k(leaf.size, 0.75)
    np.testing.assert_array_equal(mask, ref_topk(np.abs(leaf), ref_k(leaf.size, 0.75)))
    assert bool(jnp.all(get(new_p, path)[~mask] == 0))
    np.testing.assert_array_equal(get(new_p, path)[mask], leaf[mask])
  for path in (("dense", "bias"), ("norm", "scale"), ("pair", 1)):
    assert get(m, path) is None
    np.testing.assert_array_equal(get(new_p, path), get(params, path))


def test_prune_existing_masks_only_kept_compete():
  params = mixed_params(1)
  _, m1 = prune(params, None, 0.5)
  # Rank with scores that favour the *removed* weights: they must not come back.
  inv = jax.tree.map(lambda x: -jnp.abs(x), params)
  _, m2 = prune(params, inv, 0.75, masks=m1)
  for path in KERNELS:
    a, b = np.asarray(get(m1, path)), np.asarray(get(m2, path))
    assert not np.any(b & ~a)
    leaf = get(params, path)
    assert b.sum() == ref_k(leaf.size, 0.75)
    np.testing.assert_array_equal(b, ref_topk(-np.abs(leaf), ref_k(leaf.size, 0.75), a))
  # Asking for more than remain keeps the mask unchanged.
  _, m3 = prune(params, None, 0.1, masks=m2)
  for path in KERNELS:
    np.testing.assert_array_equal(get(m3, path), get(m2, path))


def test_prune_with_erk_tree_and_overrides():
  params = mixed_params(2)
  sp = erdos_renyi(params, 0.8, overrides={"conv": 0.5})
  new_p, m = prune(params, None, sp)
  for path in KERNELS + (("pair", 0),):
    s = float(get(sp, path))
    assert int(get(m, path).sum()) == ref_k(get(params, path).size, s)
  assert int(m["conv"]["kernel"].sum()) == 144
  assert m["dense"]["bias"] is None and new_p["norm"]["scale"] is params["norm"]["scale"]


def test_prune_jit_traced_sparsity_traces_once():
  chex.clear_trace_counter()
  params = mixed_params(3)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(p, s):
    return prune(p, magnitude(p), s)

  for s in (0.1, 0.5, 0.9, 0.97):
    new_p, m = f(params, jnp.float32(s))
    ref_p, ref_m = prune(params, None, s)
    chex.assert_trees_all_equal(m, ref_m)
    chex.assert_trees_all_equal(new_p, ref_p)


def test_prune_jit_per_leaf_tree():
  chex.clear_trace_counter()
  params = mixed_params(4)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(p, s):
    return prune(p, None, erdos_renyi(p, s))

  for s in (0.6, 0.9):
    _, m = f(params, s)
    _, ref_m = prune(params, None, erdos_renyi(params, s))
    chex.assert_trees_all_equal(m, ref_m)


def test_prune_nm_pattern():
  params = mixed_params(5)
  new_p, m = prune(params, None, None, pattern=NM(2, 4))
  k = np.asarray(m["dense"]["kernel"])  # (32, 16): groups of 4 along axis 0
  assert np.all(k.reshape(8, 4, 16).sum(axis=1) == 2)
  c = np.asarray(m["conv"]["kernel"])  # (3, 3, 4, 8): groups along the input axis
  assert np.all(c.reshape(3, 3, 1, 4, 8).sum(axis=3) == 2)
  w = np.abs(np.asarray(params["dense"]["kernel"])).reshape(8, 4, 16)
  kept_min = np.where(k.reshape(8, 4, 16), w, np.inf).min(axis=1)
  dropped_max = np.where(~k.reshape(8, 4, 16), w, -np.inf).max(axis=1)
  assert np.all(kept_min >= dropped_max)
  _, m2 = prune(params, None, 0.5, pattern=NM(2, 4))
  chex.assert_trees_all_equal(m, m2)
  assert bool(jnp.all(new_p["dense"]["kernel"][~m["dense"]["kernel"]] == 0))


def test_prune_block_and_channel_patterns():
  params = {"w": jax.random.normal(jax.random.key(0), (8, 12)), "b": jnp.zeros(12)}
  _, m = prune(params, None, 0.5, pattern=Block(2, 4))
  blocks = np.asarray(m["w"]).reshape(4, 2, 3, 4)
  assert np.all((blocks.all(axis=(1, 3))) | (~blocks.any(axis=(1, 3))))
  assert int(blocks.all(axis=(1, 3)).sum()) == 6
  _, mc = prune(params, None, 0.75, pattern=Channel())
  cols = np.asarray(mc["w"]).all(axis=0)
  assert cols.sum() == 3 and np.all(np.asarray(mc["w"]).any(axis=0) == cols)
  col_norm = np.abs(np.asarray(params["w"])).sum(axis=0)
  np.testing.assert_array_equal(cols, ref_topk(col_norm, 3))


def test_prune_global_raw_and_normalized():
  params = mixed_params(6)
  leaves = [np.abs(np.asarray(get(params, p))) for p in KERNELS + (("pair", 0),)]
  # jax.tree order: conv/kernel, dense/kernel, pair/0
  order = [("conv", "kernel"), ("dense", "kernel"), ("pair", 0)]
  flat = np.concatenate([np.abs(np.asarray(get(params, p))).ravel() for p in order])
  n = flat.size
  for normalize in (False, True):
    if normalize:
      flat = np.concatenate([(np.abs(np.asarray(get(params, p))) /
                              np.linalg.norm(np.asarray(get(params, p)))).ravel() for p in order])
    new_p, m = prune_global(params, None, 0.8, normalize=normalize)
    expected = ref_topk(flat.astype(np.float32), ref_k(n, 0.8))
    got = np.concatenate([np.asarray(get(m, p)).ravel() for p in order])
    np.testing.assert_array_equal(got, expected)
    assert m["dense"]["bias"] is None and m["pair"][1] is None
    for p in order:
      assert bool(jnp.all(get(new_p, p)[~get(m, p)] == 0))
  del leaves


def test_prune_global_with_masks_and_jit():
  chex.clear_trace_counter()
  params = mixed_params(7)
  _, m1 = prune_global(params, None, 0.5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(p, m, s):
    return prune_global(p, jax.tree.map(lambda x: -jnp.abs(x), p), s, masks=m)

  order = [("conv", "kernel"), ("dense", "kernel"), ("pair", 0)]
  for s in (0.6, 0.9):
    _, m2 = f(params, m1, s)
    sc = np.concatenate([-np.abs(np.asarray(get(params, p))).ravel() for p in order])
    el = np.concatenate([np.asarray(get(m1, p)).ravel() for p in order])
    expected = ref_topk(sc, ref_k(sc.size, s), el)
    got = np.concatenate([np.asarray(get(m2, p)).ravel() for p in order])
    np.testing.assert_array_equal(got, expected)


def test_ties_across_leaves_go_to_earlier_leaf():
  params = {"a": jnp.ones((2, 2)), "b": jnp.ones((2, 2))}
  _, m = prune_global(params, None, 0.5)
  assert m["a"].all() and not m["b"].any()


# ---------------------------------------------------------------- drop and grow


def ref_drop_grow(m, w_scores, g_scores, f):
  m = np.asarray(m)
  n_active = int(m.sum())
  n_drop = int(np.floor(n_active * f))
  kept = ref_topk(w_scores, n_active - n_drop, m)
  grow = ref_topk(g_scores, n_drop, ~kept)
  return kept, grow


@given(seed=st.integers(0, 2**16), density=st.floats(0.05, 0.95), j=st.integers(0, 64),
       tie_range=st.sampled_from([3, 1000]))
def test_drop_and_grow_property(seed, density, j, tie_range):
  f = j / 64.0  # exactly representable: floor(n * f) is unambiguous
  rng = np.random.default_rng(seed)
  params = {"w": jnp.asarray(rng.normal(size=(10, 7)), jnp.float32), "b": jnp.ones(7)}
  masks0 = {"w": jnp.asarray(ref_topk(rng.random((10, 7)), max(1, int(70 * density)))), "b": None}
  params = {"w": jnp.where(masks0["w"], params["w"], 0.0), "b": params["b"]}
  ds = {"w": jnp.asarray(rng.integers(0, tie_range, (10, 7)), jnp.float32), "b": None}
  gs = {"w": jnp.asarray(rng.integers(0, tie_range, (10, 7)), jnp.float32), "b": None}
  new_p, new_m, grown = drop_and_grow(params, masks0, ds, gs, f)
  kept, grow = ref_drop_grow(masks0["w"], ds["w"], gs["w"], f)
  np.testing.assert_array_equal(new_m["w"], kept | grow)
  np.testing.assert_array_equal(grown["w"], grow)
  assert int(new_m["w"].sum()) == int(masks0["w"].sum())  # constant nnz
  np.testing.assert_array_equal(new_p["w"], np.where(kept, params["w"], 0.0))
  assert bool(jnp.all(new_p["w"][grow] == 0))
  assert new_m["b"] is None and grown["b"] is None and new_p["b"] is params["b"]


@given(seed=st.integers(0, 2**30), j=st.integers(1, 63))
def test_set_update_deterministic_for_fixed_key(seed, j):
  params = {"w": jax.random.normal(jax.random.key(0), (12, 8)), "b": jnp.ones(8)}
  masks = {"w": jnp.abs(params["w"]) > 0.7, "b": None}
  params = {"w": jnp.where(masks["w"], params["w"], 0.0), "b": params["b"]}
  key = jax.random.key(seed)
  a = drop_and_grow(params, masks, None, random_scores(params, key), j / 64)
  b = drop_and_grow(params, masks, None, random_scores(params, key), j / 64)
  chex.assert_trees_all_equal(a, b)
  assert int(a[1]["w"].sum()) == int(masks["w"].sum())
  assert int(a[2]["w"].sum()) == int(np.floor(int(masks["w"].sum()) * j / 64))


def test_none_param_leaves_are_ignored():
  params = {"w": jnp.arange(8.0).reshape(2, 4), "opt": None, "b": jnp.ones(4)}
  new_p, m = prune(params, None, 0.5)
  assert m["opt"] is None and new_p["opt"] is None and m["b"] is None
  assert m["w"].tolist() == [[False, False, False, False], [True, True, True, True]]
  _, m2, _ = drop_and_grow(new_p, m, None, magnitude(new_p), 0.25)
  assert int(m2["w"].sum()) == 4


def test_just_dropped_positions_can_regrow():
  params = {"w": jnp.array([5.0, 0.1, 3.0, 0.0])}
  masks = {"w": jnp.array([True, True, True, False])}
  grow = {"w": jnp.array([0.0, 9.0, 0.0, 1.0])}  # the dropped position 1 has the top grow score
  new_p, new_m, grown = drop_and_grow(params, masks, None, grow, 1 / 3)
  assert new_m["w"].tolist() == [True, True, True, False]
  assert grown["w"].tolist() == [False, True, False, False]
  assert new_p["w"].tolist() == [5.0, 0.0, 3.0, 0.0]  # grown back at 0


def test_drop_and_grow_set_determinism_and_jit():
  chex.clear_trace_counter()
  params = mixed_params(8)
  del params["pair"]  # two masked leaves are enough here (fewer compiles)
  _, masks = prune(params, None, 0.8)
  params = jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0), params, masks,
                        is_leaf=lambda x: x is None)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, m, key, frac):
    return drop_and_grow(p, m, None, random_scores(p, key), frac)

  a = step(params, masks, jax.random.key(1), 0.3)
  b = step(params, masks, jax.random.key(1), 0.3)
  c = step(params, masks, jax.random.key(2), 0.25)
  chex.assert_trees_all_equal(a, b)
  assert any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a[1]), jax.tree.leaves(c[1])))
  for path in KERNELS:
    n0 = int(get(masks, path).sum())
    assert int(get(a[1], path).sum()) == n0 == int(get(c[1], path).sum())
    assert int(get(a[2], path).sum()) == int(np.floor(n0 * np.float32(0.3)))
  eager = drop_and_grow(params, masks, None, random_scores(params, jax.random.key(1)), 0.3)
  chex.assert_trees_all_equal(a, eager)


def test_bfloat16_params_keep_dtype():
  params = {"w": jax.random.normal(jax.random.key(0), (8, 8)).astype(jnp.bfloat16),
            "b": jnp.ones(8, jnp.bfloat16)}
  new_p, m = prune(params, None, 0.75)
  assert new_p["w"].dtype == jnp.bfloat16 and int(m["w"].sum()) == 16
  np.testing.assert_array_equal(m["w"], ref_topk(np.abs(np.asarray(params["w"], np.float32)), 16))
  p2, m2, g2 = drop_and_grow(new_p, m, None, random_scores(new_p, jax.random.key(0)), 0.5)
  assert p2["w"].dtype == jnp.bfloat16 and int(m2["w"].sum()) == 16 and int(g2["w"].sum()) == 8


def test_drop_and_grow_per_leaf_fraction_tree():
  params = mixed_params(9)
  _, masks = prune(params, None, 0.5)
  frac = jax.tree.map(lambda m: None if m is None else 0.5, masks, is_leaf=lambda x: x is None)
  frac["conv"]["kernel"] = 0.0
  _, new_m, grown = drop_and_grow(params, masks, None, magnitude(params), frac)
  chex.assert_trees_all_equal(new_m["conv"]["kernel"], masks["conv"]["kernel"])
  assert not bool(grown["conv"]["kernel"].any())
  assert int(grown["dense"]["kernel"].sum()) == int(masks["dense"]["kernel"].sum()) // 2


def test_regrow_count_and_fraction():
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "b": jnp.ones(5)}
  _, masks = prune(params, None, 0.8)
  sc = {"w": jnp.asarray(rng.random((6, 5)), jnp.float32), "b": None}
  new_p, new_m, grown = regrow(params, masks, sc, 4)
  np.testing.assert_array_equal(grown["w"], ref_topk(sc["w"], 4, ~np.asarray(masks["w"])))
  np.testing.assert_array_equal(new_m["w"], np.asarray(masks["w"]) | np.asarray(grown["w"]))
  assert bool(jnp.all(new_p["w"][grown["w"]] == 0))
  _, m_f, g_f = regrow(params, masks, sc, 0.5)
  assert int(g_f["w"].sum()) == int(masks["w"].sum()) // 2
  _, m_all, _ = regrow(params, masks, sc, 1000)  # clipped to the inactive count
  assert bool(m_all["w"].all())
  f = jax.jit(lambda p, m, n: regrow(p, m, sc, n))
  chex.assert_trees_all_equal(f(params, masks, jnp.int32(4))[1], new_m)


# ---------------------------------------------------------------- flax models


def test_flax_linen_model():
  from flax import linen as nn

  class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.LayerNorm()(x)
      x = x.reshape((x.shape[0], -1))
      return nn.Dense(10)(x)

  model = CNN()
  x = jnp.ones((2, 8, 8, 1))
  params = model.init(jax.random.key(0), x)["params"]
  new_p, m = jax.jit(lambda p, s: prune(p, None, erdos_renyi(p, s)))(params, 0.9)
  assert m["LayerNorm_0"]["scale"] is None and m["Conv_0"]["bias"] is None
  total = sum(x.size for x in jax.tree.leaves(m))
  kept = sum(int(x.sum()) for x in jax.tree.leaves(m))
  assert abs(1 - kept / total - 0.9) < 2e-3
  y = model.apply({"params": new_p}, x)
  assert y.shape == (2, 10) and bool(jnp.all(jnp.isfinite(y)))
  dense_model_out = model.apply({"params": jax.tree.map(
      lambda p, mm: p if mm is None else p * mm, params, m, is_leaf=lambda z: z is None)}, x)
  np.testing.assert_allclose(y, dense_model_out, rtol=1e-6)


def test_flax_nnx_model_drop_and_grow():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(12, 16, rngs=rngs)
      self.norm = nnx.LayerNorm(16, rngs=rngs)
      self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
      return self.fc2(self.norm(nnx.relu(self.fc1(x))))

  model = MLP(nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  new_state, masks = prune(state, None, 0.5)
  x = jnp.ones((3, 12))
  grads = nnx.grad(lambda mdl: jnp.sum(mdl(x) ** 2))(nnx.merge(graphdef, new_state))
  gstate = nnx.state(grads, nnx.Param)
  from sparsejax.core.scores import gradient_magnitude
  p2, m2, grown = jax.jit(drop_and_grow)(new_state, masks, None, gradient_magnitude(gstate), 0.25)
  new_paths = dict(zip(*pruning._flat(m2)[0:2]))
  old_paths = dict(zip(*pruning._flat(masks)[0:2]))
  # NNX masks live under the usual paths (trailing "value" dropped); only kernels are masked.
  assert {k for k, v in old_paths.items() if v is not None} == {"fc1/kernel", "fc2/kernel"}
  assert int(new_paths["fc1/kernel"].sum()) == int(old_paths["fc1/kernel"].sum()) == 96
  assert int(jax.tree.leaves(grown["fc1"])[0].sum()) == 24
  leaves_m2 = jax.tree.leaves(m2)
  assert len(leaves_m2) == 2  # only the two kernels are masked
  nnx.update(model, p2)
  assert model(x).shape == (3, 4)
  assert float(jnp.sum(model.fc1.kernel[...] != 0)) <= 96


# ---------------------------------------------------------------- sharding


def test_prune_sharded_matches_single_device():
  devs = np.array(jax.devices()[:8])
  if devs.size < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.sharding.Mesh(devs.reshape(4, 2), ("x", "y"))
  spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
  params = {"w": jax.random.normal(jax.random.key(0), (64, 32)), "b": jnp.zeros(32)}
  sharded = {"w": jax.device_put(params["w"], spec), "b": params["b"]}
  p1, m1 = jax.jit(lambda p: prune(p, None, 0.9))(sharded)
  p2, m2 = prune(params, None, 0.9)
  chex.assert_trees_all_equal(m1, m2)
  assert m1["w"].sharding.is_equivalent_to(spec, 2)
  _, mg = jax.jit(lambda p: prune_global(p, None, 0.9))(sharded)
  assert mg["w"].sharding.is_equivalent_to(spec, 2)


# ---------------------------------------------------------------- errors


def test_error_scores_shape_names_leaf():
  params = mixed_params()
  scores = magnitude(params)
  scores["conv"]["kernel"] = jnp.ones((3, 3))
  with pytest.raises(ValueError, match=r"scores at 'conv/kernel' have shape \(3, 3\)"):
    prune(params, scores, 0.5)


def test_error_scores_missing_leaf():
  params = mixed_params()
  with pytest.raises(ValueError, match=r"scores has no leaf 'dense/bias'"):
    prune(params, {"conv": {"kernel": jnp.ones((3, 3, 4, 8))}}, 0.5)


def test_error_masks_missing_leaf_and_dtype():
  params = {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"masks has no leaf 'b'"):
    prune(params, None, 0.5, masks={"a": jnp.ones((4, 4), bool)})
  with pytest.raises(TypeError, match=r"mask at 'b' has dtype float32; expected bool"):
    drop_and_grow(params, {"a": None, "b": jnp.ones((4, 4))}, None, params, 0.1)
  with pytest.raises(ValueError, match=r"mask at 'a' has shape \(2, 2\)"):
    regrow(params, {"a": jnp.ones((2, 2), bool), "b": None}, params, 1)


def test_error_sparsity_out_of_range_names_leaf():
  params = mixed_params()
  sp = erdos_renyi(params, 0.5)
  sp["conv"]["kernel"] = 1.0
  with pytest.raises(ValueError, match=r"sparsity at 'conv/kernel' must be in \[0, 1\)"):
    prune(params, None, sp)
  with pytest.raises(ValueError, match=r"prune_global: sparsity must be in \[0, 1\)"):
    prune_global(params, None, -0.1)


def test_error_sparsity_tree_none_on_masked_leaf():
  params = mixed_params()
  _, masks = prune(params, None, 0.5)
  sp = erdos_renyi(params, 0.5)
  sp["dense"]["kernel"] = None
  with pytest.raises(ValueError, match=r"sparsity is None at 'dense/kernel'"):
    prune(params, None, sp, masks=masks)


def test_error_value_on_dense_leaf():
  params = mixed_params()
  _, masks = prune(params, None, 0.5)
  sp = jax.tree.map(lambda _: 0.5, params)  # also on biases, which are dense in masks
  with pytest.raises(ValueError, match=r"sparsity has a value at 'dense/bias', but that leaf is dense"):
    prune(params, None, sp, masks=masks)
  with pytest.raises(ValueError, match="grow_scores is required"):
    drop_and_grow(params, masks, None, None, 0.1)


def test_error_nm_axis_not_divisible():
  params = {"w": jnp.ones((6, 4))}
  with pytest.raises(ValueError, match=r"NM\(2:4\) at 'w'.*not divisible by m=4"):
    prune(params, None, None, pattern=NM(2, 4))
  with pytest.raises(ValueError, match=r"'w'.*requested sparsity 0.9"):
    prune({"w": jnp.ones((8, 4))}, None, 0.9, pattern=NM(2, 4))


def test_error_integer_leaf_in_masks():
  params = {"w": jnp.ones((4, 4), jnp.int32)}
  with pytest.raises(TypeError, match=r"leaf 'w' has dtype int32"):
    prune(params, None, 0.5, masks={"w": jnp.ones((4, 4), bool)})


def test_error_drop_fraction_out_of_range():
  params = {"w": jnp.ones((4, 4))}
  with pytest.raises(ValueError, match=r"drop_fraction at 'w' must be in \[0, 1\]"):
    drop_and_grow(params, {"w": jnp.ones((4, 4), bool)}, None, params, 1.5)


def test_error_regrow_bad_count():
  params = {"w": jnp.ones((4, 4))}
  m = {"w": jnp.zeros((4, 4), bool)}
  with pytest.raises(ValueError, match=r"count at 'w' must be >= 0"):
    regrow(params, m, params, -1)
  with pytest.raises(TypeError, match=r"n_or_fraction at 'w' is a bool"):
    regrow(params, m, params, True)


def test_error_prune_global_tree_sparsity():
  params = mixed_params()
  with pytest.raises(ValueError, match=r"scalar \(a global target\)"):
    prune_global(params, None, erdos_renyi(params, 0.5))


def test_doctests():
  res = doctest.testmod(pruning, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
