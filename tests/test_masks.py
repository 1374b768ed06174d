"""Tests for sparsejax.core.masks against dense numpy references."""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.core.masks import (
  apply_masks, export_masks, global_sparsity, import_masks, init_masks, leaf_sparsity, map_masked, mask_and,
  mask_or, nnz, summary, validate_masks)


def _params(rng):
  return {
    "enc": {"kernel": rng.normal(size=(4, 6)).astype(np.float32), "bias": rng.normal(size=6).astype(np.float32)},
    "layers": [rng.normal(size=(3, 3, 2, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)],
    "out": (rng.normal(size=(6, 2)).astype(np.float32),),
  }


def _random_masks(params, rng, p=0.5):
  return jax.tree.map(lambda x: None if x.ndim < 2 else rng.random(x.shape) < p, params)


def test_init_masks_default_and_regex():
  p = _params(np.random.default_rng(0))
  m = init_masks(p)
  assert m["enc"]["bias"] is None and m["layers"][1] is None
  assert m["enc"]["kernel"].dtype == jnp.bool_ and bool(m["enc"]["kernel"].all())
  assert m["layers"][0].shape == (3, 3, 2, 4)
  m2 = init_masks(p, "enc")
  assert m2["enc"]["bias"] is not None and m2["out"][0] is None and m2["layers"][0] is None
  validate_masks(m, p)
  validate_masks(m2, p)


def test_apply_masks_matches_numpy_and_keeps_dtype():
  rng = np.random.default_rng(1)
  p = _params(rng)
  p["enc"]["kernel"] = p["enc"]["kernel"].astype(jnp.bfloat16)
  p["out"][0][0, 0] = np.inf
  p["out"] = (p["out"][0],)
  m = _random_masks(p, rng)
  m["out"][0][0, 0] = False
  out = apply_masks(p, m)
  for (x, mm, y) in zip(jax.tree.leaves(p), jax.tree.leaves(m, is_leaf=lambda v: v is None), jax.tree.leaves(out)):
    assert y.dtype == x.dtype
    expect = np.asarray(x, np.float32) if mm is None else np.where(mm, np.asarray(x, np.float32), 0.0)
    np.testing.assert_array_equal(np.asarray(y, np.float32), expect)
  assert float(out["out"][0][0, 0]) == 0.0  # inf masked to an exact zero (no 0 * inf = nan)


mask_arrays = hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=3, max_side=5))


@given(mask_arrays, st.data())
def test_apply_idempotent_and_combinators(m1, data):
  m2 = data.draw(hnp.arrays(np.bool_, m1.shape))
  x = data.draw(hnp.arrays(np.float32, m1.shape, elements=st.floats(-10, 10, width=32)))
  params = {"w": x, "b": np.ones(3, np.float32)}
  a = {"w": m1, "b": None}
  b = {"w": m2, "b": np.array([True, False, True])}
  once = apply_masks(params, a)
  chex.assert_trees_all_equal(apply_masks(once, a), once)
  andm, orm = mask_and(a, b), mask_or(a, b)
  np.testing.assert_array_equal(andm["w"], m1 & m2)
  np.testing.assert_array_equal(andm["b"], [True, False, True])  # None acts as all-True
  np.testing.assert_array_equal(orm["w"], m1 | m2)
  assert orm["b"] is None
  # Applying and-ed masks == applying both in sequence.
  chex.assert_trees_all_equal(apply_masks(params, andm), apply_masks(apply_masks(params, a), b))
  assert int(nnz(a)) == int(m1.sum())
  np.testing.assert_allclose(float(global_sparsity(a)), 1 - m1.mean(), rtol=1e-6, atol=1e-6)  # float32 sparsity
  total = m1.size + 3
  np.testing.assert_allclose(float(global_sparsity(a, params)), 1 - (m1.sum() + 3) / total, rtol=1e-6, atol=1e-6)  # float32 sparsity


def test_counts_and_sparsity_tree_with_nones():
  rng = np.random.default_rng(2)
  p = _params(rng)
  m = _random_masks(p, rng, 0.3)
  masked = [x for x in jax.tree.leaves(m, is_leaf=lambda v: v is None) if x is not None]
  assert int(nnz(m)) == sum(int(x.sum()) for x in masked)
  ls = leaf_sparsity(m)
  assert sorted(ls) == ["enc/kernel", "layers/0", "out/0"]
  np.testing.assert_allclose(float(ls["layers/0"]), 1 - m["layers"][0].mean(), rtol=1e-6)
  dense_total = sum(x.size for x in jax.tree.leaves(p))
  kept = sum(int(x.sum()) for x in masked) + 6 + 4
  np.testing.assert_allclose(float(global_sparsity(m, p)), 1 - kept / dense_total, rtol=1e-6)
  r = map_masked(lambda mm, x: jnp.sum(jnp.where(mm, x, 0)), m, p)
  assert r["enc"]["bias"] is None
  np.testing.assert_allclose(float(r["enc"]["kernel"]), np.where(m["enc"]["kernel"], p["enc"]["kernel"], 0).sum(),
                             rtol=1e-5)


