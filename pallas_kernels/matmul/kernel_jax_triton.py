"""Block-sparse matmul kernels in the Triton language, called through ``jax_triton.triton_call``.

The ``"jax_triton"`` backend: the route for NVIDIA GPUs before Hopper (sm_80 A100, sm_86/sm_89
Ampere and Ada) that does not depend on Pallas' Triton lowering (deprecated from jax 0.11). Same
format and products as :mod:`pallas_kernels.matmul.kernel_triton`:

* ``spmm`` (``y = a @ W``, and ``dx = dy @ W^T`` with ``transpose``): one program per
  ``(row tile, output block, column part)``; it walks that output block's stored blocks
  (``ptr[g]:ptr[g + 1]`` of the compressed view) and each block's reduction in ``tk`` sub-tiles.
  ``W^T``'s blocks are read through transposed strides, never copied.
* ``sddmm`` (``dW``): one program per ``(slot, row part, column part)``, a reduction over the
  rows of ``a`` and ``b``; padding slots (``>= nnzb``) are written as zeros.

Rows of ``a`` need no padding: loads and stores are masked at ``M``. Blocks are powers of two in
[16, 256] (the check of the Pallas Triton kernels). On the GPU float32 inputs multiply in TF32 on
the tensor cores, like the Pallas Triton kernels (Triton's default; Triton's interpreter multiplies
in float32). ``interpret=True`` runs the same kernels in Triton's interpreter (any platform).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _jax_triton
from pallas_kernels.matmul import _common
from pallas_kernels.matmul.format import BlockSparseMatrix
from pallas_kernels.matmul.kernel_triton import check  # same block-size rules

__all__ = ["check", "spmm", "sddmm", "spmm_kernel", "sddmm_kernel"]

# ImportError saying what to install when the triton extra is missing.
triton, tl = _jax_triton.require()


@triton.jit
def spmm_kernel(ptr_ref, inner_ref, slot_ref, a_ref, w_ref, m, lda, ldo, o_ref,
                BM: tl.constexpr, TK: tl.constexpr, TN: tl.constexpr, BK: tl.constexpr,
                BO: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
                TRANSPOSE: tl.constexpr, PRECISION: tl.constexpr):
  row = tl.program_id(0)
  group = tl.program_id(1)
  part = tl.program_id(2)
  rows = row * BM + tl.arange(0, BM)
  ks = tl.arange(0, TK)
  ns = part * TN + tl.arange(0, TN)
  row_ok = rows < m
  start = tl.load(ptr_ref + group)
  stop = tl.load(ptr_ref + group + 1)
  acc = tl.zeros((BM, TN), tl.float32)
  for t in range(start, stop):
    base = tl.load(inner_ref + t) * BK
    blk = w_ref + tl.load(slot_ref + t).to(tl.int64) * (BR * BC)
    for kk in range(0, BK, TK):
      a = tl.load(a_ref + rows[:, None].to(tl.int64) * lda + (base + kk + ks)[None, :],
                  mask=row_ok[:, None], other=0.0)
      if TRANSPOSE:  # W^T's block (k, n) is the stored block's (n, k)
        b = tl.load(blk + ns[None, :] * BC + (kk + ks)[:, None])
      else:
        b = tl.load(blk + (kk + ks)[:, None] * BC + ns[None, :])
      acc = tl.dot(a, b, acc, input_precision=PRECISION)
  out = o_ref + rows[:, None].to(tl.int64) * ldo + (group * BO + ns)[None, :]
  tl.store(out, acc.to(o_ref.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def sddmm_kernel(nnzb_ref, row_ref, col_ref, a_ref, b_ref, m, lda, ldb, o_ref,
                 BM: tl.constexpr, TR: tl.constexpr, TC: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr, PRECISION: tl.constexpr):
  p = tl.program_id(0)
  rp = tl.program_id(1)
  cp = tl.program_id(2)
  rs = rp * TR + tl.arange(0, TR)
  cs = cp * TC + tl.arange(0, TC)
  a_cols = tl.load(row_ref + p) * BR + rs
  b_cols = tl.load(col_ref + p) * BC + cs
  ms = tl.arange(0, BM)
  acc = tl.zeros((TR, TC), tl.float32)
  trips = tl.where(p < tl.load(nnzb_ref), (m + BM - 1) // BM, 0)  # padding slots: zeros
  for r in range(0, trips):
    mr = r * BM + ms
    ok = mr < m
    at = tl.load(a_ref + mr[None, :].to(tl.int64) * lda + a_cols[:, None], mask=ok[None, :],
                 other=0.0)
    b = tl.load(b_ref + mr[:, None].to(tl.int64) * ldb + b_cols[None, :], mask=ok[:, None],
                other=0.0)
    acc = tl.dot(at, b, acc, input_precision=PRECISION)
  out = o_ref + p.to(tl.int64) * (BR * BC) + rs[:, None] * BC + cs[None, :]
  tl.store(out, acc.to(o_ref.dtype.element_ty))


def _precision(dtype) -> str:
  del dtype  # float32 inputs multiply in TF32 on the tensor cores, as the Pallas Triton kernels
  return "tf32"  # do (their dots take Triton's default precision); ignored for 16-bit inputs


def _row_tile(m: int, cap: int) -> int:
  return min(cap, max(16, _common.next_pow2(m)))


def spmm(a: jax.Array, w: BlockSparseMatrix, *, transpose: bool = False, interpret: bool = False,
         block_m: int | None = None, num_warps: int | None = None,
         num_stages: int = 3) -> jax.Array:
  """``a @ W`` (``a @ W^T`` with ``transpose``) in ``a``'s dtype, float32 accumulation.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> w = bsr_from_dense(jnp.ones((32, 16)), jnp.ones((32, 16), bool), (16, 16))
  >>> y = spmm(jnp.ones((2, 16)), w, transpose=True, interpret=True)  # a @ W^T
  >>> y.shape, float(y[0, 0])
  ((2, 32), 16.0)
  """
  ptr, inner, slot = _common.compressed_view(w, transpose)
  bk, bo, groups = _common.spmm_dims(w, transpose)
  br, bc = w.block_shape
  m = a.shape[0]
  itemsize = jnp.dtype(a.dtype).itemsize
  bm = block_m or _row_tile(m, 128)
  tn = min(bo, 128)
  # A 3-stage pipeline of (bm + tn) x tk operands in <= 96 KiB; 128 x 128 tiles take tk = 32 to
  # stay clear of spills (ptxas, benchmarks/compile_jax_triton.py).
  tk = min(bk, 64 if itemsize == 2 and bm * tn < 128 * 128 else 32)
  warps = num_warps or (8 if bm * tn >= 128 * 64 else 4)
  (out,) = _jax_triton.call(
      spmm_kernel, ptr, inner, slot, a, w.blocks, m, a.shape[1], groups * bo,
      out_shape=[jax.ShapeDtypeStruct((m, groups * bo), a.dtype)],
      grid=(-(-m // bm), groups, bo // tn), interpret=interpret, num_warps=warps,
      num_stages=num_stages, name="bsr_spmm_t" if transpose else "bsr_spmm",
      BM=bm, TK=tk, TN=tn, BK=bk, BO=bo, BR=br, BC=bc, TRANSPOSE=transpose,
      PRECISION=_precision(a.dtype))
  return out


def sddmm(a: jax.Array, b: jax.Array, w: BlockSparseMatrix, *, interpret: bool = False,
          block_m: int | None = None, num_warps: int | None = None,
          num_stages: int = 3) -> jax.Array:
  """``(a^T @ b)`` on ``w``'s stored blocks: ``[capacity, br, bc]`` in ``w``'s dtype, zero padding.

  >>> import jax.numpy as jnp
  >>> from pallas_kernels.matmul.format import bsr_from_dense
  >>> mask = jnp.kron(jnp.eye(2), jnp.ones((16, 16))) > 0  # the 2 diagonal blocks
  >>> w = bsr_from_dense(jnp.ones((32, 32)), mask, (16, 16))
  >>> dw = sddmm(jnp.ones((4, 32)), jnp.full((4, 32), 0.5), w, interpret=True)
  >>> dw.shape, float(dw[1, 0, 0])
  ((2, 16, 16), 2.0)
  """
  br, bc = w.block_shape
  m = a.shape[0]
  bm = block_m or _row_tile(m, 64)
  tr, tc = min(br, 128), min(bc, 128)
  warps = num_warps or (8 if tr * tc >= 128 * 64 else 4)
  (out,) = _jax_triton.call(
      sddmm_kernel, w.nnzb.reshape(1).astype(jnp.int32), w.row_idx, w.col_idx, a, b, m,
      a.shape[1], b.shape[1],
      out_shape=[jax.ShapeDtypeStruct(w.blocks.shape, w.dtype)],
      grid=(w.capacity, br // tr, bc // tc), interpret=interpret, num_warps=warps,
      num_stages=num_stages, name="bsr_sddmm",
      BM=bm, TR=tr, TC=tc, BR=br, BC=bc, PRECISION=_precision(a.dtype))
  return out
