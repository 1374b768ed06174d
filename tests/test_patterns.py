"""Tests for sparsejax.core.patterns against independent numpy / exact-arithmetic references."""

from fractions import Fraction

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsejax.core.patterns import NM, Block, Channel, Unstructured, block_mask, channel_mask, nm_mask, topk_mask
from sparsejax.core.selection import num_to_keep


def ref_k(size, density, minimum=1):
  d = Fraction(float(np.float32(density)))
  k = int(Fraction(size) * d + Fraction(1, 2))  # floor(x + 1/2): halves round up
  return min(max(k, min(minimum, size)), size)


def ref_order(x):
  """Indices by descending value, NaN last, ties by lower index."""
  x = np.asarray(x, np.float64).ravel()
  return sorted(range(x.size), key=lambda i: (bool(np.isnan(x[i])), 0.0 if np.isnan(x[i]) else -x[i], i))


def ref_topk(x, k):
  out = np.zeros(np.size(x), bool)
  out[ref_order(x)[:k]] = True
  return out.reshape(np.shape(x))


# Few distinct values -> many ties; plus infinities, signed zeros and NaN. No subnormals: XLA's
# CPU backend may flush them to zero (jax >= 0.12), which turns them into ties with 0.
tie_floats = st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, 0.5, np.inf, -np.inf, np.nan])
score_arrays = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=7),
                          elements=st.one_of(tie_floats, st.floats(-5, 5, width=32, allow_subnormal=False)))


@given(score_arrays, st.floats(0.0, 1.0, width=32))
def test_topk_density_exact_count_and_order(x, d):
  m = np.asarray(topk_mask(x, d))
  k = ref_k(x.size, d)
  assert m.sum() == k
  np.testing.assert_array_equal(m, ref_topk(x, k))


@given(score_arrays, st.data())
def test_topk_k_and_determinism(x, data):
  k = data.draw(st.integers(0, x.size))
  m1 = np.asarray(topk_mask(x, k=k))
  m2 = np.asarray(jax.jit(lambda s, kk: topk_mask(s, k=kk))(x, k))
  np.testing.assert_array_equal(m1, ref_topk(x, k))
  np.testing.assert_array_equal(m1, m2)


def test_topk_negative_zero_ties_and_nan_lowest():
  x = np.array([-0.0, 0.0, np.nan, -np.inf, 0.0], np.float32)
  np.testing.assert_array_equal(topk_mask(x, k=2), [True, True, False, False, False])
  np.testing.assert_array_equal(topk_mask(x, k=4), [True, True, False, True, True])


@given(st.integers(1, 2**31 - 1), st.floats(2.0**-8, 1.0, width=32))
def test_num_to_keep_exact(size, d):
  assert int(num_to_keep(size, d)) == ref_k(size, d)
  assert int(jax.jit(lambda dd: num_to_keep(size, dd))(d)) == ref_k(size, d)


@given(st.integers(1, 2**31 - 1), st.floats(0.0, 2.0**-8, width=32))
def test_num_to_keep_small_density_within_one(size, d):
  assert abs(int(num_to_keep(size, d)) - ref_k(size, d)) <= 1


def test_num_to_keep_large_sizes_beat_float32():
  # float32 size * density would be off by several elements here.
  for size, d in [(100_000_007, 0.9), (123_456_789, 0.37), (2**31 - 1, 0.5)]:
    assert int(num_to_keep(size, d)) == ref_k(size, d)


def test_topk_traced_density_single_trace():
  x = np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(s, d):
    return topk_mask(s, d)

  for d in (0.1, 0.5, 0.93, 1.0):
    np.testing.assert_array_equal(f(x, d), ref_topk(x, ref_k(x.size, d)))


def ref_nm(x, n, m, axis):
  x = np.moveaxis(np.asarray(x), axis, -1)
  shp = x.shape
  g = x.reshape(-1, m)
  out = np.zeros(g.shape, bool)
  for r in range(g.shape[0]):
    out[r, ref_order(g[r])[:n]] = True
  return np.moveaxis(out.reshape(shp), -1, axis)


@st.composite
def nm_cases(draw):
  m = draw(st.sampled_from([2, 4, 8, 16, 40]))
  n = draw(st.integers(1, m))
  ndim = draw(st.integers(1, 3))
  axis = draw(st.integers(-ndim, ndim - 1))
  shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
  shape[axis] = m * draw(st.integers(1, 3))
  x = draw(hnp.arrays(np.float32, tuple(shape), elements=st.one_of(tie_floats, st.floats(-3, 3, width=32, allow_subnormal=False))))
  return x, n, m, axis


