"""Tests for sparsejax.core.imp (IMP, rewinding) and sparsejax.core.soup (sparse model soups)."""

import doctest

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.core import imp, soup
from sparsejax.core.imp import imp_density, imp_prune, rewind
from sparsejax.core.masks import init_masks
from sparsejax.core.soup import greedy_soup, sparse_soup


def _params(seed=0, shapes=((250, 200), (100, 500))):
  ks = jax.random.split(jax.random.key(seed), len(shapes) + 1)
  p = {f"l{i}": {"kernel": jax.random.normal(k, s), "bias": jnp.full((s[-1],), 0.5, jnp.float32)}
       for i, (k, s) in enumerate(zip(ks, shapes))}
  return p


def _kernels(tree):
  return [tree[k]["kernel"] for k in sorted(tree)]


# ---------------------------------------------------------------- IMP


def test_imp_density_vectors_by_counting():
  """IMP (Frankle & Carbin 2019) remaining fraction (1 - p)^n: p=0.2 -> 0.328 (5 rounds), 0.107 (10), 0.0115 (20), measured on masks."""
  chex.clear_trace_counter()
  theta0 = _params()
  n_total = sum(k.size for k in _kernels(theta0))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_(params, masks, frac, noise_key):
    # "Train": perturb every weight, then prune the remaining ones and rewind.
    trained = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(noise_key, x.shape), params)
    trained = jax.tree.map(lambda x, m: x if m is None else jnp.where(m, x, 0), trained, masks,
                           is_leaf=lambda x: x is None)
    new_p, new_m = imp_prune(trained, masks, frac)
    return rewind(new_p, new_m, theta0), new_m, trained

  params, masks = theta0, init_masks(theta0)
  counts = {k: v.size for k, v in zip(sorted(theta0), _kernels(theta0))}
  densities = {}
  for r in range(1, 21):
    old = masks
    params, masks, trained = round_(params, masks, 0.2, jax.random.key(r))
    for name in sorted(theta0):
      m_old, m_new = np.asarray(old[name]["kernel"]), np.asarray(masks[name]["kernel"])
      assert not np.any(m_new & ~m_old)  # monotone
      counts[name] -= int(np.round(0.2 * counts[name]))  # numpy reference (half to even)
      assert int(m_new.sum()) == counts[name]
      # survivors are the largest |w| among the previously kept ones
      w = np.abs(np.asarray(trained[name]["kernel"]))
      assert (m_old & ~m_new).any()
      assert w[m_new].min() >= w[m_old & ~m_new].max()
      # rewound: survivors equal theta0, removed weights exactly 0, biases rewound
      k0 = np.asarray(theta0[name]["kernel"])
      np.testing.assert_array_equal(np.asarray(params[name]["kernel"]), np.where(m_new, k0, 0))
      np.testing.assert_array_equal(params[name]["bias"], theta0[name]["bias"])
      assert masks[name]["bias"] is None
    densities[r] = sum(int(m.sum()) for m in _kernels(masks)) / n_total
  assert round(densities[5], 3) == 0.328
  assert round(densities[10], 3) == 0.107
  assert round(densities[20], 4) == 0.0115
  for r in (5, 10, 20):
    assert abs(densities[r] - imp_density(0.2, r)) < 1e-4


def test_imp_pruned_weights_stay_pruned_even_if_large():
  p = _params(1, shapes=((20, 10),))
  p1, m1 = imp_prune(p, None, 0.5)
  big = jax.tree.map(lambda x: x + 100.0, p1)  # removed positions now have the largest |w|
  _, m2 = imp_prune(big, m1, 0.5)
  a, b = np.asarray(m1["l0"]["kernel"]), np.asarray(m2["l0"]["kernel"])
  assert not np.any(b & ~a) and b.sum() == 50


