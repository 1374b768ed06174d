"""The shared mechanism: exact zeros, moment reset, accessors, composition, errors."""

from __future__ import annotations

import doctest
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.optim as so


def mlp_params(key=0):
  k = jax.random.split(jax.random.key(key), 2)
  return {"fc1": {"kernel": jax.random.normal(k[0], (16, 24)), "bias": jnp.zeros(24)},
          "fc2": {"kernel": jax.random.normal(k[1], (24, 8)), "bias": jnp.zeros(8)}}


def grads_like(params, key):
  leaves, tdef = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.key(key), len(leaves))
  return jax.tree.unflatten(tdef, [jax.random.normal(k, x.shape) for k, x in zip(ks, leaves)])


# ------------------------------------------------------------------ exact zeros


@pytest.mark.smoke
def test_exact_zeros_with_plain_apply_updates_and_chain_tail():
  p = mlp_params()
  # Wrapper form.
  tx = so.one_shot_pruning(optax.adam(1e-1), sparsity=0.8)
  s = tx.init(p)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for i in range(4):
    u, s = step(p, s, grads_like(p, i))
    p = optax.apply_updates(p, u)
    m = so.get_masks(s)
    for k in ("fc1", "fc2"):
      assert np.all(np.asarray(p[k]["kernel"])[~np.asarray(m[k]["kernel"])] == 0.0)
      assert int(m[k]["kernel"].sum()) == round(p[k]["kernel"].size * 0.2)
  # Chain-tail form: inner=None after the optimizer.
  p = mlp_params()
  tx = optax.chain(optax.adam(1e-1), so.gradual_magnitude_pruning(sparsity=0.5, end_step=2,
                                                                   frequency=1))
  s = tx.init(p)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  for i in range(4):
    u, s = step(p, s, grads_like(p, i))
    p = optax.apply_updates(p, u)
  m = so.get_masks(s)
  assert int(m["fc1"]["kernel"].sum()) == 16 * 24 // 2
  assert np.all(np.asarray(p["fc1"]["kernel"])[~np.asarray(m["fc1"]["kernel"])] == 0.0)


# ------------------------------------------------------------------ moments


def test_reset_moments_generic():
  p = {"w": jnp.ones((4, 3)), "b": jnp.ones(3), "big": jnp.ones((256, 256))}
  pos = {"w": jnp.zeros((4, 3), bool).at[1, 2].set(True), "b": None,
         "big": jnp.zeros((256, 256), bool).at[0, 0].set(True)}
  g = jax.tree.map(jnp.ones_like, p)
  opts = {
      "momentum": (optax.sgd(0.1, momentum=0.9), lambda s: [s[0].trace]),
      "adam": (optax.adam(1e-3), lambda s: [s[0].mu, s[0].nu]),
      "lion": (optax.lion(1e-3), lambda s: [s[0].mu]),
      "rmsprop": (optax.rmsprop(1e-3), lambda s: [s[0].nu]),
      "inject": (optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
                 lambda s: [s.inner_state[0].mu, s.inner_state[0].nu]),
      "chain": (optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
                lambda s: [s[1][0].mu, s[1][0].nu]),
      "adafactor": (optax.adafactor(1e-3), lambda s: [s[0].v]),
  }
  for name, (opt, moments_of) in opts.items():
    s = opt.init(p)
    _, s = opt.update(g, s, p)
    r = so.reset_moments(opt, s, pos)
    for before, after in zip(moments_of(s), moments_of(r)):
      for k in ("w", "big"):
        b, a = np.asarray(before[k]), np.asarray(after[k])
        if b.shape != pos[k].shape:  # adafactor: factored, cannot be reset per entry
          np.testing.assert_array_equal(a, b)
          continue
        assert b[np.asarray(pos[k])].max() != 0, name
        assert np.all(a[np.asarray(pos[k])] == 0), name
        np.testing.assert_array_equal(a[~np.asarray(pos[k])], b[~np.asarray(pos[k])])
      np.testing.assert_array_equal(after["b"], before["b"])
    if name == "adafactor":  # the unfactored 2-D leaf is reset, the factored one kept
      assert float(moments_of(r)[0]["w"][1, 2]) == 0.0


# ------------------------------------------------------------------ accessors


