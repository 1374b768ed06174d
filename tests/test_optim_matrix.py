"""Invariants of every sparse method x every optimizer over many jitted steps.

For each pair, ``STEPS`` training steps run in one jitted ``lax.scan`` and the
history (params, masks, inner optimizer state) is checked in NumPy after
every step:

* hard methods: weights outside the mask are exactly 0 after each step;
  SET/RigL keep nnz constant; newly grown weights are 0 with all their
  params-shaped optimizer moments 0; magnitude pruning follows its schedule
  (kept count per leaf = round(size * (1 - s_t)), s_t from a float64 formula);
* N:M methods: every group of M along the reduction axis holds exactly N kept
  entries of the scheduled pattern; the forward weights are exactly
  ``W * (m + (1 - m) * beta_t)``; fine-tune phases make the stored weights
  exactly N:M sparse.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax.optim as so
from sparsejax import schedules as sch

STEPS = 24
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
UPDATE_EVERY = 3
END = 18


def make_params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k[0], (16, 24)), "bias": jnp.zeros(24)},
          "fc2": {"kernel": jax.random.normal(k[1], (24, 8)) * 0.3, "bias": jnp.zeros(8)}}


def loss_fn(p, x, y):
  h = jax.nn.tanh(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
  return jnp.mean((h @ p["fc2"]["kernel"] + p["fc2"]["bias"] - y) ** 2)


OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.05),
    "momentum": lambda: optax.sgd(0.05, momentum=0.9),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
    "adafactor": lambda: optax.adafactor(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "rmsprop": lambda: optax.rmsprop(1e-2),
    "inject(adam)": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "chain(clip,adam)": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "MultiSteps(inner)": lambda: optax.MultiSteps(optax.adam(1e-2), 2).gradient_transformation(),
    "apply_if_finite(inner)": lambda: optax.apply_if_finite(optax.adam(1e-2), 3),
}
# Wrappers placed around the sparse transformation.
OUTER = {
    "MultiSteps(outer)": lambda tx: optax.MultiSteps(tx, 2).gradient_transformation(),
    "apply_if_finite(outer)": lambda tx: optax.apply_if_finite(tx, 3),
}

SPARSITY = 0.75
# fc2/kernel is excluded: every run also checks a dense kernel next to a masked one.
EX = "fc2"
METHODS = {
    "gmp": lambda o: so.gradual_magnitude_pruning(o, sparsity=SPARSITY, begin_step=2,
                                                  end_step=14, frequency=UPDATE_EVERY,
                                                  exclude=EX),
    "one_shot": lambda o: so.one_shot_pruning(o, sparsity=SPARSITY, step=4, exclude=EX),
    "static_erk": lambda o: so.static_sparse(o, sparsity=SPARSITY, key=1, exclude=EX),
    "set": lambda o: so.set_training(o, sparsity=SPARSITY, update_every=UPDATE_EVERY,
                                     end_step=END, drop_fraction=0.5, key=2, exclude=EX),
    "rigl": lambda o: so.rigl(o, sparsity=SPARSITY, update_every=UPDATE_EVERY, end_step=END,
                              drop_fraction=0.5, distribution="uniform", exclude=EX),
    "ste": lambda o: so.ste(o, nm="2:4", exclude=EX),
    "srste": lambda o: so.srste(o, nm="1:4", decay=1e-2, exclude=EX),
    "mdgf": lambda o: so.mdgf(o, nm="1:8", rate=0.1, kind="linear", total_steps=STEPS,
                              dense_steps=2, finetune_steps=5, exclude=EX),
    "sdgf": lambda o: so.sdgf(o, nm="1:4", total_steps=STEPS, dense_steps=2,
                              finetune_steps=5, exclude=EX),
}
HARD = {"gmp", "one_shot", "static_erk", "set", "rigl"}
DST = {"set", "rigl"}
KERNELS = (("fc1", "kernel"),)


def run_many(cases):
  """Jitted training histories of several (name -> (tx, steps)) in ONE program.

  One compilation for all optimizers of a method (compile time dominates these
  tiny runs); the histories are checked afterwards in NumPy.
  """
  params = make_params()
  x = jax.random.normal(jax.random.key(5), (32, 16))
  y = jax.random.normal(jax.random.key(6), (32, 8))
  states = {name: tx.init(params) for name, (tx, _) in cases.items()}

  def one(tx, steps, state):
    def body(carry, i):
      p, s = carry
      g = jax.grad(lambda q: loss_fn(so.forward_params(q, s), x * (1 + 0.01 * i), y))(p)
      u, s = tx.update(g, s, p)
      p = optax.apply_updates(p, u)
      st = so.get_sparse_state(s)
      return (p, s), dict(params=p, masks=st.sparse_masks, inner=st.sparse_inner,
                          step=st.sparse_step, beta=st.sparse_beta,
                          target=st.sparse_target, fwd=so.forward_params(p, s))
    return jax.lax.scan(body, (params, state), jnp.arange(steps))[1]

  def all_runs(states):
    return {name: one(tx, steps, states[name]) for name, (tx, steps) in cases.items()}

  # Unoptimised LLVM code generation: these runs are tiny and compile-bound.
  compiled = jax.jit(all_runs).lower(states).compile(compiler_options=FAST_COMPILE)
  hist = jax.tree.map(np.asarray, compiled(states))
  return {name: (so.get_sparse_state(states[name]), hist[name]) for name in cases}


def leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def moments_at(inner, inner_hist, positions_hist):
  """Max |moment| at ``positions`` over every params-shaped subtree (float64, NumPy)."""
  out = []

  def f(v, pos):
    if pos is False or not hasattr(v, "shape") or v.shape != pos.shape:
      return v
    out.append(float(np.max(np.abs(np.where(pos, v, 0)))) if pos.any() else 0.0)
    return v

  optax.tree_utils.tree_map_params(inner, f, inner_hist, positions_hist)
  return max(out) if out else 0.0


def nm_expected(method, step):
  """(n, m) pattern of the forward masks at sparse step ``step`` (None: dense)."""
  if method == "ste":
    return (2, 4)
  if method == "srste":
    return (1, 4)
  if step < 2:
    return None
  if method == "mdgf":
    return (1, 8)
  ft = STEPS - 5
  if step >= ft:
    return (1, 4)
  pats = sch.sdgf_patterns("1:4")
  starts = [2 + (i * (ft - 2)) // len(pats) for i in range(len(pats))]
  idx = max(i for i, s in enumerate(starts) if s <= step)
  return pats[idx]


def check_nm(mask, n, m):
  g = mask.reshape(mask.shape[0] // m, m, mask.shape[1])
  assert np.all(g.sum(axis=1) == n), f"not {n}:{m} along axis -2"


# Adafactor adds its epsilon (1e-30) into the second moment of every entry on
# every step: a regrown weight's moment is that floor, not 0.
MOMENT_FLOOR = {"adafactor": 1e-29}


def check_history(method, init_st, hist, inner, micro, moment_floor=0.0):
  """``micro``: micro-steps per committed step (MultiSteps outer: 2)."""
  T = hist["step"].shape[0]
  prev_masks = init_st.sparse_masks
  sizes = {p: int(np.prod(leaf(hist["params"], p).shape[1:])) for p in KERNELS}
  nnz0 = {p: int(np.asarray(leaf(prev_masks, p)).sum()) for p in KERNELS}
  for t in range(T):
    step = int(hist["step"][t])
    assert step == (t + 1) // micro
    masks = {p: leaf(hist["masks"], p)[t] for p in KERNELS}
    params = {p: leaf(hist["params"], p)[t] for p in KERNELS}
    for path in (("fc1", "bias"), ("fc2", "bias"), ("fc2", "kernel")):
      assert leaf(hist["masks"], path) is None  # biases and the excluded kernel stay dense
    assert np.count_nonzero(leaf(hist["params"], ("fc2", "kernel"))[t]) == 24 * 8
    if method in HARD:
      for p in KERNELS:
        assert np.all(params[p][~masks[p]] == 0), f"{method}: pruned weight not zero at {p}"
    if method in DST:
      for p in KERNELS:
        assert masks[p].sum() == nnz0[p], "nnz changed"
      grown = jax.tree.map(
          lambda new, old: None if new is None else (new[t] & ~np.asarray(old)),
          hist["masks"], prev_masks, is_leaf=lambda z: z is None)
      for p in KERNELS:
        assert np.all(params[p][leaf(grown, p)] == 0), "grown weight not zero"
      inner_t = jax.tree.map(lambda z: z[t], hist["inner"])
      grown_full = jax.tree.map(lambda g: False if g is None else g, grown,
                                is_leaf=lambda z: z is None)
      assert moments_at(inner, inner_t, grown_full) <= moment_floor, \
          "moments of grown weights not reset"
    if method in ("gmp", "one_shot"):
      last_update = None
      for s in range(step):  # masks reflect the last update step < step
        upd = (s >= 2 and (s - 2) % UPDATE_EVERY == 0 and s <= 14) or s == 14 \
            if method == "gmp" else s == 4
        if upd:
          last_update = s
      if last_update is None:
        want = 0.0
      elif method == "gmp":
        frac = min(max((last_update - 2) / 12, 0.0), 1.0)
        want = SPARSITY * (1 - (1 - frac) ** 3)
      else:
        want = SPARSITY
      for p in KERNELS:
        keep = max(1, math.floor(sizes[p] * (1 - want) + 0.5))
        assert abs(int(masks[p].sum()) - keep) <= 1, (t, p, masks[p].sum(), keep)
      assert float(hist["target"][t]) == pytest.approx(want, abs=1e-6)
    if method not in HARD:
      pat = nm_expected(method, step)
      for p in KERNELS:
        if pat is None:
          assert masks[p].all()
        else:
          check_nm(masks[p], *pat)
      beta = float(hist["beta"][t])
      if method == "mdgf":
        want_beta = 1.0 if step < 2 else (0.0 if step >= STEPS - 5 else max(1 - 0.1 * (step - 2), 0))
        assert beta == pytest.approx(want_beta, abs=1e-6)
      elif method != "sdgf" or step < STEPS - 5:
        assert beta == (1.0 if pat is None else 0.0)
      for p in KERNELS:
        fwd = leaf(hist["fwd"], p)[t]
        want = params[p] * np.where(masks[p], 1.0, beta).astype(np.float32)
        np.testing.assert_allclose(fwd, want, rtol=1e-6, atol=1e-7)
        if beta == 0.0:
          assert np.all(fwd[~masks[p]] == 0)
      if method in ("mdgf", "sdgf") and step > STEPS - 5:
        for p in KERNELS:  # hard fine-tune: stored weights N:M sparse, mask frozen
          assert np.all(params[p][~masks[p]] == 0)
          np.testing.assert_array_equal(masks[p], leaf(hist["masks"], p)[t - micro])
    prev_masks = jax.tree.map(lambda z: None if z is None else z[t], hist["masks"],
                              is_leaf=lambda z: z is None)


def build(method, opt):
  """(tx, inner, micro-steps per committed step) for one pair."""
  if opt in OUTER:
    inner = optax.adam(1e-2)
    return OUTER[opt](METHODS[method](inner)), inner, (2 if opt.startswith("MultiSteps") else 1)
  inner = OPTIMIZERS[opt]()
  return METHODS[method](inner), inner, 1


def check_pairs(method, opts):
  built = {o: build(method, o) for o in opts}
  runs = run_many({o: (tx, STEPS * micro) for o, (tx, _, micro) in built.items()})
  k0 = np.asarray(make_params()["fc2"]["kernel"])
  for o, (init_st, hist) in runs.items():
    _, inner, micro = built[o]
    if micro == 2:  # committed states only (after every 2nd micro-step)
      hist = jax.tree.map(lambda z: z[1::2], hist)
    try:
      check_history(method, init_st, hist, inner, 1, MOMENT_FLOOR.get(o, 0.0))
      # Training did something: the weights moved.
      assert not np.allclose(hist["params"]["fc2"]["kernel"][-1], k0)
    except AssertionError as e:
      raise AssertionError(f"{method} with {o}: {e}") from e


ALL_OPTS = list(OPTIMIZERS) + list(OUTER)


@pytest.mark.parametrize("method", list(METHODS))
def test_invariants_every_optimizer(method):
  check_pairs(method, ALL_OPTS)


@pytest.mark.smoke
@pytest.mark.parametrize("method, opts", [
    ("rigl", ["adam", "MultiSteps(outer)"]),
    ("srste", ["inject(adam)"]),
])
def test_invariants_smoke(method, opts):
  check_pairs(method, opts)
