"""Block masks: constructors against independent NumPy token masks, block classification,
combinators, top-k selection, schedules, the precomputed visit orders and validation errors."""

import functools
import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.attention import (BlockMask, and_masks, block_attention_targets,
                                      block_mask_from_blocks, causal_mask, document_mask,
                                      full_mask, index_lists, mask_from_fn, or_masks,
                                      pooled_block_scores, prefix_lm_mask,
                                      segment_ids_from_lengths, sliding_window_mask,
                                      topk_block_mask)
from pallas_kernels.attention import kernel_mosaic_gpu as mosaic_gpu
from pallas_kernels.attention._common import Dims, kv_block_items, q_block_items


def _positions(q_len, kv_len):
  return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def _expected_states(tok, q_block, kv_block):
  """Block states from a token mask [.., Sq, Sk] by definition (padding = out of bounds)."""
  sq, sk = tok.shape[-2:]
  nq, nk = -(-sq // q_block), -(-sk // kv_block)
  out = np.zeros(tok.shape[:-2] + (nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      t = tok[..., i * q_block:(i + 1) * q_block, j * kv_block:(j + 1) * kv_block]
      out[..., i, j] = np.where(t.all(axis=(-1, -2)), 2, np.where(t.any(axis=(-1, -2)), 1, 0))
  return out


def _check(mask: BlockMask, tok):
  """Token mask and block states of ``mask`` equal the NumPy definition ``tok`` [B', Sq, Sk]."""
  mask.validate()
  dense = np.asarray(mask.to_dense())
  np.testing.assert_array_equal(dense[:, 0], tok)
  np.testing.assert_array_equal(np.asarray(mask.block_states())[:, 0],
                                _expected_states(tok, mask.q_block, mask.kv_block))


@pytest.mark.parametrize("q_len,kv_len,q_offset", [(64, 64, 0), (40, 56, 16), (48, 36, -5)])
def test_causal_matches_definition(q_len, kv_len, q_offset):
  q, k = _positions(q_len, kv_len)
  m = causal_mask(q_len, kv_len, q_block=16, kv_block=8, q_offset=q_offset)
  _check(m, (q + q_offset >= k)[None])


@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window_matches_definition(causal):
  q, k = _positions(50, 50)
  d = q - k
  tok = ((d >= 0) & (d < 12)) if causal else (np.abs(d) < 12)
  _check(sliding_window_mask(50, window=12, causal=causal, q_block=8), tok[None])


def test_document_mask_per_batch_with_padding_and_causal():
  seg = np.array([[0] * 10 + [1] * 25 + [2] * 5, [0] * 33 + [-1] * 7])
  m = document_mask(jnp.asarray(seg), causal=True, q_block=8)
  q, k = _positions(40, 40)
  tok = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] >= 0) & (q >= k)[None]
  _check(m, tok)
  assert m.batch == 2
  # Padding rows (segment -1) attend to nothing.
  assert not np.asarray(m.to_dense())[1, 0, 33:].any()


def test_document_mask_cross_attention_lengths():
  q_seg = np.array([0] * 20 + [1] * 12)
  kv_seg = np.array([0] * 9 + [1] * 15)
  m = document_mask(jnp.asarray(q_seg), jnp.asarray(kv_seg), q_block=16, kv_block=8)
  _check(m, (q_seg[:, None] == kv_seg[None, :])[None])


def test_segment_ids_from_lengths():
  np.testing.assert_array_equal(segment_ids_from_lengths(jnp.array([3, 1, 2]), 8),
                                [0, 0, 0, 1, 2, 2, -1, -1])


def test_prefix_lm_traced_per_batch_prefix_one_trace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def build(prefix):
    return prefix_lm_mask(48, prefix_len=prefix, q_block=16).to_dense()

  q, k = _positions(48, 48)
  for prefix in (np.array([5, 30]), np.array([17, 0])):
    tok = (k < prefix[:, None, None]) | (q >= k)[None]
    np.testing.assert_array_equal(np.asarray(build(jnp.asarray(prefix)))[:, 0], tok)


def test_mask_from_fn_and_blocks_and_full():
  q, k = _positions(30, 44)
  fn = lambda qi, ki: (qi * 3 + ki * 5) % 7 < 3
  _check(mask_from_fn(fn, 30, 44, q_block=8, kv_block=16), fn(q, k)[None])
  blocks = np.array([[True, False, True], [False, False, False]])
  m = block_mask_from_blocks(jnp.asarray(blocks), q_len=16, kv_len=20, q_block=8)
  tok = np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:16, :20]
  _check(m, tok[None])
  assert int(m.partial_kv_counts.sum()) == 0  # block-level masks have no partial blocks
  assert float(full_mask(16, 20, q_block=8).density()) == 1.0


