"""sparsejax.optim transformations under a device mesh (8 CPU devices).

Each transformation trains a few steps (mask updates included) with params in
an FSDP or tensor-parallel layout and the optimizer state laid out by
:func:`sparsejax.sharding.opt_state_shardings`; masks, counters and keys must
equal those of the same steps on one device exactly, params and moments to
float rounding (the loss is elementwise, so no reduction order differs; XLA
may still vectorise shards differently), params-shaped state
must keep the params' shardings through the step, and the compiled step must
not all-gather a whole parameter, gradient or score array.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import SingleDeviceSharding

import sparsejax.optim as so
from sparsejax import sharding as shd

STEPS = 6


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {"fc1": {"kernel": f(64, 128), "bias": f(128)},
          "fc2": {"kernel": f(128, 32)},
          "conv": f(3, 3, 8, 16)}


METHODS = {
    "gmp": lambda: so.gradual_magnitude_pruning(
        optax.adam(1e-2), sparsity=0.8, begin_step=1, end_step=5, frequency=2),
    "one_shot": lambda: so.one_shot_pruning(
        optax.sgd(0.1, momentum=0.9), sparsity=0.7, step=2),
    "static": lambda: so.static_sparse(optax.adam(1e-2), sparsity=0.8, key=1),
    "set": lambda: so.set_training(
        optax.sgd(0.1, momentum=0.9), sparsity=0.8, update_every=2,
        begin_step=1, end_step=STEPS, key=2),
    "rigl": lambda: so.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2,
                            begin_step=1, end_step=STEPS),
    "ste": lambda: so.ste(optax.sgd(0.1), nm="2:4"),
    "srste": lambda: so.srste(optax.adam(1e-2), nm="2:4", decay=0.05),
    "mdgf": lambda: so.mdgf(optax.sgd(0.1), nm="2:4", rate=0.2),
    "sdgf": lambda: so.sdgf(optax.sgd(0.1), nm="1:4", total_steps=STEPS),
    "gradient_masking": lambda: so.gradient_masking(optax.adam(1e-2),
                                                    fraction=0.1),
}
# RigL, gradual magnitude pruning and SR-STE in both layouts here; the other
# methods, one layout each, in test_sharding_optim_more.py (compile time).
CASES = [(m, l) for m in ("rigl", "gmp", "srste") for l in ("fsdp", "tensor")]


def _target(p):
  return jax.tree.map(lambda x: 0.5 * jnp.sin(3.0 * x), p)


def _make_steps(tx, sparse):
  """STEPS updates in one jitted scan; the loss is elementwise."""
  target = _target(_params(7))

  def loss(p, state):
    fp = so.forward_params(p, state) if sparse else p
    return sum(jnp.sum((a - b) ** 2 * 0.5) for a, b in zip(
        jax.tree.leaves(fp), jax.tree.leaves(target)))

  def steps(params, state):
    def body(carry, _):
      p, s = carry
      g = jax.grad(loss)(p, s)
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (params, state), _ = jax.lax.scan(body, (params, state), None,
                                      length=STEPS)
    return params, state

  return steps


@functools.lru_cache(maxsize=None)
def _single_device(method):
  one = SingleDeviceSharding(jax.devices()[0])
  tx = METHODS[method]()
  params = jax.device_put(_params(), one)
  state = jax.jit(tx.init)(params)
  return jax.jit(_make_steps(tx, method != "gradient_masking"))(params, state)


@functools.lru_cache(maxsize=None)
def _layout(mode):
  mesh = (shd.make_mesh((-1, 2), ("data", "model")) if mode == "tensor"
          else shd.make_mesh())
  return shd.param_shardings(_params(), mesh, mode)


@pytest.mark.parametrize("method, mode", CASES)
def test_sharded_training_equals_single_device(method, mode):
  check_sharded_training(method, mode)


def check_sharded_training(method, mode):
  """Runs the checks of the module docstring for one method and layout."""
  tx = METHODS[method]()
  params = _params()
  p_sh = _layout(mode)
  s_sh = shd.opt_state_shardings(tx, params, p_sh)
  placed = jax.device_put(params, p_sh)
  state = jax.jit(tx.init, out_shardings=s_sh)(placed)
  step = jax.jit(_make_steps(tx, method != "gradient_masking"),
                 in_shardings=(p_sh, s_sh))
  compiled = step.lower(placed, state).compile()
  out_params, out_state = step(placed, state)

  # Same as on one device: params, masks, moments, counters, keys.
  ref_params, ref_state = _single_device(method)
  for got, want in ((out_params, ref_params), (out_state, ref_state)):
    a = jax.tree.leaves(got, is_leaf=lambda x: x is None)
    b = jax.tree.leaves(want, is_leaf=lambda x: x is None)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for x, y in zip(a, b):
      if x is None:
        assert y is None
        continue
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x, y = jax.random.key_data(x), jax.random.key_data(y)
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape
      if np.issubdtype(x.dtype, np.floating):
        # XLA:CPU may vectorise differently shaped shards differently
        # (observed: 1-ulp differences with jax 0.12); zeros stay exact.
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(x == 0, y == 0)
      else:  # masks, counters, PRNG keys: exact.
        np.testing.assert_array_equal(x, y)
  if method != "gradient_masking":
    masks = so.get_masks(out_state)
    assert masks["fc1"]["bias"] is None
    assert masks["fc1"]["kernel"].dtype == jnp.bool_
    assert 0.5 <= float(1 - masks["fc2"]["kernel"].mean()) <= 0.9

  # Params and every params-shaped state buffer keep the params' shardings
  # (the step was not told the output shardings).
  for x, s in zip(jax.tree.leaves(out_params), jax.tree.leaves(p_sh)):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  for x, s in zip(jax.tree.leaves(out_state), jax.tree.leaves(s_sh)):
    if not s.is_fully_replicated:
      assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)

  # The mask update and the optimizer never gather a whole array.
  sizes = [x.size for x, s in zip(jax.tree.leaves(params),
                                  jax.tree.leaves(p_sh))
           if not s.is_fully_replicated]
  for dtype, shape in shd.collective_shapes(compiled):
    assert int(np.prod(shape)) < min(sizes), (
        f"{method}/{mode}: all-gather of a whole array {dtype}{shape}")
