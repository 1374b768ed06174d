"""Flax NNX multi-head attention on the block-sparse flash attention op.

:class:`BlockSparseMultiHeadAttention` projects inputs to queries, keys and
values (grouped-query attention when ``num_kv_heads < num_heads``), runs
``pallas_kernels.attention.block_sparse_attention`` with a block mask, and
projects back. The mask comes from a static :class:`MaskSpec` given at
construction (built for the call's lengths and segment ids) or from a
:class:`BlockMask` passed to the call.

With ``topk_blocks=k`` the layer also keeps, per q-block, only the ``k`` kv-blocks
a learned gate scores highest (SeerAttention-style): the gate projects pooled
queries and keys; train it with :meth:`gate_distillation_loss`, since top-k
selection passes no gradient to it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.attention import (BlockMask, MaskSpec, block_attention_targets,
                                      block_sparse_attention, pool_blocks, topk_block_mask)

__all__ = ["BlockSparseMultiHeadAttention", "MaskSpec"]


class BlockSparseMultiHeadAttention(nnx.Module):
  """Multi-head (and grouped-query) attention with block-sparse masks.

  Args:
    num_heads: number of query heads.
    in_features: input feature size.
    num_kv_heads: key/value heads (default ``num_heads``); must divide ``num_heads``.
    head_dim: per-head size (default ``in_features // num_heads``).
    out_features: output size (default ``in_features``).
    mask: a :class:`MaskSpec` (default causal with 128-token blocks), or ``None`` for
      the spec ``MaskSpec("full")``.
    topk_blocks: keep only this many kv-blocks per q-block, chosen by a learned gate.
    gate_dim: size of the gate's projections of pooled queries and keys.
    use_bias: biases in the projections.
    dtype: computation dtype of the projections and attention (e.g. ``jnp.bfloat16``).
    param_dtype: parameter dtype.
    kernel_init: initializer of the projection kernels.
    backend: attention backend (``None``: by platform); ``interpret`` for the interpreter.
    interpret: run the backend's kernels in the Pallas interpreter.
    rngs: ``nnx.Rngs``.

  >>> layer = BlockSparseMultiHeadAttention(4, 32, num_kv_heads=2,
  ...                                       mask=MaskSpec("causal", q_block=16),
  ...                                       rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((2, 48, 32))).shape
  (2, 48, 32)
  """

  def __init__(self, num_heads: int, in_features: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, out_features: int | None = None,
               mask: MaskSpec | None = MaskSpec("causal"), topk_blocks: int | None = None,
               gate_dim: int = 64, use_bias: bool = False, dtype: Any | None = None,
               param_dtype: Any = jnp.float32,
               kernel_init: Any = nnx.initializers.lecun_normal(),
               backend: str | None = None, interpret: bool = False, rngs: nnx.Rngs):
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads: {num_kv_heads} must divide num_heads={num_heads}")
    head_dim = in_features // num_heads if head_dim is None else head_dim
    if head_dim < 1:
      raise ValueError(f"head_dim: got {head_dim}; pass head_dim= when in_features < num_heads")
    mask = MaskSpec("full") if mask is None else mask
    if not isinstance(mask, MaskSpec):
      raise TypeError(f"mask: expected a MaskSpec (a BlockMask goes to __call__), got "
                      f"{type(mask).__name__}")
    if topk_blocks is not None and (not isinstance(topk_blocks, int) or topk_blocks < 1):
      raise ValueError(f"topk_blocks: expected a positive int, got {topk_blocks!r}")
    self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
    self.mask_spec, self.topk_blocks = mask, topk_blocks
    self.dtype, self.backend, self.interpret = dtype, backend, interpret
    out_features = in_features if out_features is None else out_features
    lin = lambda i, o: nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                  kernel_init=kernel_init, rngs=rngs)
    self.query = lin(in_features, num_heads * head_dim)
    self.key = lin(in_features, num_kv_heads * head_dim)
    self.value = lin(in_features, num_kv_heads * head_dim)
    self.out = lin(num_heads * head_dim, out_features)
    if topk_blocks is not None:
      self.gate_q = lin(head_dim, gate_dim)
      self.gate_k = lin(head_dim, gate_dim)

  def _qkv(self, x, context):
    b, sq = x.shape[:2]
    sk = context.shape[1]
    q = self.query(x).reshape(b, sq, self.num_heads, self.head_dim)
    k = self.key(context).reshape(b, sk, self.num_kv_heads, self.head_dim)
    v = self.value(context).reshape(b, sk, self.num_kv_heads, self.head_dim)
    return q, k, v

  def _base_mask(self, q_len, kv_len, block_mask, segment_ids, kv_segment_ids, prefix_len):
    if block_mask is not None:
      if not isinstance(block_mask, BlockMask):
        raise TypeError(f"block_mask: expected a BlockMask, got {type(block_mask).__name__}")
      return block_mask
    return self.mask_spec.build(q_len, kv_len, segment_ids=segment_ids,
                                kv_segment_ids=kv_segment_ids, prefix_len=prefix_len)

  def gate_scores(self, q: jax.Array, k: jax.Array, base: BlockMask) -> jax.Array:
    """Learned block scores ``[batch, heads, nq, nk]`` from pooled queries and keys."""
    qp = self.gate_q(pool_blocks(q, base.q_block).astype(q.dtype))      # [B, H, nq, G]
    kp = self.gate_k(pool_blocks(k, base.kv_block).astype(k.dtype))     # [B, Hk, nk, G]
    kp = jnp.repeat(kp, self.num_heads // self.num_kv_heads, axis=1)
    scores = jnp.einsum("bhig,bhjg->bhij", qp.astype(jnp.float32), kp.astype(jnp.float32))
    return scores * qp.shape[-1] ** -0.5

  def __call__(self, x: jax.Array, context: jax.Array | None = None, *,
               block_mask: BlockMask | None = None, segment_ids=None, kv_segment_ids=None,
               prefix_len=None) -> jax.Array:
    """Attends ``x`` ([batch, q_len, in]) to ``context`` (default ``x``).

    Args:
      x: queries' input.
      context: keys' and values' input (cross-attention).
      block_mask: a mask for this call (overrides the spec).
      segment_ids, kv_segment_ids: document ids ``[batch, len]`` for the spec.
      prefix_len: prefix length for a ``"prefix_lm"`` spec.
    """
    context = x if context is None else context
    q, k, v = self._qkv(x, context)
    mask = self._base_mask(q.shape[1], k.shape[1], block_mask, segment_ids, kv_segment_ids,
                           prefix_len)
    if self.topk_blocks is not None:
      scores = jax.lax.stop_gradient(self.gate_scores(q, k, mask))
      mask = topk_block_mask(scores, self.topk_blocks, q_len=mask.q_len, kv_len=mask.kv_len,
                             q_block=mask.q_block, kv_block=mask.kv_block, base=mask)
    y = block_sparse_attention(q, k, v, mask, backend=self.backend, interpret=self.interpret)
    return self.out(y.reshape(y.shape[:2] + (self.num_heads * self.head_dim,)))

  def gate_distillation_loss(self, x: jax.Array, context: jax.Array | None = None, *,
                             block_mask: BlockMask | None = None, segment_ids=None,
                             kv_segment_ids=None, prefix_len=None) -> jax.Array:
    """KL(target || gate) between max-pooled attention and the gate's block softmax.

    The target (``block_attention_targets``) is computed densely per q-block from
    the layer's own queries and keys, with gradients stopped: only the gate learns.
    """
    if self.topk_blocks is None:
      raise ValueError("gate_distillation_loss: the layer has no gate (topk_blocks=None)")
    context = x if context is None else context
    q, k, _ = self._qkv(x, context)
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    base = self._base_mask(q.shape[1], k.shape[1], block_mask, segment_ids, kv_segment_ids,
                           prefix_len)
    target = block_attention_targets(q, k, q_block=base.q_block, kv_block=base.kv_block,
                                     base=base)
    allowed = jnp.repeat(base.block_states() > 0, self.num_heads // base.num_heads, axis=1)
    logits = jnp.where(allowed, self.gate_scores(q, k, base), -1e30)  # finite: empty rows
    logp = jax.nn.log_softmax(logits, axis=-1)
    logp = jnp.where(allowed, logp, 0.0)
    kl = jnp.where(target > 0, target * (jnp.log(jnp.where(target > 0, target, 1.0)) - logp), 0.0)
    return jnp.mean(jnp.sum(kl, axis=-1))