def test_jit_single_trace_mixed_tree():
  rng = np.random.default_rng(3)
  p = _params(rng)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, masks):
    out = apply_masks(params, mask_and(masks, masks))
    return out, nnz(masks), global_sparsity(masks, params)

  for i in range(3):
    m = _random_masks(p, np.random.default_rng(i), 0.5)
    out, n, s = step(p, m)
    assert int(n) == int(nnz(m))
    chex.assert_trees_all_equal(out, apply_masks(p, m))


def test_summary_table_values():
  p = {"fc": {"kernel": np.ones((4, 2), np.float32), "bias": np.ones(2, np.float32)}}
  m = {"fc": {"kernel": np.array([[1, 0], [0, 0], [1, 1], [0, 0]], bool), "bias": None}}
  text = summary(p, m)
  lines = text.splitlines()
  assert lines[0].split()[:4] == ["path", "shape", "sparsity", "nnz"]
  bias = lines[1].split()
  kern = [ln for ln in lines if ln.startswith("fc/kernel")][0].split()
  total = lines[-1].split()
  assert bias[0] == "fc/bias" and bias[2] == "0.0000" and bias[3] == "2" and bias[-1] == "-"
  # 3 of 8 kept: sparsity 0.625, 32 dense bytes, 3*4 + ceil(8/8) sparse bytes, 2*3 FLOPs per row.
  assert kern[3:5] == ["0.6250", "3"] and kern[5:7] == ["32", "B"] and kern[7:9] == ["13", "B"] and kern[-1] == "6"
  # "all leaves" counts the dense bias as kept (global_sparsity(m, p)); "masked leaves"
  # only the kernel (global_sparsity(m)).
  assert total[:2] == ["all", "leaves"] and total[2] == f"{1 - 5 / 10:.4f}" and total[3] == "5"
  masked = lines[-2].split()
  assert masked[:2] == ["masked", "leaves"] and masked[2] == "0.6250" and masked[3] == "3"


def test_export_import_roundtrip_and_int_masks():
  rng = np.random.default_rng(4)
  p = _params(rng)
  m = _random_masks(p, rng)
  flat = export_masks(m)
  assert sorted(flat) == ["enc/kernel", "layers/0", "out/0"] and all(v.dtype == np.bool_ for v in flat.values())
  back = import_masks(flat, p)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, back), jax.tree.map(np.asarray, m))
  ints = {k: v.astype(np.int8) for k, v in flat.items()}
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, import_masks(ints, p)), jax.tree.map(np.asarray, m))


def test_import_and_init_keep_param_sharding():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
  sh = NamedSharding(mesh, P("data", "model"))
  p = {"w": jax.device_put(np.ones((8, 4), np.float32), sh), "b": jnp.ones(4)}
  m = import_masks({"w": np.eye(8, 4, dtype=bool)}, p)
  assert m["w"].sharding == sh
  assert init_masks(p)["w"].sharding == sh
  assert apply_masks(p, m)["w"].sharding == sh


@pytest.mark.parametrize(
  "masks, exc, match",
  [
    ({"enc": {"kernel": None}, "out": None}, ValueError, r"mask tree has no leaf 'enc/bias'"),
    ({"enc": {"kernel": None, "bias": None, "extra": None}, "out": None}, ValueError, r"leaf 'enc/extra'"),
    ({"enc": {"kernel": np.ones((3, 3), bool), "bias": None}, "out": None}, ValueError,
     r"mask at 'enc/kernel' has shape \(3, 3\) but the param has shape \(2, 3\)"),
    ({"enc": {"kernel": np.ones((2, 3), np.float32), "bias": None}, "out": None}, TypeError,
     r"mask at 'enc/kernel' has dtype float32; expected bool"),
    ({"enc": {"kernel": [[True] * 3] * 2, "bias": None}, "out": None}, TypeError,
     r"mask at 'enc/kernel' is a subtree"),
    ({"enc": {"kernel": "yes", "bias": None}, "out": None}, TypeError, r"mask at 'enc/kernel' is a str"),
  ],
)
def test_validate_masks_errors_name_path(masks, exc, match):
  p = {"enc": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}, "out": np.zeros(2)}
  with pytest.raises(exc, match=match):
    validate_masks(masks, p)


@pytest.mark.parametrize(
  "flat, match",
  [
    ({"enc/kernal": np.ones((2, 3), bool)}, r"mask path 'enc/kernal' is not a leaf of params.*enc/kernel"),
    ({"enc/kernel": np.ones((3, 2), bool)}, r"mask at 'enc/kernel' has shape \(3, 2\)"),
    ({"enc/kernel": np.full((2, 3), 2)}, r"mask at 'enc/kernel' has dtype int64 with values other than 0/1"),
  ],
)
def test_import_masks_errors_name_path(flat, match):
  p = {"enc": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}
  with pytest.raises(ValueError, match=match):
    import_masks(flat, p)


def test_summary_and_global_sparsity_validate():
  p = {"w": np.zeros((2, 2), np.float32)}
  with pytest.raises(ValueError, match=r"mask at 'w' has shape"):
    summary(p, {"w": np.ones((2, 3), bool)})
  with pytest.raises(ValueError, match=r"mask at 'w' has shape"):
    global_sparsity({"w": np.ones((2, 3), bool)}, p)


def test_init_masks_bad_selection():
  p = {"w": np.zeros((2, 2), np.float32)}
  with pytest.raises(TypeError, match=r"selection at 'w' must be a Python bool"):
    init_masks(p, {"w": np.ones((2, 2), bool)})
