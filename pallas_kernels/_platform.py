"""Backend selection shared by the kernels: which lowering runs a Pallas op.

Backends:
  * ``"mosaic_gpu"``: Pallas Mosaic GPU (Hopper sm_90a and newer).
  * ``"triton"``: Pallas with the Triton lowering (other NVIDIA GPUs).
  * ``"tpu"``: Pallas Mosaic TPU with scalar prefetch.
  * ``"interpret"``: a Pallas kernel run by the interpreter (any platform; tests).
  * ``"reference"``: the XLA reference implementation (CPU and fallback).
"""

from __future__ import annotations

import jax

BACKENDS = ("mosaic_gpu", "triton", "tpu", "interpret", "reference")


def _is_hopper_or_newer(device) -> bool:
  cc = getattr(device, "compute_capability", None)
  if cc is None:
    return False
  try:
    major = int(str(cc).split(".")[0])
  except ValueError:
    return False
  return major >= 9


def default_backend() -> str:
  """The backend that ``backend=None`` selects on the default device."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda"):
    return "mosaic_gpu" if _is_hopper_or_newer(jax.devices()[0]) else "triton"
  return "reference"


def resolve_backend(backend: str | None) -> str:
  """Validates an explicit backend name, or picks one by platform when ``None``.

  >>> resolve_backend("reference")
  'reference'
  """
  if backend is None:
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS} or None (automatic)")
  return backend
