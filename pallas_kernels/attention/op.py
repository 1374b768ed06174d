"""``block_sparse_attention``: the differentiable op and its dispatch to a backend.

The op is a ``jax.custom_vjp``: the forward pass saves the output and the
float32 log-sum-exp of every query row, the backward pass recomputes the
probabilities block by block from them (FlashAttention-2). A cotangent for the
returned LSE is folded into the row term ``delta = rowsum(dO * O) - dLSE``.

Backends (``pallas_kernels.resolve_backend``; ``None`` picks by platform):
  * ``"mosaic_gpu"``: Pallas Mosaic GPU, warp-specialised (Hopper and newer).
  * ``"jax_triton"``: Triton-language kernels through ``jax_triton.triton_call`` (sm_8x GPUs
    with the ``triton`` extra; ``interpret=True`` runs them in Triton's interpreter).
  * ``"triton"``: Pallas with the Triton lowering (other NVIDIA GPUs).
  * ``"tpu"``: Pallas Mosaic TPU with scalar prefetch.
  * ``"interpret"``: the Triton-style kernels run by the Pallas interpreter.
  * ``"reference"``: XLA blockwise reference (CPU and fallback).
``interpret=True`` runs a GPU/TPU backend's kernels in the matching Pallas
interpreter on any platform (TPU: ``pltpu.InterpretParams()``; Mosaic GPU: the
GPU interpreter of jax >= 0.12).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels._platform import resolve_backend
from pallas_kernels.attention._common import Dims, check_block_sizes_pow2, check_inputs
from pallas_kernels.attention.block_mask import BlockMask

__all__ = ["block_sparse_attention"]


@dataclasses.dataclass(frozen=True)
class _Impl:
  backend: str
  interpret: bool
  num_warps: int | None
  num_stages: int | None


def _check_backend(impl: _Impl, dims: Dims, block_mask: BlockMask):
  if impl.backend in ("triton", "interpret", "jax_triton"):
    check_block_sizes_pow2(dims, impl.backend)
  elif impl.backend == "tpu":
    from pallas_kernels.attention import kernel_tpu  # pylint: disable=g-import-not-at-top
    kernel_tpu.check_tpu_shapes(dims, interpret=impl.interpret)
  elif impl.backend == "mosaic_gpu":
    from pallas_kernels.attention import kernel_mosaic_gpu  # pylint: disable=g-import-not-at-top
    kernel_mosaic_gpu.check_shapes(dims, block_mask)


def _jax_triton_kwargs(impl: _Impl) -> dict:
  """Keyword arguments of the ``jax_triton`` kernels (forward and backward)."""
  return dict(interpret=impl.interpret, num_warps=impl.num_warps, num_stages=impl.num_stages)


def _triton_kwargs(impl: _Impl, dims: Dims) -> dict:
  """Keyword arguments of the Pallas Triton kernels: the interpreter, or Triton compiler params."""
  from pallas_kernels.attention import kernel_triton  # pylint: disable=g-import-not-at-top
  interpret = impl.backend == "interpret" or impl.interpret
  params = None if interpret else kernel_triton.triton_compiler_params(
      impl.num_warps, impl.num_stages, dims.head_dim)
  return dict(interpret=interpret, compiler_params=params)


def _forward(q, k, v, block_mask, scale, impl: _Impl):
  dims = check_inputs(q, k, v, block_mask, check_values=False)
  if impl.backend == "reference":
    from pallas_kernels.attention import reference  # pylint: disable=g-import-not-at-top
    return reference.blockwise_attention_fwd(q, k, v, block_mask, scale=scale)
  if impl.backend == "jax_triton":
    from pallas_kernels.attention import kernel_jax_triton  # pylint: disable=g-import-not-at-top
    return kernel_jax_triton.flash_fwd(q, k, v, block_mask, dims, scale=scale,
                                       **_jax_triton_kwargs(impl))
  if impl.backend in ("triton", "interpret"):
    from pallas_kernels.attention import kernel_triton  # pylint: disable=g-import-not-at-top
    return kernel_triton.flash_fwd(q, k, v, block_mask, dims, scale=scale,
                                   **_triton_kwargs(impl, dims))
  if impl.backend == "tpu":
    from pallas_kernels.attention import kernel_tpu  # pylint: disable=g-import-not-at-top
    return kernel_tpu.flash_fwd(q, k, v, block_mask, dims, scale=scale, interpret=impl.interpret)
  from pallas_kernels.attention import kernel_mosaic_gpu  # pylint: disable=g-import-not-at-top
  return kernel_mosaic_gpu.flash_fwd(q, k, v, block_mask, dims, scale=scale,
                                     interpret=impl.interpret)


def _backward(q, k, v, out, lse, d_out, d_lse, block_mask, scale, impl: _Impl):
  dims = check_inputs(q, k, v, block_mask, check_values=False)
  ct = lse.dtype  # float32 (float64 on the reference backend for float64 inputs)
  delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(ct), d_out.astype(ct),
                     precision=jax.lax.Precision.HIGHEST)
  if d_lse is not None:
    delta = delta - jnp.where(jnp.isfinite(lse), d_lse.astype(ct), 0.0)
  # A row with a NaN/inf output has a NaN LSE, so its attended probabilities are already NaN;
  # a finite delta keeps its masked entries (p = 0) at ds = 0 instead of 0 * NaN, so NaN
  # gradients reach only the keys the row attends, as through dense attention's mask.
  delta = jnp.where(jnp.isfinite(delta), delta, 0.0)
  if impl.backend == "reference":
    from pallas_kernels.attention import reference  # pylint: disable=g-import-not-at-top
    return reference.blockwise_attention_bwd(q, k, v, lse, delta, d_out, block_mask, scale=scale)
  if impl.backend == "jax_triton":
    from pallas_kernels.attention import kernel_jax_triton  # pylint: disable=g-import-not-at-top
    return kernel_jax_triton.flash_bwd(q, k, v, d_out, lse, delta, block_mask, dims, scale=scale,
                                       **_jax_triton_kwargs(impl))
  if impl.backend in ("triton", "interpret"):
    from pallas_kernels.attention import kernel_triton  # pylint: disable=g-import-not-at-top
    return kernel_triton.flash_bwd(q, k, v, d_out, lse, delta, block_mask, dims, scale=scale,
                                   **_triton_kwargs(impl, dims))
  if impl.backend == "tpu":
    from pallas_kernels.attention import kernel_tpu  # pylint: disable=g-import-not-at-top
    return kernel_tpu.flash_bwd(q, k, v, d_out, lse, delta, block_mask, dims, scale=scale,
                                interpret=impl.interpret)
  from pallas_kernels.attention import kernel_mosaic_gpu  # pylint: disable=g-import-not-at-top
  return kernel_mosaic_gpu.flash_bwd(q, k, v, d_out, lse, delta, block_mask, dims, scale=scale,
                                     interpret=impl.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, block_mask, scale, impl):
  return _forward(q, k, v, block_mask, scale, impl)


def _attention_fwd(q, k, v, block_mask, scale, impl):
  out, lse = _forward(q, k, v, block_mask, scale, impl)
  return (out, lse), (q, k, v, block_mask, out, lse)


def _attention_bwd(scale, impl, res, cts):
  q, k, v, block_mask, out, lse = res
  d_out, d_lse = cts
  dq, dk, dv = _backward(q, k, v, out, lse, d_out, d_lse, block_mask, scale, impl)
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def block_sparse_attention(q: jax.Array, k: jax.Array, v: jax.Array, block_mask: BlockMask, *,
                           scale: float | None = None, backend: str | None = None,
                           interpret: bool = False, return_lse: bool = False,
                           num_warps: int | None = None, num_stages: int | None = None):
  """Block-sparse flash attention ``softmax(scale * q k^T + mask) v`` with autodiff.

  Args:
    q: ``[batch, q_len, heads, head_dim]`` float16/bfloat16/float32.
    k, v: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA).
    block_mask: a :class:`BlockMask` built for ``q_len`` and ``kv_len``.
    scale: static logit scale, default ``head_dim ** -0.5``.
    backend: ``"mosaic_gpu"``, ``"jax_triton"``, ``"triton"``, ``"tpu"``, ``"interpret"``,
      ``"reference"`` or ``None`` (by platform: Hopper GPUs Mosaic GPU; sm_8x GPUs jax_triton
      when the ``triton`` extra is installed, else Triton; other GPUs Triton; TPU tpu; CPU
      reference).
    interpret: run a GPU/TPU backend's kernels in the Pallas interpreter (tests).
    return_lse: also return the float32 log-sum-exp ``[batch, heads, q_len]``.
    num_warps, num_stages: Triton compiler parameters (default: 4 warps for
      head_dim <= 64, else 8; 2 stages).

  Returns:
    The output ``[batch, q_len, heads, head_dim]`` in the input dtype (and the LSE).
    Softmax statistics are float32 (float64 inputs: float64 on the reference
    backend, for tests). A query row that attends to no key gets a zero
    output, ``lse = -inf`` and zero gradients. Non-finite inputs propagate as in
    dense attention: a row that attends a NaN/inf key, or whose query is NaN/inf,
    gets a NaN output and LSE (and NaN gradients); only values inside visited
    blocks are read.

  >>> from pallas_kernels.attention import causal_mask
  >>> q = k = v = jnp.ones((1, 64, 2, 32))
  >>> out = block_sparse_attention(q, k, v, causal_mask(64, q_block=32), backend="reference")
  >>> out.shape
  (1, 64, 2, 32)
  """
  backend = resolve_backend(backend)
  if scale is None:
    scale = q.shape[-1] ** -0.5
  if isinstance(scale, jax.core.Tracer):
    raise TypeError("scale: must be a static Python float (it is a compile-time constant of "
                    "the kernels); multiply q by a traced scale instead")
  impl = _Impl(backend, bool(interpret), num_warps, num_stages)
  dims = check_inputs(q, k, v, block_mask)
  if q.dtype == jnp.float64 and backend != "reference":
    raise TypeError(f"q: float64 runs only on the reference backend, not {backend!r}; cast the "
                    "inputs to float32/bfloat16/float16 or pass backend='reference'")
  _check_backend(impl, dims, block_mask)
  out, lse = _attention(q, k, v, block_mask, float(scale), impl)
  return (out, lse) if return_lse else out
