"""Test and benchmark support for the block-sparse matmul: random block masks, a float64 dense
reference, and lowering a function for a GPU or TPU target from a machine without one."""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._numerics import relative_error  # noqa: F401  (re-exported)
from pallas_kernels.matmul.format import bsr_from_dense
from pallas_kernels.matmul.op import bsr_matmul

# Relative-error bounds (||out - ref|| / ||ref||) per input dtype, float32 accumulation.
TOLERANCE = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 1e-2, jnp.dtype(jnp.float16): 2e-3}


def random_block_mask(
    rng: np.random.Generator,
    shape: tuple[int, int],
    block_shape: tuple[int, int],
    density: float,
    *,
    empty_rows: int = 0,
    empty_cols: int = 0,
) -> np.ndarray:
  """A bool ``shape`` mask, constant on blocks, each block kept with probability ``density``.

  ``empty_rows``/``empty_cols`` block rows/columns (chosen at random) are then cleared.

  >>> m = random_block_mask(np.random.default_rng(0), (4, 6), (2, 3), 1.0, empty_rows=1)
  >>> m.shape, int(m.sum())
  ((4, 6), 12)
  """
  kb, nb = shape[0] // block_shape[0], shape[1] // block_shape[1]
  blocks = rng.random((kb, nb)) < density
  blocks[rng.permutation(kb)[:empty_rows]] = False
  blocks[:, rng.permutation(nb)[:empty_cols]] = False
  return expand_block_mask(blocks, block_shape)


def expand_block_mask(block_mask: np.ndarray, block_shape: tuple[int, int]) -> np.ndarray:
  """Repeats a ``(kb, nb)`` block mask into the element mask ``(kb * br, nb * bc)``.

  >>> expand_block_mask(np.eye(2, dtype=bool), (1, 2)).astype(int).tolist()
  [[1, 1, 0, 0], [0, 0, 1, 1]]
  """
  return np.repeat(np.repeat(np.asarray(block_mask, bool), block_shape[0], 0), block_shape[1], 1)


def dense_reference(x, w, mask, dy):
  """``(y, dx, dw)`` of ``y = x @ where(mask, w, 0)`` in float64, ``dw`` masked.

  ``x`` is ``[..., in]`` and ``dy`` ``[..., out]``.

  >>> y, dx, dw = dense_reference(np.ones((1, 2)), np.ones((2, 2)), np.eye(2, dtype=bool), np.ones((1, 2)))
  >>> y.tolist(), dw.tolist()
  ([[1.0, 1.0]], [[1.0, 0.0], [0.0, 1.0]])
  """
  f64 = lambda a: np.asarray(a, np.float64)
  wm = np.where(mask, f64(w), 0.0)
  x2, dy2 = f64(x).reshape(-1, wm.shape[0]), f64(dy).reshape(-1, wm.shape[1])
  y = (x2 @ wm).reshape(*np.shape(x)[:-1], wm.shape[1])
  dx = (dy2 @ wm.T).reshape(np.shape(x))
  return y, dx, np.where(mask, x2.T @ dy2, 0.0)


def check_bsr_matmul(
    backend: str | None,
    *,
    m_shape: tuple[int, ...],
    k: int,
    n: int,
    block: tuple[int, int],
    density: float,
    dtype=jnp.float32,
    empty_rows: int = 0,
    empty_cols: int = 0,
    slack: int = 2,
    seed: int = 0,
    interpret: bool = False,
    tolerance: float | None = None,
) -> dict[str, float]:
  """Checks ``y``, ``dx`` and ``dW`` of :func:`bsr_matmul` on a random case against float64.

  Builds a random block mask (``density``, plus ``empty_rows``/``empty_cols`` cleared block
  rows/columns) with ``slack`` padding slots, runs value and VJP under ``jit``, and asserts the
  relative errors are under ``tolerance`` (default :data:`TOLERANCE` of ``dtype``), the output
  dtypes and shapes, and exact zero gradients on padding slots.

  Returns:
    The relative errors ``{"y": ..., "dx": ..., "dW": ...}``.

  >>> errs = check_bsr_matmul("reference", m_shape=(3,), k=8, n=8, block=(4, 4), density=0.5)
  >>> sorted(errs)
  ['dW', 'dx', 'y']
  """
  dtype = jnp.dtype(dtype)
  rng = np.random.default_rng(seed)
  mask = random_block_mask(rng, (k, n), block, density, empty_rows=empty_rows, empty_cols=empty_cols)
  nblocks = (k // block[0]) * (n // block[1])
  capacity = min(nblocks, max(int(mask[:: block[0], :: block[1]].sum()), 1) + slack)
  # Inputs are rounded to dtype first, so the reference sees exactly what the kernel sees.
  cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))
  w_dense = cast(rng.standard_normal((k, n)))
  x = cast(rng.standard_normal((*m_shape, k)))
  dy = cast(rng.standard_normal((*m_shape, n)))
  w = bsr_from_dense(jnp.asarray(w_dense, dtype), mask, block, capacity=capacity)

  @jax.jit
  def value_and_vjp(x, blocks, dy):
    f = lambda x, b: bsr_matmul(x, dataclasses.replace(w, blocks=b), backend=backend, interpret=interpret)
    y, vjp = jax.vjp(f, x, blocks)
    return y, *vjp(dy)

  y, dx, dblocks = value_and_vjp(jnp.asarray(x, dtype), w.blocks, jnp.asarray(dy, dtype))
  assert y.dtype == dtype and dx.dtype == dtype and dblocks.dtype == dtype, (y.dtype, dx.dtype, dblocks.dtype)
  assert y.shape == (*m_shape, n) and dx.shape == x.shape and dblocks.shape == w.blocks.shape
  assert not np.asarray(dblocks, np.float32)[int(w.nnzb):].any(), "padding slots got a gradient"
  y_ref, dx_ref, dw_ref = dense_reference(x, w_dense, mask, dy)
  dw = dataclasses.replace(w, blocks=dblocks).to_dense()
  errors = {name: relative_error(a, b) for name, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dW", dw, dw_ref))}
  bound = TOLERANCE[dtype] if tolerance is None else tolerance
  assert all(e < bound for e in errors.values()), (errors, bound)
  return errors


@contextlib.contextmanager
def lowering_target(platform: str):
  """Lets ``jit(f).trace(...).lower(lowering_platforms=(platform,))`` target a device not present.

  jax >= 0.11 needs an abstract GPU device for Pallas GPU lowerings (an H100 here); older jax
  and TPU lowerings need nothing.

  >>> with lowering_target("tpu"):
  ...   pass
  """
  abstract_device = getattr(jax.sharding, "AbstractDevice", None)
  if platform not in ("cuda", "gpu") or abstract_device is None:
    yield
    return
  device = abstract_device(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    yield


def lower(fn, *args, platform: str) -> str:
  """StableHLO text of ``jit(fn)(*args)`` lowered for ``platform`` (``"cuda"`` or ``"tpu"``).

  Pallas kernels are lowered to Triton / Mosaic GPU / Mosaic TPU on the way, which checks them
  without the device (the device compiler's own checks still need one).

  >>> "add" in lower(lambda a: a + 1, np.ones(2, np.float32), platform="tpu")
  True
  """
  with lowering_target(platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
