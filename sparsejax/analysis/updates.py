"""Update sparsity between two checkpoints: unchanged entries, update rank, support overlap.

Mukherjee et al. 2025, "Reinforcement Learning Finetunes Small Subnetworks in Large Language
Models" (arXiv:2505.11711): RL finetuning leaves most parameters bitwise unchanged (70-95 %),
while the update it does make is nearly full-rank. Part of the effect is precision: in bf16 a
small step ``|delta| < |theta| * 2**-9`` rounds back to the stored value. Compare in the stored
dtype (``dtype=jnp.bfloat16``) to see what a bf16 checkpoint sees.

Functions take two param trees of the same structure (any pytree). Every real floating leaf is
compared; non-float leaves and ``None`` are skipped. Results are per leaf (keyed by path) and
global (entry-weighted).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import paths as _paths

__all__ = [
  "SupportOverlap",
  "UpdateFractions",
  "changed_support",
  "support_overlap",
  "unchanged_fraction",
  "update_rank",
]


def _count_dtype():
  return jax.dtypes.canonicalize_dtype(jnp.int64)


def _pairs(fn: str, a: Any, b: Any) -> list[tuple[str, jax.Array, jax.Array]]:
  fa = _paths.paths_with_leaves(a, is_leaf=lambda x: x is None)
  fb = _paths.paths_with_leaves(b, is_leaf=lambda x: x is None)
  pa, pb = [p for p, _ in fa], [p for p, _ in fb]
  if pa != pb:
    raise ValueError(f"{fn}: the two trees have different leaf paths (only in the first: "
                     f"{sorted(set(pa) - set(pb))[:5]}, only in the second: {sorted(set(pb) - set(pa))[:5]}); "
                     "pass two checkpoints of the same model.")
  out = []
  for (path, x), (_, y) in zip(fa, fb):
    if x is None or y is None:
      if (x is None) != (y is None):
        raise ValueError(f"{fn}: leaf '{path}' is None in one tree only.")
      continue
    if np.shape(x) != np.shape(y):
      raise ValueError(f"{fn}: leaf '{path}' has shape {np.shape(x)} in the first tree and {np.shape(y)} "
                       "in the second.")
    if not (jnp.issubdtype(jnp.result_type(x), jnp.floating) and jnp.issubdtype(jnp.result_type(y), jnp.floating)):
      continue
    out.append((path, jnp.asarray(x), jnp.asarray(y)))
  if not out:
    raise ValueError(f"{fn}: no floating-point leaf to compare.")
  return out


def changed_support(before: Any, after: Any, *, atol: float = 0.0, rtol: float | str = 0.0,
                    dtype: Any = None) -> Any:
  """Bool tree: True where ``after`` differs from ``before`` by more than the tolerance.

  An entry is unchanged when ``|after - before| <= atol + rtol * |before|`` after casting both
  to ``dtype`` (default: their own dtypes). ``rtol="eps"`` uses ``finfo(dtype).eps`` (bf16:
  2**-7), i.e. "equal up to one unit in the last place".

  Args:
    before: first param tree.
    after: second param tree (same structure).
    atol: absolute tolerance (Mukherjee et al. use 1e-5).
    rtol: relative tolerance, or ``"eps"``.
    dtype: compare in this dtype (e.g. ``jnp.bfloat16``, the stored dtype).

  Returns:
    ``{path: bool array}`` over the compared (floating) leaves.

  >>> import jax.numpy as jnp
  >>> changed_support({'w': jnp.array([1., 2., 3.])}, {'w': jnp.array([1., 2.001, 4.])}, dtype=jnp.bfloat16)
  {'w': Array([False, False,  True], dtype=bool)}
  """
  out = {}
  for path, x, y in _pairs("changed_support", before, after):
    dt = jnp.dtype(dtype) if dtype is not None else jnp.promote_types(x.dtype, y.dtype)
    if not jnp.issubdtype(dt, jnp.floating):
      raise TypeError(f"changed_support: dtype must be floating, got {dt}.")
    xd, yd = x.astype(dt), y.astype(dt)
    r = float(jnp.finfo(dt).eps) if rtol == "eps" else rtol
    if isinstance(r, str):
      raise ValueError(f"changed_support: rtol must be a float or 'eps', got {rtol!r}.")
    wide = jnp.promote_types(dt, jnp.float32)
    xw, yw = xd.astype(wide), yd.astype(wide)
    if atol == 0.0 and r == 0.0:
      out[path] = xd != yd
    else:
      out[path] = jnp.abs(yw - xw) > atol + r * jnp.abs(xw)
  return out


class UpdateFractions(NamedTuple):
  """Fraction of unchanged entries per leaf (``{path: scalar}``) and over all compared leaves."""
  per_leaf: dict[str, jax.Array]
  total: jax.Array


def unchanged_fraction(before: Any, after: Any, *, atol: float = 0.0, rtol: float | str = 0.0,
                       dtype: Any = None) -> UpdateFractions:
  """Update sparsity: the fraction of entries an update left unchanged, per leaf and global.

  Defaults give exact (bitwise, up to ``-0 == 0``) equality in the trees' own dtype. See
  :func:`changed_support` for the tolerance and ``dtype`` arguments.

  >>> import jax.numpy as jnp
  >>> a = {'w': jnp.array([1., 2., 3., 4.]), 'b': jnp.zeros(4)}
  >>> b = {'w': jnp.array([1., 2.001, 3., 5.]), 'b': jnp.zeros(4)}
  >>> r = unchanged_fraction(a, b)
  >>> float(r.per_leaf['w']), float(r.total)
  (0.5, 0.75)
  >>> float(unchanged_fraction(a, b, dtype=jnp.bfloat16).per_leaf['w'])  # 2.001 rounds to 2 in bf16
  0.75
  """
  changed = changed_support(before, after, atol=atol, rtol=rtol, dtype=dtype)
  per_leaf, same, total = {}, jnp.zeros((), _count_dtype()), 0
  for path, c in changed.items():
    n_same = jnp.sum(~c, dtype=_count_dtype())
    per_leaf[path] = (n_same / max(c.size, 1)).astype(jnp.float32)
    same = same + n_same
    total += c.size
  return UpdateFractions(per_leaf, (same / max(total, 1)).astype(jnp.float32))


def update_rank(before: Any, after: Any, *, rtol: float | None = None, min_ndim: int = 2) -> dict[str, jax.Array]:
  """Rank of the update ``after - before`` of every leaf with ``ndim >= min_ndim``.

  A leaf of shape ``(..., out)`` is viewed as a ``(prod(...), out)`` matrix (Dense kernels
  as is, Conv HWIO kernels as ``(kh*kw*in, out)``). The difference is taken in float32.

  Args:
    before: first param tree.
    after: second param tree.
    rtol: singular values below ``rtol * s_max`` count as zero; default
      ``max(rows, cols) * eps(float32)`` (numpy's ``matrix_rank`` rule).
    min_ndim: smallest rank of a leaf to analyse.

  Returns:
    ``{path: int32 rank}``; divide by ``min(rows, cols)`` for the relative rank.

  >>> import jax.numpy as jnp
  >>> u = jnp.outer(jnp.arange(1., 4.), jnp.ones(2))
  >>> {k: int(v) for k, v in update_rank({'w': jnp.zeros((3, 2))}, {'w': u}).items()}
  {'w': 1}
  """
  out = {}
  for path, x, y in _pairs("update_rank", before, after):
    if x.ndim < min_ndim:
      continue
    d = (y.astype(jnp.float32) - x.astype(jnp.float32))
    d = d.reshape(-1, d.shape[-1]) if d.ndim >= 2 else d.reshape(1, -1)
    s = jnp.linalg.svd(d, compute_uv=False)
    tol = (max(d.shape) * float(jnp.finfo(jnp.float32).eps)) if rtol is None else rtol
    out[path] = jnp.sum(s > tol * jnp.max(s, initial=0.0), dtype=jnp.int32)
  return out


class SupportOverlap(NamedTuple):
  """Overlap of two update supports A, B against independent random supports of the same sizes.

  ``overlap = |A & B| / |A|`` and its chance value ``|B| / N``; ``iou = |A & B| / |A | B|`` and
  its chance value ``ab/N / (a + b - ab/N)`` (``a = |A|``, ``b = |B|``, ``N`` entries).
  """
  overlap: jax.Array
  chance_overlap: jax.Array
  iou: jax.Array
  chance_iou: jax.Array


def support_overlap(support_a: Any, support_b: Any) -> SupportOverlap:
  """How much two updates touch the same entries, compared with chance.

  Args:
    support_a: bool tree of changed entries (from :func:`changed_support`).
    support_b: bool tree of the same structure.

  Returns:
    :class:`SupportOverlap` (global over leaves, float32 scalars; NaN where a denominator is 0).

  >>> import jax.numpy as jnp
  >>> r = support_overlap({'w': jnp.array([True, True, False, False])}, {'w': jnp.array([True, False, False, False])})
  >>> float(r.overlap), float(r.chance_overlap), float(r.iou)
  (0.5, 0.25, 0.5)
  """
  fa = _paths.paths_with_leaves(support_a)
  fb = _paths.paths_with_leaves(support_b)
  if [p for p, _ in fa] != [p for p, _ in fb]:
    raise ValueError("support_overlap: the two support trees have different leaf paths.")
  cd = _count_dtype()
  a = b = ab = jnp.zeros((), cd)
  n = 0
  for (path, x), (_, y) in zip(fa, fb):
    if np.shape(x) != np.shape(y) or jnp.result_type(x) != jnp.bool_ or jnp.result_type(y) != jnp.bool_:
      raise ValueError(f"support_overlap: supports at '{path}' must be bool arrays of the same shape, got "
                       f"{jnp.result_type(x)}{np.shape(x)} and {jnp.result_type(y)}{np.shape(y)}.")
    a = a + jnp.sum(x, dtype=cd)
    b = b + jnp.sum(y, dtype=cd)
    ab = ab + jnp.sum(x & y, dtype=cd)
    n += int(np.size(x))
  a, b, ab = (v.astype(jnp.float32) for v in (a, b, ab))
  nf = jnp.float32(max(n, 1))
  exp_ab = a * b / nf
  return SupportOverlap(ab / a, b / nf, ab / (a + b - ab), exp_ab / (a + b - exp_ab))
