"""Pallas attention kernels on CPU: the Triton-style kernels in the interpreter, the TPU kernels
under pltpu.InterpretParams(), the Mosaic GPU kernels in the GPU interpreter (jax >= 0.12),
lowering for CUDA and TPU targets, and (marked gpu/tpu) the compiled kernels on a device.
Every check compares forward, LSE and gradients with a float64 NumPy dense masked softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention import (and_masks, block_mask_from_blocks, block_sparse_attention,
                                      causal_mask, document_mask, full_mask, sliding_window_mask)
from pallas_kernels.attention.testing import (export_for, numpy_attention, random_block_mask,
                                              relative_error)

_JAX_012 = tuple(int(x) for x in jax.__version__.split(".")[:2]) >= (0, 12)


def _inputs(rng, b, sq, sk, h, hk, d, dtype):
  mk = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
  return mk(b, sq, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d), mk(b, sq, h, d)


@functools.partial(jax.jit, static_argnames=("backend", "interpret"))
def _run(q, k, v, do, mask, backend, interpret):
  f = lambda q, k, v: block_sparse_attention(q, k, v, mask, backend=backend, interpret=interpret,
                                             return_lse=True)
  (out, lse), vjp = jax.vjp(f, q, k, v)
  return (out, lse) + vjp((do, jnp.zeros_like(lse)))


def _check(got, q, k, v, do, mask, tol):
  ref = numpy_attention(q, k, v, mask.to_dense(), do)
  out, lse = np.asarray(got[0], np.float64), np.asarray(got[1])
  assert relative_error(out, ref[0]) < tol
  np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(ref[1]))
  fin = np.isfinite(ref[1])
  np.testing.assert_allclose(lse[fin], ref[1][fin], rtol=1e-3, atol=1e-3)
  for name, a, b in zip(("dq", "dk", "dv"), got[2:], ref[2:]):
    assert relative_error(a, b) < tol, (name, relative_error(a, b))
  empty = ~np.asarray(mask.to_dense()).any(-1)           # [B', H', Sq]: rows seeing nothing
  if empty.any():
    b_, h_ = out.shape[0], out.shape[2]
    rows = np.broadcast_to(np.repeat(empty, h_ // empty.shape[1], 1), (b_, h_, out.shape[1]))
    rows = np.transpose(rows, (0, 2, 1))
    assert (out[rows] == 0).all() and (np.asarray(got[2], np.float64)[rows] == 0).all()


def _doc_causal(sq, sk, qb, kb, batch=2):
  seg_q = np.array([[0] * (sq // 2) + [1] * (sq - sq // 2), [0] * (sq - 6) + [-1] * 6])[:batch]
  seg_k = np.array([[0] * (sk // 3) + [1] * (sk - sk // 3), [0] * sk])[:batch]
  return and_masks(causal_mask(sq, sk, q_block=qb, kv_block=kb, q_offset=-3),
                   document_mask(jnp.asarray(seg_q), jnp.asarray(seg_k), q_block=qb, kv_block=kb))


def _per_group(mask, rng, heads=2):
  """Intersects with a random block mask per kv head (H' = num_kv_heads)."""
  blocks = random_block_mask(rng, q_len=mask.q_len, kv_len=mask.kv_len, q_block=mask.q_block,
                             kv_block=mask.kv_block, density=0.7, heads=heads, empty_q_blocks=0)
  return and_masks(mask, blocks)


def test_interpret_kernels_token_masks_gqa_ragged():
  rng = np.random.default_rng(0)
  q, k, v, do = _inputs(rng, 2, 40, 36, 4, 2, 16, jnp.float32)
  mask = _per_group(_doc_causal(40, 36, 16, 16), rng)
  assert (mask.batch, mask.num_heads) == (2, 2)
  got = _run(q, k, v, do, mask, "interpret", False)
  _check(got, q, k, v, do, mask, 2e-5)


def test_interpret_kernels_random_blocks_bf16_padded_head_dim():
  rng = np.random.default_rng(1)
  q, k, v, do = _inputs(rng, 1, 64, 48, 4, 1, 24, jnp.bfloat16)
  mask = random_block_mask(rng, q_len=64, kv_len=48, q_block=32, kv_block=16, density=0.4,
                           heads=4)
  got = _run(q, k, v, do, mask, "interpret", False)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
  _check(got, q, k, v, do, mask, 2e-2)


def test_tpu_kernels_under_interpret_params():
  rng = np.random.default_rng(2)
  q, k, v, do = _inputs(rng, 2, 40, 36, 4, 2, 8, jnp.float32)
  mask = _per_group(_doc_causal(40, 36, 16, 8), rng)
  got = _run(q, k, v, do, mask, "tpu", True)
  _check(got, q, k, v, do, mask, 2e-5)


@pytest.mark.skipif(not _JAX_012, reason="the Mosaic GPU interpreter needs jax >= 0.12")
def test_mosaic_gpu_kernels_in_gpu_interpreter():
  rng = np.random.default_rng(3)
  q, k, v, do = _inputs(rng, 1, 128, 200, 2, 1, 64, jnp.float16)
  # H' = 2 (one mask per query head): head 1 sees nothing at all.
  heads = block_mask_from_blocks(jnp.array([[[True, True]], [[False, False]]]), q_len=128,
                                 kv_len=200, q_block=128)
  mask = and_masks(_doc_causal(128, 200, 128, 128, batch=1), heads)
  assert np.asarray(mask.block_states()).reshape(2, 2).tolist() == [[1, 0], [0, 0]]
  got = _run(q, k, v, do, mask, "mosaic_gpu", True)
  _check(got, q, k, v, do, mask, 3e-3)


def test_mosaic_gpu_work_items_longest_first():
  from pallas_kernels.attention import kernel_mosaic_gpu as mg  # pylint: disable=g-import-not-at-top
  # Mask rows [B'=1, H'=2, nq=3] for batch 2 and 4 heads (2 heads per mask head): item ids are
  # (b * 4 + h) * 3 + q_block; visited counts 5 > 2 > 1 > 0, ties in id order.
  dims = mg.Dims(2, 384, 384, 4, 4, 64, 128, 128, 1, 2)
  items = np.asarray(mg._work_items(jnp.array([[[1, 0, 2], [5, 1, 0]]]), dims))  # pylint: disable=protected-access
  counts = np.array([[1, 0, 2]] * 2 + [[5, 1, 0]] * 2)  # per head, one batch
  ids = np.arange(24).reshape(2, 4, 3)
  assert sorted(items.tolist()) == list(range(24))
  cost = np.broadcast_to(counts, (2, 4, 3))[np.unravel_index(items, (2, 4, 3))]
  assert (np.diff(cost) <= 0).all()
  assert items[:4].tolist() == sorted(ids[:, 2:, 0].ravel().tolist())  # the four rows of 5


def test_mosaic_gpu_refuses_token_masks_on_the_miscompiling_cuda(monkeypatch):
  from pallas_kernels.attention import kernel_mosaic_gpu as mg  # pylint: disable=g-import-not-at-top
  # cudaRuntimeGetVersion: 1000 * major + 10 * minor + patch; bad: 12.8.0 <= v < 12.9.1.
  decide = mg._masking_miscompiled  # pylint: disable=protected-access
  assert [decide(v) for v in (12079, 12080, 12090, 12091, 13000, None)] == [
      False, True, True, False, False, False]
  q = jnp.zeros((1, 256, 1, 64), jnp.float16)
  monkeypatch.setattr(mg, "_cuda_runtime_version", lambda: 12090)
  with pytest.raises(ValueError, match=r"block_mask: .*CUDA 12\.9\.0.*backend='triton'"):
    block_sparse_attention(q, q, q, causal_mask(256, q_block=128), backend="mosaic_gpu")
  dims = lambda kv_len: mg.Dims(1, 256, kv_len, 1, 1, 64, 128, 128, 1, 1)
  # Whole blocks without a token mask are not affected; a ragged kv edge is masked in-block.
  mg.check_cuda_version(full_mask(256, q_block=128), dims(256), interpret=False)
  with pytest.raises(ValueError, match="ptxas"):
    mg.check_cuda_version(full_mask(256, 200, q_block=128), dims(200), interpret=False)
  mg.check_cuda_version(causal_mask(256, q_block=128), dims(256), interpret=True)


@pytest.mark.skipif(not _JAX_012, reason="the Mosaic GPU interpreter needs jax >= 0.12")
@pytest.mark.parametrize("ring", [2, 3])  # head_dim 128 gets 2 slots, head_dim 64 gets 3
def test_mosaic_gpu_kernels_stream_full_and_partial_blocks_in_gpu_interpreter(ring, monkeypatch):
  # Every q-block visits 2 full and 2 partial kv-blocks (document data; the last one ragged), so
  # the K/V ring wraps with indices read a step ahead and mask data copied for partial blocks
  # only, with the forward's two compute warpgroups in ping-pong; dK/dV streams 2 q-blocks x 2
  # query heads (GQA) per kv-block the same way.
  from pallas_kernels.attention import kernel_mosaic_gpu as mg  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mg, "_MAX_RING", ring)
  # 4 work items (2 heads x 2 q-blocks) on 2 persistent CTAs: each CTA's ring step and barrier
  # phases carry from its first item to its second.
  assert mg._num_ctas(4, interpret=True) == 2  # pylint: disable=protected-access
  rng = np.random.default_rng(7)
  q, k, v, do = _inputs(rng, 1, 256, 500, 2, 1, 64, jnp.float16)
  seg_k = jnp.asarray([[0] * 300 + [1] * 100 + [0] * 100])
  mask = document_mask(jnp.zeros((1, 256), jnp.int32), seg_k, q_block=128)
  assert np.asarray(mask.block_states())[0, 0].tolist() == [[2, 2, 1, 1]] * 2
  got = _run(q, k, v, do, mask, "mosaic_gpu", True)
  _check(got, q, k, v, do, mask, 3e-3)


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend,platform,block", [
    ("triton", "cuda", 64), ("mosaic_gpu", "cuda", 128), ("tpu", "tpu", 128)])
