"""Per-array mask makers: unstructured top-k, N:M, blocks, channels.

All functions are jit-able with a traced ``density``, keep exact counts and break
ties deterministically (the lower flat index wins). ``density`` is the kept
fraction; the number kept is ``clip(round(size * density), 1, size)`` (halves
round up, exact integer arithmetic, see :func:`sparsejax.core.selection.num_to_keep`).

Pattern objects (:class:`Unstructured`, :class:`NM`, :class:`Block`,
:class:`Channel`) bundle a mask maker with a static ``check`` that validates a
leaf's shape and requested sparsity and names the leaf path in its errors.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core import selection as _sel
from sparsejax.schedules import parse_nm

__all__ = [
  "NM",
  "as_pattern",
  "Block",
  "Channel",
  "Unstructured",
  "block_mask",
  "channel_mask",
  "nm_mask",
  "topk_mask",
]


def _where(path) -> str:
  return f" at '{path}'" if path else ""


def _concrete(x) -> float | None:
  """Python float of a scalar, or None if it is traced."""
  if x is None:
    return None
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return float(np.asarray(x))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return None


def _check_density(fn: str, density, path) -> None:
  d = _concrete(density)
  if d is not None and not 0.0 <= d <= 1.0:
    raise ValueError(f"{fn}{_where(path)}: density {d} outside [0, 1] (density = 1 - sparsity).")


def _check_sparsity(fn: str, sparsity, path) -> float | None:
  s = _concrete(sparsity)
  if s is not None and not 0.0 <= s < 1.0:
    raise ValueError(f"{fn}{_where(path)}: sparsity {s} outside [0, 1). Use a value in [0, 1) "
                     f"(sparsity 1 would remove the whole leaf; exclude the leaf instead).")
  return s


def _as_real(fn: str, scores, path) -> jax.Array:
  scores = jnp.asarray(scores)
  if jnp.issubdtype(scores.dtype, jnp.complexfloating):
    raise TypeError(f"{fn}{_where(path)}: complex scores ({scores.dtype}); pass real scores such as jnp.abs(x).")
  if scores.size == 0:
    raise ValueError(f"{fn}{_where(path)}: empty array of shape {scores.shape}; nothing to select.")
  return scores


def _norm_axis(fn: str, axis: int, ndim: int, path) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f"{fn}{_where(path)}: axis {axis} out of range for an array of rank {ndim}.")
  return axis % ndim


def topk_mask(scores: jax.Array, density=None, *, k=None, path: str | None = None) -> jax.Array:
  """Keeps the ``k`` largest scores (exact count, lower flat index wins ties).

  Args:
    scores: real array (NaN ranks below every number).
    density: kept fraction (may be traced): ``k = clip(round(size*density), 1, size)``.
    k: number kept instead of ``density`` (may be traced; clipped to [0, size]).
    path: leaf path used in error messages.

  Returns:
    Bool array of ``scores.shape``.

  >>> import jax.numpy as jnp
  >>> topk_mask(jnp.array([1., 3., 3., 2.]), 0.5).tolist()
  [False, True, True, False]
  >>> topk_mask(jnp.array([5., 5., 5.]), k=2).tolist()
  [True, True, False]
  """
  scores = _as_real("topk_mask", scores, path)
  if (density is None) == (k is None):
    raise ValueError(f"topk_mask{_where(path)}: pass exactly one of density or k.")
  if density is not None:
    _check_density("topk_mask", density, path)
    return _sel.global_topk_masks([scores], density=density)[0]
  kc = _concrete(k)
  if kc is not None and not 0 <= kc <= scores.size:
    raise ValueError(f"topk_mask{_where(path)}: k={int(kc)} outside [0, {scores.size}].")
  return _sel.global_topk_masks([scores], k=k)[0]


def nm_mask(scores: jax.Array, n: int, m: int, *, axis: int = -2, path: str | None = None) -> jax.Array:
  """N:M mask: exactly ``n`` kept in every group of ``m`` consecutive entries along ``axis``.

  The default ``axis=-2`` is the reduction (input) axis of Flax Dense ``(in, out)``
  and Conv HWIO kernels: the hardware 2:4 layout.

  Args:
    scores: real array; ``scores.shape[axis]`` must be divisible by ``m``.
    n: kept per group (1 <= n <= m).
    m: group size.
    axis: grouping axis.
    path: leaf path used in error messages.

  Returns:
    Bool array of ``scores.shape``.

  >>> import jax.numpy as jnp
  >>> nm_mask(jnp.array([[4., 1., 2., 3.]]), 2, 4, axis=-1).tolist()
  [[True, False, False, True]]
  """
  NM(n, m, axis)._check_shape(path, np.shape(scores))
  scores = _as_real("nm_mask", scores, path)
  return _nm_core(scores, n, m, axis % scores.ndim)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _nm_core(scores, n, m, ax):
  """Keeps the top ``n`` of each group by ``min(n, m - n)`` selection passes.

  Each pass picks one not-yet-chosen index per group (largest key, lowest index
  on ties; or, when dropping is shorter, smallest key, highest index) by one
  variadic reduction along the group axis, so every group holds exactly ``n``
  entries by construction -- even inside large jitted programs where XLA
  recomputes a fused producer of ``scores`` with different rounding in
  different places (pairwise rank comparisons can then disagree). A reduction
  per pass keeps the program small for any ``m``: an elementwise tournament
  over the ``m`` slices (``m - 1`` selects per pass) made the compile grow
  with ``passes * m`` and beyond (XLA duplicates the unrolled chain into its
  consumers): 25 s for one 8:16 STE step on a small MLP, see
  ``benchmarks/nm_compile.py``.
  """
  keys = _sel.ordered_keys(scores)
  shp = keys.shape
  g = keys.reshape(shp[:ax] + (shp[ax] // m, m) + shp[ax + 1:])  # groups on axis ax + 1
  gax = ax + 1
  largest = n <= m - n
  iota = lax.broadcasted_iota(jnp.int32, g.shape, gax)
  picked = jnp.zeros(g.shape, bool)
  for _ in range(n if largest else m - n):
    picked = picked | (iota == _pick(g, ~picked, iota, largest, gax))
  keep = picked if largest else ~picked
  return keep.reshape(shp)


def _pick(keys, eligible, iota, largest: bool, axis: int):
  """Index of the best eligible entry along ``axis``, by one variadic reduction.

  Largest key (ties: lowest index) or smallest key (ties: highest index).
  """
  def better(a, b):
    ka, ea, ia = a
    kb, eb, ib = b
    if largest:
      key_wins = (kb > ka) | ((kb == ka) & (ib < ia))
    else:
      key_wins = (kb < ka) | ((kb == ka) & (ib > ia))
    take_b = (eb & ~ea) | ((eb == ea) & key_wins)
    return (jnp.where(take_b, kb, ka), jnp.where(take_b, eb, ea), jnp.where(take_b, ib, ia))

  init = (jnp.zeros((), keys.dtype), jnp.asarray(False), jnp.asarray(-1, jnp.int32))
  _, _, idx = lax.reduce((keys, eligible, iota), init, better, (axis,))
  return jnp.expand_dims(idx, axis)


def block_mask(scores: jax.Array, density, block_shape: tuple[int, int], *, path: str | None = None) -> jax.Array:
  """Block mask over the last two dims; blocks ranked by the sum of their scores.

  The number of kept blocks is ``clip(round(n_blocks * density), 1, n_blocks)``
  (blocks of all leading dims compete together); the mask is constant per block.

  Args:
    scores: real array of rank >= 2; the last two dims divisible by ``block_shape``.
    density: kept fraction of blocks (may be traced).
    block_shape: ``(r, c)``.
    path: leaf path used in error messages.

  Returns:
    Bool array of ``scores.shape``.

  >>> import jax.numpy as jnp
  >>> block_mask(jnp.array([[1., 1., 0., 0.], [1., 1., 0., 9.]]), 0.5, (2, 2)).astype(int).tolist()
  [[0, 0, 1, 1], [0, 0, 1, 1]]
  """
  r, c = Block(*block_shape)._check_shape(path, np.shape(scores))
  scores = _as_real("block_mask", scores, path)
  _check_density("block_mask", density, path)
  *lead, R, C = scores.shape
  s = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  bs = s.reshape(*lead, R // r, r, C // c, c).sum(axis=(-3, -1))
  keep = topk_mask(bs, density, path=path)
  full = jnp.broadcast_to(keep[..., :, None, :, None], (*lead, R // r, r, C // c, c))
  return full.reshape(scores.shape)


def channel_mask(scores: jax.Array, density, *, axis: int = -1, path: str | None = None) -> jax.Array:
  """Keeps whole slices along ``axis`` (output channels / neurons / heads).

  Channel score = sum of the scores in the slice. With a Dense kernel ``(in, out)``
  ``axis=-1`` removes output neurons; with an attention kernel ``(d, heads, hd)``
  ``axis=1`` removes heads.

  Args:
    scores: real array.
    density: kept fraction of channels (may be traced).
    axis: channel axis.
    path: leaf path used in error messages.

  Returns:
    Bool array of ``scores.shape``.

  >>> import jax.numpy as jnp
  >>> channel_mask(jnp.array([[1., 5.], [1., 5.]]), 0.5).tolist()
  [[False, True], [False, True]]
  """
  ax = Channel(axis)._check_shape(path, np.shape(scores))
  scores = _as_real("channel_mask", scores, path)
  _check_density("channel_mask", density, path)
  s = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  other = tuple(i for i in range(scores.ndim) if i != ax)
  cs = s.sum(axis=other)
  keep = topk_mask(cs, density, path=path)
  shape = [1] * scores.ndim
  shape[ax] = scores.shape[ax]
  return jnp.broadcast_to(keep.reshape(shape), scores.shape)


@dataclasses.dataclass(frozen=True)
class Unstructured:
  """Unstructured top-k pattern.

  >>> import jax.numpy as jnp
  >>> Unstructured()(jnp.array([1., 2., 3., 4.]), 0.25).tolist()
  [False, False, False, True]
  """

  @property
  def fixed_density(self) -> float | None:
    """Density imposed by the pattern (None: any density)."""
    return None

  def check(self, path: str, shape: tuple[int, ...], sparsity=None) -> None:
    """Raises ValueError (naming ``path``) for an empty leaf or a sparsity outside [0, 1)."""
    if int(np.prod(shape)) == 0:
      raise ValueError(f"Unstructured at '{path}': empty leaf of shape {tuple(shape)}.")
    _check_sparsity("Unstructured", sparsity, path)

  def __call__(self, scores, density, *, path: str | None = None) -> jax.Array:
    return topk_mask(scores, density, path=path)


def as_pattern(pattern: Any, *, fn: str = "pattern") -> Any:
  """A pattern object from a pattern or an ``"n:m"`` string.

  >>> as_pattern("2:4")
  NM(n=2, m=4, axis=-2)
  """
  if isinstance(pattern, str):
    if ":" not in pattern:
      raise ValueError(f"{fn}: unknown pattern {pattern!r}; use 'n:m' (e.g. '2:4'), NM(n, m), "
                       "Block(r, c), Channel(axis) or Unstructured().")
    return NM(pattern)
  if not callable(pattern) or not hasattr(pattern, "check"):
    raise TypeError(f"{fn}: pattern {pattern!r} is not a pattern; use 'n:m' (e.g. '2:4'), NM(n, m), "
                    "Block(r, c), Channel(axis) or Unstructured().")
  return pattern


@dataclasses.dataclass(frozen=True)
class NM:
  """N:M pattern along ``axis`` (default -2, the reduction axis of Dense/Conv kernels).

  The density is fixed at ``n/m``: a different requested sparsity raises, and a
  traced one (which cannot be verified) raises too; pass ``None``.

  >>> import jax.numpy as jnp
  >>> NM(1, 2)(jnp.array([[1.], [3.], [4.], [2.]]), None).ravel().tolist()
  [False, True, True, False]
  >>> NM(2, 4).check('fc/kernel', (8, 3), sparsity=0.9)
  Traceback (most recent call last):
  ...
  ValueError: NM(2:4) at 'fc/kernel': requested sparsity 0.9 but 2:4 gives sparsity 0.5; request 0.5 or None, or pick another N:M.
  >>> NM("2:4") == NM(2, 4)
  True
  """
  n: int
  m: int | None = None
  axis: int = -2

  def __post_init__(self):
    if isinstance(self.n, str):  # NM("2:4")
      if self.m is not None:
        raise TypeError(f"NM: pass NM({self.n!r}) or NM(n, m), not both (got m={self.m!r}).")
      n, m = parse_nm(self.n)  # the one 'n:m' parser (schedules)
      object.__setattr__(self, "n", n)
      object.__setattr__(self, "m", m)
    elif self.m is None:
      raise TypeError(f"NM: missing m; write NM(n, m) or NM('n:m'), e.g. NM(2, 4) or NM('2:4'), "
                      f"got NM({self.n!r}).")
    for name in ("n", "m", "axis"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
        raise TypeError(f"NM: {name} must be a Python int, got {v!r}.")
    if not 1 <= self.n <= self.m:
      raise ValueError(f"NM: need 1 <= n <= m, got {self.n}:{self.m}.")

  @property
  def fixed_density(self) -> float:
    """``n / m``."""
    return self.n / self.m

  def _check_shape(self, path, shape) -> int:
    shape = tuple(shape)
    if len(shape) == 0:
      raise ValueError(f"NM({self.n}:{self.m}){_where(path)}: scalar leaf; N:M needs an array.")
    ax = _norm_axis(f"NM({self.n}:{self.m})", self.axis, len(shape), path)
    if shape[ax] % self.m:
      raise ValueError(f"NM({self.n}:{self.m}){_where(path)}: axis {self.axis} of shape {shape} has size "
                       f"{shape[ax]}, not divisible by m={self.m}. Choose another axis or M, or exclude the leaf.")
    return ax

  def check(self, path: str, shape: tuple[int, ...], sparsity=None) -> None:
    """Raises ValueError naming ``path`` if the shape or requested sparsity cannot be met."""
    self._check_shape(path, shape)
    if sparsity is None:
      return
    s = _check_sparsity(f"NM({self.n}:{self.m})", sparsity, path)
    want = 1.0 - self.n / self.m
    if s is None:
      raise ValueError(f"NM({self.n}:{self.m}) at '{path}': a traced sparsity cannot be checked against the "
                       f"fixed N:M sparsity {want}; pass sparsity=None for N:M leaves.")
    if abs(s - want) > 1e-6:
      raise ValueError(f"NM({self.n}:{self.m}) at '{path}': requested sparsity {s} but {self.n}:{self.m} gives "
                       f"sparsity {want}; request {want} or None, or pick another N:M.")

  def __call__(self, scores, density=None, *, path: str | None = None) -> jax.Array:
    if density is not None:
      d = _concrete(density)
      self.check(path, np.shape(scores), 1.0 - jnp.asarray(density) if d is None else 1.0 - d)
    return nm_mask(scores, self.n, self.m, axis=self.axis, path=path)


@dataclasses.dataclass(frozen=True)
class Block:
  """Block pattern of ``r x c`` tiles over the last two dims.

  >>> Block(2, 2).check('w', (4, 6))
  >>> Block(4, 4).check('w', (4, 6))
  Traceback (most recent call last):
  ...
  ValueError: Block(4x4) at 'w': block (4, 4) does not divide the last two dims of shape (4, 6); pick a block size that divides them (or pad the layer).
  """
  r: int
  c: int

  def __post_init__(self):
    for name in ("r", "c"):
      v = getattr(self, name)
      if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"Block: {name} must be a positive int, got {v!r}.")

  @property
  def fixed_density(self) -> None:
    """None (any density)."""
    return None

  def _check_shape(self, path, shape) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) < 2:
      raise ValueError(f"Block({self.r}x{self.c}){_where(path)}: needs rank >= 2, got shape {shape}.")
    if shape[-2] % self.r or shape[-1] % self.c:
      raise ValueError(f"Block({self.r}x{self.c}){_where(path)}: block ({self.r}, {self.c}) does not divide the "
                       f"last two dims of shape {shape}; pick a block size that divides them (or pad the layer).")
    return self.r, self.c

  def check(self, path: str, shape: tuple[int, ...], sparsity=None) -> None:
    """Raises ValueError naming ``path`` for an incompatible shape or sparsity."""
    self._check_shape(path, shape)
    _check_sparsity(f"Block({self.r}x{self.c})", sparsity, path)

  def __call__(self, scores, density, *, path: str | None = None) -> jax.Array:
    return block_mask(scores, density, (self.r, self.c), path=path)


@dataclasses.dataclass(frozen=True)
class Channel:
  """Whole-slice pattern along ``axis`` (default -1: output channels of Dense/Conv kernels).

  >>> import jax.numpy as jnp
  >>> Channel()(jnp.array([[1., 5., 2.]]), 0.34).tolist()
  [[False, True, False]]
  """
  axis: int = -1

  def __post_init__(self):
    if not isinstance(self.axis, (int, np.integer)) or isinstance(self.axis, bool):
      raise TypeError(f"Channel: axis must be a Python int, got {self.axis!r}.")

  @property
  def fixed_density(self) -> None:
    """None (any density)."""
    return None

  def _check_shape(self, path, shape) -> int:
    shape = tuple(shape)
    if len(shape) == 0:
      raise ValueError(f"Channel{_where(path)}: scalar leaf has no channels.")
    return _norm_axis("Channel", self.axis, len(shape), path)

  def check(self, path: str, shape: tuple[int, ...], sparsity=None) -> None:
    """Raises ValueError naming ``path`` for a bad axis or sparsity."""
    self._check_shape(path, shape)
    _check_sparsity("Channel", sparsity, path)

  def __call__(self, scores, density, *, path: str | None = None) -> jax.Array:
    return channel_mask(scores, density, axis=self.axis, path=path)
