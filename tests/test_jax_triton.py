"""The ``"jax_triton"`` backend: Triton-language kernels for NVIDIA GPUs before Hopper.

On CPU the kernels run in Triton's own interpreter (``interpret=True``), against float64 NumPy
references, forward and backward through the ops' custom VJPs. The dispatch rule (which backend
an sm_8x GPU gets) is a pure function, tested everywhere. Tests marked ``aot`` compile the
kernels for an A100 (sm_80) without the device and read ``ptxas -v``.

Needs the optional ``triton`` extra (``pip install -e ".[triton]"``); without it the kernel tests
skip and say so.
"""

import dataclasses
import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _jax_triton, _platform, aot
from pallas_kernels.attention import (block_sparse_attention, causal_mask, document_mask,
                                      segment_ids_from_lengths)
from pallas_kernels.attention.testing import numpy_attention, random_block_mask
from pallas_kernels.matmul import bsr_from_dense, bsr_matmul

needs_triton = pytest.mark.skipif(not _jax_triton.installed(), reason=str(_jax_triton.missing()))


# --------------------------------------------------------------- dispatch
@pytest.mark.parametrize("cc,installed,expected", [
    ("8.0", True, "jax_triton"), ("8.6", True, "jax_triton"), ("8.9", True, "jax_triton"),
    ("8.0", False, "triton"), ("8.9", False, "triton"),
    ("9.0", True, "mosaic_gpu"), ("10.0", False, "mosaic_gpu"),
    ("7.5", True, "triton"), (None, True, "triton"), ("unknown", False, "triton"),
])
def test_gpu_backend_is_a_function_of_capability_and_install(cc, installed, expected):
  assert _platform.gpu_backend(cc, installed) == expected


def test_cpu_default_is_not_jax_triton():
  assert _platform.resolve_backend(None) == "reference"
  assert "jax_triton" in _platform.BACKENDS


def test_missing_names_the_extra(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "jax_triton" else real(name, *a))
  msg = _jax_triton.missing()
  assert "jax_triton" in msg and 'pip install -e ".[triton]"' in msg
  assert not _jax_triton.installed()


# ----------------------------------------------------------------- matmul
def _weight(rng, shape, block, density, dtype, spare=2):
  kb, nb = shape[0] // block[0], shape[1] // block[1]
  blocks = rng.random((kb, nb)) < density
  blocks[0, 0] = True
  mask = np.repeat(np.repeat(blocks, block[0], 0), block[1], 1)
  dense = rng.standard_normal(shape).astype(np.float32)
  w = bsr_from_dense(jnp.asarray(dense, dtype), jnp.asarray(mask), block,
                     capacity=int(blocks.sum()) + spare)  # padding slots must get zero grads
  return w, np.where(mask, np.asarray(jnp.asarray(dense, dtype), np.float64), 0.0), mask


@needs_triton
@pytest.mark.parametrize("block,dtype,tol", [
    ((128, 32), jnp.float32, 1e-5),   # several reduction sub-tiles per stored block
    ((16, 256), jnp.float32, 1e-5),   # two output column parts per block
    ((32, 32), jnp.float16, 1e-2),
])
def test_matmul_forward_and_grads_match_float64(block, dtype, tol):
  rng = np.random.default_rng(1)
  k, n, m = 2 * block[0], 2 * block[1], 37  # ragged rows: 37 is no multiple of the row tile
  w, dense, mask = _weight(rng, (k, n), block, 0.5, dtype)
  x = jnp.asarray(rng.standard_normal((m, k)), dtype)
  dy = rng.standard_normal((m, n))

  def loss(x, blocks):
    y = bsr_matmul(x, dataclasses.replace(w, blocks=blocks), backend="jax_triton", interpret=True)
    return jnp.sum(y.astype(jnp.float32) * dy.astype(np.float32)), y

  (_, y), (dx, dblocks) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w.blocks)
  x64 = np.asarray(x, np.float64)
  scale = np.abs(x64 @ dense).max()
  np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ dense, atol=tol * scale)
  np.testing.assert_allclose(np.asarray(dx, np.float64), dy @ dense.T,
                             atol=tol * np.abs(dy @ dense.T).max())
  dw = np.where(mask, x64.T @ dy, 0.0)
  got = np.zeros_like(dw)
  nnzb = int(w.nnzb)
  for p in range(w.capacity):
    blk = np.asarray(dblocks[p], np.float64)
    if p >= nnzb:
      assert not blk.any(), "padding slots get zero gradient"
      continue
    i, j = int(w.row_idx[p]), int(w.col_idx[p])
    got[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]] = blk
  np.testing.assert_allclose(got, dw, atol=tol * np.abs(dw).max())


@needs_triton
def test_matmul_rejects_blocks_triton_cannot_tile():
  w = bsr_from_dense(jnp.ones((24, 24)), jnp.ones((24, 24), bool), (24, 24))
  with pytest.raises(ValueError, match="powers of two"):
    bsr_matmul(jnp.ones((2, 24)), w, backend="jax_triton", interpret=True, path="layer/kernel")


# -------------------------------------------------------------- attention
def _attention_case(name, rng):
  s = 40  # ragged: 40 keys in 16-blocks
  if name == "causal_gqa":
    return causal_mask(s, q_block=16), (1, s, 2, 1, 24)
  if name == "documents_per_batch":
    seg = segment_ids_from_lengths(jnp.array([[10, 20, 10], [25, 15, 0]]), s)
    return document_mask(seg, causal=True, q_block=16, kv_block=16), (2, s, 1, 1, 16)
  # block-level mask (no token mask) with empty q-block rows, one mask per head
  return random_block_mask(rng, q_len=s, kv_len=s, q_block=16, kv_block=16, density=0.5,
                           heads=2), (1, s, 2, 2, 32)