@pytest.mark.smoke
def test_accessors_through_wrappers():
  p = mlp_params()
  inner = lambda: so.static_sparse(optax.adam(1e-3), sparsity=0.5)
  for tx in (inner(), optax.chain(optax.clip(1.0), inner()),
             optax.MultiSteps(inner(), 2).gradient_transformation(),
             optax.apply_if_finite(inner(), 2),
             optax.inject_hyperparams(so.static_sparse)(optax.adam(1e-3), sparsity=0.5)):
    s = tx.init(p)
    u, s = jax.jit(tx.update)(grads_like(p, 0), s, p)
    m = so.get_masks(s)
    assert m["fc1"]["bias"] is None and m["fc1"]["kernel"].dtype == jnp.bool_
    chex.assert_trees_all_equal(optax.tree.get(s, "sparse_masks"), m)
    assert int(so.get_step(s)) in (0, 1)
    assert float(so.get_target_sparsity(s)) == 0.5
    assert float(so.get_beta(s)) == 0.0
  two = (so.ste(optax.sgd(1.0)).init(p), so.ste(optax.sgd(1.0)).init(p))
  with pytest.raises(ValueError, match="2 SparseStates"):
    so.get_masks(two)
  with pytest.raises(ValueError, match="no sparsejax SparseState"):
    so.get_masks(optax.adam(1.0).init(p))


def test_forward_params_gradients():
  w = jnp.array([[1.0], [-4.0], [2.0], [3.0]])
  p = {"w": w}
  tx = so.mdgf(optax.sgd(1.0), nm="2:4", rate=0.5)
  s = tx.init(p)
  _, s = jax.jit(tx.update)({"w": jnp.zeros_like(w)}, s, p)  # beta_1 = 0.5
  beta = float(so.get_beta(s))
  assert beta == 0.5
  m = np.asarray(so.get_masks(s)["w"]).ravel()
  assert m.tolist() == [False, True, False, True]
  fp = so.forward_params(p, s)["w"].ravel()
  np.testing.assert_allclose(fp, np.where(m, w.ravel(), beta * w.ravel()))
  loss = lambda q, st: jnp.sum(so.forward_params(q, s, straight_through=st)["w"] ** 2)
  g_ste = jax.grad(loss)(p, True)["w"].ravel()
  g_scaled = jax.grad(loss)(p, False)["w"].ravel()
  weff = np.where(m, w.ravel(), beta * w.ravel())
  np.testing.assert_allclose(g_ste, 2 * weff, rtol=1e-6)  # dL/dW_eff passed straight through
  np.testing.assert_allclose(g_scaled, 2 * weff * np.where(m, 1.0, beta), rtol=1e-6)


def test_apply_state_masks():
  p = mlp_params()
  s = so.static_sparse(optax.sgd(0.1), sparsity=0.9).init(p)
  q = so.apply_state_masks(p, s)
  m = so.get_masks(s)
  assert np.all(np.asarray(q["fc1"]["kernel"])[~np.asarray(m["fc1"]["kernel"])] == 0)
  np.testing.assert_array_equal(q["fc1"]["bias"], p["fc1"]["bias"])


# ------------------------------------------------------------------ NaN / Inf


@pytest.mark.smoke
@pytest.mark.parametrize("placement", ["outer", "inner"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_grads_leave_masks_and_params(placement, bad):
  p = mlp_params()
  kw = dict(sparsity=0.5, update_every=1, end_step=10, begin_step=0)
  if placement == "outer":
    tx = optax.apply_if_finite(so.rigl(optax.adam(1e-2), **kw), 5)
  else:
    tx = so.rigl(optax.apply_if_finite(optax.adam(1e-2), 5), **kw)
  s = tx.init(p)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  u, s = step(p, s, grads_like(p, 0))
  p = optax.apply_updates(p, u)
  m0, p0 = so.get_masks(s), p
  g = grads_like(p, 1)
  i, j = np.argwhere(np.asarray(m0["fc1"]["kernel"]))[0]  # a trained entry: its grad reaches the inner
  g["fc1"]["kernel"] = g["fc1"]["kernel"].at[i, j].set(bad)
  u, s = step(p, s, g)  # a mask-update step with a non-finite gradient
  p = optax.apply_updates(p, u)
  if placement == "outer":  # apply_if_finite drops the whole step
    chex.assert_trees_all_equal(so.get_masks(s), m0)
    chex.assert_trees_all_equal(p, p0)
  else:  # judged per leaf: only fc1/kernel keeps its mask and owes the update
    chex.assert_trees_all_equal(so.get_masks(s)["fc1"]["kernel"], m0["fc1"]["kernel"])
    chex.assert_trees_all_equal(p["fc1"]["kernel"], p0["fc1"]["kernel"])
    assert int(so.get_sparse_state(s).sparse_owed["fc1"]["kernel"]) == 1
  u, s = step(p, s, grads_like(p, 2))  # recovers on the next finite step
  p = optax.apply_updates(p, u)
  assert not np.array_equal(np.asarray(so.get_masks(s)["fc1"]["kernel"]),
                            np.asarray(m0["fc1"]["kernel"]))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))


