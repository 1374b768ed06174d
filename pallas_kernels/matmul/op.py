"""``y = x @ W`` for dense ``x`` and block-sparse ``W``, with a custom VJP and backend dispatch.

Backward: ``dx = dy @ W^T`` walks the row-compressed structure; ``dW`` is computed only on the
stored blocks (a sampled dense-dense product, ``x^T @ dy`` at the stored blocks); padding slots
get zero gradient. Inputs are float32, bfloat16 or float16; products accumulate in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels._platform import resolve_backend
from pallas_kernels.matmul.format import SUPPORTED_DTYPES, BlockSparseMatrix, _name

# backend -> (module, interpret flag forced)
_MODULES = {
    "reference": ("reference", None),
    "xla_cpu": ("xla_cpu", None),
    "interpret": ("kernel_triton", True),
    "triton": ("kernel_triton", None),
    "jax_triton": ("kernel_jax_triton", None),
    "tpu": ("kernel_tpu", None),
    "mosaic_gpu": ("kernel_mosaic_gpu", None),
}


# Pure-XLA backends (no Pallas kernel, no interpret flag). "xla_cpu" is matmul-only, so it is
# resolved here rather than in pallas_kernels._platform (shared with attention).
_XLA_BACKENDS = ("reference", "xla_cpu")


@dataclasses.dataclass(frozen=True)
class _Impl:
  """A resolved backend (hashable: a static argument of the custom VJP)."""

  backend: str
  interpret: bool

  @property
  def module(self):
    # Lazy: the Mosaic GPU module imports GPU-only pieces of Pallas.
    return importlib.import_module(f"pallas_kernels.matmul.{_MODULES[self.backend][0]}")

  def _kw(self):
    return {} if self.backend in _XLA_BACKENDS else {"interpret": self.interpret}

  def spmm(self, a, w, transpose):
    return self.module.spmm(a, w, transpose=transpose, **self._kw())

  def sddmm(self, a, b, w):
    return self.module.sddmm(a, b, w, **self._kw())


def _resolve(backend, interpret, dtype, w, path) -> _Impl:
  explicit = backend is not None
  if explicit and backend not in _MODULES:
    raise ValueError(f"{_name(path)}: unknown backend {backend!r}; expected one of {tuple(_MODULES)} or None (automatic)")
  name = backend if backend in _XLA_BACKENDS else resolve_backend(backend)
  if not explicit and name == "reference" and jax.default_backend() == "cpu":
    name = "xla_cpu"  # the block-sparse XLA:CPU path; "reference" multiplies by the dense weight
  if not explicit and name == "mosaic_gpu" and jnp.dtype(dtype) == jnp.float32:
    name = "triton"  # wgmma kernels take 16-bit inputs; float32 goes through Triton
  forced = _MODULES[name][1]
  impl = _Impl(name, bool(interpret) if forced is None else forced)
  check = getattr(impl.module, "check", None)
  if check is not None:
    check(w, dtype, path)
  return impl


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _matmul(impl: _Impl, x: jax.Array, w: BlockSparseMatrix) -> jax.Array:
  return impl.spmm(x, w, False)


def _matmul_fwd(impl, x, w):
  return impl.spmm(x, w, False), (x, w)


def _matmul_bwd(impl, res, dy):
  x, w = res
  dx = impl.spmm(dy, w, True).astype(x.dtype)
  dblocks = impl.sddmm(x, dy, w).astype(w.dtype)
  none = {f.name: None for f in dataclasses.fields(w) if f.name not in ("blocks", "shape")}
  return dx, dataclasses.replace(w, blocks=dblocks, **none)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def bsr_matmul(
    x: jax.Array,
    w: BlockSparseMatrix,
    *,
    backend: str | None = None,
    interpret: bool = False,
    path: str | None = None,
) -> jax.Array:
  """``x @ W`` for ``x`` of shape ``[..., in]`` and a block-sparse ``(in, out)`` weight.

  Differentiable with respect to ``x`` and ``w.blocks`` (``jax.grad(..., allow_int=True)`` when
  differentiating the whole ``w``; its index leaves get ``float0`` zeros).

  Args:
    x: activations ``[..., in]``, float32, bfloat16 or float16.
    w: the weight (see :func:`bsr_from_dense`).
    backend: ``None`` picks by platform (Mosaic GPU on Hopper for 16-bit inputs; on sm_8x GPUs
      the Triton-language kernels through jax-triton when the ``triton`` extra is installed;
      Pallas Triton on other GPUs and for float32 on Hopper; Mosaic TPU on TPU; ``"xla_cpu"`` on
      CPU); or one of ``"mosaic_gpu"``, ``"jax_triton"``, ``"triton"``, ``"tpu"``,
      ``"interpret"`` (the Pallas Triton kernel run by the Pallas interpreter, any platform),
      ``"xla_cpu"`` (loops of GEMMs over the stored blocks in
      plain XLA, tuned for XLA:CPU, any platform), ``"reference"`` (XLA through the dense weight:
      the correctness reference).
    interpret: run the chosen Pallas kernel in interpret mode (``"tpu"`` under
      ``pltpu.InterpretParams()``, ``"mosaic_gpu"`` under the Mosaic GPU interpreter,
      ``"jax_triton"`` in Triton's interpreter: any platform).
    path: name used in error messages.

  Returns:
    ``[..., out]`` in the promoted dtype of ``x`` and ``w``.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((4, 4)), jnp.eye(2, dtype=bool).repeat(2, 0).repeat(2, 1), (2, 2))
  >>> bsr_matmul(jnp.ones((3, 4)), w).tolist()[0]
  [2.0, 2.0, 2.0, 2.0]
  """
  if not isinstance(w, BlockSparseMatrix):
    raise TypeError(f"{_name(path)}: expected a BlockSparseMatrix (see bsr_from_dense), got {type(w).__name__}")
  x = jnp.asarray(x)
  if x.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f"{_name(path)}: x has shape {x.shape} but the weight is {w.shape}; x must be [..., {w.shape[0]}]")
  if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
    raise TypeError(f"{_name(path)}: x dtype {x.dtype} is not supported; use float32, bfloat16 or float16")
  dtype = jnp.promote_types(x.dtype, w.dtype)
  impl = _resolve(backend, interpret, dtype, w, path)
  x2 = x.reshape(-1, w.shape[0]).astype(dtype)
  if x2.shape[0] == 0:
    return jnp.zeros((*x.shape[:-1], w.shape[1]), dtype)
  if w.dtype != dtype:
    w = dataclasses.replace(w, blocks=w.blocks.astype(dtype))
  y = _matmul(impl, x2, w)
  return y.reshape(*x.shape[:-1], w.shape[1])
