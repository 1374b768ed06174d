"""Backend selection shared by the kernels: which lowering runs a Pallas op.

Backends:
  * ``"mosaic_gpu"``: Pallas Mosaic GPU (Hopper sm_90a and newer).
  * ``"jax_triton"``: Triton-language kernels through ``jax_triton.triton_call`` (NVIDIA sm_8x:
    A100, Ampere and Ada GPUs; needs the ``triton`` extra).
  * ``"triton"``: Pallas with the Triton lowering (other NVIDIA GPUs, and sm_8x without the
    ``triton`` extra).
  * ``"tpu"``: Pallas Mosaic TPU with scalar prefetch.
  * ``"interpret"``: a Pallas kernel run by the interpreter (any platform; tests).
  * ``"reference"``: the XLA reference implementation (CPU and fallback).
"""

from __future__ import annotations

import jax

BACKENDS = ("mosaic_gpu", "jax_triton", "triton", "tpu", "interpret", "reference")


def gpu_backend(compute_capability, jax_triton_installed: bool) -> str:
  """The backend ``backend=None`` picks on an NVIDIA GPU: a pure function of the device's compute
  capability (``"8.0"``, ``"9.0"``; ``None`` if unknown) and whether the ``triton`` extra
  (jax-triton) is installed.

  Hopper and newer: ``"mosaic_gpu"``. sm_8x (A100 sm_80, Ampere sm_86, Ada sm_89): the
  Triton-language kernels (``"jax_triton"``) when the extra is installed, else Pallas' Triton
  lowering (``"triton"``, deprecated from jax 0.11). Anything else: ``"triton"``.

  >>> gpu_backend("8.9", True), gpu_backend("8.0", False), gpu_backend("9.0", True)
  ('jax_triton', 'triton', 'mosaic_gpu')
  """
  try:
    major = int(str(compute_capability).split(".")[0])
  except ValueError:
    return "triton"
  if major >= 9:
    return "mosaic_gpu"
  if major == 8 and jax_triton_installed:
    return "jax_triton"
  return "triton"


def default_backend() -> str:
  """The backend that ``backend=None`` selects on the default device."""
  platform = jax.default_backend()
  if platform == "tpu":
    return "tpu"
  if platform in ("gpu", "cuda"):
    from pallas_kernels import _jax_triton  # pylint: disable=g-import-not-at-top
    cc = getattr(jax.devices()[0], "compute_capability", None)
    return gpu_backend(cc, _jax_triton.installed())
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
