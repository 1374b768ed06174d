"""Token-level mask functions evaluated inside partial blocks.

A token-level mask is a :class:`MaskMod`: a hashable function ``fn`` plus
per-token integer data (segment ids, prefix flags). Every kernel calls

  ``fn(q_idx, kv_idx, q_data, kv_data) -> bool``

with ``q_idx`` an int32 array of absolute query positions shaped ``[bq, 1]``,
``kv_idx`` absolute key positions shaped ``[1, bk]``, ``q_data`` a tuple of
per-query arrays shaped like ``q_idx`` and ``kv_data`` a tuple of per-key arrays
shaped like ``kv_idx``. The result broadcasts to ``[bq, bk]``. The function only
uses elementwise jnp operations, so the same code runs in XLA, in the Pallas
interpreter and in the Triton, Mosaic TPU and Mosaic GPU lowerings.

The functions are frozen dataclasses: equal masks compare equal, so a jitted
function that receives a :class:`~pallas_kernels.attention.BlockMask` traces
once per mask *kind*, not once per mask object.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Any, Callable

import jax
import jax.numpy as jnp

__all__ = [
    "MaskMod",
    "CausalFn",
    "SlidingWindowFn",
    "SegmentFn",
    "PrefixLMFn",
    "UserFn",
    "AndFn",
    "OrFn",
]


@dataclasses.dataclass(frozen=True)
class MaskMod:
  """A token-level mask: a static function and per-token int32 data.

  Attributes:
    fn: hashable callable ``fn(q_idx, kv_idx, q_data, kv_data) -> bool``.
    q_data: tuple of int32 arrays shaped ``[B', q_len]`` (``B'`` is 1 or the batch).
    kv_data: tuple of int32 arrays shaped ``[B', kv_len]``.
    exact: ``True`` when ``fn`` is the exact token mask at every position, also
      outside the blocks the block mask visits. ``or_masks`` needs exact masks;
      ``and_masks`` with a block-level mask (top-k, arbitrary blocks) makes the
      result inexact.

  >>> mm = MaskMod(CausalFn())
  >>> bool(mm.fn(jnp.int32(3), jnp.int32(2), (), ()))
  True
  """

  fn: Callable[..., Any]
  q_data: tuple = ()
  kv_data: tuple = ()
  exact: bool = True

  @property
  def batch(self) -> int:
    """The leading (batch) size of the data arrays; 1 without data."""
    for x in self.q_data + self.kv_data:
      return x.shape[0]
    return 1

  def __call__(self, q_idx, kv_idx, q_data=None, kv_data=None):
    """Evaluates the mask on broadcastable positions with aligned data."""
    return self.fn(q_idx, kv_idx, self.q_data if q_data is None else q_data,
                   self.kv_data if kv_data is None else kv_data)

  def broadcast_batch(self, batch: int) -> "MaskMod":
    """Returns the same mask with data broadcast to a leading size ``batch``."""
    bcast = lambda xs: tuple(jnp.broadcast_to(x, (batch,) + x.shape[1:]) for x in xs)
    return dataclasses.replace(self, q_data=bcast(self.q_data), kv_data=bcast(self.kv_data))


jax.tree_util.register_dataclass(
    MaskMod, data_fields=["q_data", "kv_data"], meta_fields=["fn", "exact"])


@dataclasses.dataclass(frozen=True)
class CausalFn:
  """``q_idx + q_offset >= kv_idx``: query ``i`` sits at absolute position ``i + q_offset``.

  >>> bool(CausalFn(q_offset=2)(jnp.int32(0), jnp.int32(2), (), ()))
  True
  """

  q_offset: int = 0

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    del q_data, kv_data
    return q_idx + self.q_offset >= kv_idx


@dataclasses.dataclass(frozen=True)
class SlidingWindowFn:
  """Local attention: ``0 <= d < window`` (causal) or ``|d| < window``, ``d = q + q_offset - kv``.

  >>> f = SlidingWindowFn(window=2)
  >>> [bool(f(jnp.int32(5), jnp.int32(k), (), ())) for k in (3, 4, 5, 6)]
  [False, True, True, False]
  """

  window: int
  q_offset: int = 0
  causal: bool = True

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    del q_data, kv_data
    d = q_idx + self.q_offset - kv_idx
    if self.causal:
      return (d >= 0) & (d < self.window)
    return jnp.abs(d) < self.window


@dataclasses.dataclass(frozen=True)
class SegmentFn:
  """Block-diagonal documents: ``q_seg == kv_seg`` and both ids are >= 0 (negative = padding).

  Data: ``q_data = (q_segment_ids,)``, ``kv_data = (kv_segment_ids,)``.

  >>> f = SegmentFn()
  >>> bool(f(jnp.int32(0), jnp.int32(1), (jnp.int32(3),), (jnp.int32(3),)))
  True
  """

  causal: bool = False
  q_offset: int = 0

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    (q_seg,), (kv_seg,) = q_data, kv_data
    allowed = (q_seg == kv_seg) & (q_seg >= 0)
    if self.causal:
      allowed = allowed & (q_idx + self.q_offset >= kv_idx)
    return allowed


@dataclasses.dataclass(frozen=True)
class PrefixLMFn:
  """Prefix-LM: a key in the prefix is visible to every query; the rest is causal.

  Data: ``kv_data = (is_prefix,)`` (int32 0/1 per key), so the prefix length may be
  traced or differ per batch element.

  >>> f = PrefixLMFn()
  >>> bool(f(jnp.int32(0), jnp.int32(3), (), (jnp.int32(1),)))
  True
  """

  q_offset: int = 0

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    del q_data
    (is_prefix,) = kv_data
    return (is_prefix != 0) | (q_idx + self.q_offset >= kv_idx)


@dataclasses.dataclass(frozen=True)
class UserFn:
  """Wraps a user ``mask_fn(q_idx, kv_idx) -> bool`` (compared by identity).

  >>> f = UserFn(lambda q, k: (q - k) % 2 == 0)
  >>> bool(f(jnp.int32(4), jnp.int32(2), (), ()))
  True
  """

  mask_fn: Callable[[Any, Any], Any]

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    del q_data, kv_data
    return self.mask_fn(q_idx, kv_idx)


def _split(data, sizes):
  out, start = [], 0
  for n in sizes:
    out.append(tuple(data[start:start + n]))
    start += n
  return out


def _each_mask(combined, q_idx, kv_idx, q_data, kv_data):
  """The masks of an :class:`AndFn` / :class:`OrFn`'s functions, each on its share of the data."""
  return [fn(q_idx, kv_idx, qd, kd) for fn, qd, kd in zip(
      combined.fns, _split(q_data, combined.q_sizes), _split(kv_data, combined.kv_sizes))]


@dataclasses.dataclass(frozen=True)
class AndFn:
  """Conjunction of mask functions; ``q_sizes``/``kv_sizes`` split the concatenated data.

  >>> f = AndFn((CausalFn(), SlidingWindowFn(2)), (0, 0), (0, 0))
  >>> bool(f(jnp.int32(5), jnp.int32(3), (), ()))
  False
  """

  fns: tuple
  q_sizes: tuple
  kv_sizes: tuple

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    return functools.reduce(operator.and_, _each_mask(self, q_idx, kv_idx, q_data, kv_data))


@dataclasses.dataclass(frozen=True)
class OrFn:
  """Disjunction of mask functions; ``q_sizes``/``kv_sizes`` split the concatenated data.

  >>> f = OrFn((SlidingWindowFn(1), UserFn(lambda q, k: k == 0)), (0, 0), (0, 0))
  >>> bool(f(jnp.int32(5), jnp.int32(0), (), ()))
  True
  """

  fns: tuple
  q_sizes: tuple
  kv_sizes: tuple

  def __call__(self, q_idx, kv_idx, q_data, kv_data):
    return functools.reduce(operator.or_, _each_mask(self, q_idx, kv_idx, q_data, kv_data))