@settings(max_examples=8)
@given(table=hnp.arrays(bool, (21, 27)), q_block=st.sampled_from([4, 8, 16]),
       kv_block=st.sampled_from([4, 8, 16]))
def test_classification_property(table, q_block, kv_block):
  """Any token mask: full blocks are all-true, empty all-false, to_dense is exact."""
  t = jnp.asarray(table)
  m = mask_from_fn(lambda qi, ki: t[qi, ki], 21, 27, q_block=q_block, kv_block=kv_block)
  _check(m, table[None])


def test_lists_sorted_padded_and_schedule_full_first():
  c, i = index_lists(jnp.array([[False, True, False, True, False]]))
  assert c.tolist() == [2] and i.tolist() == [[1, 3, 3, 3, 3]]
  m = causal_mask(64, q_block=16)
  idx, kinds, counts = m.kv_schedule()
  # q-block 2: full blocks 0, 1 then the partial diagonal block 2; padding repeats it.
  assert idx[0, 0, 2].tolist() == [0, 1, 2, 2]
  assert kinds[0, 0, 2].tolist() == [2, 2, 1, 0]
  assert counts[0, 0].tolist() == [1, 2, 3, 4]
  tidx, tkinds, tcounts = m.q_schedule()
  assert tidx[0, 0, 1].tolist() == [2, 3, 1, 1] and tkinds[0, 0, 1].tolist() == [2, 2, 1, 0]
  assert tcounts[0, 0].tolist() == [4, 3, 2, 1]


def test_from_kv_lists_roundtrip():
  m = sliding_window_mask(64, window=20, q_block=16)
  r = BlockMask.from_kv_lists(m.full_kv_counts, m.full_kv_indices, m.partial_kv_counts,
                              m.partial_kv_indices, q_len=64, kv_len=64, q_block=16,
                              kv_block=16, mask_mod=m.mask_mod)
  for name in ("full_q_counts", "full_q_indices", "partial_q_counts", "partial_q_indices"):
    np.testing.assert_array_equal(getattr(r, name), getattr(m, name))


def test_and_or_match_numpy():
  q, k = _positions(48, 48)
  seg = np.array([[0] * 20 + [1] * 28, [0] * 40 + [1] * 8])
  doc = (seg[:, :, None] == seg[:, None, :])
  causal, window = q >= k, (q - k >= 0) & (q - k < 10)
  sink = k < 4
  a = and_masks(causal_mask(48, q_block=8), document_mask(jnp.asarray(seg), q_block=8))
  _check(a, doc & causal[None])
  o = or_masks(sliding_window_mask(48, window=10, q_block=8), mask_from_fn(lambda x, y: y < 4, 48,
                                                                           q_block=8))
  _check(o, (window | sink)[None])
  # Unions and intersections nest (token functions stay exact).
  n = and_masks(o, document_mask(jnp.asarray(seg), q_block=8))
  _check(n, (window | sink)[None] & doc)


def test_and_with_block_level_mask_and_head_broadcast():
  rng = np.random.default_rng(0)
  blocks = rng.random((4, 6, 6)) < 0.5          # H' = 4
  blk = block_mask_from_blocks(jnp.asarray(blocks), q_len=48, q_block=8)
  m = and_masks(causal_mask(48, q_block=8), blk)
  assert m.num_heads == 4 and not m.mask_mod.exact
  q, k = _positions(48, 48)
  tok = np.repeat(np.repeat(blocks, 8, 1), 8, 2) & (q >= k)[None]
  np.testing.assert_array_equal(np.asarray(m.to_dense())[0], tok)
  m.validate(num_heads=8)
  with pytest.raises(ValueError, match="inexact"):
    or_masks(m, causal_mask(48, q_block=8))
  with pytest.raises(ValueError, match="cannot mix"):
    or_masks(blk, causal_mask(48, q_block=8))
  with pytest.raises(ValueError, match="mask 1 has"):
    and_masks(causal_mask(48, q_block=8), causal_mask(48, q_block=16))


def test_topk_selection_matches_numpy_and_traces_once():
  rng = np.random.default_rng(1)
  base = causal_mask(64, q_block=8)
  allowed = np.asarray(base.block_states())[0, 0] > 0

  @jax.jit
  @chex.assert_max_traces(n=1)
  def select(scores):
    return topk_block_mask(scores, 3, q_len=64, q_block=8, base=base).block_states()

  for _ in range(2):
    scores = rng.standard_normal((2, 8, 8)).astype(np.float32)
    got = np.asarray(select(jnp.asarray(scores)))[0]
    for h in range(2):
      for i in range(8):
        cand = np.flatnonzero(allowed[i])
        top = cand[np.argsort(-scores[h, i, cand])[:3]]
        np.testing.assert_array_equal(np.flatnonzero(got[h, i]), np.sort(top))
        # The diagonal stays partial (causal inside), earlier blocks full.
        assert all(got[h, i, j] == (1 if j == i else 2) for j in top)