@given(nm_cases())
def test_nm_mask_validity_and_reference(case):
  x, n, m, axis = case
  mask = np.asarray(nm_mask(x, n, m, axis=axis))
  groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
  assert (groups.sum(-1) == n).all()  # exactly n survivors per group
  np.testing.assert_array_equal(mask, ref_nm(x, n, m, axis))
  # The pattern object agrees and its density is n/m exactly.
  np.testing.assert_array_equal(NM(n, m, axis)(x, n / m), mask)


def test_nm_default_axis_is_reduction_axis_of_dense_and_conv():
  rng = np.random.default_rng(1)
  dense = rng.normal(size=(8, 3)).astype(np.float32)  # (in, out)
  mask = np.asarray(NM(2, 4)(dense))
  assert (mask.reshape(2, 4, 3).sum(1) == 2).all()
  conv = rng.normal(size=(3, 3, 8, 5)).astype(np.float32)  # HWIO
  mask = np.asarray(NM(2, 4)(conv))
  assert (mask.reshape(3, 3, 2, 4, 5).sum(3) == 2).all()


def test_nm_jit_single_trace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(s):
    return nm_mask(s, 2, 4)

  for seed in range(3):
    x = np.random.default_rng(seed).normal(size=(8, 4)).astype(np.float32)
    np.testing.assert_array_equal(f(x), ref_nm(x, 2, 4, -2))


def ref_block(x, d, r, c):
  *lead, R, C = x.shape
  bs = x.astype(np.float64).reshape(*lead, R // r, r, C // c, c).sum(axis=(-3, -1))
  keep = ref_topk(bs, ref_k(bs.size, d))
  return np.broadcast_to(keep[..., :, None, :, None], (*lead, R // r, r, C // c, c)).reshape(x.shape)


@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3), st.booleans(),
       st.floats(0.0, 1.0, width=32), st.integers(0, 10**6))
def test_block_mask_reference(r, c, nr, nc, lead, d, seed):
  shape = ((2,) if lead else ()) + (r * nr, c * nc)
  x = np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.float32)  # integer sums: exact, many ties
  got = np.asarray(block_mask(x, d, (r, c)))
  np.testing.assert_array_equal(got, ref_block(x, d, r, c))
  np.testing.assert_array_equal(Block(r, c)(x, d), got)


def ref_channel(x, d, axis):
  xs = np.moveaxis(x.astype(np.float64), axis, -1)
  cs = xs.reshape(-1, xs.shape[-1]).sum(0)
  keep = ref_topk(cs, ref_k(cs.size, d))
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]
  return np.broadcast_to(keep.reshape(shape), x.shape)


@given(hnp.array_shapes(min_dims=1, max_dims=3, max_side=5), st.data(), st.floats(0.0, 1.0, width=32))
def test_channel_mask_reference(shape, data, d):
  axis = data.draw(st.integers(-len(shape), len(shape) - 1))
  x = data.draw(hnp.arrays(np.float32, shape, elements=st.integers(0, 3).map(float)))
  got = np.asarray(channel_mask(x, d, axis=axis))
  np.testing.assert_array_equal(got, ref_channel(x, d, axis))
  np.testing.assert_array_equal(Channel(axis)(x, d), got)


def test_channel_heads_of_attention_kernel():
  x = np.ones((4, 3, 2), np.float32)
  x[:, 1] *= 5
  m = np.asarray(Channel(axis=1)(x, 1 / 3))
  assert m[:, 1].all() and not m[:, 0].any() and not m[:, 2].any()


def test_unstructured_pattern_and_traced_density_for_structured():
  x = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(s, d):
    return Unstructured()(s, d), Block(2, 3)(jnp.abs(s), d), Channel()(jnp.abs(s), d)

  for d in (0.25, 0.5):
    u, b, c = f(x, d)
    np.testing.assert_array_equal(u, ref_topk(x, ref_k(x.size, d)))
    np.testing.assert_array_equal(b, block_mask(np.abs(x), d, (2, 3)))
    np.testing.assert_array_equal(c, channel_mask(np.abs(x), d))


# ---- bad inputs: error type and the leaf path in the message ----

