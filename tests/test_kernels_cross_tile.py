"""Kernel paths that cross a tile boundary, under the Pallas interpreters (plain CPU).

* The persistent Mosaic GPU matmul with more work tiles than CTAs: each CTA's TMA ring carries
  its step counter (buffer index and barrier phase) from one tile to the next, through tiles
  with different step counts, some empty.
* The TPU matmul with several row tiles: every output block column is visited once per row
  tile, and ``sddmm`` accumulates each block's ``dW`` over row tiles.
* The Triton matmul's sub-tiling for large float32 blocks (a block's reduction in several
  sub-tiles, ``dW`` blocks in column parts), chosen to fit H100 shared memory.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matmul import kernel_mosaic_gpu, kernel_triton
from pallas_kernels.matmul.format import bsr_from_dense
from pallas_kernels.matmul.testing import check_bsr_matmul

NEW_JAX = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 11)


@pytest.mark.skipif(not NEW_JAX, reason="the jax 0.10 Mosaic GPU interpreter cannot transpose refs (dx, dW)")
def test_mosaic_gpu_persistent_matmul_more_tiles_than_ctas():
  case = dict(m_shape=(300,), k=256, n=320, block=(64, 64), density=0.5, empty_cols=1, seed=3)
  # y: 2 row tiles x 5 block columns = 10 work tiles; dx: 2 x 4 = 8; dW: one per stored block.
  w = bsr_from_dense(np.zeros((256, 320), np.float32), np.ones((256, 320), bool), (64, 64))
  num_sms = kernel_mosaic_gpu._num_sms(interpret=True)  # pylint: disable=protected-access
  tiles = kernel_mosaic_gpu._spmm_tiles(64, 64, 2, 300)  # pylint: disable=protected-access
  assert -(-300 // tiles.rows) * w.grid[1] > 2 * num_sms and tiles.stages > 1
  check_bsr_matmul("mosaic_gpu", interpret=True, dtype=jnp.bfloat16, **case)


def test_tpu_matmul_several_row_tiles():
  # 300 rows: two 256-row tiles; block columns hold 0..3 stored blocks.
  check_bsr_matmul("tpu", interpret=True, m_shape=(300,), k=384, n=256, block=(128, 128),
                   density=0.6, empty_cols=1, seed=5)


def test_triton_matmul_large_float32_blocks_in_sub_tiles():
  # float32 256 x 256 blocks: spmm in 64-wide reduction sub-tiles, dW in two column parts over
  # four 32-row tiles (the shapes that fit H100 shared memory).
  assert kernel_triton._reduction_tile(128, 256, 256, 4) == 64  # pylint: disable=protected-access
  check_bsr_matmul("interpret", m_shape=(128,), k=512, n=512, block=(256, 256), density=0.5,
                   slack=1, seed=7)
