"""Block (and N:M) patterns in the mask-learning transformations.

GMP, one-shot, static, SET and RigL with ``pattern=sj.Block(r, c)`` are run
for several jitted steps; after every update the masks must be constant on
blocks and equal an independent NumPy reference computed densely on the
block-reduced grid (block sums of |W| / |g| / scores, exact top-k with the
lower index winning ties). Also: exact block counts for the ERK / uniform /
global distributions, moments reset per grown block, the optimizer wrappers,
``nnx.Optimizer`` and a device mesh (same checks as tests/test_sharding_optim.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
import sparsejax.optim as so

R, C = 4, 4
B = sj.Block(R, C)
STEPS = 8
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
KERNELS = (("fc1", "kernel"), ("fc2", "kernel"))


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {"fc1": {"kernel": f(16, 24), "bias": jnp.zeros(24)},
          "fc2": {"kernel": f(24, 8) * 0.3, "bias": jnp.zeros(8)}}


def loss_fn(p, x, y):
  h = jax.nn.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return jnp.mean((h @ p["fc2"]["kernel"] + p["fc2"]["bias"] - y) ** 2)


def leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def run(cases):
  """{name: tx} -> {name: (initial SparseState, history)}, all in one compiled program.

  The history holds, per step, the params and gradients the update saw and the
  state after it.
  """
  params = make_params()
  x = jax.random.normal(jax.random.key(5), (32, 16))
  y = jax.random.normal(jax.random.key(6), (32, 8))
  states = {n: tx.init(params) for n, tx in cases.items()}

  def one(tx, state):
    def body(carry, i):
      p, s = carry
      g = jax.grad(loss_fn)(p, x * (1 + 0.05 * i), y)
      u, s = tx.update(g, s, p)
      st = so.get_sparse_state(s)
      return (optax.apply_updates(p, u), s), dict(
          before=p, grads=g, after=optax.apply_updates(p, u), masks=st.sparse_masks,
          inner=st.sparse_inner, step=st.sparse_step)
    return jax.lax.scan(body, (params, state), jnp.arange(STEPS))[1]

  def all_runs(states):
    return {n: one(tx, states[n]) for n, tx in cases.items()}

  hist = jax.tree.map(np.asarray, jax.jit(all_runs).lower(states).compile(
      compiler_options=FAST_COMPILE)(states))
  return {n: (so.get_sparse_state(states[n]), hist[n]) for n in cases}


# ---- the independent reference: dense NumPy on the block grid ----

def block_sums(x):
  x = np.asarray(x, np.float64)
  return x.reshape(x.shape[0] // R, R, x.shape[1] // C, C).sum(axis=(1, 3))


def to_grid(m):
  m = np.asarray(m)
  g = m.reshape(m.shape[0] // R, R, m.shape[1] // C, C)
  assert np.all(g.all(axis=(1, 3)) == g.any(axis=(1, 3))), "mask not constant on blocks"
  return g.any(axis=(1, 3))


def topk(scores, k, eligible):
  """The k largest eligible scores; ties: lower flat index."""
  flat = np.asarray(scores).ravel()
  idx = [i for i in np.lexsort((np.arange(flat.size), -flat)) if eligible.ravel()[i]][:k]
  out = np.zeros(flat.size, bool)
  out[idx] = True
  return out.reshape(scores.shape)


def keep_count(n, sparsity):
  return min(max(1, math.floor(n * (1 - sparsity) + 0.5)), n)


def cubic(t, s_f, t0, t1):
  frac = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
  return s_f * (1 - (1 - frac) ** 3)


def cosine_alpha(t, alpha, end):
  return alpha / 2 * (1 + math.cos(math.pi * min(t, end) / end))


def masks_at(hist, t):
  return {p: leaf(hist["masks"], p)[t] for p in KERNELS}


def check_hard(hist, committed=range(STEPS)):
  for t in range(STEPS):
    for p in KERNELS:
      m = leaf(hist["masks"], p)[t]
      to_grid(m)
      if t in committed:  # (MultiSteps: params change on committed steps only)
        assert np.all(leaf(hist["after"], p)[t][~m] == 0), (t, p)
    assert leaf(hist["masks"], ("fc1", "bias")) is None


GMP = dict(sparsity=0.8, begin_step=1, end_step=5, frequency=2)


def test_block_pruning_matches_grid_reference():
  runs = run({
      "gmp": so.gradual_magnitude_pruning(optax.adam(1e-2), pattern=B, **GMP),
      "one_shot": so.one_shot_pruning(optax.sgd(0.1, momentum=0.9), sparsity=0.75, step=2,
                                      pattern=B),
      "gmp_global": so.gradual_magnitude_pruning(optax.adam(1e-2), pattern=B,
                                                 distribution="global", **GMP),
  })
  for name, (init, hist) in runs.items():
    check_hard(hist)
    old = {p: to_grid(leaf(init.sparse_masks, p)) for p in KERNELS}
    for t in range(STEPS):
      if name == "one_shot":
        s_t, upd = 0.75, t == 2
      else:
        upd = t in (1, 3, 5)
        s_t = cubic(t, GMP["sparsity"], GMP["begin_step"], GMP["end_step"])
      if upd:
        scores = {p: block_sums(np.abs(leaf(hist["before"], p)[t])) for p in KERNELS}
        if name == "gmp_global":  # one top-k over the blocks of both leaves, leaf order first
          n = sum(s.size for s in scores.values())
          flat = np.concatenate([scores[p].ravel() for p in KERNELS])
          elig = np.concatenate([old[p].ravel() for p in KERNELS])
          sel = topk(flat, keep_count(n, s_t), elig)
          sizes = np.cumsum([0] + [scores[p].size for p in KERNELS])
          want = {p: sel[sizes[i]:sizes[i + 1]].reshape(scores[p].shape)
                  for i, p in enumerate(KERNELS)}
        else:
          want = {p: topk(scores[p], keep_count(scores[p].size, s_t), old[p]) for p in KERNELS}
      else:
        want = old
      got = {p: to_grid(m) for p, m in masks_at(hist, t).items()}
      for p in KERNELS:
        np.testing.assert_array_equal(got[p], want[p], err_msg=f"{name} step {t} {p}")
      old = got
    assert any(old[p].sum() < old[p].size for p in KERNELS)


DST = dict(sparsity=0.7, update_every=2, begin_step=1, end_step=7, drop_fraction=0.5,
           distribution="uniform")


def check_drop_grow(name, init, hist, grow_by_gradient):
  old = {p: to_grid(leaf(init.sparse_masks, p)) for p in KERNELS}
  n0 = {p: int(old[p].sum()) for p in KERNELS}
  for p in KERNELS:
    assert n0[p] == keep_count(old[p].size, DST["sparsity"])
  changed = 0
  for t in range(STEPS):
    got = {p: to_grid(m) for p, m in masks_at(hist, t).items()}
    upd = t >= 1 and (t - 1) % 2 == 0 and t < DST["end_step"]
    for p in KERNELS:
      assert got[p].sum() == n0[p], "block count changed"
      if not upd:
        np.testing.assert_array_equal(got[p], old[p])
        continue
      n_drop = math.floor(n0[p] * cosine_alpha(t, DST["drop_fraction"], DST["end_step"]))
      kept = topk(block_sums(np.abs(leaf(hist["before"], p)[t])), n0[p] - n_drop, old[p])
      if grow_by_gradient:
        grown = topk(block_sums(np.abs(leaf(hist["grads"], p)[t])), n_drop, ~kept)
        np.testing.assert_array_equal(got[p], kept | grown, err_msg=f"{name} step {t} {p}")
      else:  # SET: the kept blocks are exact; n_drop random blocks among the others
        assert np.all(got[p][kept]) and (got[p] & ~kept).sum() == n_drop
      new = np.repeat(np.repeat(got[p] & ~old[p], R, 0), C, 1)
      changed += int(new.sum())
      # New blocks start at zero, with zero Adam moments (reset per grown block).
      assert np.all(leaf(hist["after"], p)[t][new] == 0)
      adam = hist["inner"][0]
      assert np.all(leaf(adam.mu, p)[t][new] == 0) and np.all(leaf(adam.nu, p)[t][new] == 0)
    old = got
  assert changed > 0, f"{name}: no block ever moved"


def test_block_dst_matches_grid_reference():
  runs = run({"rigl": so.rigl(optax.adam(1e-2), pattern=B, **DST),
              "set": so.set_training(optax.adam(1e-2), pattern=B, key=3, **DST)})
  for name, (init, hist) in runs.items():
    check_hard(hist)
    check_drop_grow(name, init, hist, grow_by_gradient=name == "rigl")


def test_block_static_distributions_exact_in_blocks():
  params = make_params()
  grid_shapes = {p: (leaf(params, p).shape[0] // R, leaf(params, p).shape[1] // C)
                 for p in KERNELS}
  # ERK at block granularity: the ERK solve on the grid shapes, exact total in blocks.
  erk = sj.erdos_renyi({"/".join(p): jnp.zeros(s) for p, s in grid_shapes.items()}, 0.75)
  init = lambda tx: so.get_masks(jax.jit(tx.init)(params))  # noqa: E731
  masks = init(so.static_sparse(optax.sgd(0.1), sparsity=0.75, pattern=B, key=4))
  total = 0
  for p in KERNELS:
    n = int(np.prod(grid_shapes[p]))
    kept = int(to_grid(leaf(masks, p)).sum())
    assert kept == keep_count(n, float(erk["/".join(p)]))
    total += kept
  assert total == sum(n - math.floor(0.75 * n) for n in
                      (int(np.prod(s)) for s in grid_shapes.values()))
  assert masks["fc1"]["bias"] is None
  # Uniform, magnitude: the top blocks by block sum of |W| in every leaf.
  masks = init(so.static_sparse(optax.sgd(0.1), sparsity=0.6, pattern=B, scores="magnitude",
                                distribution="uniform"))
  for p in KERNELS:
    s = block_sums(np.abs(leaf(params, p)))
    want = topk(s, keep_count(s.size, 0.6), np.ones(s.shape, bool))
    np.testing.assert_array_equal(to_grid(leaf(masks, p)), want)
  # SNIP (a score tree), global: one top-k over the block sums of all leaves.
  x = jax.random.normal(jax.random.key(1), (32, 16))
  y = jax.random.normal(jax.random.key(2), (32, 8))
  snip = sj.saliency(params, jax.grad(loss_fn)(params, x, y))
  masks = init(so.static_sparse(optax.sgd(0.1), sparsity=0.8, pattern=B, scores=snip,
                                distribution="global"))
  flat = np.concatenate([block_sums(leaf(snip, p)).ravel() for p in KERNELS])
  sel = topk(flat, keep_count(flat.size, 0.8), np.ones(flat.size, bool))
  got = np.concatenate([to_grid(leaf(masks, p)).ravel() for p in KERNELS])
  np.testing.assert_array_equal(got, sel)


def test_channel_pattern_keeps_whole_output_neurons():
  params = make_params()
  tx = so.static_sparse(optax.sgd(0.1), sparsity=0.5, pattern=sj.Channel(-1),
                        scores="magnitude", distribution="uniform")
  masks = so.get_masks(jax.jit(tx.init)(params))
  for p in KERNELS:
    w = np.abs(np.asarray(leaf(params, p), np.float64))
    col = topk(w.sum(axis=0), keep_count(w.shape[1], 0.5), np.ones(w.shape[1], bool))
    np.testing.assert_array_equal(leaf(masks, p), np.broadcast_to(col, w.shape))


def test_nm_pattern_one_shot_and_static():
  params = make_params()
  nm = sj.NM(2, 4)

  def ref(w):  # top 2 |w| of every group of 4 along the input axis (ties: lower index)
    a = np.abs(np.asarray(w))
    g = a.reshape(a.shape[0] // 4, 4, a.shape[1])
    order = np.argsort(-g, axis=1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[:, :2], True, axis=1)
    return keep.reshape(a.shape)

  tx = so.one_shot_pruning(optax.sgd(0.0), pattern=nm)
  _, s = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  st = so.static_sparse(optax.sgd(0.0), pattern=nm, scores="magnitude").init(params)
  st_text = so.static_sparse(optax.sgd(0.0), pattern="2:4", scores="magnitude").init(params)
  for masks in (so.get_masks(s), so.get_masks(st), so.get_masks(st_text)):
    for p in KERNELS:
      np.testing.assert_array_equal(leaf(masks, p), ref(leaf(params, p)))
  assert float(so.get_target_sparsity(s)) == 0.5


def test_pattern_errors_name_the_leaf():
  params = {"a": {"kernel": jnp.ones((8, 6))}, "b": jnp.ones((8, 8))}
  with pytest.raises(ValueError, match="'a/kernel'.*does not divide"):
    so.rigl(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=10,
            pattern=sj.Block(4, 4)).init(params)
  bad = {"a": {"kernel": jnp.ones((8, 6), bool)}, "b": jnp.eye(8, dtype=bool)}
  with pytest.raises(ValueError, match="'b' is not constant on the units"):
    so.static_sparse(optax.sgd(0.1), masks=bad, pattern=sj.Block(2, 2)).init(params)
  with pytest.raises(ValueError, match="gradual schedule"):
    so.gradual_magnitude_pruning(optax.sgd(0.1), sparsity=0.5, end_step=4, pattern=sj.NM(2, 4))
  with pytest.raises(ValueError, match="drop-and-grow"):
    so.set_training(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=4, pattern=sj.NM(2, 4))
  with pytest.raises(ValueError, match="fixes the sparsity to 0.5"):
    so.one_shot_pruning(optax.sgd(0.1), sparsity=0.9, pattern=sj.NM(2, 4))
  with pytest.raises(ValueError, match="static_sparse: unknown pattern '4x4'"):
    so.static_sparse(optax.sgd(0.1), sparsity=0.5, pattern="4x4")
  with pytest.raises(ValueError, match="N:M pattern '2:x' must look like 'n:m'"):
    so.one_shot_pruning(optax.sgd(0.1), pattern="2:x")
  with pytest.raises(TypeError, match="dynamic_sparse: pattern 3 is not a pattern"):
    so.rigl(optax.sgd(0.1), sparsity=0.5, update_every=1, end_step=4, pattern=3)
  with pytest.raises(ValueError, match="gradual schedule"):  # "n:m" is NM(n, m) here too
    so.gradual_magnitude_pruning(optax.sgd(0.1), sparsity=0.5, end_step=4, pattern="2:4")


def test_block_rigl_under_optimizer_wrappers():
  rigl = lambda inner: so.rigl(inner, pattern=B, **DST)  # noqa: E731
  runs = run({
      "plain": rigl(optax.adam(1e-2)),
      "inject": optax.inject_hyperparams(so.rigl, static_args=("pattern", "distribution"))(
          optax.adam(1e-2), pattern=B, **DST),
      "apply_if_finite": optax.apply_if_finite(rigl(optax.adam(1e-2)), 3),
      "multisteps": optax.MultiSteps(rigl(optax.adam(1e-2)), 2).gradient_transformation(),
      "chain": optax.chain(optax.adam(1e-2), so.rigl(None, pattern=B, **DST)),
  })
  ref = runs["plain"][1]
  for name, (init, hist) in runs.items():
    check_hard(hist, range(1, STEPS, 2) if name == "multisteps" else range(STEPS))
    if name in ("inject", "apply_if_finite"):  # the same numbers as the plain transformation
      for p in KERNELS:
        np.testing.assert_array_equal(leaf(hist["masks"], p), leaf(ref["masks"], p))
        np.testing.assert_allclose(leaf(hist["after"], p), leaf(ref["after"], p), rtol=1e-6)
    if name == "multisteps":  # one mask update per committed step, blocks still exact
      for p in KERNELS:
        counts = [int(to_grid(m).sum()) for m in leaf(hist["masks"], p)]
        assert len(set(counts)) == 1
    if name == "inject":
      check_drop_grow(name, init, hist, grow_by_gradient=True)


def test_block_rigl_with_nnx_optimizer():
  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(16, 24, rngs=rngs)
      self.fc2 = nnx.Linear(24, 8, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.tanh(self.fc1(x)))

  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.rigl(optax.adam(1e-2), pattern=B, **DST), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(5), (32, 16))
  y = jax.random.normal(jax.random.key(6), (32, 8))

  @nnx.jit
  def step(model, opt):
    opt.update(model, nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model))

  first = None
  for _ in range(STEPS):
    step(model, opt)
    masks = so.get_masks(opt.opt_state)
    for name in ("fc1", "fc2"):
      m = np.asarray(masks[name]["kernel"])
      grid = to_grid(m)
      assert np.all(np.asarray(getattr(model, name).kernel[...])[~m] == 0)
      assert masks[name]["bias"] is None
    first = grid if first is None else first
    assert grid.sum() == first.sum()


def test_block_training_on_a_mesh():
  import test_sharding_optim as tso  # pylint: disable=import-outside-toplevel
  # 8x8 blocks fit the per-device shards of the mesh layouts of that module.
  tso.METHODS.setdefault("block_rigl", lambda: so.rigl(
      optax.adam(1e-2), sparsity=0.8, update_every=2, begin_step=1, end_step=tso.STEPS,
      pattern=sj.Block(8, 8)))
  tso.check_sharded_training("block_rigl", "fsdp")


def test_grid_doctests():
  import doctest  # pylint: disable=import-outside-toplevel
  from sparsejax.optim import grid  # pylint: disable=import-outside-toplevel
  res = doctest.testmod(grid, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