# ------------------------------------------------------------------ one trace


METHODS = {
    "gmp": lambda o: so.gradual_magnitude_pruning(o, sparsity=0.8, end_step=6, frequency=2),
    "one_shot": lambda o: so.one_shot_pruning(o, sparsity=0.8, step=3),
    "static": lambda o: so.static_sparse(o, sparsity=0.8),
    "set": lambda o: so.set_training(o, sparsity=0.8, update_every=2, end_step=6),
    "rigl": lambda o: so.rigl(o, sparsity=0.8, update_every=2, end_step=6,
                              skip_gradient_on_update=True),
    "ste": lambda o: so.ste(o, nm="2:4"),
    "srste": lambda o: so.srste(o, nm="2:4"),
    "mdgf": lambda o: so.mdgf(o, nm="1:8", rate=0.2, total_steps=8, dense_steps=1,
                              finetune_steps=2),
    "sdgf": lambda o: so.sdgf(o, nm="1:8", total_steps=8, dense_steps=1, finetune_steps=2),
    "gradmask": lambda o: so.rigl(so.gradient_masking(o, fraction=0.5), sparsity=0.8,
                                  update_every=2, end_step=6),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_one_trace_over_update_and_ordinary_steps(name):
  chex.clear_trace_counter()
  tx = METHODS[name](optax.adam(1e-2))
  p = mlp_params()
  s = tx.init(p)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  for i in range(8):  # covers mask-update, ordinary, warm-up and fine-tune steps
    p, s = step(p, s, grads_like(p, i))
  assert int(so.get_step(s)) == 8


# ------------------------------------------------------------------ composition


def test_multisteps_equals_mean_gradient():
  """MultiSteps(rigl(sgd), k) == rigl(sgd) fed the mean of the k micro-gradients."""
  k = 3
  kw = dict(sparsity=0.6, update_every=2, end_step=20, distribution="uniform")
  ms = optax.MultiSteps(so.rigl(optax.sgd(0.1, momentum=0.9), **kw), k)
  ref = so.rigl(optax.sgd(0.1, momentum=0.9), **kw)
  p1 = p2 = mlp_params()
  s1, s2 = ms.init(p1), ref.init(p2)
  up1, up2 = jax.jit(ms.update), jax.jit(ref.update)
  for t in range(4):
    gs = [grads_like(p1, 10 * t + j) for j in range(k)]
    for j, g in enumerate(gs):
      u, s1 = up1(g, s1, p1)
      p1 = optax.apply_updates(p1, u)
      if j < k - 1:
        assert int(so.get_step(s1)) == t  # not committed before the emitting micro-step
    mean = jax.tree.map(lambda *x: sum(x) / k, *gs)
    u, s2 = up2(mean, s2, p2)
    p2 = optax.apply_updates(p2, u)
    assert int(so.get_step(s1)) == int(so.get_step(s2)) == t + 1
    chex.assert_trees_all_equal(so.get_masks(s1), so.get_masks(s2))
    chex.assert_trees_all_close(p1, p2, rtol=1e-5, atol=1e-6)


@pytest.mark.smoke
def test_injected_sparsity():
  p = {"w": jax.random.normal(jax.random.key(0), (32, 32)), "b": jnp.zeros(32)}
  tx = optax.inject_hyperparams(so.gradual_magnitude_pruning)(
      optax.adam(1e-3), sparsity=0.5, end_step=4, frequency=1)
  s = tx.init(p)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  seen = []
  for i in range(7):
    if i == 3:
      s.hyperparams["sparsity"] = jnp.asarray(0.75)
    u, s = step(p, s, grads_like(p, i))
    p = optax.apply_updates(p, u)
    seen.append(int(so.get_masks(s)["w"].sum()))
  want = [round(1024 * (1 - 0.5 * (1 - (1 - t / 4) ** 3))) for t in range(3)]
  want += [round(1024 * (1 - 0.75 * (1 - (1 - min(t, 4) / 4) ** 3))) for t in range(3, 7)]
  assert [abs(a - b) <= 1 for a, b in zip(seen, want)] == [True] * 7, (seen, want)
  assert seen[-1] == 256


def test_skip_gradient_on_update():
  p = mlp_params()
  tx = so.rigl(optax.adam(1e-2), sparsity=0.5, update_every=2, end_step=10, begin_step=1,
               skip_gradient_on_update=True, distribution="uniform")
  s = tx.init(p)
  p = so.apply_state_masks(p, s)
  step = jax.jit(lambda p, s, g: tx.update(g, s, p))
  u, s = step(p, s, grads_like(p, 0))  # step 0: ordinary
  p = optax.apply_updates(p, u)
  count_before = int(so.get_sparse_state(s).sparse_inner[0].count)
  m_before = so.get_masks(s)
  u, s = step(p, s, grads_like(p, 1))  # step 1: mask update, no gradient step
  p_new = optax.apply_updates(p, u)
  m_after = so.get_masks(s)
  old, new = np.asarray(p["fc1"]["kernel"]), np.asarray(p_new["fc1"]["kernel"])
  changed = old != new
  # No gradient step: only dropped (or regrown, restarting at 0) weights changed.
  assert changed.any() and np.all(new[changed] == 0)
  assert np.all(np.asarray(m_before["fc1"]["kernel"])[changed])
  np.testing.assert_array_equal(p_new["fc1"]["bias"], p["fc1"]["bias"])
  assert int(so.get_sparse_state(s).sparse_inner[0].count) == count_before
  assert not np.array_equal(np.asarray(m_before["fc1"]["kernel"]),
                            np.asarray(m_after["fc1"]["kernel"]))


def test_nnx_optimizer():
  from flax import nnx

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(16, 32, rngs=rngs)
      self.fc2 = nnx.Linear(32, 8, rngs=rngs)

    def __call__(self, x):
      return self.fc2(jax.nn.relu(self.fc1(x)))

  x = jax.random.normal(jax.random.key(1), (8, 16))
  y = jax.random.normal(jax.random.key(2), (8, 8))
  # Hard sparsity: params are exactly sparse inside the model after nnx updates.
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.rigl(optax.adam(1e-2), sparsity=0.75, update_every=2,
                                     end_step=8), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    g = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    opt.update(model, g)

  for _ in range(5):
    step(model, opt)
  m = so.get_masks(opt.opt_state)
  assert m["fc1"]["bias"] is None
  k = np.asarray(model.fc1.kernel[...])
  assert np.all(k[~np.asarray(m["fc1"]["kernel"])] == 0)
  assert int(so.get_step(opt.opt_state)) == 5
  # STE: forward through nnx.split / merge with forward_params.
  model = MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.srste(optax.adam(1e-2), nm="2:4"), wrt=nnx.Param)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @nnx.jit
  def ste_step(model, opt):
    def loss(m):
      gd, prm, rst = nnx.split(m, nnx.Param, ...)
      fwd = nnx.merge(gd, so.forward_params(prm, opt.opt_state), rst)
      return jnp.mean((fwd(x) - y) ** 2)
    opt.update(model, nnx.grad(loss)(model))

  for _ in range(3):
    ste_step(model, opt)
  fwd = so.forward_params(nnx.state(model, nnx.Param), opt.opt_state)
  kf = np.asarray(fwd["fc1"]["kernel"])
  assert np.all((kf.reshape(4, 4, 32) != 0).sum(1) <= 2)
  assert np.count_nonzero(np.asarray(model.fc1.kernel[...])) > kf.size * 0.9  # stored dense
  del graphdef, params, rest


