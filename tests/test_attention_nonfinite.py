"""block_sparse_attention propagates NaN/inf inputs like dense attention on every CPU backend.

A NaN or inf in a key or query makes exactly the rows that attend it NaN (output and LSE), as
``jax.nn.dot_product_attention`` with the equivalent dense mask does; rows that are empty by the
mask stay exact zeros with ``lse = -inf``. Gradients are finite and equal to dense attention's
wherever dense attention's are finite, and NaN on the rows that saw the bad value. Backends: the
XLA reference, the Triton-style kernels in the Pallas interpreter, the TPU kernels under
``pltpu.InterpretParams()`` and the Mosaic GPU kernels in the GPU interpreter (jax >= 0.12).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import and_masks, block_sparse_attention, causal_mask, document_mask

_JAX_012 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 12)

# (backend, interpret, dtype, seq, head_dim, block, tolerance)
BACKENDS = [
    pytest.param("reference", False, jnp.float32, 64, 16, 16, 1e-5, id="reference"),
    pytest.param("interpret", False, jnp.float32, 64, 16, 16, 1e-5, id="triton-interpret"),
    pytest.param("tpu", True, jnp.float32, 64, 16, 16, 1e-5, id="tpu-interpret-params"),
    pytest.param("mosaic_gpu", True, jnp.float16, 256, 64, 128, 2e-2, id="mosaic-gpu-interpreter",
                 marks=[pytest.mark.skipif(not _JAX_012, reason="the Mosaic GPU interpreter needs jax >= 0.12"),
                        # the interpreter runs wgmma as a NumPy matmul, which warns on the NaN inputs
                        pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")]),
]


def _mask(seq, block):
  """Causal, and the last 6 queries in a document of their own with no keys: empty rows."""
  seg_q = jnp.array([[0] * (seq - 6) + [1] * 6])
  seg_k = jnp.zeros((1, seq), jnp.int32)
  return and_masks(causal_mask(seq, q_block=block), document_mask(seg_q, seg_k, q_block=block, kv_block=block))


def _inputs(seq, head_dim, dtype, where):
  rng = np.random.default_rng(0)
  q, k, v, do = (rng.standard_normal((1, seq, 2, head_dim)).astype(np.float32) for _ in range(4))
  do[:, seq - 6:] = 0  # rows empty by the mask: dense attention would spread them over all keys
  kv_bad = seq * 5 // 8
  if where == "k":
    k[0, kv_bad, 0, 3] = np.nan  # head 0: every row at or after kv_bad attends it
    k[0, 3, 1, 0] = np.inf       # head 1
  elif where == "q":
    q[0, 9, 0, :] = np.nan
    q[0, seq // 2, 1, 2] = -np.inf
  return tuple(jnp.asarray(a, dtype) for a in (q, k, v, do))


@functools.partial(jax.jit, static_argnames=("backend", "interpret"))
def _ours(q, k, v, do, mask, backend, interpret):
  f = lambda q, k, v: block_sparse_attention(q, k, v, mask, backend=backend, interpret=interpret, return_lse=True)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  return (out, lse) + vjp((do, jnp.zeros_like(lse)))


@jax.jit
def _dense(q, k, v, do, token_mask):
  f = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=token_mask, implementation="xla")
  out, vjp = jax.vjp(f, *(a.astype(jnp.float32) for a in (q, k, v)))
  return (out,) + vjp(do.astype(jnp.float32))


def _close(a, b, tol, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(initial=0.0), 1.0)
  np.testing.assert_allclose(a, b, rtol=0, atol=tol * scale, err_msg=what)


@pytest.mark.parametrize("where", ["k", "q"])
@pytest.mark.parametrize("backend,interpret,dtype,seq,head_dim,block,tol", BACKENDS)
def test_nonfinite_like_dense_attention(backend, interpret, dtype, seq, head_dim, block, tol, where):
  mask = _mask(seq, block)
  token_mask = jnp.asarray(mask.to_dense())             # [1, 1, Sq, Sk]
  q, k, v, do = _inputs(seq, head_dim, dtype, where)
  out, lse, dq, dk, dv = (np.asarray(a, np.float64) for a in _ours(q, k, v, do, mask, backend, interpret))
  ref = [np.asarray(a, np.float64) for a in _dense(q, k, v, do, token_mask)]
  empty = ~np.asarray(token_mask)[0, 0].any(-1)          # [Sq] rows that see no key
  nan_rows = np.isnan(ref[0]).any(-1)                    # [B, Sq, H] per dense attention
  assert nan_rows[:, ~empty].any(), "the case must put NaN in some attended row"

  # Forward: the same NaN rows as dense attention, the same values elsewhere.
  live = ~empty
  np.testing.assert_array_equal(np.isnan(out[:, live]), np.isnan(ref[0][:, live]))
  ok = np.isfinite(ref[0][:, live])
  _close(out[:, live][ok], ref[0][:, live][ok], tol, "output")
  lse_bshape = np.transpose(lse, (0, 2, 1))              # [B, Sq, H]
  np.testing.assert_array_equal(np.isnan(lse_bshape[:, live]), nan_rows[:, live])
  # Rows empty by the mask: exact zeros and lse = -inf. Their dq is zero, or NaN where their
  # (zero) probabilities meet a NaN key of a visited block (0 * NaN, as in a dense matmul).
  assert (out[:, empty] == 0).all() and np.isneginf(lse_bshape[:, empty]).all()
  assert ((dq[:, empty] == 0) | np.isnan(dq[:, empty])).all()

  # Gradients: NaN on the rows that saw the bad value; dense attention's value wherever finite.
  assert np.isnan(dq[nan_rows & live[None, :, None]]).all()
  for name, g, r in (("dq", dq, ref[1]), ("dk", dk, ref[2]), ("dv", dv, ref[3])):
    fin = np.isfinite(r)
    if name == "dq":
      fin &= live[None, :, None, None]
    assert np.isfinite(g[fin]).all(), f"{name}: NaN where dense attention is finite"
    _close(g[fin], r[fin], tol, name)


@pytest.mark.parametrize("backend,interpret", [("reference", False), ("interpret", False)])
def test_nan_value_reaches_the_rows_that_attend_it(backend, interpret):
  # A NaN in v[40] reaches the rows attending key 40 (the ones at or after it, causal); rows whose
  # visited blocks end before it never read it and are unchanged.
  mask = _mask(64, 16)
  q, k, v, do = _inputs(64, 16, jnp.float32, None)
  clean = np.asarray(_ours(q, k, v, do, mask, backend, interpret)[0])
  out = np.asarray(_ours(q, k, v.at[0, 40, 0, 0].set(jnp.nan), do, mask, backend, interpret)[0])
  assert np.isnan(out[0, 40:58, 0, 0]).all() and np.isfinite(out[0, :, 0, 1:]).all()
  np.testing.assert_array_equal(out[0, :32], clean[0, :32])
  np.testing.assert_array_equal(out[0, :, 1], clean[0, :, 1])
