"""Backend kernels: the TPU kernel under TPU interpret mode, the Mosaic GPU kernel under the Mosaic
GPU interpreter, lowering of every kernel for its real target (no device needed), and GPU runs.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import bsr_from_dense, bsr_matmul
from pallas_kernels.matmul import kernel_tpu
from pallas_kernels.matmul.testing import check_bsr_matmul, lower

NEW_JAX = jax.__version_info__ >= (0, 11)


def _schedule_by_loops(ptr, inner, slot):
  """visit_schedule, written as the obvious Python loops."""
  steps = []
  for g in range(len(ptr) - 1):
    if ptr[g] == ptr[g + 1]:
      steps.append((g, None, None, 0))
    steps += [(g, inner[t], slot[t], 1) for t in range(ptr[g], ptr[g + 1])]
  return steps


@pytest.mark.parametrize(
    "ptr", [[0, 0, 0], [0, 2, 2, 3], [0, 1, 4], [0, 0, 3, 3, 5]], ids=["empty", "hole", "full", "mixed"]
)
def test_visit_schedule(ptr):
  capacity = max(ptr[-1], 1) + 1
  rng = np.random.default_rng(len(ptr))
  inner, slot = rng.permutation(capacity), rng.permutation(capacity)
  group, inner_s, slot_s, valid = (np.asarray(a) for a in jax.jit(kernel_tpu.visit_schedule)(
      jnp.asarray(ptr, jnp.int32), jnp.asarray(inner, jnp.int32), jnp.asarray(slot, jnp.int32)))
  expected = _schedule_by_loops(ptr, inner, slot)
  n = len(expected)
  assert len(group) == capacity + len(ptr) - 1 >= n
  for s, (g, i, p, v) in enumerate(expected):
    assert (group[s], valid[s]) == (g, v)
    if v:
      assert (inner_s[s], slot_s[s]) == (i, p)
  # Steps past the end repeat the last step: same block indices, so the pipeline skips the DMA.
  for a in (group, inner_s, slot_s):
    assert (a[n:] == a[n - 1]).all()
  assert not valid[n:].any()
  # Each output block is visited on consecutive steps only.
  firsts = [s for s in range(len(group)) if s == 0 or group[s] != group[s - 1]]
  assert [group[s] for s in firsts] == list(range(len(ptr) - 1))


TPU_CASES = [
    dict(m_shape=(40,), k=256, n=384, block=(128, 128), density=0.5, empty_rows=1, empty_cols=1),
    dict(m_shape=(2, 8), k=64, n=256, block=(64, 128), density=1.0),  # block = whole in dim
    dict(m_shape=(24,), k=256, n=256, block=(128, 128), density=0.0, dtype=jnp.bfloat16),
]


@pytest.mark.parametrize("case", TPU_CASES, ids=["random", "full-dim", "empty-bf16"])
def test_tpu_kernel_in_tpu_interpret_mode(case):
  check_bsr_matmul("tpu", interpret=True, **case)


@pytest.mark.skipif(not NEW_JAX, reason="the jax 0.10 Mosaic GPU interpreter cannot transpose refs (dx, dW); lowering is tested below")
@pytest.mark.parametrize(
    "case",
    [
        dict(m_shape=(100,), k=256, n=192, block=(64, 64), density=0.5, empty_rows=1, empty_cols=1),
        dict(m_shape=(64,), k=256, n=128, block=(256, 128), density=1.0),  # reduction sub-steps
    ],
    ids=["random-64", "dense-256x128"],
)
def test_mosaic_gpu_kernel_in_gpu_interpret_mode(case):
  check_bsr_matmul("mosaic_gpu", interpret=True, dtype=jnp.bfloat16, **case)


def _grad_fn(w, backend):
  def loss(x, blocks):
    return jnp.sum(bsr_matmul(x, dataclasses.replace(w, blocks=blocks), backend=backend).astype(jnp.float32))

  return jax.value_and_grad(loss, argnums=(0, 1))


TRITON_DEPRECATED = "ignore:The Pallas Triton backend is deprecated:DeprecationWarning"  # jax >= 0.11


@pytest.mark.filterwarnings(TRITON_DEPRECATED)
@pytest.mark.parametrize(
    "backend,platform,call,block,dtype",
    [
        ("triton", "cuda", "__gpu$xla.gpu.triton", (128, 128), jnp.bfloat16),
        ("triton", "cuda", "__gpu$xla.gpu.triton", (16, 64), jnp.float32),
        ("mosaic_gpu", "cuda", "mosaic_gpu", (128, 128), jnp.bfloat16),
        ("mosaic_gpu", "cuda", "mosaic_gpu", (256, 64), jnp.float16),
        ("tpu", "tpu", "tpu_custom_call", (128, 128), jnp.bfloat16),
        ("tpu", "tpu", "tpu_custom_call", (128, 256), jnp.float32),
    ],
)
def test_kernels_lower_for_their_target(backend, platform, call, block, dtype):
  """Forward + backward lower through Triton / Mosaic GPU / Mosaic TPU: three kernel calls."""
  rng = np.random.default_rng(0)
  k, n = 512, 512
  mask = np.repeat(np.repeat(rng.random((k // block[0], n // block[1])) < 0.5, block[0], 0), block[1], 1)
  w = bsr_from_dense(jnp.asarray(rng.standard_normal((k, n)), dtype), mask, block, capacity=(k // block[0]) * (n // block[1]))
  x = jnp.ones((256, k), dtype)
  text = lower(_grad_fn(w, backend), x, w.blocks, platform=platform)
  assert text.count(f"custom_call @{call}") == 3, text.count("custom_call")


@pytest.mark.gpu
@pytest.mark.filterwarnings(TRITON_DEPRECATED)
@pytest.mark.parametrize("backend", [None, "triton", "mosaic_gpu"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize(
    "case",
    [
        dict(m_shape=(300,), k=512, n=768, block=(128, 128), density=0.3, empty_rows=1, empty_cols=1),
        dict(m_shape=(4, 64), k=512, n=512, block=(64, 128), density=1.0),
        dict(m_shape=(128,), k=256, n=512, block=(128, 64), density=0.0),
        dict(m_shape=(256,), k=1024, n=512, block=(256, 256), density=0.5),
    ],
    ids=["random", "dense", "empty", "256-blocks"],
)
def test_on_gpu(backend, dtype, case):
  if backend == "mosaic_gpu":
    cc = getattr(jax.devices()[0], "compute_capability", "0")
    if int(str(cc).split(".")[0]) < 9:
      pytest.skip("Mosaic GPU kernels need Hopper (sm_90a) or newer")
    if dtype == jnp.float32:
      pytest.skip("the Mosaic GPU kernels take 16-bit inputs")
  # Triton and XLA may run float32 dots as tf32 on the tensor cores.
  tolerance = 2e-3 if dtype == jnp.float32 and backend != "mosaic_gpu" else None
  check_bsr_matmul(backend, dtype=dtype, tolerance=tolerance, seed=7, **case)
