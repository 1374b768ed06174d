"""Calling Triton-language kernels from JAX: ``jax_triton.triton_call`` on GPU, Triton's interpreter
anywhere.

The ``"jax_triton"`` backend (NVIDIA GPUs before Hopper) runs kernels written in the Triton
language, not Pallas: Pallas' Triton lowering is deprecated from jax 0.11. :func:`call` runs one
kernel:

* on a GPU (and when compiling ahead of time for one, see :mod:`pallas_kernels.aot`) through
  ``jax_triton.triton_call``, for the compute capability of the default device;
* with ``interpret=True`` on any platform, through ``jax.pure_callback`` into Triton's own
  interpreter (``triton.runtime.interpreter``: NumPy, one program at a time; for tests).

Needs the optional ``triton`` extra (``pip install -e ".[triton]"``: jax-triton and triton, about
1 GB). :func:`missing` says what is missing; nothing here is imported by ``pallas_kernels`` unless
this backend is used.

:func:`kernel_stats` reads the PTX that ``triton_call`` embeds in a lowered program and reports
``ptxas -v``'s registers, spills and shared memory for each kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["missing", "installed", "call", "embedded_kernels", "kernel_stats",
           "device_compute_capability"]

_INSTALL = 'install the triton extra: pip install -e ".[triton]" (jax-triton and triton)'


def missing() -> str | None:
  """``None`` when jax-triton and triton can be imported, else what to install (one sentence).

  >>> missing() is None or "pip install" in missing()
  True
  """
  for mod in ("triton", "jax_triton"):
    if importlib.util.find_spec(mod) is None:
      return f"the jax_triton backend needs the {mod!r} package: {_INSTALL}"
  return None


def installed() -> bool:
  """Whether the ``triton`` extra is installed (without importing it).

  >>> isinstance(installed(), bool)
  True
  """
  return missing() is None


def require():
  """Imports and returns ``(triton, triton.language)``; ``ImportError`` saying what to install."""
  why = missing()
  if why:
    raise ImportError(why)
  import triton  # pylint: disable=g-import-not-at-top
  import triton.language as tl  # pylint: disable=g-import-not-at-top
  return triton, tl


def device_compute_capability() -> int | None:
  """``major * 10 + minor`` of the default device when it is an NVIDIA GPU (also a compile-only
  device from :mod:`pallas_kernels.aot`), else ``None``.

  >>> device_compute_capability() is None  # on CPU
  True
  """
  dev = jax.config.jax_default_device
  if dev is None or isinstance(dev, str):
    if jax.default_backend() not in ("gpu", "cuda"):
      return None
    dev = jax.devices()[0]
  cc = getattr(dev, "compute_capability", None)
  if cc is None:
    return None
  major, _, minor = str(cc).partition(".")
  return int(major) * 10 + int(minor or 0)


# -------------------------------------------------------------- interpreter
_TRITON_DTYPES = {
    jnp.dtype(jnp.float32): "fp32", jnp.dtype(jnp.float16): "fp16",
    jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float64): "fp64",
    jnp.dtype(jnp.int32): "i32", jnp.dtype(jnp.int8): "i8", jnp.dtype(jnp.uint32): "u32",
}


class _HostBuffer:
  """A NumPy array seen by Triton's interpreter as a device pointer (it reads host memory)."""

  def __init__(self, array: np.ndarray):
    self.array = array
    self.dtype = _TRITON_DTYPES[jnp.dtype(array.dtype)]

  def data_ptr(self) -> int:
    return self.array.ctypes.data