def test_imp_global_and_normalized_vs_numpy():
  p = _params(2, shapes=((30, 20), (20, 10)))
  p = {"l0": {"kernel": p["l0"]["kernel"] * 5.0, "bias": p["l0"]["bias"]}, "l1": p["l1"]}
  masks = init_masks(p)
  for normalize in (False, True):
    _, m = imp_prune(p, masks, 0.3, global_prune=True, normalize=normalize)
    ks = [np.abs(np.asarray(k)) for k in _kernels(p)]
    if normalize:
      ks = [k / np.linalg.norm(k) for k in ks]
    flat = np.concatenate([k.ravel() for k in ks]).astype(np.float32)
    keep = flat.size - int(np.round(0.3 * flat.size))
    ref = np.zeros(flat.size, bool)
    ref[np.argsort(-flat, kind="stable")[:keep]] = True
    got = np.concatenate([np.asarray(k).ravel() for k in _kernels(m)])
    np.testing.assert_array_equal(got, ref)
  _, m_raw = imp_prune(p, masks, 0.3, global_prune=True)
  # raw global favours the scaled-up layer; per-leaf pruning does not
  assert float(m_raw["l0"]["kernel"].mean()) > float(m_raw["l1"]["kernel"].mean())
  _, m_leaf = imp_prune(p, masks, 0.3)
  assert int(m_leaf["l0"]["kernel"].sum()) == 600 - 180 and int(m_leaf["l1"]["kernel"].sum()) == 140


def test_imp_flax_nnx_loop():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(10, 20, rngs=rngs)
      self.fc2 = nnx.Linear(20, 5, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))

  model = MLP(nnx.Rngs(0))
  theta0 = nnx.state(model, nnx.Param)
  masks = init_masks(theta0)
  state = theta0
  for _ in range(3):
    state = jax.tree.map(lambda x: x * 1.1 + 0.01, state)  # stand-in for training
    state, masks = imp_prune(state, masks, 0.5)
    state = rewind(state, masks, theta0)
  nnx.update(model, state)
  assert int(jnp.sum(model.fc1.kernel[...] != 0)) == 25  # 200 -> 100 -> 50 -> 25
  # 100 -> 50 -> 25 -> 25 - round(12.5) = 13 (round half to even)
  assert int(jnp.sum(model.fc2.kernel[...] != 0)) == 13
  np.testing.assert_array_equal(model.fc1.bias[...], theta0["fc1"]["bias"][...])


def test_rewind_dtype_and_errors():
  p = {"w": jnp.ones((2, 3), jnp.bfloat16), "b": jnp.ones(3, jnp.bfloat16)}
  m = {"w": jnp.array([[True, False, True]] * 2), "b": None}
  r = {"w": jnp.full((2, 3), 2.0, jnp.float32), "b": jnp.full((3,), 3.0)}
  out = rewind(p, m, r)
  assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out["w"], np.float32), [[2, 0, 2]] * 2)
  with pytest.raises(ValueError, match=r"rewind_params at 'w' has shape \(3, 2\)"):
    rewind(p, m, {"w": jnp.ones((3, 2)), "b": jnp.ones(3)})
  with pytest.raises(ValueError, match=r"rewind_params has no leaf 'b'"):
    rewind(p, m, {"w": jnp.ones((2, 3))})


def test_imp_errors():
  p = _params(3, shapes=((4, 4),))
  with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
    imp_prune(p, None, 1.0)
  with pytest.raises(ValueError, match="normalize=True only applies to global_prune"):
    imp_prune(p, None, 0.2, normalize=True)
  with pytest.raises(ValueError, match="no masked leaf"):
    imp_prune(p, jax.tree.map(lambda _: None, p), 0.2)
  with pytest.raises(ValueError, match=r"mask at 'l0/kernel' has shape \(2, 2\)"):
    imp_prune(p, {"l0": {"kernel": jnp.ones((2, 2), bool), "bias": None}}, 0.2)


# ---------------------------------------------------------------- soups


def _ingredients(n=3, seed=0):
  rng = np.random.default_rng(seed)
  mask = rng.random((6, 5)) < 0.3
  models = []
  for _ in range(n):
    w = np.where(mask, rng.normal(size=(6, 5)), 0).astype(np.float32)
    models.append({"w": jnp.asarray(w), "b": jnp.asarray(rng.normal(size=5), jnp.float32)})
  masks = [{"w": jnp.asarray(mask), "b": None} for _ in range(n)]
  return models, masks, mask