@needs_triton
@pytest.mark.parametrize("name", ["causal_gqa", "documents_per_batch", "random_blocks"])
def test_attention_forward_and_grads_match_float64(name):
  rng = np.random.default_rng(2)
  mask, (b, s, h, hk, d) = _attention_case(name, rng)
  q = jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, hk, d)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, s, hk, d)), jnp.float32)
  do = rng.standard_normal((b, s, h, d))
  dl = rng.standard_normal((b, h, s))

  def loss(q, k, v):
    out, lse = block_sparse_attention(q, k, v, mask, backend="jax_triton", interpret=True,
                                      return_lse=True)
    finite = jnp.where(jnp.isfinite(lse), lse, 0.0)
    value = jnp.sum(out * do.astype(np.float32)) + jnp.sum(finite * dl.astype(np.float32))
    return value, (out, lse)

  (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  ref_out, ref_lse = numpy_attention(q, k, v, mask.to_dense())
  np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-5)
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), np.isfinite(ref_lse))
  fin = np.isfinite(ref_lse)
  assert (~fin).any() or name != "random_blocks", "the case must have rows that attend nothing"
  np.testing.assert_allclose(np.asarray(lse)[fin], ref_lse[fin], atol=2e-5)
  for got, want in zip(grads, _float64_grads(q, k, v, mask.to_dense(), do, dl)):
    np.testing.assert_allclose(np.asarray(got), want, atol=5e-5 * max(1.0, np.abs(want).max()))


def _float64_grads(q, k, v, token_mask, do, dl):
  """Gradients of ``sum(out * do) + sum(lse * dl)`` (rows that attend nothing: no lse term)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, sq, h, d = q.shape
  g = h // k.shape[2]
  tm = np.broadcast_to(np.repeat(np.asarray(token_mask), h // token_mask.shape[1], axis=1),
                       (b, h, sq, k.shape[1]))
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.where(tm, np.einsum("bqhd,bkhd->bhqk", q, kr) * d ** -0.5, -np.inf)
  m = np.max(s, -1, keepdims=True)
  e = np.where(tm, np.exp(s - np.where(np.isfinite(m), m, 0.0)), 0.0)
  l = e.sum(-1, keepdims=True)
  p = e / np.where(l > 0, l, 1.0)
  dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
  ds = p * (dp - np.sum(dp * p, -1, keepdims=True) + dl[..., None])  # d lse / d s = p
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * d ** -0.5
  fold = lambda x: x.reshape(b, x.shape[1], k.shape[2], g, d).sum(3)
  dk = fold(np.einsum("bhqk,bqhd->bkhd", ds, q) * d ** -0.5)
  dv = fold(np.einsum("bhqk,bqhd->bkhd", p, do))
  return dq, dk, dv


@needs_triton
def test_attention_rejects_block_sizes_triton_cannot_tile():
  q = jnp.zeros((1, 48, 1, 16))
  with pytest.raises(ValueError, match="q_block"):
    block_sparse_attention(q, q, q, causal_mask(48, q_block=24), backend="jax_triton",
                           interpret=True)


# --------------------------------------------------------------- doctests
@needs_triton
@pytest.mark.parametrize("name", ["pallas_kernels._jax_triton", "pallas_kernels._platform",
                                  "pallas_kernels.matmul.kernel_jax_triton",
                                  "pallas_kernels.attention.kernel_jax_triton"])
def test_doctests(name):
  res = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0


# ------------------------------------------------- A100 compile (no device)
def _needs_a100():
  if not _jax_triton.installed():
    pytest.skip(_jax_triton.missing())
  missing = aot.missing_dependencies("cuda:a100")
  if missing:
    pytest.skip(missing)


@pytest.mark.aot
def test_matmul_compiles_for_a100_without_spills():
  _needs_a100()
  rng = np.random.default_rng(0)
  w, _, _ = _weight(rng, (1024, 1024), (128, 128), 0.5, jnp.bfloat16)
  x = jax.ShapeDtypeStruct((512, 1024), jnp.bfloat16)

  def train_step(x, w):
    return jax.grad(lambda x, w: jnp.sum(bsr_matmul(x, w, backend="jax_triton")
                                         .astype(jnp.float32)), argnums=(0, 1),
                    allow_int=True)(x, w)

  report = aot.compile_for(train_step, x, w, target="cuda:a100")
  assert report.ok, report.error
  kernels = {k.name: k for k in report.kernels if k.source == "jax_triton"}
  assert set(kernels) == {"spmm_kernel", "sddmm_kernel"}, kernels
  assert all(k.spills == 0 for k in kernels.values()), kernels
  assert all(k.smem <= 163 * 1024 for k in kernels.values()), kernels  # A100's per-CTA limit


@pytest.mark.aot
def test_attention_compiles_for_a100():
  _needs_a100()
  mask = causal_mask(1024, q_block=64)
  q = jax.ShapeDtypeStruct((1, 1024, 4, 64), jnp.bfloat16)

  def train_step(q, k, v):
    return jax.grad(lambda q, k, v: jnp.sum(block_sparse_attention(
        q, k, v, mask, backend="jax_triton").astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

  report = aot.compile_for(train_step, q, q, q, target="cuda:a100")
  assert report.ok, report.error
  kernels = {k.name: k for k in report.kernels if k.source == "jax_triton"}
  assert set(kernels) == {"fwd_kernel", "dq_kernel", "dkv_kernel"}, kernels
  assert kernels["fwd_kernel"].spills == 0, kernels
  assert all(k.smem <= 163 * 1024 for k in kernels.values()), kernels  # A100's per-CTA limit
