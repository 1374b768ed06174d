"""block_sparse_attention on the XLA reference backend: forward, LSE and gradients against a
float64 NumPy dense masked softmax; empty rows; GQA; unequal lengths; API errors."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import default_backend
from pallas_kernels.attention import (and_masks, attention_dense_reference,
                                      block_mask_from_blocks, block_sparse_attention,
                                      causal_mask, document_mask, sliding_window_mask)
from pallas_kernels.attention.testing import numpy_attention, random_block_mask, relative_error


def _inputs(rng, b, sq, sk, h, hk, d, dtype=jnp.float32):
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d), mk(b, sq, h, d)


@functools.partial(jax.jit, static_argnames=("backend",))
def _grads(q, k, v, do, mask, backend):
  def f(q, k, v):
    return block_sparse_attention(q, k, v, mask, return_lse=True, backend=backend)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
  return out, lse, dq, dk, dv


def _assert_close(got, ref, tol):
  out, lse, dq, dk, dv = got
  r_out, r_lse, r_dq, r_dk, r_dv = ref
  for name, a, b in (("out", out, r_out), ("dq", dq, r_dq), ("dk", dk, r_dk), ("dv", dv, r_dv)):
    assert np.isfinite(np.asarray(a, np.float64)).all(), name
    assert relative_error(a, b) < tol, (name, relative_error(a, b))
  lse, r_lse = np.asarray(lse), np.asarray(r_lse)
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(r_lse))
  fin = np.isfinite(r_lse)
  np.testing.assert_allclose(lse[fin], r_lse[fin], rtol=1e-5, atol=1e-5)


@settings(max_examples=6)
@given(seed=st.integers(0, 2**16), density=st.sampled_from([0.1, 0.25, 0.5, 1.0]))
def test_random_block_masks_gqa_unequal_lengths(seed, density):
  rng = np.random.default_rng(seed)
  q, k, v, do = _inputs(rng, 2, 40, 52, 4, 2, 16)
  mask = random_block_mask(rng, q_len=40, kv_len=52, q_block=16, kv_block=8, density=density,
                           batch=2, heads=2)
  ref = numpy_attention(q, k, v, mask.to_dense(), do)
  _assert_close(_grads(q, k, v, do, mask, backend="reference"), ref, 1e-5)


def test_token_masks_with_empty_rows_give_zero_output_and_gradients():
  rng = np.random.default_rng(0)
  q, k, v, do = _inputs(rng, 2, 48, 40, 4, 1, 8)
  seg_q = np.array([[0] * 20 + [1] * 20 + [-1] * 8, [0] * 48])
  seg_k = np.array([[0] * 16 + [1] * 24, [0] * 40])
  mask = and_masks(causal_mask(48, 40, q_block=16, kv_block=8, q_offset=-6),
                   document_mask(jnp.asarray(seg_q), jnp.asarray(seg_k), q_block=16, kv_block=8))
  dense = np.asarray(mask.to_dense())
  empty = ~dense.any(-1)                                       # [B, H', Sq]
  assert empty.any()
  got = _grads(q, k, v, do, mask, backend="reference")
  _assert_close(got, numpy_attention(q, k, v, dense, do), 1e-5)
  rows = np.broadcast_to(empty[:, 0][:, :, None, None], got[0].shape)
  assert (np.asarray(got[0])[rows] == 0).all() and (np.asarray(got[2])[rows] == 0).all()


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 2e-2), (jnp.float16, 4e-3)])
def test_half_precision_inputs_float32_statistics(dtype, tol):
  rng = np.random.default_rng(1)
  q, k, v, do = _inputs(rng, 1, 64, 64, 2, 2, 32, dtype)
  mask = sliding_window_mask(64, window=24, q_block=16)
  got = _grads(q, k, v, do, mask, backend="reference")
  assert got[0].dtype == dtype and got[1].dtype == jnp.float32 and got[2].dtype == dtype
  out, lse, dq, dk, dv = numpy_attention(q, k, v, mask.to_dense(), do)
  for a, b in zip((got[0], got[2], got[3], got[4]), (out, dq, dk, dv)):
    assert relative_error(a, b) < tol


def test_lse_cotangent_matches_autodiff_of_dense_reference():
  rng = np.random.default_rng(2)
  q, k, v, _ = _inputs(rng, 1, 32, 32, 2, 1, 8)
  mask = causal_mask(32, q_block=16, q_offset=-3)
  w = jnp.asarray(rng.standard_normal((1, 2, 32)), jnp.float32)

  def loss(fn):
    def f(q, k, v):
      out, lse = fn(q, k, v)
      return jnp.sum(out ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse * w, 0.0))
    return f

  op = lambda q, k, v: block_sparse_attention(q, k, v, mask, backend="reference", return_lse=True)
  dense = lambda q, k, v: attention_dense_reference(q, k, v, mask)
  g = jax.jit(jax.grad(loss(op), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g, g_ref):
    assert relative_error(a, b) < 1e-5


def test_one_trace_for_new_segment_ids_and_scale():
  rng = np.random.default_rng(3)
  q, k, v, _ = _inputs(rng, 2, 32, 32, 2, 2, 8)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(q, k, v, seg):
    mask = document_mask(seg, q_block=16)
    return block_sparse_attention(q, k, v, mask, scale=0.3, backend="reference")

  for cut in (5, 20):
    seg = (jnp.arange(32) >= cut).astype(jnp.int32)[None].repeat(2, 0)
    out = f(q, k, v, seg)
    tok = np.asarray(seg[:, :, None] == seg[:, None, :])[:, None]
    ref, _ = numpy_attention(q, k, v, tok, scale=0.3)
    assert relative_error(out, ref) < 1e-5


def test_default_backend_on_cpu_is_reference_and_errors():
  assert default_backend() == "reference"
  rng = np.random.default_rng(4)
  q, k, v, _ = _inputs(rng, 1, 32, 32, 4, 2, 16)
  m = causal_mask(32, q_block=16)
  ref = jax.jit(block_sparse_attention)(q, k, v, m)
  assert relative_error(ref, numpy_attention(q, k, v, m.to_dense())[0]) < 1e-5
  with pytest.raises(ValueError, match="unknown backend"):
    block_sparse_attention(q, k, v, m, backend="cuda")
  with pytest.raises(ValueError, match="3 kv heads must divide the 4"):
    block_sparse_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), m)
  with pytest.raises(TypeError, match="dtypes differ"):
    block_sparse_attention(q, k.astype(jnp.bfloat16), v, m)
  with pytest.raises(ValueError, match="block_mask/kv_len"):
    block_sparse_attention(q, k[:, :16], v[:, :16], m)
  with pytest.raises(ValueError, match="block_mask/q_block: the interpret backend needs a power"):
    block_sparse_attention(q[:, :24], k[:, :24], v[:, :24], causal_mask(24, q_block=12),
                           backend="interpret")
  with pytest.raises(ValueError, match="block_mask/q_block: the tpu backend needs a multiple of 128"):
    block_sparse_attention(q, k, v, m, backend="tpu")
  with pytest.raises(ValueError, match="mosaic_gpu backend needs 128 x 128"):
    block_sparse_attention(q, k, v, m, backend="mosaic_gpu")
  with pytest.raises(TypeError, match="float64 runs only on the reference backend"):
    q64 = np.zeros((1, 32, 4, 16), np.float64)
    block_sparse_attention(q64, q64[:, :, :2], q64[:, :, :2], m, backend="interpret")
  with pytest.raises(TypeError, match="expected a BlockMask"):
    block_sparse_attention(q, k, v, m.to_dense())
  blk = block_mask_from_blocks(jnp.ones((3, 2, 2), bool), q_len=32, q_block=16)
  with pytest.raises(ValueError, match="3 mask heads do not divide the 4 query heads"):
    block_sparse_attention(q, k, v, blk)
