"""The kernel configurations compiled ahead of time by ``benchmarks/compile_sweep.py`` and the
``aot`` tests: every kernel x block shape / dtype / head_dim x mask, as a function plus abstract
arguments for :func:`pallas_kernels.aot.compile_for`.

Matmul: ``spmm`` (``y = x @ W``), ``spmm_t`` (``dx = dy @ W^T``) and ``sddmm`` (``dW``) at
``M x K x N = 1024 x 2048 x 2048``, half the blocks stored. Attention: forward, dQ and dK/dV at
``B=1, H=2, S=2048``, 128 x 128 blocks. GPU targets run 16-bit inputs through Mosaic GPU and
float32 through Triton; TPU targets through Mosaic TPU.

>>> cases = [c for c in matmul_cases("cuda") if c.block == (128, 128)]
>>> sorted({c.backend for c in cases})
['mosaic_gpu', 'triton']
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import (block_sparse_attention, causal_mask, document_mask,
                                      full_mask, segment_ids_from_lengths, sliding_window_mask,
                                      topk_block_mask)
from pallas_kernels.attention._common import check_inputs
from pallas_kernels.attention.testing import random_block_mask
from pallas_kernels.matmul.format import bsr_from_dense

__all__ = ["Case", "matmul_cases", "attention_cases", "all_cases", "MATMUL_BLOCKS",
           "MATMUL_DTYPES", "ATTENTION_MASKS", "HEAD_DIMS"]

MATMUL_BLOCKS = ((64, 64), (128, 128), (256, 64), (64, 256), (256, 256))
MATMUL_DTYPES = ("bfloat16", "float16", "float32")
MATMUL_KERNELS = ("spmm", "spmm_t", "sddmm")
ATTENTION_KERNELS = ("fwd", "dq", "dkv")
ATTENTION_MASKS = ("full", "causal", "window", "documents", "random", "topk")
HEAD_DIMS = (64, 128)
_M, _K, _N = 1024, 2048, 2048
_B, _H, _S = 1, 2, 2048


@dataclasses.dataclass(frozen=True)
class Case:
  """One kernel configuration.

  Attributes:
    kind: ``"matmul"`` or ``"attention"``.
    kernel: ``spmm``/``spmm_t``/``sddmm`` or ``fwd``/``dq``/``dkv``.
    backend: the ``pallas_kernels`` backend it compiles through.
    dtype: input dtype name.
    block: block shape (matmul) or ``(q_block, kv_block)``.
    head_dim: attention head dim (0 for matmul).
    mask: attention mask name ("" for matmul).
    skip: why this configuration is not supported by the backend ("" if it is); the sweep
      reports it instead of compiling.
  """

  kind: str
  kernel: str
  backend: str
  dtype: str
  block: tuple[int, int]
  head_dim: int = 0
  mask: str = ""
  skip: str = ""

  @property
  def name(self) -> str:
    if self.kind == "matmul":
      return f"matmul/{self.kernel}/{self.block[0]}x{self.block[1]}/{self.dtype}/{self.backend}"
    return f"attention/{self.kernel}/d{self.head_dim}/{self.mask}/{self.dtype}/{self.backend}"

  def build(self) -> tuple[Callable, tuple]:
    """``(fn, args)``: the function to compile and its (concrete, small-metadata) arguments."""
    return _build_matmul(self) if self.kind == "matmul" else _build_attention(self)


def _matmul_skip(backend: str, block, dtype) -> str:
  module = importlib.import_module(f"pallas_kernels.matmul.kernel_{'triton' if backend == 'triton' else backend}")
  w = bsr_from_dense(np.zeros((_K, _N), np.float32), np.zeros((_K, _N), bool), block, capacity=1)
  try:
    module.check(w, jnp.dtype(dtype))
  except (TypeError, ValueError) as e:
    return str(e).split(": ", 1)[-1]
  return ""


def _gpu_backend(dtype: str) -> str:
  return "triton" if dtype == "float32" else "mosaic_gpu"


def matmul_cases(platform: str) -> Iterator[Case]:
  """Matmul cases for ``"cuda"`` or ``"tpu"``."""
  for kernel in MATMUL_KERNELS:
    for block in MATMUL_BLOCKS:
      for dtype in MATMUL_DTYPES:
        backend = _gpu_backend(dtype) if platform == "cuda" else "tpu"
        yield Case("matmul", kernel, backend, dtype, block, skip=_matmul_skip(backend, block, dtype))


def attention_cases(platform: str) -> Iterator[Case]:
  """Attention cases for ``"cuda"`` (bf16, Mosaic GPU) or ``"tpu"`` (bf16)."""
  backend = "mosaic_gpu" if platform == "cuda" else "tpu"
  for kernel in ATTENTION_KERNELS:
    for head_dim in HEAD_DIMS:
      for mask in ATTENTION_MASKS:
        yield Case("attention", kernel, backend, "bfloat16", (128, 128), head_dim, mask)


def all_cases(platform: str) -> list[Case]:
  return [*matmul_cases(platform), *attention_cases(platform)]


def _build_matmul(case: Case):
  rng = np.random.default_rng(0)
  kb, nb = _K // case.block[0], _N // case.block[1]
  blocks = rng.random((kb, nb)) < 0.5
  mask = np.repeat(np.repeat(blocks, case.block[0], 0), case.block[1], 1)
  dtype = jnp.dtype(case.dtype)
  w = bsr_from_dense(np.zeros((_K, _N), np.float32).astype(dtype), mask, case.block)
  module = importlib.import_module(
      f"pallas_kernels.matmul.kernel_{'triton' if case.backend == 'triton' else case.backend}")
  if case.kernel == "sddmm":
    fn = lambda x, dy, w: module.sddmm(x, dy, w)
    return fn, (jax.ShapeDtypeStruct((_M, _K), dtype), jax.ShapeDtypeStruct((_M, _N), dtype), w)
  transpose = case.kernel == "spmm_t"
  fn = lambda a, w: module.spmm(a, w, transpose=transpose)
  return fn, (jax.ShapeDtypeStruct((_M, _N if transpose else _K), dtype), w)


def _attention_mask(name: str, q_block: int):
  s = _S
  if name == "full":
    return full_mask(s, q_block=q_block)
  if name == "causal":
    return causal_mask(s, q_block=q_block)
  if name == "window":
    return sliding_window_mask(s, window=512, q_block=q_block)
  if name == "documents":
    return document_mask(segment_ids_from_lengths(jnp.array([700, 900, 448]), s), causal=True,
                         q_block=q_block)
  if name == "random":
    return random_block_mask(np.random.default_rng(0), q_len=s, kv_len=s, q_block=q_block,
                             kv_block=q_block, density=0.3, heads=_H)
  if name == "topk":
    scores = jnp.asarray(np.random.default_rng(0).random((_H, s // q_block, s // q_block)), jnp.float32)
    return topk_block_mask(scores, 4, q_len=s, q_block=q_block, base=causal_mask(s, q_block=q_block))
  raise ValueError(f"unknown attention mask {name!r}; expected one of {ATTENTION_MASKS}")


def _build_attention(case: Case):
  dtype = jnp.dtype(case.dtype)
  shape = jax.ShapeDtypeStruct((_B, _S, _H, case.head_dim), dtype)
  mask = _attention_mask(case.mask, case.block[0])
  run = lambda q, k, v, m: block_sparse_attention(q, k, v, m, backend=case.backend)
  if case.kernel == "fwd":
    return run, (shape, shape, shape, mask)

  module = importlib.import_module(f"pallas_kernels.attention.kernel_{case.backend}")
  stats = jax.ShapeDtypeStruct((_B, _H, _S), jnp.float32)
  # The Pallas Triton kernels lower through Triton only with Triton compiler params (as op.py).
  extra = ({"compiler_params": module.triton_compiler_params(None, None, case.head_dim)}
           if case.backend == "triton" else {})

  def backward(q, k, v, d_out, lse, delta, m):
    dims = check_inputs(q, k, v, m, check_values=False)
    dq, dk, dv = module.flash_bwd(q, k, v, d_out, lse, delta, m, dims,
                                  scale=case.head_dim ** -0.5, interpret=False, **extra)
    return dq if case.kernel == "dq" else (dk, dv)  # the other kernel is dead code
  return backward, (shape, shape, shape, shape, stats, stats, mask)