def test_pooled_scores_and_targets_match_numpy():
  rng = np.random.default_rng(2)
  q = rng.standard_normal((1, 20, 4, 8)).astype(np.float32)
  k = rng.standard_normal((1, 24, 2, 8)).astype(np.float32)
  s = np.asarray(pooled_block_scores(jnp.asarray(q), jnp.asarray(k), q_block=8))
  qp = np.stack([q[0, i:i + 8].mean(0) for i in (0, 8, 16)])       # [3, H, D] (last block: 4 rows)
  kp = np.stack([k[0, i:i + 8].mean(0) for i in (0, 8, 16)])
  kp = np.repeat(kp, 2, axis=1)
  np.testing.assert_allclose(s[0], np.einsum("ihd,jhd->hij", qp, kp) / np.sqrt(8), rtol=1e-5,
                             atol=1e-5)
  t = np.asarray(block_attention_targets(jnp.asarray(q), jnp.asarray(k), q_block=8))
  kr = np.repeat(k, 2, axis=2)
  logits = np.einsum("qhd,khd->hqk", q[0], kr[0]) / np.sqrt(8)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  pooled = np.zeros((4, 3, 3))
  for i, qs in enumerate((0, 8, 16)):
    for j, ks in enumerate((0, 8, 16)):
      pooled[:, i, j] = p[:, qs:qs + 8, ks:ks + 8].max(axis=(1, 2))
  np.testing.assert_allclose(t[0], pooled / pooled.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)


def _replace(m, **kw):
  import dataclasses
  return dataclasses.replace(m, **kw)


@pytest.mark.parametrize("edit,match", [
    (lambda m: _replace(m, full_kv_counts=m.full_kv_counts.astype(jnp.float32)), "int32"),
    (lambda m: _replace(m, full_kv_indices=m.full_kv_indices[..., :2]), "expected shape"),
    (lambda m: _replace(m, full_kv_counts=m.full_kv_counts.at[0, 0, 0].set(9)), "counts"),
    (lambda m: _replace(m, full_kv_indices=m.full_kv_indices.at[0, 0, 3, 0].set(7)),
     "block ids"),
    (lambda m: _replace(m, full_kv_indices=m.full_kv_indices.at[0, 0, 3, :2].set(
        jnp.array([1, 0]))), "strictly increasing"),
    (lambda m: _replace(m, partial_kv_indices=m.partial_kv_indices.at[0, 0, 3, 0].set(0)),
     "both as full"),
    (lambda m: _replace(m, full_q_counts=m.full_q_counts.at[0, 0, 0].set(1)), "transposed"),
    (lambda m: _replace(m, q_block_order=jnp.arange(4, dtype=jnp.int32)), "longest-first"),
    (lambda m: _replace(m, kv_block_order=m.kv_block_order[:2]), "expected shape"),
])
def test_validation_names_the_field(edit, match):
  m = causal_mask(64, q_block=16)
  with pytest.raises((ValueError, TypeError), match=match) as info:
    edit(m).validate()
  assert "block_mask/" in str(info.value)


def test_validation_against_problem_sizes():
  m = document_mask(jnp.zeros((2, 32), jnp.int32), q_block=16)
  with pytest.raises(ValueError, match="block_mask/q_len"):
    m.validate(q_len=48)
  with pytest.raises(ValueError, match="mask batch 2 must be 1 or the batch size 3"):
    m.validate(batch=3)
  h3 = block_mask_from_blocks(jnp.ones((3, 2, 2), bool), q_len=32, q_block=16)
  with pytest.raises(ValueError, match="3 mask heads do not divide the 4"):
    h3.validate(num_heads=4)
  with pytest.raises(ValueError, match="q_block"):
    causal_mask(32, q_block=0)
  with pytest.raises(ValueError, match="window"):
    sliding_window_mask(32, window=0, q_block=16)
  with pytest.raises(TypeError, match="boolean"):
    block_mask_from_blocks(jnp.ones((2, 2)), q_len=32, q_block=16)
  with pytest.raises(ValueError, match="segment_ids"):
    document_mask(jnp.zeros((2, 2, 2), jnp.int32))


# ------------------------------------------------------- precomputed visit orders
def _check_orders(m: BlockMask):
  """The stored orders are the stable longest-first orders of the mask's counts."""
  for order, fc, pc in ((m.q_block_order, m.full_kv_counts, m.partial_kv_counts),
                        (m.kv_block_order, m.full_q_counts, m.partial_q_counts)):
    total = np.asarray(fc + pc).reshape(-1)
    assert order.dtype == jnp.int32
    np.testing.assert_array_equal(order, np.argsort(-total, kind="stable"))


