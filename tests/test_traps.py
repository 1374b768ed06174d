"""The traps a new user falls into, each closed: detection, the one call, the docs."""

from __future__ import annotations

import inspect
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
import sparsejax.optim as so

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _params():
  k = jax.random.key(0)
  return {"fc": {"kernel": jax.random.normal(k, (16, 16)), "bias": jnp.ones(16)}}


def _grads(params, t):
  return jax.tree.map(lambda x: jax.random.normal(jax.random.key(t), x.shape), params)


def _train(tx, params, steps):
  state = tx.init(params)
  params = so.apply_state_masks(params, state)
  update = jax.jit(tx.update)
  for t in range(steps):
    u, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
  return params, state


def _outside(params, state):
  m = so.get_masks(state)["fc"]["kernel"]
  return int(np.count_nonzero(np.asarray(params["fc"]["kernel"])[~np.asarray(m)]))


def _rigl(inner):
  return so.rigl(inner, sparsity=0.75, update_every=2, begin_step=2, end_step=50,
                 distribution="uniform")


def test_not_outermost_is_counted_raised_and_named():
  params = _params()
  wrong = optax.chain(_rigl(optax.adam(1e-2)), optax.scale(0.5))
  right = _rigl(optax.chain(optax.adam(1e-2), optax.scale(0.5)))
  p, s = _train(wrong, params, 5)
  # Under jit: weights dropped at step 2 land on W / 2, not 0; the next mask update (step 4)
  # counts them in the state.
  assert _outside(p, s) > 0
  assert int(so.get_masked_nonzero(s)) > 0
  with pytest.raises(ValueError, match=r"fc/kernel: \d+.*outermost"):
    so.check_masked_zero(p, s)
  p, s = _train(right, params, 5)
  assert _outside(p, s) == 0 and int(so.get_masked_nonzero(s)) == 0
  so.check_masked_zero(p, s)
  # Eager (not jitted) updates raise at the check: here step 1 after a dense start.
  state = wrong.init(params)
  u, state = wrong.update(_grads(params, 0), state, params)  # no apply_state_masks
  with pytest.raises(ValueError, match="at step 1: .*not the outermost"):
    wrong.update(_grads(params, 1), state, optax.apply_updates(params, u))


def test_counter_is_minus_one_until_checked_and_zero_after_init_masks():
  params = _params()
  tx = so.static_sparse(optax.sgd(0.1), sparsity=0.5)
  s = tx.init(params)
  assert int(so.get_masked_nonzero(s)) == -1
  _, s = _train(tx, params, 1)
  assert int(so.get_masked_nonzero(s)) == -1  # step 0 is not checked
  _, s = _train(tx, params, 2)
  assert int(so.get_masked_nonzero(s)) == 0


def test_apply_state_masks_after_init_makes_multisteps_micro_steps_sparse():
  params = _params()
  tx = optax.MultiSteps(_rigl(optax.adam(1e-2)), every_k_schedule=3)
  state = tx.init(params)
  assert _outside(params, state) > 0  # dense right after init
  params = so.apply_state_masks(params, state)
  update = jax.jit(tx.update)
  for t in range(7):  # micro-steps 0, 1 run on the sparse params too
    assert _outside(params, state) == 0, t
    u, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, u)
  so.check_masked_zero(params, state)


class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(8, 16, rngs=rngs)
    self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


def test_apply_state_masks_on_nnx_model_in_place():
  model = _MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.static_sparse(optax.adam(1e-2), sparsity=0.5), wrt=nnx.Param)
  m = so.get_masks(opt.opt_state)["fc1"]["kernel"]
  assert np.count_nonzero(np.asarray(model.fc1.kernel[...])[~np.asarray(m)]) > 0
  bias = np.asarray(model.fc1.bias[...]).copy()
  out = so.apply_state_masks(model, opt.opt_state)
  assert out is model
  kernel = np.asarray(model.fc1.kernel[...])
  assert np.count_nonzero(kernel[~np.asarray(m)]) == 0 and np.all(kernel[np.asarray(m)] != 0)
  np.testing.assert_array_equal(np.asarray(model.fc1.bias[...]), bias)
  so.check_masked_zero(model, opt.opt_state)