@contextlib.contextmanager
def _interpreting(kernel):
  """While active, every ``@triton.jit`` function of ``triton.language`` and of the kernel's module
  is Triton's ``InterpretedFunction`` of it, as under ``TRITON_INTERPRET=1`` (the interpreter runs
  a kernel in its module's globals, where helpers are compiled-only ``JITFunction``\\ s).
  Not thread-safe: a ``triton_call`` lowered meanwhile would see the interpreted helpers."""
  import triton.language as tl  # pylint: disable=g-import-not-at-top
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top
  from triton.runtime.jit import JITFunction  # pylint: disable=g-import-not-at-top
  # Imported by Triton on first use, and it checks that tl's helpers are JITFunctions: import now.
  importlib.import_module("triton.experimental.gluon")
  class Scoped(interpreter.InterpretedFunction):
    """Undoes its patches of ``triton.language`` when a helper returns: the interpreter leaves
    them in place (harmless under ``TRITON_INTERPRET=1``, but it breaks later compiles)."""

    def __call__(self, *args, **kwargs):
      scope = interpreter._patch_lang(self.fn)  # pylint: disable=protected-access
      try:
        return self.rewrite()(*args, **kwargs)
      except Exception as e:  # pylint: disable=broad-except  (as the interpreter reports it)
        raise interpreter.InterpreterError(repr(e)) from e
      finally:
        scope.restore()

  modules = [tl, tl.standard, tl.random, sys.modules[kernel.fn.__module__]]
  interpreted, saved = {}, []
  for mod in modules:
    for name, value in list(vars(mod).items()):
      if isinstance(value, JITFunction):
        if id(value) not in interpreted:
          interpreted[id(value)] = Scoped(value.fn)
        saved.append((mod, name, value))
        setattr(mod, name, interpreted[id(value)])
  try:
    yield interpreted[id(kernel)]
  finally:
    for mod, name, value in reversed(saved):
      setattr(mod, name, value)


def _host_executor():
  from triton.runtime import interpreter  # pylint: disable=g-import-not-at-top

  class HostGridExecutor(interpreter.GridExecutor):
    """Runs the grid on host buffers in place (no device copies to make)."""

    def _init_args_hst(self, args_dev, kwargs):
      return list(args_dev), dict(kwargs)

    def _restore_args_dev(self, args_dev, args_hst, kwargs, kwargs_hst):
      del args_dev, args_hst, kwargs, kwargs_hst

  return HostGridExecutor


def _run_interpreted(kernel, grid, constexprs, scalars, out_shapes, zeroed, *arrays):
  ins = [np.ascontiguousarray(np.asarray(a)).copy() for a in arrays]
  outs = []
  for i, s in enumerate(out_shapes):
    # Outputs the kernel must write start as NaN (floats), so a missed store shows up in tests.
    fill = 0 if (i in zeroed or not jnp.issubdtype(s.dtype, jnp.floating)) else np.nan
    outs.append(np.full(s.shape, fill, dtype=s.dtype))
  args = [_HostBuffer(a) for a in ins]
  for pos, value in scalars:
    args.insert(pos, value)
  args += [_HostBuffer(o) for o in outs]
  with _interpreting(kernel) as interp, np.errstate(all="ignore"):  # inf - inf in masked lanes
    _host_executor()(interp.rewrite(), interp.arg_names, tuple(grid))(*args, **constexprs)
  return tuple(outs)


@functools.cache
def _adapt_dce_rule():
  """jax-triton 0.4.1 registers a 2-argument DCE rule ``(used_outs, eqn)``; jax 0.12 calls DCE
  rules with ``(used_outs, live_ins, eqn)`` and every jit of a ``triton_call`` fails with
  "takes 2 positional arguments but 3 were given". Adapts the registered rule to jax's calling
  convention when they differ (the rule keeps every input, so ``live_ins`` is not needed)."""
  from jax._src.interpreters import partial_eval as pe  # pylint: disable=g-import-not-at-top
  from jax_triton import triton_lib  # pylint: disable=g-import-not-at-top
  prim = triton_lib.triton_kernel_call_p
  rule = pe.dce_rules.get(prim)
  default_rule = pe._default_dce_rule  # pylint: disable=protected-access
  jax_arity = len(inspect.signature(default_rule).parameters)
  if rule is not None and jax_arity == 3 and len(inspect.signature(rule).parameters) == 2:
    pe.dce_rules[prim] = lambda used_outs, live_ins, eqn: rule(used_outs, eqn)


