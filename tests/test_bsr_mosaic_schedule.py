"""The Mosaic GPU matmul schedule: heaviest-first orders precomputed in the format, the snake
deal of work tiles to persistent CTAs, tile sizes that fit H100 shared memory, and the kernels
(two compute warpgroups, 3+-deep ring, sub-tiled double-buffered epilogue) under the Mosaic GPU
interpreter on cases that exercise every path against float64 references.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bsr_matmul
from pallas_kernels.matmul import kernel_mosaic_gpu as mgpu
from pallas_kernels.matmul.format import BlockSparseMatrix, bsr_from_dense
from pallas_kernels.matmul.testing import check_bsr_matmul, expand_block_mask, lower

NEW_JAX = jax.__version_info__ >= (0, 11)
H100_SMEM = 232448  # opt-in shared memory per block


def _orders_by_loops(block_mask):
  """Heaviest-first block rows and columns, ties by index: the obvious Python sort."""
  rows, cols = block_mask.sum(1), block_mask.sum(0)
  return (sorted(range(len(rows)), key=lambda i: (-rows[i], i)),
          sorted(range(len(cols)), key=lambda j: (-cols[j], j)))


def test_format_precomputes_heaviest_first_orders():
  rng = np.random.default_rng(0)
  blocks = rng.random((6, 7)) < 0.4
  blocks[2] = False  # an empty block row
  blocks[:, 5] = True  # the heaviest block column
  mask = expand_block_mask(blocks, (2, 2))
  w = bsr_from_dense(jnp.ones((12, 14)), mask, (2, 2), capacity=int(blocks.sum()) + 3)
  row_order, col_order = _orders_by_loops(blocks)
  assert w.row_order.tolist() == row_order and w.col_order.tolist() == col_order
  assert w.row_order.dtype == w.col_order.dtype == jnp.int32
  # A traced mask gets the same orders (computed at build time, inside the jitted build).
  traced = jax.jit(lambda m: bsr_from_dense(jnp.ones((12, 14)), m, (2, 2), capacity=w.capacity))(mask)
  assert traced.row_order.tolist() == row_order and traced.col_order.tolist() == col_order
  # The kernels read them; a matrix assembled from its index arrays alone gets the same order.
  bare = BlockSparseMatrix(w.blocks, w.row_ptr, w.row_idx, w.col_idx, w.col_ptr, w.col_slot, w.shape)
  assert bare.row_order is None and len(jax.tree.leaves(bare)) == 6
  for transpose, expected in ((False, col_order), (True, row_order)):
    assert mgpu.visit_order(w, transpose).tolist() == expected
    assert mgpu.visit_order(bare, transpose).tolist() == expected
  leaves, treedef = jax.tree.flatten(w)
  assert len(leaves) == 8 and jax.tree.unflatten(treedef, leaves).col_order.tolist() == col_order


@pytest.mark.parametrize("n_tiles,num_sms", [(1, 1), (5, 4), (8, 4), (11, 4), (300, 132), (132, 132)])
def test_schedule_deals_every_tile_once_in_a_snake(n_tiles, num_sms):
  schedule = mgpu._Schedule(n_tiles, num_sms)  # pylint: disable=protected-access
  dealt = {sm: [int(schedule.lin(jnp.int32(i), jnp.int32(sm))) for i in range(int(schedule.count(jnp.int32(sm))))]
           for sm in range(num_sms)}
  assert sorted(t for tiles in dealt.values() for t in tiles) == list(range(n_tiles))
  for sm, tiles in dealt.items():  # round i: CTA sm takes position sm (even i) or S-1-sm (odd i)
    assert tiles == [i * num_sms + (sm if i % 2 == 0 else num_sms - 1 - sm) for i in range(len(tiles))]
  # Heaviest first: the lightest tiles of each round pair with the heaviest of the next.
  if n_tiles >= 2 * num_sms:
    assert dealt[0][:2] == [0, 2 * num_sms - 1]


@pytest.mark.parametrize("bk", [64, 128, 256])
@pytest.mark.parametrize("bo", [64, 128, 256])
def test_tiles_fit_h100_shared_memory(bk, bo):
  itemsize = 2
  for m in (64, 1024):
    t = mgpu._spmm_tiles(bk, bo, itemsize, m)  # pylint: disable=protected-access
    em, en = min(64, t.wg_rows), min(64, bo)
    smem = t.stages * (t.rows * t.tk + t.tk * bo) * itemsize + 2 * 2 * em * en * itemsize
    assert t.stages >= 3 and smem + 2 * t.stages * 8 <= H100_SMEM, (t, smem)
    assert t.wg_rows * bo <= 128 * 128  # at most 128 accumulator registers per thread
    if m > 128:  # CTA tiles 256 x 64, 256 x 128 or 128 x 256
      assert (t.rows, bo) in ((256, 64), (256, 128), (128, 256))
  br, bc = bk, bo
  s = mgpu._sddmm_tiles(br, bc, itemsize)  # pylint: disable=protected-access
  am, an = s.acc_shape
  a_cols, b_cols = (2 * am, bc) if s.split_rows else (br, 2 * an)
  smem = s.stages * s.tm * (a_cols + b_cols) * itemsize + 2 * 2 * min(64, am) * min(64, an) * itemsize
  assert s.stages >= 3 and smem <= H100_SMEM and am * an <= 128 * 128, s
  assert (am * 2 * s.chunks == br) if s.split_rows else (am == br and an * 2 == bc)


# Interpreter cases, each checking y, dx and dW against float64 (and zero padding gradients).
# The interpreter runs 4 CTAs: every case has more work tiles than CTAs in some product.
INTERPRET_CASES = {
    # y: 2 row tiles (of 256: rows 0-127 on warpgroup 0, 128-255 on 1; the second ragged, 44
    # rows) x 4 block columns, one empty = 8 tiles; each 128-row block in 2 reduction sub-steps;
    # dx: 2 x 3 tiles, one block row empty; dW: the warpgroups split each block's rows.
    # (tests/test_kernels_cross_tile.py runs 64 x 64 blocks, 10 tiles for 4 CTAs.)
    "128x64-multi-tile": dict(m_shape=(300,), k=384, n=256, block=(128, 64), density=0.6,
                              empty_rows=1, empty_cols=1, seed=1),
    # 256 x 128 blocks: y in 4 reduction sub-steps per block, dx with 128 x 256 CTA tiles
    # (64-row warpgroup halves), dW with the warpgroups splitting each block's rows.
    "256x128-substeps": dict(m_shape=(200,), k=512, n=384, block=(256, 128), density=0.6,
                             empty_cols=1, seed=2),
    # Few rows: 64-row warpgroup tiles, one 64 x 64 epilogue sub-tile per tile (its two slots
    # alternate across tiles), an all-empty block column.
    "few-rows": dict(m_shape=(2, 20), k=128, n=384, block=(64, 64), density=0.6, empty_cols=1,
                     seed=3),
}


@pytest.mark.skipif(not NEW_JAX, reason="the jax 0.10 Mosaic GPU interpreter cannot transpose refs (dx, dW); lowering is tested below")
@pytest.mark.parametrize("case", INTERPRET_CASES.values(), ids=INTERPRET_CASES.keys())
def test_mosaic_gpu_schedule_in_interpreter(case):
  check_bsr_matmul("mosaic_gpu", interpret=True, dtype=jnp.bfloat16, **case)


@pytest.mark.skipif(not NEW_JAX, reason="the jax 0.10 Mosaic GPU interpreter cannot transpose refs (dx, dW)")
def test_mosaic_gpu_empty_weight():
  # No stored block at all: every tile runs zero steps and stores zeros.
  check_bsr_matmul("mosaic_gpu", interpret=True, dtype=jnp.float16, m_shape=(70,), k=128, n=256,
                   block=(128, 128), density=0.0, slack=1)


@pytest.mark.parametrize("block", [(64, 64), (64, 256), (256, 256)])
def test_mosaic_gpu_lowers_every_tile_mode(block):
  """Forward + backward lower through Mosaic GPU: both sddmm splits, 128 x 256 tiles, sub-steps."""
  rng = np.random.default_rng(0)
  k, n = 512, 512
  mask = expand_block_mask(rng.random((k // block[0], n // block[1])) < 0.5, block)
  w = bsr_from_dense(jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16), mask, block)

  def loss(x, blocks):
    y = bsr_matmul(x, dataclasses.replace(w, blocks=blocks), backend="mosaic_gpu")
    return jnp.sum(y.astype(jnp.float32))

  text = lower(jax.value_and_grad(loss, argnums=(0, 1)), jnp.ones((300, k), jnp.bfloat16), w.blocks, platform="cuda")
  assert text.count("custom_call @mosaic_gpu") == 3