def test_forward_model_trains_sparse_and_forgetting_it_is_detected():
  x = jax.random.normal(jax.random.key(1), (8, 8))
  model = _MLP(nnx.Rngs(0))
  opt = nnx.Optimizer(model, so.srste(optax.adam(1e-2), nm="2:4"), wrt=nnx.Param)

  def with_fwd(m, st):
    return jnp.mean(so.forward_model(m, st)(x) ** 2)

  def forgot(m, st):
    del st
    return jnp.mean(m(x) ** 2)

  so.check_forward_params(with_fwd, model, opt.opt_state)
  with pytest.raises(ValueError, match="forward_model"):
    so.check_forward_params(forgot, model, opt.opt_state)
  # forward_model equals the pytree forward_params through split/merge, gradients included.
  fwd = so.forward_model(model, opt.opt_state)
  ref = so.forward_params(nnx.state(model, nnx.Param), opt.opt_state)
  np.testing.assert_array_equal(np.asarray(fwd.fc1.kernel[...]), np.asarray(ref["fc1"]["kernel"]))
  assert np.all((np.asarray(fwd.fc1.kernel[...]).reshape(2, 4, 16) != 0).sum(1) <= 2)
  g = nnx.grad(lambda m: with_fwd(m, opt.opt_state))(model)
  gd, prm, rest = nnx.split(model, nnx.Param, ...)
  g_ref = jax.grad(lambda p: jnp.mean(nnx.merge(gd, so.forward_params(p, opt.opt_state),
                                                rest)(x) ** 2))(prm)
  np.testing.assert_allclose(np.asarray(g["fc1"]["kernel"][...]),
                             np.asarray(g_ref["fc1"]["kernel"][...]), rtol=1e-6)
  # Pytree form of the check, and a type error for a non-module.
  p = {"w": jnp.array([[1.0], [-3.0], [2.0], [0.5]])}
  s = so.ste(optax.sgd(0.1), nm="2:4").init(p)
  so.check_forward_params(lambda q, st: so.forward_params(q, st)["w"].sum(), p, s)
  with pytest.raises(ValueError, match="forward_params"):
    so.check_forward_params(lambda q, st: q["w"].sum(), p, s)
  with pytest.raises(TypeError, match="forward_params"):
    so.forward_model(p, s)


def test_summary_totals_named_by_what_they_count():
  params = {"fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)}}
  masks = {"fc": {"kernel": jnp.arange(16).reshape(4, 4) < 4, "bias": None}}
  lines = sj.summary(params, masks).splitlines()
  masked = [ln for ln in lines if ln.startswith("masked leaves")]
  every = [ln for ln in lines if ln.startswith("all leaves")]
  assert len(masked) == len(every) == 1 and not any(ln.startswith("total") for ln in lines)
  assert masked[0].split()[2] == f"{float(sj.global_sparsity(masks)):.4f}" == "0.7500"
  assert every[0].split()[2] == f"{float(sj.global_sparsity(masks, params)):.4f}" == "0.6000"


@pytest.mark.parametrize("make, text", [
    (lambda: so.rigl(optax.sgd(0.1), sparsity=0.5, end_step=10, update_every=0),
     "update_every=0 "),
    (lambda: so.gradual_magnitude_pruning(optax.sgd(0.1), sparsity=0.5, end_step=10,
                                          frequency=0), "frequency=0 "),
])
def test_integer_arguments_print_as_integers(make, text):
  with pytest.raises(ValueError) as err:
    make()
  assert text in str(err.value) and "0.0" not in str(err.value)


def test_no_reference_to_a_file_outside_the_repository():
  # Every citation a user sees names a paper, not the developers' ALGORITHMS.md.
  files = [ROOT / "README.md"] + [
      f for d in ("sparsejax", "pallas_kernels", "examples", "benchmarks", "tests")
      for f in (ROOT / d).rglob("*.py")]
  hits = [str(f.relative_to(ROOT)) for f in files
          if f.name != "test_traps.py" and "ALGORITHMS.md" in f.read_text()]
  assert not hits, hits


def test_default_distributions_are_explained_in_one_place():
  defaults = {f: inspect.signature(f).parameters["distribution"].default
              for f in (so.gradual_magnitude_pruning, so.one_shot_pruning, so.static_sparse,
                        so.set_training, so.rigl)}
  assert [defaults[f] for f in (so.gradual_magnitude_pruning, so.one_shot_pruning)] == [
      "uniform"] * 2
  assert [defaults[f] for f in (so.static_sparse, so.set_training, so.rigl)] == ["erk"] * 3
  doc = so.__doc__
  assert "Default layer-wise distributions" in doc and "uniform" in doc and "erk" in doc


def test_every_method_docstring_states_the_outermost_rule():
  for f in (so.gradual_magnitude_pruning, so.one_shot_pruning, so.static_sparse,
            so.dynamic_sparse, so.set_training, so.rigl, so.nm_training, so.ste, so.srste,
            so.mdgf, so.sdgf, so.sparse_wrapper):
    assert "outermost" in f.__doc__, f.__name__
  for f in (so.nm_training, so.ste, so.srste, so.mdgf, so.sdgf):
    assert "forward_model" in f.__doc__ and "forward_params" in f.__doc__, f.__name__
  readme = (ROOT / "README.md").read_text()
  assert "outermost" in readme.lower() and "wrt=nnx.Param" in readme


def test_readme_rules_block_runs():
  section = (ROOT / "README.md").read_text().split("## Rules of sparse training", 1)[1]
  blocks = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], flags=re.S)
  assert len(blocks) == 1
  exec(compile(blocks[0], "README.md:rules", "exec"), {"__name__": "__readme__"})  # noqa: S102