# ------------------------------------------------------------------ gradient masking


def test_gradient_masking_reference_and_composition():
  g = {"w": jnp.array([[0.0, 3.0, -1.0, 2.0], [0.5, 0.0, -4.0, 0.25]]), "b": jnp.ones(4)}
  tx = so.gradient_masking(fraction=0.5)
  u, _ = tx.update(g, tx.init(g))
  w = np.asarray(g["w"])
  nz = np.flatnonzero(w.ravel())
  k = int(round(0.5 * nz.size))
  keep = nz[np.argsort(-np.abs(w.ravel()[nz]), kind="stable")[:k]]
  want = np.zeros_like(w.ravel())
  want[keep] = w.ravel()[keep]
  np.testing.assert_array_equal(np.asarray(u["w"]).ravel(), want)
  np.testing.assert_array_equal(u["b"], g["b"])
  # Inside RigL the fraction is relative to the active weights.
  p = mlp_params()
  tx = so.rigl(so.gradient_masking(optax.sgd(1.0), fraction=0.25), sparsity=0.5,
               update_every=100, end_step=200, distribution="uniform")
  s = tx.init(p)
  p = so.apply_state_masks(p, s)
  gg = grads_like(p, 3)
  u, s = tx.update(gg, s, p)
  active = int(so.get_masks(s)["fc1"]["kernel"].sum())
  assert int(jnp.sum(u["fc1"]["kernel"] != 0)) == round(0.25 * active)
  # Chain head with injected fraction.
  tx = optax.chain(optax.inject_hyperparams(so.gradient_masking)(fraction=0.5), optax.sgd(1.0))
  s = tx.init(p)
  u, s = jax.jit(tx.update)(gg, s, p)
  assert int(jnp.sum(u["fc2"]["kernel"] != 0)) == round(0.5 * 24 * 8)


