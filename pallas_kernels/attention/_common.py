"""Helpers shared by the attention reference and kernels: shape checks, padding, masking."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.attention.block_mask import BlockMask

_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)


@dataclasses.dataclass(frozen=True)
class Dims:
  """Static problem sizes of one attention call."""

  batch: int
  q_len: int
  kv_len: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  q_block: int
  kv_block: int
  mask_batch: int
  mask_heads: int

  @property
  def group(self) -> int:
    """Query heads per kv head."""
    return self.num_heads // self.num_kv_heads

  @property
  def nq(self) -> int:
    return -(-self.q_len // self.q_block)

  @property
  def nk(self) -> int:
    return -(-self.kv_len // self.kv_block)

  @property
  def q_pad(self) -> int:
    return self.nq * self.q_block

  @property
  def kv_pad(self) -> int:
    return self.nk * self.kv_block

  @property
  def ragged_kv(self) -> bool:
    """Whether the last kv-block reaches past ``kv_len`` (its extra keys are masked)."""
    return self.kv_len % self.kv_block != 0

  @property
  def heads_per_mask_head(self) -> int:
    return self.num_heads // self.mask_heads


def check_inputs(q, k, v, block_mask: BlockMask, *, check_values: bool = True) -> Dims:
  """Validates q/k/v against each other and the mask; returns the static sizes.

  ``check_values=False`` skips the (NumPy) checks of concrete index values.
  """
  if not isinstance(block_mask, BlockMask):
    raise TypeError(f"block_mask: expected a BlockMask, got {type(block_mask).__name__}; build "
                    "one with pallas_kernels.attention.causal_mask and friends")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name}: expected [batch, seq, heads, head_dim], got shape "
                       f"{getattr(x, 'shape', None)}")
    if not any(x.dtype == d for d in _FLOATS):
      raise TypeError(f"{name}: expected float16/bfloat16/float32 inputs, got {x.dtype}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k, v: dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one")
  b, sq, hq, d = q.shape
  if k.shape != v.shape:
    raise ValueError(f"v: expected the shape of k {k.shape}, got {v.shape}")
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k: expected [batch={b}, kv_len, kv_heads, head_dim={d}], got {k.shape}")
  hk = k.shape[2]
  if hq % hk:
    raise ValueError(f"k: {hk} kv heads must divide the {hq} query heads (grouped-query "
                     "attention)")
  block_mask.validate(batch=b, num_heads=hq, q_len=sq, kv_len=k.shape[1],
                      check_values=check_values)
  return Dims(b, sq, k.shape[1], hq, hk, d, block_mask.q_block, block_mask.kv_block,
              block_mask.batch, block_mask.num_heads)


def pad_axis(x, size: int, axis: int, value=0):
  """Pads ``x`` with ``value`` along ``axis`` up to ``size``."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_mask_data(block_mask: BlockMask, dims: Dims):
  """Mask data padded to whole blocks: (q_data [B', q_pad], kv_data [B', kv_pad]) int32."""
  mm = block_mask.mask_mod
  if mm is None:
    return (), ()
  qd = tuple(pad_axis(x.astype(jnp.int32), dims.q_pad, 1) for x in mm.q_data)
  kd = tuple(pad_axis(x.astype(jnp.int32), dims.kv_pad, 1) for x in mm.kv_data)
  return qd, kd


def allowed_in_block(fn, partial, q_pos, kv_pos, q_data, kv_data, kv_len: int,
                     ragged_kv: bool):
  """Token mask inside one block: ``fn`` for partial blocks, bounds for a ragged kv edge.

  ``partial`` is a Python bool (kernels with separate loops) or a traced bool.
  Returns ``None`` when nothing needs masking (full block, no ragged edge).
  """
  allowed = None
  if ragged_kv:
    allowed = kv_pos < kv_len
  if partial is not False and fn is not None:
    m = fn(q_pos, kv_pos, q_data, kv_data)
    if partial is not True:
      m = m | jnp.logical_not(partial)
    allowed = m if allowed is None else allowed & m
  return allowed


def safe_max(m):
  """Replaces -inf row maxima by 0 so that ``exp(s - m)`` is 0, never NaN."""
  return jnp.where(m == -jnp.inf, 0.0, m)


def compute_dtype(dtype):
  """float64 inputs compute in float64 (tests); everything else in float32."""
  return jnp.float64 if dtype == jnp.float64 else jnp.float32


def mask_rows(arr, dims: Dims):
  """Expands ``[B', H', ...]`` mask arrays to ``[batch, num_heads, ...]`` (a gather)."""
  b_idx = jnp.arange(dims.batch) if dims.mask_batch > 1 else jnp.zeros(dims.batch, jnp.int32)
  h_idx = jnp.arange(dims.num_heads) // dims.heads_per_mask_head
  return arr[b_idx[:, None], h_idx[None, :]]


def check_block_sizes_pow2(dims: Dims, backend: str, minimum: int = 16):
  """Triton and Mosaic GPU tiles: block sizes powers of two, at least ``minimum``."""
  for name, v in (("q_block", dims.q_block), ("kv_block", dims.kv_block)):
    if v < minimum or v & (v - 1):
      raise ValueError(f"block_mask/{name}: the {backend} backend needs a power of two >= "
                       f"{minimum}, got {v}; rebuild the mask with another block size")