@pytest.mark.parametrize(
  "call, exc, match",
  [
    (lambda: NM(2, 4).check("enc/kernel", (6, 3)), ValueError, r"NM\(2:4\) at 'enc/kernel'.*size 6, not divisible by m=4"),
    (lambda: NM(2, 4).check("enc/kernel", (8, 3), sparsity=0.75), ValueError,
     r"at 'enc/kernel': requested sparsity 0.75 but 2:4 gives sparsity 0.5"),
    (lambda: NM(2, 4, axis=3).check("enc/kernel", (8, 4)), ValueError, r"at 'enc/kernel': axis 3 out of range"),
    (lambda: NM(2, 4)(np.ones((8, 3)), 0.3, path="dec/kernel"), ValueError, r"at 'dec/kernel': requested sparsity"),
    (lambda: nm_mask(np.ones((5, 4)), 2, 4, path="fc/kernel"), ValueError, r"at 'fc/kernel'.*not divisible"),
    (lambda: Block(4, 4).check("attn/wq", (8, 6)), ValueError, r"Block\(4x4\) at 'attn/wq'.*does not divide"),
    (lambda: Block(2, 2).check("norm/scale", (8,)), ValueError, r"at 'norm/scale': needs rank >= 2"),
    (lambda: block_mask(np.ones((4, 5)), 0.5, (2, 2), path="w"), ValueError, r"at 'w'.*does not divide"),
    (lambda: Channel(axis=2).check("fc/kernel", (3, 4)), ValueError, r"Channel at 'fc/kernel': axis 2 out of range"),
    (lambda: Unstructured().check("fc/kernel", (3, 4), sparsity=1.0), ValueError,
     r"at 'fc/kernel': sparsity 1.0 outside \[0, 1\)"),
    (lambda: Block(2, 2).check("fc/kernel", (4, 4), sparsity=-0.1), ValueError, r"at 'fc/kernel': sparsity -0.1"),
    (lambda: topk_mask(np.ones(4), 1.5, path="fc/kernel"), ValueError, r"at 'fc/kernel': density 1.5 outside"),
    (lambda: topk_mask(np.ones(4), k=7, path="fc/kernel"), ValueError, r"at 'fc/kernel': k=7 outside \[0, 4\]"),
    (lambda: topk_mask(np.ones(4, np.complex64), 0.5, path="fc/kernel"), TypeError, r"at 'fc/kernel': complex"),
    (lambda: topk_mask(np.ones((0, 3)), 0.5, path="fc/kernel"), ValueError, r"at 'fc/kernel': empty array"),
    (lambda: topk_mask(np.ones(4), path="fc/kernel"), ValueError, r"at 'fc/kernel': pass exactly one"),
  ],
)
def test_bad_inputs_name_path(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


def test_nm_traced_sparsity_raises_under_jit():
  with pytest.raises(ValueError, match=r"NM\(2:4\) at 'fc/kernel': a traced sparsity cannot be checked"):
    jax.jit(lambda s, d: NM(2, 4)(s, d, path="fc/kernel"))(np.ones((8, 2), np.float32), 0.5)


@pytest.mark.parametrize("args, exc", [((3, 2), ValueError), ((0, 4), ValueError), ((2.0, 4), TypeError)])
def test_bad_pattern_construction(args, exc):
  with pytest.raises(exc, match="NM"):
    NM(*args)


def test_bad_block_construction():
  with pytest.raises(ValueError, match=r"Block: r must be a positive int"):
    Block(0, 2)
  assert NM(2, 4).fixed_density == 0.5 and Block(2, 2).fixed_density is None
  assert Unstructured().fixed_density is None and Channel().fixed_density is None
  assert jnp.asarray(nm_mask(np.ones((4, 1), jnp.bfloat16), 1, 4)).sum() == 1


def test_vmap_per_row_topk_and_traced_k():
  x = np.random.default_rng(4).integers(0, 4, size=(5, 12)).astype(np.float32)  # many ties
  m = np.asarray(jax.vmap(lambda r, k: topk_mask(r, k=k))(x, jnp.arange(5)))
  for i in range(5):
    np.testing.assert_array_equal(m[i], ref_topk(x[i], i))
  m = np.asarray(jax.vmap(lambda r: nm_mask(r, 1, 4, axis=-1))(x))
  np.testing.assert_array_equal(m, ref_nm(x, 1, 4, -1))
