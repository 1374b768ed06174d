"""BlockSparseMultiHeadAttention (Flax NNX): outputs against a NumPy float64 computation from the
layer's own parameters, mask specs and overrides, GQA, cross-attention, learned top-k gate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from pallas_kernels.attention import MaskSpec, causal_mask, topk_block_mask
from pallas_kernels.attention.testing import numpy_attention, relative_error
from sparsejax.nn.attention import BlockSparseMultiHeadAttention


def _manual(layer, x, context, token_mask):
  """Projections in float64 from the layer's parameters, then the NumPy attention."""
  p = lambda lin, a: np.asarray(a, np.float64) @ np.asarray(lin.kernel[...], np.float64)
  b, sq, _ = x.shape
  sk = context.shape[1]
  q = p(layer.query, x).reshape(b, sq, layer.num_heads, layer.head_dim)
  k = p(layer.key, context).reshape(b, sk, layer.num_kv_heads, layer.head_dim)
  v = p(layer.value, context).reshape(b, sk, layer.num_kv_heads, layer.head_dim)
  out, _ = numpy_attention(q, k, v, token_mask)
  return p(layer.out, out.reshape(b, sq, -1))


def test_spec_masks_gqa_cross_attention_and_override():
  rng = np.random.default_rng(0)
  layer = BlockSparseMultiHeadAttention(4, 32, num_kv_heads=2, head_dim=8,
                                        mask=MaskSpec("causal", q_block=16), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.standard_normal((2, 40, 32)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((2, 24, 32)), jnp.float32)
  q_pos, k_pos = np.arange(40)[:, None], np.arange(40)[None, :]
  assert relative_error(nnx.jit(lambda l, x: l(x))(layer, x),
                        _manual(layer, x, x, (q_pos >= k_pos)[None, None])) < 1e-5
  seg = np.array([[0] * 15 + [1] * 25, [0] * 40])
  tok = (q_pos >= k_pos)[None] & (seg[:, :, None] == seg[:, None, :])
  y = nnx.jit(lambda l, x, s: l(x, segment_ids=s))(layer, x, jnp.asarray(seg))
  assert relative_error(y, _manual(layer, x, x, tok[:, None])) < 1e-5
  # Cross-attention with an explicit block mask (overrides the spec).
  m = causal_mask(40, 24, q_block=16, kv_block=8, q_offset=-16)
  y = nnx.jit(lambda l, x, c, m: l(x, c, block_mask=m))(layer, x, ctx, m)
  assert relative_error(y, _manual(layer, x, ctx, np.asarray(m.to_dense()))) < 1e-5


def test_prefix_lm_and_window_specs_under_nnx_jit():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 32, 16)), jnp.float32)
  q_pos, k_pos = np.arange(32)[:, None], np.arange(32)[None, :]
  pre = BlockSparseMultiHeadAttention(2, 16, mask=MaskSpec("prefix_lm", q_block=16),
                                      rngs=nnx.Rngs(1))
  prefix = np.array([5, 20])
  y = nnx.jit(lambda m, x, p: m(x, prefix_len=p))(pre, x, jnp.asarray(prefix))
  tok = (k_pos < prefix[:, None, None]) | (q_pos >= k_pos)[None]
  assert relative_error(y, _manual(pre, x, x, tok[:, None])) < 1e-5
  win = BlockSparseMultiHeadAttention(2, 16, mask=MaskSpec("sliding_window", q_block=16,
                                                           window=6), rngs=nnx.Rngs(2))
  d = q_pos - k_pos
  y = nnx.jit(lambda l, x: l(x))(win, x)
  assert relative_error(y, _manual(win, x, x, ((d >= 0) & (d < 6))[None, None])) < 1e-5


def test_topk_gate_selects_blocks_and_trains_only_by_distillation():
  rng = np.random.default_rng(2)
  layer = BlockSparseMultiHeadAttention(2, 16, head_dim=8, topk_blocks=2, gate_dim=8,
                                        mask=MaskSpec("causal", q_block=8), rngs=nnx.Rngs(3))
  x = jnp.asarray(rng.standard_normal((1, 48, 16)), jnp.float32)
  # The output equals attention under the top-k mask built from the gate's scores.
  q, k, _ = layer._qkv(x, x)  # pylint: disable=protected-access
  base = causal_mask(48, q_block=8)
  sel = topk_block_mask(layer.gate_scores(q, k, base), 2, q_len=48, q_block=8, base=base)
  assert int(sel.num_visited_blocks()) == 2 * (1 + 5 * 2)   # q-block 0 has one candidate
  y = nnx.jit(lambda l, x: l(x))(layer, x)
  assert relative_error(y, _manual(layer, x, x, np.asarray(sel.to_dense()))) < 1e-5
  # Attention loss gives the gate no gradient; the distillation loss does, and only to it.
  g_attn = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(layer)
  assert not np.any(np.asarray(g_attn["gate_q"]["kernel"][...]))
  g_gate = nnx.jit(nnx.grad(lambda m: m.gate_distillation_loss(x)))(layer)
  assert np.any(np.asarray(g_gate["gate_q"]["kernel"][...]))
  assert not np.any(np.asarray(g_gate["query"]["kernel"][...]))
  opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
  losses = []
  step = nnx.jit(lambda m, o: (lambda l, g: (o.update(m, g), l)[1])(
      *nnx.value_and_grad(lambda m: m.gate_distillation_loss(x))(m)))
  for _ in range(30):
    losses.append(float(step(layer, opt)))
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0]


def test_layer_errors():
  with pytest.raises(ValueError, match="num_kv_heads"):
    BlockSparseMultiHeadAttention(4, 32, num_kv_heads=3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="MaskSpec"):
    BlockSparseMultiHeadAttention(4, 32, mask=causal_mask(16, q_block=16), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="MaskSpec/window"):
    MaskSpec("sliding_window")
  layer = BlockSparseMultiHeadAttention(2, 16, mask=MaskSpec("document", q_block=16),
                                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="segment_ids"):
    layer(jnp.ones((1, 16, 16)))