def call(kernel, *args, out_shape: Sequence[jax.ShapeDtypeStruct], grid: tuple[int, ...],
         interpret: bool = False, num_warps: int = 4, num_stages: int = 2, name: str = "",
         zeroed_outputs: Sequence[int] = (), **constexprs):
  """Runs a ``@triton.jit`` kernel on JAX arrays; returns a tuple of outputs.

  Args:
    kernel: the Triton kernel. Its parameters are the array and scalar ``args`` (in order), then
      one pointer per output, then ``constexprs`` (``tl.constexpr`` parameters).
    *args: ``jax.Array``\\ s (passed as pointers to contiguous row-major data) and Python ``int``
      scalars.
    out_shape: the outputs' shapes and dtypes.
    grid: the launch grid (up to 3 dims).
    interpret: run in Triton's interpreter on the host (any platform) instead of on the GPU.
    num_warps, num_stages: Triton compiler options (GPU only).
    name: the kernel call's name in the HLO.
    zeroed_outputs: indices of outputs that start zeroed (the kernel may skip their elements).
    **constexprs: the kernel's compile-time constants.

  Under ``jit`` on a GPU the kernel compiles at lowering, for the default device's compute
  capability (a compile-only device of :mod:`pallas_kernels.aot` included).

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul import kernel_jax_triton as k
  >>> one, zero, a = jnp.ones(1, jnp.int32), jnp.zeros(1, jnp.int32), jnp.ones((16, 16))
  >>> (out,) = call(k.sddmm_kernel, one, zero, zero, a, a, 16, 16, 16,
  ...               out_shape=[jax.ShapeDtypeStruct((1, 16, 16), jnp.float32)], grid=(1, 1, 1),
  ...               interpret=True, BM=16, TR=16, TC=16, BR=16, BC=16, PRECISION="ieee")
  >>> float(out[0, 0, 0])  # one stored block: a^T a over 16 rows
  16.0
  """
  out_shape = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shape)
  if interpret:
    require()
    arrays = [a for a in args if not isinstance(a, (int, np.integer))]
    scalars = tuple((i, int(a)) for i, a in enumerate(args) if isinstance(a, (int, np.integer)))
    host = functools.partial(_run_interpreted, kernel, tuple(grid), constexprs, scalars, out_shape,
                             frozenset(zeroed_outputs))
    return tuple(jax.pure_callback(host, out_shape, *arrays, vmap_method="sequential"))
  why = missing()
  if why:
    raise ImportError(why)
  import jax_triton  # pylint: disable=g-import-not-at-top
  _adapt_dce_rule()
  cc = device_compute_capability()
  # jax-triton 0.4 renamed out_shape= to out_type= (the old name warns).
  params = inspect.signature(jax_triton.triton_call).parameters
  out_kw = {"out_type" if "out_type" in params else "out_shape": out_shape}
  # FP fusion (FMA contraction) stated: Triton 3.9 warns when it is left to its default, which
  # changes in 3.10. jax-triton 0.3 takes it as an argument; 0.4 has none, so the environment
  # variable Triton reads says it (unless the user set it).
  if "enable_fp_fusion" in params:
    out_kw["enable_fp_fusion"] = True
  else:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
  out = jax_triton.triton_call(
      *args, kernel=kernel, **out_kw, grid=tuple(grid), name=name,
      num_warps=num_warps, num_stages=num_stages, compute_capability=cc,
      zeroed_outputs=tuple(zeroed_outputs), **constexprs)
  return tuple(out) if isinstance(out, (list, tuple)) else (out,)


# ------------------------------------------------------------ ptxas figures
def _mlir_bytes(text: str) -> bytes:
  """Decodes an MLIR string literal's body (``\\XX`` hex escapes, ``\\\\`` and ``\\"``)."""
  raw = text.encode("latin-1")
  out, i = bytearray(), 0
  while i < len(raw):
    if raw[i] == 0x5C:  # backslash
      nxt = raw[i + 1:i + 2]
      if nxt in (b"\\", b'"'):
        out += nxt
        i += 2
      else:
        out.append(int(raw[i + 1:i + 3], 16))
        i += 3
    else:
      out.append(raw[i])
      i += 1
  return bytes(out)


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = raw[pos]
    value |= (byte & 0x7F) << shift
    pos += 1
    shift += 7
    if not byte & 0x80:
      return value, pos