# ------------------------------------------------------------------ bad inputs


@pytest.mark.smoke
def test_bad_inputs_raise_at_construction_or_init():
  p = mlp_params()
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="sparsity"):
    so.gradual_magnitude_pruning(sgd, sparsity=1.5, end_step=10)
  with pytest.raises(ValueError, match="sparsity"):
    so.one_shot_pruning(sgd, sparsity=1.0)
  with pytest.raises(ValueError, match="sparsity"):
    so.static_sparse(sgd, sparsity=-0.1)
  with pytest.raises(ValueError, match="sparsity"):
    so.rigl(sgd, sparsity=2.0, end_step=10)
  with pytest.raises(ValueError, match="sparsity"):
    so.set_training(sgd, sparsity=1.2, end_step=10)
  with pytest.raises(ValueError, match="frequency"):
    so.gradual_magnitude_pruning(sgd, sparsity=0.5, end_step=10, frequency=0)
  with pytest.raises(ValueError, match="update_every"):
    so.rigl(sgd, sparsity=0.5, end_step=10, update_every=0)
  with pytest.raises(ValueError, match="drop_fraction"):
    so.rigl(sgd, sparsity=0.5, end_step=10, drop_fraction=1.5)
  with pytest.raises(ValueError, match="distribution"):
    so.static_sparse(sgd, sparsity=0.5, distribution="erdos")
  with pytest.raises(ValueError, match="grow"):
    so.dynamic_sparse(sgd, sparsity=0.5, end_step=1000, grow="magic")
  with pytest.raises(ValueError, match="fraction"):
    so.gradient_masking(sgd, fraction=0.0)
  with pytest.raises(TypeError, match="inner"):
    so.srste(None)
  with pytest.raises(ValueError, match="1 <= N <= M"):
    so.ste(sgd, nm="5:4")
  with pytest.raises(ValueError, match="finetune_steps needs total_steps"):
    so.mdgf(sgd, rate=0.1, finetune_steps=5)
  # N:M on an indivisible reduction axis: init names the leaf path.
  bad = {"fc1": {"kernel": jnp.ones((6, 8)), "bias": jnp.ones(8)}}
  for tx in (so.ste(sgd, nm="2:4"), so.srste(sgd, nm="1:4"), so.mdgf(sgd, nm="2:4", rate=0.1),
             so.sdgf(sgd, nm="1:4", total_steps=10)):
    with pytest.raises(ValueError, match="fc1/kernel"):
      tx.init(bad)
  with pytest.raises(ValueError, match="fc1/kernel"):  # geometric 8:64 needs axis % 64 == 0
    so.sdgf(sgd, nm="1:8", kind="geometric", total_steps=10).init(p)
  # Mask / params mismatch at init, naming the path.
  wrong = {"fc1": {"kernel": jnp.ones((16, 23), bool), "bias": None},
           "fc2": {"kernel": jnp.ones((24, 8), bool), "bias": None}}
  with pytest.raises(ValueError, match="fc1/kernel"):
    so.static_sparse(sgd, masks=wrong).init(p)
  with pytest.raises(ValueError, match="fc2"):
    so.rigl(sgd, masks={"fc1": {"kernel": jnp.ones((16, 24), bool), "bias": None}},
            end_step=1000).init(p)
  with pytest.raises(TypeError, match="fc2/kernel"):
    so.static_sparse(sgd, masks={"fc1": {"kernel": jnp.ones((16, 24), bool), "bias": None},
                                 "fc2": {"kernel": jnp.ones((24, 8)), "bias": None}}).init(p)
  with pytest.raises(ValueError, match="matches no leaf"):
    so.one_shot_pruning(sgd, sparsity=0.5, include="conv").init(p)
  with pytest.raises(ValueError, match="params"):
    tx = so.ste(sgd)
    tx.update(p, tx.init(p))


def test_doctests():
  for name in ("state", "moments", "wrapper", "pruning", "dst", "nm", "pgf",
               "gradient_masking"):
    mod = importlib.import_module(f"sparsejax.optim.{name}")
    res = doctest.testmod(mod, extraglobs={"jax": jax}, optionflags=doctest.ELLIPSIS)
    assert res.failed == 0, name
    assert res.attempted > 0, name
