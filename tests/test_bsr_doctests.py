"""The runnable examples in the block-sparse matmul modules and the NNX layer."""

import doctest
import importlib

import jax
import pytest

MODULES = [
    "pallas_kernels._numerics",
    "pallas_kernels.matmul.format",
    "pallas_kernels.matmul.op",
    "pallas_kernels.matmul.reference",
    "pallas_kernels.matmul.xla_cpu",
    "pallas_kernels.matmul.kernel_triton",
    "pallas_kernels.matmul.kernel_tpu",
    "pallas_kernels.matmul.kernel_mosaic_gpu",
    "pallas_kernels.matmul.testing",
    "sparsejax.nn.block_sparse_dense",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
  if name.endswith("kernel_mosaic_gpu") and jax.__version_info__ < (0, 11):
    pytest.skip("the jax 0.10 Mosaic GPU interpreter is ~5x slower; its kernels are covered by lowering tests")
  res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