def _fields(raw: bytes) -> dict[int, list]:
  """Protobuf wire format: field number -> values (ints, or bytes for length-delimited ones)."""
  out, pos = {}, 0
  while pos < len(raw):
    key, pos = _varint(raw, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(raw, pos)
    elif wire == 2:
      size, pos = _varint(raw, pos)
      value, pos = raw[pos:pos + size], pos + size
    elif wire in (1, 5):
      width = 8 if wire == 1 else 4
      value, pos = int.from_bytes(raw[pos:pos + width], "little"), pos + width
    else:
      raise ValueError(f"unsupported protobuf wire type {wire}")
    out.setdefault(number, []).append(value)
  return out


def embedded_kernels(ir: str) -> list[dict]:
  """The Triton kernels of every ``triton_kernel_call`` in a lowered module's text.

  Each is a dict with ``name``, ``num_warps``, ``shared_mem_bytes`` (dynamic shared memory set
  at launch), ``compute_capability`` and ``ptx``; decoded from the call's ``backend_config``
  (a zlib-compressed ``TritonAnyKernelCall`` protobuf of jaxlib's ``gpu/triton.proto``).

  >>> embedded_kernels("no kernels here")
  []
  """
  found = []
  # jax-triton 0.3: `custom_call @triton_kernel_call(...) {backend_config = "..."}`; 0.4:
  # `custom_call @triton_kernel_call_ffi(...) {mhlo.backend_config = {opaque = "..."}}`.
  call_re = (r'custom_call @triton_kernel_call\w*\([^\n]*?(?:backend_config|opaque) = '
             r'"((?:[^"\\]|\\.)+)"')
  for m in re.finditer(call_re, ir):
    any_call = _fields(zlib.decompress(_mlir_bytes(m.group(1))))
    calls = any_call.get(1, [])  # a single kernel call (autotuned calls hold several configs)
    for autotuned in any_call.get(2, []):
      calls += [_fields(c).get(1, [b""])[0] for c in _fields(autotuned).get(2, [])]
    for call in calls:
      kernel = _fields(_fields(call)[1][0])
      found.append({
          "name": kernel[1][0].decode(), "num_warps": kernel.get(2, [0])[0],
          "shared_mem_bytes": kernel.get(3, [0])[0], "ptx": kernel[4][0].decode(),
          "compute_capability": kernel.get(6, [0])[0]})
  unique = {(k["name"], k["ptx"]): k for k in found}
  return list(unique.values())


def kernel_stats(ir: str):
  """``ptxas -v`` figures (:class:`pallas_kernels.aot.KernelStats`, source ``"jax_triton"``) of
  the Triton kernels embedded in a lowered module's text; ``smem`` is the dynamic shared memory
  of the launch. Needs ``ptxas`` on ``PATH``.

  >>> kernel_stats("no kernels here")
  []
  """
  from pallas_kernels import aot  # pylint: disable=g-import-not-at-top
  stats = []
  for kernel in embedded_kernels(ir):
    ptx = kernel["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
      path = f"{tmp}/kernel.ptx"
      with open(path, "w") as f:
        f.write(ptx)
      arch = re.search(r"^\.target\s+(\S+)", ptx, re.M)
      ptxas = aot._ptxas()  # pylint: disable=protected-access
      proc = subprocess.run([ptxas, "-v", f"-arch={arch.group(1) if arch else 'sm_80'}", path,
                             "-o", f"{tmp}/out.cubin"],
                            capture_output=True, text=True, check=False, timeout=600)
    stats += [dataclasses.replace(k, smem=k.smem + kernel["shared_mem_bytes"])
              for k in aot.parse_ptxas(proc.stdout + proc.stderr, "jax_triton")]
  return stats
