"""Non-finite gradients and weights never cause silent mis-pruning (issue 14, findings 1-3, 7).

* A non-finite gradient never costs a scheduled mask change: magnitude pruning and SET do not
  read gradients, so they never skip; RigL judges each masked leaf's gradient (``isfinite``, no
  overflowing sums) and an update skipped on a leaf is owed and run at the next finite step.
  Property: for every transformation, NaN/inf at a random position in random steps gives the
  final masks of the same run with the bad steps dropped.
* Pruned weights are exact zeros after ``optax.apply_updates`` even when weights are NaN/inf:
  magnitude selection never removes a non-finite weight (``w + (-w)`` is NaN).
* Traced sparsities outside [0, 1) have a documented meaning and a checkify error path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.experimental import checkify

import sparsejax.optim as so
from sparsejax.core import pruning

# ------------------------------------------------------------------ fixtures

_K = jax.random.split(jax.random.key(14), 4)
# 'n': a None leaf, which every transformation must accept (finding 5).
PARAMS = {"w": jax.random.normal(_K[0], (8, 8)), "v": jax.random.normal(_K[1], (4, 8)),
          "b": jax.random.normal(_K[2], (8,)), "n": None}
GRAD = jax.tree.map(lambda x: jnp.full(x.shape, 0.5) + 0.1 * x, PARAMS)  # constant, varied


def _skip_bad(inner):
  # The inner optimizer drops bad steps, so the weights see only the finite ones.
  return optax.apply_if_finite(inner, max_consecutive_errors=100)


HARD_INNER = _skip_bad(optax.sgd(0.0))
RIGL_INNER = so.gradient_masking(HARD_INNER, fraction=0.5)


# name -> (tx, number of steps of the run without bad steps). Hard methods use lr 0 (mask
# updates are then the only change, so the dropped-step run is comparable step by step);
# the N:M methods train with lr > 0 (their masks are a function of the weights).
def _methods():
  hard = HARD_INNER
  soft = _skip_bad(optax.sgd(0.1))
  return {
      "gmp": (so.gradual_magnitude_pruning(hard, sparsity=0.75, begin_step=1, end_step=7,
                                           frequency=3, distribution="erk"), 9),
      "gmp_global": (so.gradual_magnitude_pruning(hard, sparsity=0.75, end_step=6, frequency=3,
                                                  distribution="global"), 8),
      "one_shot": (so.one_shot_pruning(hard, sparsity=0.75, step=4), 6),
      "static": (so.static_sparse(hard, sparsity=0.75, distribution="uniform"), 5),
      "set": (so.set_training(hard, sparsity=0.5, update_every=3, begin_step=1, end_step=8),
              9),
      # RigL around gradient masking: both transformations in one compile.
      "rigl": (so.rigl(RIGL_INNER, sparsity=0.5, update_every=3, begin_step=1, end_step=8,
                       distribution="uniform"), 9),
      "ste": (so.ste(soft, nm="2:4"), 5),
      "srste": (so.srste(soft, nm="2:4", decay=0.1), 5),
      "mdgf": (so.mdgf(soft, nm="2:4", rate=0.3), 5),
      "sdgf": (so.sdgf(soft, nm="1:4", total_steps=4), 6),
  }


METHODS = _methods()


@functools.lru_cache(maxsize=None)
def _step(name):
  tx = METHODS[name][0]
  return jax.jit(lambda p, s, g: tx.update(g, s, p))


def _run(name, grads):
  tx = METHODS[name][0]
  p, s = PARAMS, tx.init(PARAMS)
  step = _step(name)
  for g in grads:
    u, s = step(p, s, g)
    p = optax.apply_updates(p, u)
  return p, s


def _masks_np(s):
  return {k: None if m is None else np.asarray(m) for k, m in so.get_masks(s).items()}


_bad = st.tuples(st.sampled_from(["w", "v", "b"]), st.integers(0, 63),
                 st.sampled_from([np.nan, np.inf, -np.inf]))


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_bad_steps_cost_no_mask_change(name, data):
  n_good = METHODS[name][1]
  n_bad = data.draw(st.integers(1, 2), label="n_bad")
  total = n_good + n_bad
  bad_at = data.draw(st.lists(st.integers(0, total - 2), min_size=n_bad, max_size=n_bad,
                              unique=True), label="bad_steps")
  grads = []
  for t in range(total):
    g = GRAD
    if t in bad_at:
      leaf, pos, val = data.draw(_bad, label=f"bad@{t}")
      flat = g[leaf].ravel()
      g = {**g, leaf: flat.at[pos % flat.size].set(val).reshape(g[leaf].shape)}
    grads.append(g)
  kept = [g for t, g in enumerate(grads) if t not in bad_at]
  _, s_bad = _run(name, grads)
  _, s_ref = _run(name, kept)
  got, want = _masks_np(s_bad), _masks_np(s_ref)
  for k in want:
    if want[k] is None:
      assert got[k] is None
    else:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{name}: leaf {k}")


# ------------------------------------------------------------------ the findings
# (These reuse the compiled steps of METHODS: same shapes, no new compiles.)


def _with_bad(steps, bad_at, value=np.nan, leaf="w"):
  out = [GRAD] * steps
  if value == 3e37:  # finite, but a float32 sum of the leaf overflows
    out[bad_at] = {**GRAD, leaf: jnp.full(GRAD[leaf].shape, value)}
  else:
    out[bad_at] = {**GRAD, leaf: GRAD[leaf].at[(0,) * GRAD[leaf].ndim].set(value)}
  return out


@pytest.mark.parametrize("value", [np.nan, 3e37])
def test_one_shot_prunes_despite_bad_gradient_at_its_step(value):
  # Finding 1: NaN, or finite values whose float32 sum overflows, at the pruning step.
  _, s = _run("one_shot", _with_bad(6, 4, value))
  assert float(so.get_target_sparsity(s)) == pytest.approx(0.75)
  assert int(so.get_masks(s)["w"].sum()) == 16 and int(so.get_masks(s)["v"].sum()) == 8


@pytest.mark.parametrize("leaf", ["w", "b"])
def test_gmp_reaches_final_sparsity_with_nan_at_end_step(leaf):
  # Finding 2: the end_step update is never lost (NaN in a kernel or in a dense bias).
  _, s = _run("gmp_global", _with_bad(8, 6, np.nan, leaf))
  m = so.get_masks(s)
  assert int(m["w"].sum()) + int(m["v"].sum()) == round(96 * 0.25)


def test_rigl_nan_in_dense_bias_does_not_block_kernel_update():
  _, s = _run("rigl", _with_bad(2, 1, np.nan, "b"))
  _, s_ref = _run("rigl", [GRAD, GRAD])
  _, s0 = _run("rigl", [GRAD])
  np.testing.assert_array_equal(so.get_masks(s)["w"], so.get_masks(s_ref)["w"])
  assert not np.array_equal(so.get_masks(s)["w"], so.get_masks(s0)["w"])
  owed = so.get_sparse_state(s).sparse_owed
  assert owed["b"] is None and int(owed["w"]) == -1


def test_rigl_owes_per_leaf_and_pays_at_next_finite_step():
  bad = _with_bad(2, 1, np.inf, "w")  # step 1 is a scheduled update
  _, s0 = _run("rigl", bad[:1])
  _, s1 = _run("rigl", bad)  # 'w' owes the step-1 update, 'v' updates
  st1 = so.get_sparse_state(s1)
  assert int(st1.sparse_owed["w"]) == 1 and int(st1.sparse_owed["v"]) == -1
  np.testing.assert_array_equal(st1.sparse_masks["w"], so.get_masks(s0)["w"])
  assert not np.array_equal(st1.sparse_masks["v"], so.get_masks(s0)["v"])
  _, s2 = _run("rigl", bad + [GRAD])  # step 2: not scheduled, pays the owed update of 'w'
  st2 = so.get_sparse_state(s2)
  assert int(st2.sparse_owed["w"]) == -1
  _, s_ref = _run("rigl", [GRAD, GRAD])  # what step 1 would have done with finite grads
  np.testing.assert_array_equal(st2.sparse_masks["w"], so.get_masks(s_ref)["w"])
  np.testing.assert_array_equal(st2.sparse_masks["v"], st1.sparse_masks["v"])  # not redone
  _, s_huge = _run("rigl", _with_bad(2, 1, 3e37, "w"))  # finite: no overflow, nothing owed
  assert int(so.get_sparse_state(s_huge).sparse_owed["w"]) == -1


# ------------------------------------------------------------------ non-finite weights


def _nonfinite_params():
  w = PARAMS["w"].at[0, 0].set(np.nan).at[1, 3].set(np.inf).at[5, 6].set(-np.inf)
  return {**PARAMS, "w": w, "v": PARAMS["v"].at[0, 1].set(np.nan)}


def _check_pruned_zero(tx, step, steps, check_from=0):
  p = _nonfinite_params()
  s = tx.init(p)
  for t in range(steps):
    u, s = step(p, s, GRAD)
    p = optax.apply_updates(p, u)
    if t < check_from:  # (a soft N:M phase keeps pruned weights by design)
      continue
    for k, m in so.get_masks(s).items():
      if m is None:
        continue
      outside = np.asarray(p[k])[~np.asarray(m)]
      assert np.all(outside == 0.0), (k, outside[outside != 0])
  return s


def _magnitude_init(name):
  # SET/RigL start from random masks, which cannot know about non-finite initial weights
  # (documented: call apply_state_masks after init); start them from magnitude masks. The
  # compiled update of METHODS[name] runs on that state unchanged.
  if name not in ("set", "rigl"):
    return METHODS[name][0]
  make = so.set_training if name == "set" else so.rigl
  return make(HARD_INNER if name == "set" else RIGL_INNER, sparsity=0.5, update_every=3, begin_step=1, end_step=8,
              init_scores="magnitude", distribution="erk" if name == "set" else "uniform")


@pytest.mark.parametrize("name", ["gmp", "gmp_global", "one_shot", "set", "rigl"])
def test_pruned_weights_exact_zero_with_nonfinite_weights(name):
  # Finding 3: NaN/inf weights are never pruned by magnitude, so every weight outside the
  # mask lands on exactly 0 through plain optax.apply_updates.
  s = _check_pruned_zero(_magnitude_init(name), _step(name), METHODS[name][1])
  w = np.asarray(so.get_masks(s)["w"])
  assert w[0, 0] and w[1, 3] and w[5, 6]


EXTRA = {  # hard phases not in METHODS, with optimizers that keep moments
    "static_magnitude_adam": so.static_sparse(optax.adam(0.1), sparsity=0.75,
                                              scores="magnitude", distribution="uniform"),
    "sdgf_finetune_momentum": so.sdgf(optax.sgd(0.1, momentum=0.9), nm="2:4", total_steps=3,
                                      finetune_steps=2),
    "one_shot_lion": so.one_shot_pruning(optax.lion(0.01), sparsity=0.75, step=1),
}


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_pruned_weights_exact_zero_other_methods_and_optimizers(name):
  tx = EXTRA[name]
  _check_pruned_zero(tx, jax.jit(lambda p, s, g: tx.update(g, s, p)), 3,
                     check_from=1 if name.startswith("sdgf") else 0)


def test_magnitude_ranks_nonfinite_highest_and_counts_stay_exact():
  p = _nonfinite_params()
  _, m = pruning.prune(p, None, 0.9)
  w = np.asarray(m["w"])
  assert w[0, 0] and w[1, 3] and w[5, 6] and w.sum() == round(64 * 0.1)


# ------------------------------------------------------------------ traced sparsity (finding 7)


def test_traced_sparsity_out_of_range_documented_and_checkify_error():
  p = {"w": jnp.arange(1.0, 257.0).reshape(16, 16)}
  kept = jax.jit(lambda s: pruning.prune(p, None, s)[1]["w"].sum())
  # Documented clamping: NaN prunes nothing, >= 1 keeps one weight, < 0 keeps all.
  assert [int(kept(s)) for s in (np.nan, 1.5, -3.0, 0.5)] == [256, 1, 256, 128]
  err, _ = checkify.checkify(kept)(jnp.float32(1.5))
  with pytest.raises(checkify.JaxRuntimeError, match=r"prune: sparsity at 'w' must be in \[0, 1\)"):
    err.throw()
  err, _ = checkify.checkify(kept)(jnp.float32(0.5))
  err.throw()  # in range: no error


def test_traced_sparsity_through_inject_hyperparams_checkify():
  tx = optax.inject_hyperparams(so.one_shot_pruning)(optax.sgd(0.0), sparsity=0.5)
  p = {"w": PARAMS["w"]}
  s = tx.init(p)
  s = s._replace(hyperparams={**s.hyperparams, "sparsity": jnp.float32(1.5)})
  err, _ = checkify.checkify(jax.jit(lambda g, s, p: tx.update(g, s, p)))({"w": GRAD["w"]}, s, p)
  with pytest.raises(checkify.JaxRuntimeError, match="sparsity"):
    err.throw()
