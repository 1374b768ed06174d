"""bsr_matmul: forward and custom VJP against a float64 dense masked reference.

Backends here: the XLA reference and the Triton-lowering Pallas kernel run by the interpreter
("interpret"). The TPU and Mosaic GPU kernels are in test_bsr_kernels.py.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import bsr_from_dense, bsr_matmul
from pallas_kernels.matmul.testing import check_bsr_matmul, dense_reference, expand_block_mask, random_block_mask, relative_error

# Shapes: leading batch dims, rows that are not a multiple of any tile, densities 0 and 1, and
# masks with empty block rows and columns (outputs/gradients that must be exact zeros).
CASES = [
    dict(m_shape=(2, 9), k=64, n=96, block=(16, 32), density=0.5, empty_rows=1, empty_cols=1),
    dict(m_shape=(33,), k=128, n=64, block=(32, 16), density=0.0),
    dict(m_shape=(16,), k=32, n=64, block=(32, 32), density=1.0),
    dict(m_shape=(5,), k=64, n=64, block=(16, 16), density=0.3, empty_rows=2, empty_cols=2, slack=0),
]


@pytest.mark.parametrize("backend", ["reference", "interpret"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['block']}-d{c['density']}")
def test_matches_dense_reference(backend, case):
  check_bsr_matmul(backend, **case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_matches_reference(dtype):
  check_bsr_matmul("interpret", m_shape=(16,), k=256, n=32, block=(32, 16), density=0.8, dtype=dtype, seed=3)


@pytest.mark.parametrize("backend", ["reference", "interpret"])
def test_bfloat16_accumulates_in_float32(backend):
  # Sums of 512 ones: exact (512) with float32 accumulation; a bfloat16 running sum over the
  # elements stalls at 256 (257 is not representable). Covers the three reductions: over in (y),
  # over out (dx) and over rows (dW).
  w = bsr_from_dense(jnp.ones((512, 512), jnp.bfloat16), np.ones((512, 512), bool), (128, 128))
  f = jax.jit(lambda x, b: jax.vjp(lambda x, b: bsr_matmul(x, dataclasses.replace(w, blocks=b), backend=backend), x, b))
  y, vjp = f(jnp.ones((512, 512), jnp.bfloat16), w.blocks)
  dx, dblocks = vjp(jnp.ones_like(y))
  for a in (y, dx, dblocks):
    np.testing.assert_array_equal(np.asarray(a, np.float32), 512.0)


@settings(max_examples=5)
@given(
    kb=st.integers(1, 4), nb=st.integers(1, 4), br=st.sampled_from([8, 16]), bc=st.sampled_from([4, 16]),
    m=st.integers(1, 20), density=st.floats(0, 1), seed=st.integers(0, 2**16),
)
def test_property_reference_backend(kb, nb, br, bc, m, density, seed):
  check_bsr_matmul("reference", m_shape=(m,), k=kb * br, n=nb * bc, block=(br, bc), density=density, seed=seed)


def test_mixed_dtypes_promote():
  w = bsr_from_dense(jnp.ones((32, 32), jnp.bfloat16), np.ones((32, 32), bool), (16, 16))
  y = jax.jit(lambda x, w: bsr_matmul(x, w, backend="interpret"))(jnp.ones((2, 32), jnp.float32), w)
  assert y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), 32.0)
  g = jax.jit(jax.grad(lambda b: bsr_matmul(jnp.ones((2, 32)), dataclasses.replace(w, blocks=b)).sum()))(w.blocks)
  assert g.dtype == jnp.bfloat16


def test_grad_through_whole_matrix_and_jit_traces_once():
  rng = np.random.default_rng(4)
  mask = random_block_mask(rng, (64, 32), (16, 16), 0.5)
  w = bsr_from_dense(rng.standard_normal((64, 32)).astype(np.float32), mask, (16, 16), capacity=8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_grad(x, w):
    return jax.grad(lambda x, w: jnp.sum(bsr_matmul(x, w, backend="interpret") ** 2), argnums=(0, 1), allow_int=True)(x, w)

  for seed in range(2):  # new values, same shapes: one trace
    x = np.random.default_rng(seed).standard_normal((8, 64)).astype(np.float32)
    dx, dw = loss_grad(x, w)
    y_ref, dx_ref, dw_ref = dense_reference(x, w.to_dense(), mask, 2 * (x @ np.asarray(w.to_dense())))
    assert relative_error(dx, dx_ref) < 1e-5
    assert relative_error(dataclasses.replace(w, blocks=dw.blocks).to_dense(), dw_ref) < 1e-5
    assert dw.row_ptr.dtype == jax.dtypes.float0


def _record_backends(monkeypatch):
  from pallas_kernels.matmul import op

  seen = []

  def spmm(self, a, w, transpose):
    seen.append(self.backend)
    return jnp.zeros((a.shape[0], w.shape[1]), a.dtype)

  monkeypatch.setattr(op._Impl, "spmm", spmm)
  return op, seen


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choice")
def test_automatic_backend_on_cpu_is_xla_cpu(monkeypatch):
  _, seen = _record_backends(monkeypatch)
  bsr_matmul(jnp.ones((1, 16)), bsr_from_dense(jnp.ones((16, 16)), np.ones((16, 16), bool), (16, 16)))
  assert seen == ["xla_cpu"]


def test_automatic_mosaic_gpu_sends_float32_to_triton(monkeypatch):
  op, seen = _record_backends(monkeypatch)
  monkeypatch.setattr(op, "resolve_backend", lambda b: b or "mosaic_gpu")
  for dtype in (jnp.float32, jnp.bfloat16):
    w = bsr_from_dense(jnp.ones((64, 64), dtype), np.ones((64, 64), bool), (64, 64))
    bsr_matmul(jnp.ones((1, 64), dtype), w)
  assert seen == ["triton", "mosaic_gpu"]


def test_empty_batch():
  w = bsr_from_dense(jnp.ones((16, 16)), np.ones((16, 16), bool), (16, 16))
  y = bsr_matmul(jnp.ones((0, 3, 16)), w, backend="interpret")
  assert y.shape == (0, 3, 16)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(x=np.ones((2, 8), np.float32)), ValueError, r"'fc/kernel'.*must be \[\.\.\., 32\]"),
        (dict(x=np.ones((2, 32), np.int32)), TypeError, "x dtype int32"),
        (dict(backend="cuda"), ValueError, "unknown backend"),
        (dict(backend="interpret", block=(8, 16)), ValueError, "powers of two in \\[16, 256\\]"),
        (dict(backend="interpret", block=(32, 48)), ValueError, "powers of two"),
        (dict(backend="tpu", block=(16, 16)), ValueError, "multiples of 128"),
        (dict(backend="tpu", dtype=jnp.float16, block=(32, 96)), TypeError, "do not support float16"),
        (dict(backend="mosaic_gpu", dtype=jnp.float32), TypeError, "float16 or bfloat16"),
        (dict(backend="mosaic_gpu", dtype=jnp.bfloat16, block=(32, 32)), ValueError, r"\{64, 128, 256\}"),
    ],
)
def test_backend_validation_errors(kwargs, err, match):
  block = kwargs.get("block", (16, 16))
  dtype = kwargs.get("dtype", jnp.float32)
  w = bsr_from_dense(jnp.ones((32, 96), dtype), np.ones((32, 96), bool), block)
  x = kwargs.get("x", np.ones((2, 32), dtype))
  with pytest.raises(err, match=match):
    bsr_matmul(x, w, backend=kwargs.get("backend", "reference"), path="fc/kernel")


def test_not_a_block_sparse_matrix():
  with pytest.raises(TypeError, match="expected a BlockSparseMatrix"):
    bsr_matmul(jnp.ones((2, 4)), jnp.ones((4, 4)))


def test_empty_rows_and_columns_give_exact_zeros():
  block_mask = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 1]], bool)  # empty row 1, empty column 1
  w = bsr_from_dense(jnp.ones((48, 48)), expand_block_mask(block_mask, (16, 16)), (16, 16), capacity=5)
  for backend in ("reference", "interpret"):

    @jax.jit
    def value_and_dx(x):
      y, vjp = jax.vjp(lambda x: bsr_matmul(x, w, backend=backend), x)
      return y, vjp(jnp.ones_like(y))[0]

    y, dx = value_and_dx(jnp.ones((4, 48)))
    assert not np.asarray(y[:, 16:32]).any()  # output column block 1 has no block
    assert not np.asarray(dx[:, 16:32]).any()  # input row block 1 has no block
    np.testing.assert_array_equal(np.asarray(y[:, :16]), 32.0)
    np.testing.assert_array_equal(np.asarray(dx[:, :16]), 16.0)
