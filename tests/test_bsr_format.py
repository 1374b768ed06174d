"""BlockSparseMatrix: construction, index invariants, round trips, validation, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import BlockSparseMatrix, bsr_from_dense, bsr_to_dense
from pallas_kernels.matmul.testing import expand_block_mask, random_block_mask


def _check_structure(w: BlockSparseMatrix, block_mask: np.ndarray):
  """Index arrays against an independent NumPy enumeration of the block mask."""
  kb, nb = block_mask.shape
  rows, cols = np.nonzero(block_mask)  # row-major order
  nnzb, cap = len(rows), w.capacity
  assert int(w.nnzb) == nnzb
  np.testing.assert_array_equal(np.asarray(w.row_idx)[:nnzb], rows)
  np.testing.assert_array_equal(np.asarray(w.col_idx)[:nnzb], cols)
  np.testing.assert_array_equal(np.asarray(w.row_ptr), np.r_[0, np.cumsum(block_mask.sum(1))])
  np.testing.assert_array_equal(np.asarray(w.col_ptr), np.r_[0, np.cumsum(block_mask.sum(0))])
  # Column view: the t-th block in column-major order is slot col_slot[t].
  cols_t, rows_t = np.nonzero(block_mask.T)
  slot = np.asarray(w.col_slot)[:nnzb]
  np.testing.assert_array_equal(np.asarray(w.row_idx)[slot], rows_t)
  np.testing.assert_array_equal(np.asarray(w.col_idx)[slot], cols_t)
  # Padding convention: last block row/column, identity in the column view, zero values.
  np.testing.assert_array_equal(np.asarray(w.row_idx)[nnzb:], kb - 1)
  np.testing.assert_array_equal(np.asarray(w.col_idx)[nnzb:], nb - 1)
  np.testing.assert_array_equal(np.asarray(w.col_slot)[nnzb:], np.arange(nnzb, cap))
  assert not np.asarray(w.blocks)[nnzb:].any()
  for a in (w.row_ptr, w.row_idx, w.col_idx, w.col_ptr, w.col_slot):
    assert a.dtype == jnp.int32


@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("shape,block", [((8, 12), (2, 4)), ((64, 32), (16, 32)), ((6, 6), (3, 1))])
def test_round_trip_and_structure(density, shape, block):
  rng = np.random.default_rng(1)
  mask = random_block_mask(rng, shape, block, density, empty_rows=1)
  dense = rng.standard_normal(shape).astype(np.float32)
  w = bsr_from_dense(dense, mask, block, capacity=None)
  block_mask = mask[:: block[0], :: block[1]]
  assert w.capacity == max(int(block_mask.sum()), 1)
  assert w.shape == shape and w.block_shape == block
  _check_structure(w, block_mask)
  np.testing.assert_array_equal(np.asarray(bsr_to_dense(w)), np.where(mask, dense, 0))
  np.testing.assert_array_equal(np.asarray(w.mask()), mask)
  np.testing.assert_array_equal(np.asarray(w.block_mask()), block_mask)
  np.testing.assert_allclose(float(w.density), block_mask.mean())


@settings(max_examples=5)
@given(
    kb=st.integers(1, 5), nb=st.integers(1, 5), br=st.sampled_from([1, 2, 4]), bc=st.sampled_from([1, 3]),
    density=st.floats(0, 1), extra=st.integers(0, 3), seed=st.integers(0, 2**16),
)
def test_property_any_block_mask(kb, nb, br, bc, density, extra, seed):
  rng = np.random.default_rng(seed)
  block_mask = rng.random((kb, nb)) < density
  mask = expand_block_mask(block_mask, (br, bc))
  dense = rng.standard_normal(mask.shape).astype(np.float32)
  capacity = min(kb * nb, max(int(block_mask.sum()), 1) + extra)
  w = bsr_from_dense(dense, mask, (br, bc), capacity=capacity)
  _check_structure(w, block_mask)
  np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask, dense, 0))


def test_traced_mask_under_jit_with_static_capacity_traces_once():
  rng = np.random.default_rng(2)
  shape, block, cap = (32, 48), (8, 16), 8

  @jax.jit
  @chex.assert_max_traces(n=1)
  def build(dense, mask):
    return bsr_from_dense(dense, mask, block, capacity=cap)

  for density in (0.0, 0.3, 0.7):  # different block counts (at most cap), same shapes
    block_mask = rng.random((4, 3)) < density
    block_mask &= np.cumsum(block_mask).reshape(4, 3) <= cap
    mask = expand_block_mask(block_mask, block)
    dense = rng.standard_normal(shape).astype(np.float32)
    w = build(dense, mask)
    _check_structure(w, block_mask)
    np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask, dense, 0))


def test_traced_partial_mask_is_applied_exactly():
  dense = np.arange(16, dtype=np.float32).reshape(4, 4) + 1
  mask = np.zeros((4, 4), bool)
  mask[0, 1] = True  # one element of block (0, 0)
  w = jax.jit(lambda d, m: bsr_from_dense(d, m, (2, 2), capacity=2))(dense, mask)
  np.testing.assert_array_equal(np.asarray(w.to_dense()), np.where(mask, dense, 0))
  assert int(w.nnzb) == 1


def test_traced_capacity_overflow_poisons_values():
  mask = np.ones((4, 4), bool)
  w = jax.jit(lambda d, m: bsr_from_dense(d, m, (2, 2), capacity=2))(np.ones((4, 4), np.float32), mask)
  assert np.isnan(np.asarray(w.blocks)).all()
  assert int(w.nnzb) <= w.capacity  # indices stay in bounds for the kernels
  assert (np.asarray(w.col_slot) < w.capacity).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtypes_preserved(dtype):
  mask = expand_block_mask(np.array([[1, 0], [1, 1]], bool), (2, 2))
  w = bsr_from_dense(jnp.ones((4, 4), dtype), mask, (2, 2))
  assert w.blocks.dtype == dtype and w.to_dense().dtype == dtype


def test_is_a_pytree_with_static_shape():
  w = bsr_from_dense(np.ones((4, 4), np.float32), np.ones((4, 4), bool), (2, 2))
  leaves, treedef = jax.tree.flatten(w)
  assert len(leaves) == 8  # blocks, 5 index arrays, row_order, col_order
  w2 = jax.tree.unflatten(treedef, leaves)
  assert w2.shape == (4, 4)
  w3 = jax.jit(lambda w: jax.tree.map(lambda a: a, w))(w)
  np.testing.assert_array_equal(np.asarray(w3.to_dense()), np.ones((4, 4)))


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(block_shape=(3, 2)), ValueError, r"'fc1/kernel'.*does not divide"),
        (dict(block_shape=(2,)), ValueError, "pair of ints"),
        (dict(block_shape=(0, 2)), ValueError, "positive"),
        (dict(capacity=1), ValueError, r"capacity 1 is smaller than the mask's 2"),
        (dict(capacity=5), ValueError, r"capacity 5 must be in \[1, 4\]"),
        (dict(capacity=2.0), TypeError, "static Python int"),
        (dict(w=np.ones((4, 4), np.int32)), TypeError, "dtype int32 is not supported"),
        (dict(w=np.ones((4,), np.float32)), ValueError, "2-D"),
        (dict(mask=np.ones((4, 4), np.float32)), TypeError, "mask dtype must be bool"),
        (dict(mask=np.ones((4, 2), bool)), ValueError, "does not match weight shape"),
        (dict(mask=np.eye(4, dtype=bool)), ValueError, r"not constant on \(2, 2\) blocks \(block \(0, 0\)"),
    ],
)
def test_validation_errors(kwargs, err, match):
  args = dict(w=np.ones((4, 4), np.float32), mask=expand_block_mask(np.eye(2, dtype=bool), (2, 2)), block_shape=(2, 2))
  args.update(kwargs)
  with pytest.raises(err, match=match):
    bsr_from_dense(args.pop("w"), args.pop("mask"), args.pop("block_shape"), path="fc1/kernel", **args)


def test_traced_mask_needs_capacity():
  with pytest.raises(ValueError, match="pass a static capacity"):
    jax.jit(lambda m: bsr_from_dense(jnp.ones((4, 4)), m, (2, 2)))(np.ones((4, 4), bool))
