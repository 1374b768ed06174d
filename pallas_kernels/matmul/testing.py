"""Test and benchmark support for the block-sparse matmul: random block masks, a float64 dense
reference, and lowering a function for a GPU or TPU target from a machine without one."""

from __future__ import annotations

import contextlib

import jax
import numpy as np


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


def relative_error(out, ref) -> float:
  """``||out - ref|| / ||ref||`` in float64 (``||out||`` when ``ref`` is all zeros); NaN gives inf.

  >>> relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.0]))
  0.0
  """
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  if not np.isfinite(out).all():
    return float("inf")
  den = np.linalg.norm(ref)
  num = np.linalg.norm(out - ref)
  return float(num / den) if den > 0 else float(num)


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
