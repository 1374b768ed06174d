"""BlockSparseDense (NNX): forward, conversion from nnx.Linear, training, mask moves under jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels.matmul.testing import expand_block_mask, random_block_mask
from sparsejax.nn.block_sparse_dense import BlockSparseDense, BlockSparseIndex


def _linear_and_mask(seed=0, shape=(64, 48), block=(16, 16), density=0.5):
  linear = nnx.Linear(*shape, rngs=nnx.Rngs(seed))
  linear.bias[...] = jnp.asarray(np.random.default_rng(seed).standard_normal(shape[1]), jnp.float32)
  mask = random_block_mask(np.random.default_rng(seed), shape, block, density, empty_rows=1)
  return linear, mask


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_from_linear_matches_masked_dense(backend):
  linear, mask = _linear_and_mask()
  layer = BlockSparseDense.from_linear(linear, mask, block_shape=(16, 16), backend=backend)
  x = np.random.default_rng(1).standard_normal((3, 5, 64)).astype(np.float32)
  expected = x.astype(np.float64) @ np.where(mask, np.asarray(linear.kernel[...], np.float64), 0) + np.asarray(linear.bias[...])
  np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(layer.mask()), mask)
  np.testing.assert_array_equal(np.asarray(layer.dense_kernel()), np.where(mask, linear.kernel[...], 0))


def test_state_split_params_and_indices():
  layer = BlockSparseDense(32, 64, block_shape=(16, 32), mask=expand_block_mask(np.eye(2, dtype=bool), (16, 32)), rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == {"blocks", "bias"}
  assert params["blocks"][...].shape == (2, 16, 32)
  indices = nnx.state(layer, BlockSparseIndex)
  assert set(indices.keys()) == {"row_ptr", "row_idx", "col_idx", "col_ptr", "col_slot", "row_order",
                                 "col_order"}
  assert layer.weight.row_order is not None and layer.weight.col_order is not None  # no per-call sort
  no_bias = BlockSparseDense(32, 64, block_shape=(16, 32), use_bias=False, rngs=nnx.Rngs(0))
  assert set(nnx.state(no_bias, nnx.Param).keys()) == {"blocks"}
  assert no_bias.blocks[...].shape == (4, 16, 32)  # default mask: all blocks


def test_init_is_masked_kernel_init():
  mask = expand_block_mask(np.array([[1, 0], [1, 1]], bool), (8, 8))
  init = nnx.initializers.lecun_normal()
  layer = BlockSparseDense(16, 16, block_shape=(8, 8), mask=mask, kernel_init=init, rngs=nnx.Rngs(3))
  kernel = init(nnx.Rngs(3).params(), (16, 16), jnp.float32)
  np.testing.assert_array_equal(np.asarray(layer.dense_kernel()), np.where(mask, kernel, 0))


def test_training_step_matches_masked_dense_and_keeps_structure():
  linear, mask = _linear_and_mask(seed=2)
  layer = BlockSparseDense.from_linear(linear, mask, block_shape=(16, 16), capacity=8)
  opt = nnx.Optimizer(layer, optax.sgd(0.1), wrt=nnx.Param)
  indices_before = jax.tree.map(np.asarray, nnx.state(layer, BlockSparseIndex))
  rng = np.random.default_rng(3)
  x, t = rng.standard_normal((8, 64)).astype(np.float32), rng.standard_normal((8, 48)).astype(np.float32)

  @nnx.jit
  def step(layer, opt, x, t):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - t) ** 2))(layer)
    opt.update(layer, grads)
    return loss

  # Dense reference step on kernel * mask: its gradient, masked, is the sparse gradient.
  w0, b0 = np.where(mask, linear.kernel[...], 0).astype(np.float64), np.asarray(linear.bias[...], np.float64)
  y = x @ w0 + b0
  dy = 2 * (y - t) / y.size
  w1 = w0 - 0.1 * np.where(mask, x.T @ dy, 0)
  b1 = b0 - 0.1 * dy.sum(0)
  loss0 = step(layer, opt, x, t)
  np.testing.assert_allclose(float(loss0), np.mean((y - t) ** 2), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(layer.dense_kernel()), w1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(layer.bias[...]), b1, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, nnx.state(layer, BlockSparseIndex)), indices_before)
  assert not np.asarray(layer.blocks[...])[int(layer.weight.nnzb):].any()  # padding stays zero
  assert float(step(layer, opt, x, t)) < float(loss0)


def test_set_mask_under_jit_keeps_kept_blocks_and_zeros_new_ones():
  rng = np.random.default_rng(5)
  old = rng.random((4, 3)) < 0.5
  old[0, 0], old[3, 2] = True, False
  new = old.copy()
  new[0, 0], new[3, 2] = False, True  # drop one block, grow another: same count
  layer = BlockSparseDense(64, 48, block_shape=(16, 16), mask=expand_block_mask(old, (16, 16)), capacity=int(old.sum()) + 1, rngs=nnx.Rngs(0))
  before = np.asarray(layer.dense_kernel())

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def move(layer, mask):
    layer.set_mask(mask)

  move(layer, expand_block_mask(new, (16, 16)))
  after = np.asarray(layer.dense_kernel())
  keep = expand_block_mask(old & new, (16, 16))
  np.testing.assert_array_equal(after, np.where(keep, before, 0))
  np.testing.assert_array_equal(np.asarray(layer.mask()), expand_block_mask(new, (16, 16)))
  move(layer, expand_block_mask(old, (16, 16)))  # back: the regrown block (0, 0) starts at zero
  assert not np.asarray(layer.dense_kernel())[:16, :16].any()


def test_computation_dtype():
  layer = BlockSparseDense(32, 32, block_shape=(16, 16), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert layer.blocks[...].dtype == jnp.float32
  y = layer(jnp.ones((2, 32)))
  assert y.dtype == jnp.bfloat16


def test_errors_name_the_kernel():
  with pytest.raises(ValueError, match=r"'kernel'.*does not divide"):
    BlockSparseDense(30, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  layer = BlockSparseDense(32, 32, block_shape=(16, 16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'kernel'.*must be \[\.\.\., 32\]"):
    layer(jnp.ones((2, 8)))