def expand_order(order, costs, *, batch: int, replicas: int) -> jax.Array:
  """Expands a longest-first order of mask rows to the kernel's flat work items, without a sort.

  ``costs`` is ``[B', H', n]`` (visited blocks per mask row) and ``order`` its rows
  ``(b * H' + h) * n + i`` by decreasing cost, ties ascending (``BlockMask.q_block_order``).
  Every mask row stands for ``batch // B'`` batch rows and the ``replicas`` kernel heads
  ``h * replicas + r``; the items are ``(b * H' * replicas + head) * n + i`` over ``[batch,
  H' * replicas, n]``. The result is the stable argsort of the expanded costs by decreasing
  cost: each cost level of ``order`` is laid out batch row by batch row, then mask head by mask
  head, each mask head's rows once per replica head (a scatter of positions computed from the
  level and head boundaries of ``order``).

  >>> costs = jnp.array([[[1, 3], [3, 0]]])          # B'=1, H'=2, n=2
  >>> order = jnp.array([1, 2, 0, 3])                 # rows by decreasing cost, ties ascending
  >>> expand_order(order, costs, batch=1, replicas=2).tolist()  # 4 heads: h // 2 is the row's
  [1, 3, 4, 6, 0, 2, 5, 7]
  """
  mb, hm, n = costs.shape
  rows = mb * hm * n
  rb = batch // mb                                   # batch rows per mask batch row
  order = order.astype(jnp.int32)
  sc = costs.reshape(-1)[order]
  group = order // n                                 # b' * H' + h'
  pos = jnp.arange(rows, dtype=jnp.int32)
  level_change = jnp.concatenate([jnp.array([True]), sc[1:] != sc[:-1]])
  group_change = level_change | jnp.concatenate([jnp.array([True]), group[1:] != group[:-1]])

  def start(change):  # first position of each position's run
    return jax.lax.cummax(jnp.where(change, pos, 0))

  def end(change):    # one past the last position of each position's run
    last = jnp.concatenate([change[1:], jnp.array([True])])
    return jax.lax.cummin(jnp.where(last, pos + 1, rows), reverse=True)

  level_start, level_size = start(level_change), end(level_change) - start(level_change)
  group_start, group_size = start(group_change), end(group_change) - start(group_change)
  b_rep = jnp.arange(rb, dtype=jnp.int32)[None, :, None]
  head = jnp.arange(replicas, dtype=jnp.int32)[None, None, :]
  col = lambda x: x[:, None, None]
  dest = (col(level_start) * rb * replicas + b_rep * col(level_size) * replicas
          + col(group_start - level_start) * replicas + head * col(group_size)
          + col(pos - group_start))
  bm, h, i = order // (hm * n), (order // n) % hm, order % n
  b = col(bm) + b_rep if mb > 1 else b_rep
  item = (b * (hm * replicas) + col(h) * replicas + head) * n + col(i)
  out = jnp.zeros(rows * rb * replicas, jnp.int32)
  return out.at[dest.reshape(-1)].set(item.reshape(-1), unique_indices=True)


def q_block_items(block_mask: BlockMask, dims: Dims) -> jax.Array:
  """Forward / dQ work items ``(b * num_heads + h) * nq + i``, most visited kv-blocks first.

  Ties keep ascending item order. Expands the mask's precomputed ``q_block_order``
  (:func:`expand_order`), so no sort runs per call, under ``jit`` too.

  >>> from pallas_kernels.attention import causal_mask
  >>> m = causal_mask(8, q_block=4)                  # q-block 1 visits 2 kv-blocks, q-block 0 one
  >>> q_block_items(m, Dims(2, 8, 8, 1, 1, 16, 4, 4, 1, 1)).tolist()
  [1, 3, 0, 2]
  """
  costs = block_mask.full_kv_counts + block_mask.partial_kv_counts
  return expand_order(block_mask.q_block_order, costs, batch=dims.batch,
                      replicas=dims.heads_per_mask_head)


def kv_block_items(block_mask: BlockMask, dims: Dims) -> jax.Array:
  """dK/dV work items ``(b * num_kv_heads + hk) * nk + j``, most visiting q-blocks first.

  An item's cost is the q-blocks that visit kv-block ``j`` summed over the query heads of kv
  head ``hk``'s GQA group; ties keep ascending item order. When every group lies inside one
  mask head (``heads_per_mask_head`` a multiple of the group size) the item costs are the
  group size times the mask rows' costs, and the mask's precomputed ``kv_block_order`` is
  expanded without a sort. When a group spans several mask heads its cost is a sum over mask
  rows whose order the mask does not hold: then this sorts the item costs on every call.

  >>> from pallas_kernels.attention import causal_mask
  >>> m = causal_mask(8, q_block=4)                  # kv-block 0 is visited by 2 q-blocks
  >>> kv_block_items(m, Dims(1, 8, 8, 2, 1, 16, 4, 4, 1, 1)).tolist()
  [0, 1]
  """
  g, hpm = dims.group, dims.heads_per_mask_head
  costs = block_mask.full_q_counts + block_mask.partial_q_counts       # [B', H', nk]
  if hpm % g == 0:
    return expand_order(block_mask.kv_block_order, costs, batch=dims.batch, replicas=hpm // g)
  mask_head = (jnp.arange(dims.num_kv_heads)[:, None] * g + jnp.arange(g)[None, :]) // hpm
  group_costs = jnp.sum(costs[:, mask_head], axis=2)                  # [B', Hk, nk]
  group_costs = jnp.broadcast_to(group_costs, (dims.batch,) + group_costs.shape[1:])
  return jnp.argsort(-group_costs.reshape(-1), stable=True).astype(jnp.int32)