def test_orders_built_by_every_constructor_and_under_jit():
  seg = jnp.array([[0] * 20 + [1] * 12, [0] * 8 + [1] * 24], jnp.int32)
  base = causal_mask(64, q_block=8)
  scores = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8)), jnp.float32)
  masks = [causal_mask(48, q_block=16), document_mask(seg, q_block=8, causal=True),
           block_mask_from_blocks(jnp.array([[[1, 0], [1, 1]], [[0, 1], [0, 0]]], bool),
                                  q_len=32, q_block=16),
           jax.jit(lambda s: topk_block_mask(s, 3, q_len=64, q_block=8, base=base))(scores)]
  r = masks[1]
  masks.append(jax.jit(lambda fc, fi, pc, pi: BlockMask.from_kv_lists(
      fc, fi, pc, pi, q_len=32, kv_len=32, q_block=8, kv_block=8, mask_mod=r.mask_mod))(
          r.full_kv_counts, r.full_kv_indices, r.partial_kv_counts, r.partial_kv_indices))
  for m in masks:
    _check_orders(m)
    m.validate()
  leaves, tree = jax.tree_util.tree_flatten(masks[1])
  back = jax.tree_util.tree_unflatten(tree, leaves)
  np.testing.assert_array_equal(back.kv_block_order, masks[1].kv_block_order)
  assert len(leaves) == 10 + 2  # the index arrays, both orders and the two segment-id arrays


def _mosaic_reference_items(m: BlockMask, dims):
  """The Mosaic GPU kernels' former per-call sorts, on the kernels' own cost arrays."""
  # pylint: disable=protected-access
  fwd = mosaic_gpu._work_items(m.full_kv_counts + m.partial_kv_counts, dims)
  n_total = mosaic_gpu._group_schedule(m, dims)[2]
  dkv = mosaic_gpu._longest_first(jnp.broadcast_to(n_total, (dims.batch,) + n_total.shape[1:]))
  return fwd, dkv


# (batch, mask batch, kv heads, group, mask heads, nq, nk): a broadcast mask batch with several
# query heads per mask head, per-example masks, mask heads = kv heads, GQA groups spanning
# mask heads (the dK/dV sort), ragged block counts.
_ORDER_CASES = [(2, 1, 2, 2, 1, 3, 2), (3, 3, 1, 2, 2, 2, 3), (2, 1, 3, 2, 3, 2, 2),
                (1, 1, 2, 3, 3, 3, 1)]


@functools.lru_cache(maxsize=None)
def _order_case(case):
  batch, mb, kv_heads, group, mask_heads, nq, nk = case
  dims = Dims(batch, nq * 8, nk * 8, kv_heads * group, kv_heads, 16, 8, 8, mb, mask_heads)
  build = lambda states: BlockMask.from_states(states, q_len=nq * 8, kv_len=nk * 8, q_block=8,
                                               kv_block=8, mask_mod=causal_mask(8).mask_mod)
  both = jax.jit(lambda s: ((q_block_items(build(s), dims), kv_block_items(build(s), dims)),
                            _mosaic_reference_items(build(s), dims)))
  return (mb, mask_heads, nq, nk), both


@settings(max_examples=12, deadline=None)
@given(data=st.data(), case=st.sampled_from(_ORDER_CASES))
def test_work_items_equal_the_stable_sort_of_expanded_costs(data, case):
  shape, both = _order_case(case)
  # States 0..2 from a small range: many ties between rows of equal cost.
  states = data.draw(hnp.arrays(np.int8, shape, elements=st.integers(0, 2)))
  ours, reference = both(states)
  for got, want in zip(ours, reference):
    np.testing.assert_array_equal(got, want)


def test_work_items_sort_only_when_a_gqa_group_spans_mask_heads():
  m = block_mask_from_blocks(jnp.ones((4, 2, 2), bool), q_len=32, q_block=16)  # H' = 4
  def sorts(f, d):  # a sort primitive anywhere in the traced program (nested jits included)
    return re.search(r"\bsort\[", str(jax.make_jaxpr(lambda x: f(x, d))(m))) is not None

  one_head = Dims(2, 32, 32, 8, 2, 16, 16, 16, 1, 4)   # groups of 4 heads, 2 per mask head
  assert not sorts(q_block_items, one_head) and sorts(kv_block_items, one_head)
  per_group = Dims(2, 32, 32, 8, 4, 16, 16, 16, 1, 4)  # groups of 2 heads = 1 mask head
  assert not sorts(q_block_items, per_group) and not sorts(kv_block_items, per_group)


def test_common_doctests():  # the work-item examples (block_mask's run in 4 s more: not in CI)
  import doctest  # pylint: disable=import-outside-toplevel
  from pallas_kernels.attention import _common  # pylint: disable=import-outside-toplevel
  res = doctest.testmod(_common, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
