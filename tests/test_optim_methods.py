"""Each method's mask decisions against independent NumPy (float64) references."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsejax.optim as so
from sparsejax.core.patterns import NM, nm_mask
from test_patterns import ref_nm


def np_topk_mask(scores, k):
  """k largest, ties to the lower flat index (the library-wide rule)."""
  flat = np.asarray(scores, np.float64).ravel()
  order = np.lexsort((np.arange(flat.size), -flat))
  out = np.zeros(flat.size, bool)
  out[order[:k]] = True
  return out.reshape(np.shape(scores))


def distinct_params(key, shapes):
  """Weights with distinct magnitudes (no ties) as a dict of kernels + biases."""
  out = {}
  for i, shp in enumerate(shapes):
    k = jax.random.fold_in(jax.random.key(key), i)
    n = int(np.prod(shp))
    vals = (jax.random.permutation(k, n) + 1.0) / n
    signs = jnp.where(jax.random.bernoulli(jax.random.fold_in(k, 1), 0.5, (n,)), 1.0, -1.0)
    out[f"l{i}"] = {"kernel": (vals * signs).reshape(shp), "bias": jnp.zeros(shp[-1])}
  return out


def rand_tree(params, key):
  leaves, tdef = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.key(key), len(leaves))
  return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


@pytest.mark.smoke
def test_one_shot_and_gmp_match_numpy_topk():
  p = distinct_params(0, [(12, 10), (10, 6)])
  zero = jax.tree.map(jnp.zeros_like, p)
  tx = so.one_shot_pruning(optax.sgd(0.0), sparsity=0.7, step=2)
  s, upd = tx.init(p), jax.jit(tx.update)
  for t in range(4):
    u, s = upd(zero, s, p)
    q = optax.apply_updates(p, u)
    for k in ("l0", "l1"):
      w = np.asarray(p[k]["kernel"])
      if t < 2:
        assert so.get_masks(s)[k]["kernel"].all()
      else:
        want = np_topk_mask(np.abs(w), round(w.size * 0.3))
        np.testing.assert_array_equal(so.get_masks(s)[k]["kernel"], want)
        np.testing.assert_array_equal(np.asarray(q[k]["kernel"]), np.where(want, w, 0))
  # Gradual: per-step counts from the float64 cubic formula, masks nested, magnitude order.
  tx = so.gradual_magnitude_pruning(optax.sgd(0.01), sparsity=0.9, begin_step=1, end_step=9,
                                    frequency=2, distribution="global")
  s, upd = tx.init(p), jax.jit(tx.update)
  prev = None
  total = sum(p[k]["kernel"].size for k in ("l0", "l1"))
  for t in range(12):
    u, s = upd(rand_tree(p, t), s, p)
    p = optax.apply_updates(p, u)
    m = so.get_masks(s)
    kept = sum(int(m[k]["kernel"].sum()) for k in ("l0", "l1"))
    last = max([x for x in (1, 3, 5, 7, 9) if x <= t], default=None)
    s_t = 0.0 if last is None else 0.9 * (1 - (1 - (last - 1) / 8) ** 3)
    assert kept == max(1, math.floor(total * (1 - s_t) + 0.5)), t
    if prev is not None:
      for k in ("l0", "l1"):
        assert not np.any(np.asarray(m[k]["kernel"]) & ~np.asarray(prev[k]["kernel"]))
    prev = m


def test_static_erk_and_snip():
  shapes = [(784, 300), (300, 100), (100, 10)]
  p = {f"l{i}": {"kernel": jnp.ones(s), "bias": jnp.zeros(s[-1])} for i, s in enumerate(shapes)}
  m = so.get_masks(so.static_sparse(optax.sgd(0.1), sparsity=0.9, distribution="erk").init(p))
  got = [1 - float(m[f"l{i}"]["kernel"].mean()) for i in range(3)]
  np.testing.assert_allclose(got, [0.92043, 0.76981, 0.0], atol=2e-5)  # ERK, Evci et al. 2020
  total = sum(int(np.prod(s)) for s in shapes)
  kept = sum(int(m[f"l{i}"]["kernel"].sum()) for i in range(3))
  assert abs(kept - round(total * 0.1)) <= 3
  # SNIP: global top-k of |g * w| (pass the scores tree).
  q = distinct_params(1, [(20, 10), (10, 5)])
  g = rand_tree(q, 7)
  snip = jax.tree.map(lambda w, gg: jnp.abs(w * gg), q, g)
  m = so.get_masks(so.static_sparse(optax.sgd(0.1), sparsity=0.8, scores=snip,
                                    distribution="global").init(q))
  flat = np.concatenate([np.asarray(snip[k]["kernel"]).ravel() for k in ("l0", "l1")])
  want = np_topk_mask(flat, round(flat.size * 0.2))
  got = np.concatenate([np.asarray(m[k]["kernel"]).ravel() for k in ("l0", "l1")])
  np.testing.assert_array_equal(got, want)


def np_drop_grow(w, m, grow_scores, frac):
  """Reference RigL/SET update of one leaf (float64)."""
  n_active = int(m.sum())
  n_drop = math.floor(n_active * frac)
  drop_scores = np.where(m, np.abs(w), -np.inf)
  kept = np_topk_mask(drop_scores, n_active - n_drop) & m
  grow = np_topk_mask(np.where(kept, -np.inf, grow_scores), n_drop) & ~kept
  return kept | grow, grow


@pytest.mark.smoke
def test_rigl_update_matches_reference():
  p = distinct_params(2, [(16, 12), (12, 8)])
  end = 40
  tx = so.rigl(optax.sgd(0.05), sparsity=0.7, update_every=3, end_step=end, drop_fraction=0.4,
               distribution="uniform")
  s, upd = tx.init(p), jax.jit(tx.update)
  p = so.apply_state_masks(p, s)
  for t in range(10):
    g = rand_tree(p, 100 + t)
    m_old = so.get_masks(s)
    u, s = upd(g, s, p)
    p_new = optax.apply_updates(p, u)
    m_new = so.get_masks(s)
    if t >= 3 and t % 3 == 0:
      frac = 0.2 * (1 + math.cos(math.pi * t / end))
      for k in ("l0", "l1"):
        want, grown = np_drop_grow(np.asarray(p[k]["kernel"]), np.asarray(m_old[k]["kernel"]),
                                   np.abs(np.asarray(g[k]["kernel"])), frac)
        np.testing.assert_array_equal(m_new[k]["kernel"], want)
        # Newly grown weights start at 0; dropped-and-regrown ones keep training.
        assert np.all(np.asarray(p_new[k]["kernel"])[grown & ~np.asarray(m_old[k]["kernel"])] == 0)
    else:
      for k in ("l0", "l1"):
        np.testing.assert_array_equal(m_new[k]["kernel"], m_old[k]["kernel"])
    p = p_new


def test_set_growth_random_but_deterministic():
  p = distinct_params(3, [(20, 10)])
  def masks_after(key):
    tx = so.set_training(optax.sgd(0.0), sparsity=0.8, update_every=1, begin_step=0,
                         end_step=10, key=key, distribution="uniform")
    s = tx.init(p)
    m0 = so.get_masks(s)["l0"]["kernel"]
    _, s = jax.jit(tx.update)(rand_tree(p, 0), s, p)
    return np.asarray(m0), np.asarray(so.get_masks(s)["l0"]["kernel"])
  m0, a = masks_after(1)
  _, b = masks_after(1)
  _, c = masks_after(2)
  np.testing.assert_array_equal(a, b)
  assert a.sum() == m0.sum() == 40
  # alpha_0 = 0.3: 12 dropped; a just-dropped position may be regrown at random.
  assert 0 < (m0 & ~a).sum() == (a & ~m0).sum() <= math.floor(40 * 0.3)
  assert not np.array_equal(a, c)  # another key grows elsewhere


@pytest.mark.smoke
def test_srste_update_and_nm_masks():
  w = jax.random.normal(jax.random.key(4), (8, 6))
  p = {"w": w, "b": jnp.zeros(6)}
  lam, lr = 0.05, 0.1
  tx = so.srste(optax.sgd(lr), nm="2:4", decay=lam)
  s = tx.init(p)
  m = np.asarray(so.get_masks(s)["w"])
  want_m = np.zeros((8, 6), bool)  # NumPy reference: top-2 |w| of each group of 4 rows
  for gi in range(2):
    for c in range(6):
      col = np.abs(np.asarray(w))[4 * gi:4 * gi + 4, c]
      want_m[4 * gi + np.argsort(-col, kind="stable")[:2], c] = True
  np.testing.assert_array_equal(m, want_m)
  g = rand_tree(p, 9)
  u, s = jax.jit(tx.update)(g, s, p)
  want_u = -lr * (np.asarray(g["w"]) + lam * np.where(want_m, 0.0, np.asarray(w)))
  np.testing.assert_allclose(np.asarray(u["w"]), want_u, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(u["b"]), -lr * np.asarray(g["b"]), rtol=1e-6)
  new_w = np.asarray(optax.apply_updates(p, u)["w"])
  np.testing.assert_array_equal(np.asarray(so.get_masks(s)["w"]),
                                np.asarray(nm_mask(jnp.abs(new_w), 2, 4)))


_nm_mask = jax.jit(nm_mask, static_argnums=(1, 2))


@settings(max_examples=20, deadline=None)
@given(nm=st.sampled_from([(1, 2), (2, 4), (3, 4), (1, 8), (5, 8), (4, 16), (3, 32), (30, 32)]),
       seed=st.integers(0, 2**16), ties=st.sampled_from([0, 1, 2]))
def test_nm_mask_passes_match_reference(nm, seed, ties):
  # The pass-based selection (one variadic reduction per pass) for small and large m.
  n, m = nm
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2 * m, 3)).astype(np.float32)
  if ties == 1:  # many exact ties, -0.0 and 0.0
    x = np.round(x) * np.where(rng.random(x.shape) < 0.5, -1.0, 1.0).astype(np.float32)
  if ties == 2:
    x[rng.random(x.shape) < 0.3] = np.nan
  got = np.asarray(_nm_mask(jnp.asarray(x), n, m))
  np.testing.assert_array_equal(got, ref_nm(x, n, m, 0))
  assert np.all(got.reshape(2, m, 3).sum(1) == n)


@pytest.mark.parametrize("count_from", ["sparse", "start"])
def test_mdgf_beta_phases(count_from):
  p = {"w": jnp.ones((8, 4))}
  tx = so.mdgf(optax.sgd(0.1), nm="1:8", rate=0.25, kind="linear", total_steps=12,
               dense_steps=3, finetune_steps=2, count_from=count_from)
  s, upd = tx.init(p), jax.jit(tx.update)
  betas, targets = [], []
  for _ in range(12):
    betas.append(float(so.get_beta(s)))
    targets.append(float(so.get_target_sparsity(s)))
    _, s = upd({"w": jnp.zeros((8, 4))}, s, p)
  off = 3 if count_from == "sparse" else 0
  want = [1.0 if t < 3 else (0.0 if t >= 10 else max(1 - 0.25 * (t - off), 0.0))
          for t in range(12)]
  np.testing.assert_allclose(betas, want, atol=1e-6)
  assert targets == [0.0] * 3 + [0.875] * 9
  tx = so.mdgf(optax.sgd(0.1), nm="1:8", rate=1e-1, kind="exponential")
  s, upd = tx.init(p), jax.jit(tx.update)
  for _ in range(10):
    _, s = upd({"w": jnp.zeros((8, 4))}, s, p)
  assert float(so.get_beta(s)) == pytest.approx(math.exp(-1.0), rel=1e-5)


def test_sdgf_geometric_and_custom():
  p = {"w": jax.random.normal(jax.random.key(0), (64, 3))}
  tx = so.sdgf(optax.sgd(0.01), nm="1:8", kind="geometric", total_steps=8)
  s, upd = tx.init(p), jax.jit(tx.update)
  seen = []
  for _ in range(8):
    m = np.asarray(so.get_masks(s)["w"])
    seen.append(tuple(sorted({int(v) for v in m.reshape(-1, 64 // 64 * 64, 3).sum(1).ravel()})))
    _, s = upd({"w": jnp.ones((64, 3))}, s, p)
  # Frames of 2 steps: 8:64, 4:32, 2:16, 1:8 (a 64-group holds 8 kept in every frame).
  assert all(x == (8,) for x in seen)
  tx = so.sdgf(optax.sgd(0.01), nm="1:4", kind="custom", total_steps=6,
               custom={0: "3:4", 2: "2:4", 4: "1:4"})
  s, upd = tx.init(p), jax.jit(tx.update)
  counts = []
  for _ in range(6):
    counts.append(int(so.get_masks(s)["w"].reshape(16, 4, 3).sum(1).max()))
    _, s = upd({"w": jnp.ones((64, 3))}, s, p)
  assert counts == [3, 3, 2, 2, 1, 1]



def test_nm_methods_group_along_the_pattern_axis():
  # axis=None takes the NM pattern's axis in the N:M factories (srste calls the same
  # nm_training as ste); an explicit axis wins.
  w = jax.random.normal(jax.random.key(5), (4, 8))
  p, a = {"w": w}, np.abs(np.asarray(w))
  nm = NM(1, 4, axis=-1)
  cases = [(so.ste(optax.sgd(0.1), nm=nm), 1, -1),
           (so.mdgf(optax.sgd(0.1), nm=nm, rate=0.1), 1, -1),
           (so.sdgf(optax.sgd(0.1), nm=nm, total_steps=4), 3, -1),  # first frame: 3:4
           (so.ste(optax.sgd(0.1), nm=nm, axis=0), 1, 0)]
  for tx, n, axis in cases:
    np.testing.assert_array_equal(np.asarray(so.get_masks(tx.init(p))["w"]),
                                  ref_nm(a, n, 4, axis))