def test_kernels_lower_for_device_targets(backend, platform, block):
  """The Pallas -> Triton / Mosaic GPU / Mosaic TPU lowering of forward and backward succeeds."""
  q = jnp.zeros((2, 256, 4, 128), jnp.bfloat16)
  k = jnp.zeros((2, 192, 2, 128), jnp.bfloat16)
  mask = _doc_causal(256, 192, block, block)

  def loss(q, k, v):
    return jnp.sum(block_sparse_attention(q, k, v, mask, backend=backend).astype(jnp.float32))

  text = export_for(jax.grad(loss, argnums=(0, 1, 2)), platform, q, k, k)
  target = {"triton": "xla.gpu.triton", "mosaic_gpu": "mosaic_gpu", "tpu": "tpu_custom_call"}
  assert text.count(target[backend]) >= 3           # forward, dQ, dK/dV


# ------------------------------------------------------------------ on a device
def _device_cases():
  rng = np.random.default_rng(4)
  s = 1024
  return {
      "causal": causal_mask(s, q_block=128),
      "window": sliding_window_mask(s, window=300, q_block=128),
      "documents": _doc_causal(s, s, 128, 128),
      "random": random_block_mask(rng, q_len=s, kv_len=s, q_block=128, kv_block=128,
                                  density=0.3, heads=8),
      "dense": full_mask(s, q_block=128),
  }


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")
@pytest.mark.parametrize("backend", ["mosaic_gpu", "triton"])
@pytest.mark.parametrize("name", ["causal", "window", "documents", "random", "dense"])
def test_gpu_kernels_on_device(backend, name):
  rng = np.random.default_rng(5)
  q, k, v, do = _inputs(rng, 2, 1024, 1024, 8, 2, 128, jnp.bfloat16)
  mask = _device_cases()[name]
  got = _run(q, k, v, do, mask, backend, False)
  f32 = lambda x: x.astype(jnp.float32)
  ref = _run(f32(q), f32(k), f32(v), f32(do), mask, "reference", False)
  for a, b in zip(got, ref):
    assert relative_error(jnp.where(jnp.isfinite(b), a, 0), jnp.where(jnp.isfinite(b), b, 0)) < 2e-2


@pytest.mark.tpu
@pytest.mark.parametrize("name", ["causal", "documents", "random"])
def test_tpu_kernels_on_device(name):
  rng = np.random.default_rng(6)
  q, k, v, do = _inputs(rng, 2, 1024, 1024, 8, 2, 128, jnp.bfloat16)
  mask = _device_cases()[name]
  got = _run(q, k, v, do, mask, "tpu", False)
  f32 = lambda x: x.astype(jnp.float32)
  ref = _run(f32(q), f32(k), f32(v), f32(do), mask, "reference", False)
  for a, b in zip(got, ref):
    assert relative_error(jnp.where(jnp.isfinite(b), a, 0), jnp.where(jnp.isfinite(b), b, 0)) < 2e-2