def test_soup_uniform_and_weighted():
  models, masks, mask = _ingredients()
  s = sparse_soup(models, masks)
  ref_w = np.mean([np.asarray(m["w"], np.float64) for m in models], axis=0)
  np.testing.assert_allclose(s["w"], ref_w, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s["b"], np.mean([np.asarray(m["b"]) for m in models], 0), rtol=1e-6)
  assert bool(jnp.all(s["w"][~mask] == 0))
  wts = [1.0, 3.0, 0.0]
  s2 = sparse_soup(models, masks, weights=wts)
  ref2 = (np.asarray(models[0]["w"]) + 3 * np.asarray(models[1]["w"])) / 4
  np.testing.assert_allclose(s2["w"], ref2, rtol=1e-6, atol=1e-7)
  s3 = jax.jit(sparse_soup)(models, masks, jnp.asarray(wts))
  np.testing.assert_allclose(s3["w"], s2["w"], rtol=1e-6)


def test_soup_bf16_and_nested_tree():
  models, masks, _ = _ingredients(2)
  models = [{"blk": (jax.tree.map(lambda x: x.astype(jnp.bfloat16), m),)} for m in models]
  masks = [{"blk": (m,)} for m in masks]
  s = sparse_soup(models, masks)
  assert s["blk"][0]["w"].dtype == jnp.bfloat16


def test_soup_masks_differ_names_leaf():
  models, masks, mask = _ingredients()
  flipped = np.array(mask)
  flipped[0, 0] = ~flipped[0, 0]
  masks[2] = {"w": jnp.asarray(flipped), "b": None}
  with pytest.raises(ValueError, match=r"masks differ at 'w' between model 0 and model 2 \(1 pos"):
    sparse_soup(models, masks)
  masks[2] = {"w": None, "b": None}
  with pytest.raises(ValueError, match=r"masks differ at 'w'.*dense in model 2"):
    sparse_soup(models, masks)


def test_soup_traced_mismatch_poisons_leaf():
  models, masks, mask = _ingredients(2)
  f = jax.jit(sparse_soup)
  ok = f(models, masks)
  assert bool(jnp.all(jnp.isfinite(ok["w"])))
  bad = [masks[0], {"w": jnp.asarray(~mask), "b": None}]
  out = f(models, bad)
  assert bool(jnp.all(jnp.isnan(out["w"]))) and bool(jnp.all(jnp.isfinite(out["b"])))


def test_soup_bad_inputs():
  models, masks, _ = _ingredients(2)
  with pytest.raises(ValueError, match="non-empty list"):
    sparse_soup([])
  with pytest.raises(ValueError, match=r"params_list\[1\] at 'w' has shape \(5, 6\)"):
    sparse_soup([models[0], {"w": jnp.zeros((5, 6)), "b": jnp.zeros(5)}])
  with pytest.raises(ValueError, match=r"params_list\[1\] has no leaf 'b'"):
    sparse_soup([models[0], {"w": models[1]["w"]}])
  with pytest.raises(ValueError, match="one entry per model"):
    sparse_soup(models, masks, weights=[1.0])
  with pytest.raises(ValueError, match="non-negative"):
    sparse_soup(models, masks, weights=[1.0, -1.0])
  with pytest.raises(ValueError, match="one mask tree per model"):
    sparse_soup(models, masks[:1])
  with pytest.raises(TypeError, match=r"leaf 'n' has dtype int32"):
    sparse_soup([{"n": jnp.array(1)}, {"n": jnp.array(2)}])


def test_greedy_soup_matches_manual_greedy():
  models, masks, _ = _ingredients(4, seed=3)
  target = np.asarray(models[1]["w"]) * 0.5 + np.asarray(models[3]["w"]) * 0.5

  def score(p):
    return -float(np.sum((np.asarray(p["w"]) - target) ** 2))

  got, chosen = greedy_soup(models, score, masks)
  order = sorted(range(4), key=lambda j: -score(models[j]))
  pick, best = [order[0]], score(models[order[0]])
  for j in order[1:]:
    s = score(sparse_soup([models[c] for c in pick + [j]]))
    if s >= best:
      pick, best = pick + [j], s
  assert chosen == sorted(pick)
  np.testing.assert_allclose(got["w"], sparse_soup([models[c] for c in pick])["w"], rtol=1e-6)
  assert score(got) >= max(score(m) for m in models)


@pytest.mark.parametrize("module", [imp, soup])
def test_doctests(module):
  res = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
