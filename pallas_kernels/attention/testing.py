"""Test and benchmark support: a float64 NumPy attention (forward and backward), random
block masks with empty rows, errors, and lowering for a GPU/TPU from a machine without one."""

from __future__ import annotations

import contextlib

import jax
import numpy as np

from pallas_kernels._numerics import relative_error  # noqa: F401  (re-exported)
from pallas_kernels.attention.block_mask import BlockMask
from pallas_kernels.attention.constructors import block_mask_from_blocks

__all__ = ["numpy_attention", "random_block_mask", "relative_error", "lowering_target",
           "export_for"]


def numpy_attention(q, k, v, token_mask, d_out=None, *, scale=None):
  """Dense masked attention in float64 NumPy: ``(out, lse)`` or, with ``d_out``, also grads.

  Args:
    q: ``[B, Sq, H, D]``; k, v: ``[B, Sk, Hk, D]``.
    token_mask: bool ``[B', H', Sq, Sk]`` (``B'`` 1 or B, ``H'`` divides H).
    d_out: optional output cotangent; then returns ``(out, lse, dq, dk, dv)``.
    scale: logit scale (default ``D ** -0.5``).

  Fully masked rows give ``out = 0``, ``lse = -inf`` and zero gradients.

  >>> q = np.ones((1, 2, 1, 2)); k = v = np.eye(2).reshape(1, 2, 1, 2)
  >>> out, lse = numpy_attention(q, k, v, np.array([[[[1, 0], [0, 0]]]], bool))
  >>> out[0, :, 0].tolist()
  [[1.0, 0.0], [0.0, 0.0]]
  """
  f64 = lambda x: np.asarray(x, np.float64)
  q, k, v = f64(q), f64(k), f64(v)
  b, sq, h, d = q.shape
  hk = k.shape[2]
  g = h // hk
  scale = d ** -0.5 if scale is None else scale
  tm = np.asarray(token_mask, bool)
  tm = np.broadcast_to(np.repeat(tm, h // tm.shape[1], axis=1), (b, h) + tm.shape[2:])
  kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
  s = np.where(tm, s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  e = np.where(tm, np.exp(s - m), 0.0)
  l = e.sum(-1, keepdims=True)
  p = np.where(l > 0, e / np.where(l > 0, l, 1), 0.0)
  out = np.einsum("bhqk,bkhd->bqhd", p, vr)
  with np.errstate(divide="ignore"):
    lse = np.where(l[..., 0] > 0, m[..., 0] + np.log(np.where(l[..., 0] > 0, l[..., 0], 1)),
                   -np.inf)
  if d_out is None:
    return out, lse
  do = f64(d_out)
  dv = np.einsum("bhqk,bqhd->bkhd", p, do)
  dp = np.einsum("bqhd,bkhd->bhqk", do, vr)
  ds = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
  dq = np.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
  dk = np.einsum("bhqk,bqhd->bkhd", ds, q) * scale
  fold = lambda x: x.reshape(b, x.shape[1], hk, g, d).sum(3)
  return out, lse, dq, fold(dk), fold(dv)


def random_block_mask(rng: np.random.Generator, *, q_len: int, kv_len: int, q_block: int,
                      kv_block: int, density: float, batch: int = 1, heads: int = 1,
                      empty_q_blocks: int = 1) -> BlockMask:
  """Random block-level mask; ``empty_q_blocks`` q-block rows per (batch, head) see nothing.

  >>> m = random_block_mask(np.random.default_rng(0), q_len=64, kv_len=64, q_block=16,
  ...                       kv_block=16, density=0.5)
  >>> int(m.full_kv_counts.min())
  0
  """
  nq, nk = -(-q_len // q_block), -(-kv_len // kv_block)
  blocks = rng.random((batch, heads, nq, nk)) < density
  for bi in range(batch):
    for hi in range(heads):
      blocks[bi, hi, rng.permutation(nq)[:empty_q_blocks]] = False
  return block_mask_from_blocks(blocks, q_len=q_len, kv_len=kv_len, q_block=q_block,
                                kv_block=kv_block)


_TARGETS = {
    "cuda": ("NVIDIA H100 80GB HBM3", 132),
    "tpu": ("TPU v5 lite", 1),
}


@contextlib.contextmanager
def lowering_target(platform: str):
  """Abstract device context so that Pallas GPU/TPU lowerings run on a CPU-only machine."""
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  kind, cores = _TARGETS[platform]
  dev = mesh_lib.AbstractDevice(device_kind=kind, num_cores=cores, platform=platform)
  with jax.sharding.use_abstract_mesh(mesh_lib.AbstractMesh((1,), ("x",), abstract_device=dev)):
    yield


def export_for(fn, platform: str, *args) -> str:
  """Lowers ``jit(fn)(*args)`` for ``"cuda"`` or ``"tpu"`` and returns the StableHLO text.

  Runs the Pallas lowering to Triton / Mosaic GPU / Mosaic TPU IR (not the final
  device compiler), so it checks a kernel's shapes and API use without a device.
  """
  checks = [jax.export.DisabledSafetyCheck.custom_call(n) for n in (
      "__gpu$xla.gpu.triton", "mosaic_gpu", "mosaic_gpu_v2", "tpu_custom_call")]
  with lowering_target(platform):
    exported = jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)
  return exported.mlir_module()
