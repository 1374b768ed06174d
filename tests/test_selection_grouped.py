"""Grouped selection: leaves of one signature share one compiled pass (sparsejax.core.selection).

Trees with repeated leaf shapes (as in every transformer) are selected by loops over
same-shape groups; the masks must equal the concatenated reference (global top-k) and a
per-leaf NumPy reference (leafwise top-k), ties to the lower flat index, including
eligibility masks, lazy scores and leaves large enough to be visited in slabs.
"""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.core import pruning
from sparsejax.core.selection import LazyScores, global_topk_masks, leafwise_topk_masks

from test_selection import ref_global


def ref_leaf(x, k, eligible=None):
  """Stable descending sort (NaN lowest) of one leaf, first k eligible kept."""
  return ref_global([x], k, None if eligible is None else [eligible])[0]


values = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, -1.0, np.inf, np.nan]),
                   st.floats(-3, 3, width=32, allow_subnormal=False))  # XLA:CPU flushes subnormals


@st.composite
def repeated_trees(draw):
  """Up to 6 leaves drawn from at most 2 shapes, some with eligibility masks."""
  shapes = draw(st.lists(hnp.array_shapes(min_dims=1, max_dims=2, max_side=5), min_size=1,
                         max_size=2))
  n = draw(st.integers(1, 6))
  picks = [draw(st.sampled_from(shapes)) for _ in range(n)]
  leaves = [draw(hnp.arrays(np.float32, s, elements=values)) for s in picks]
  elig = [draw(st.one_of(st.none(), hnp.arrays(np.bool_, s))) for s in picks]
  return leaves, elig


@settings(max_examples=6)  # each tree signature compiles once
@given(repeated_trees(), st.data())
def test_grouped_global_matches_concatenated_reference(tree, data):
  leaves, elig = tree
  n_el = sum(x.size if e is None else int(e.sum()) for x, e in zip(leaves, elig))
  k = data.draw(st.integers(0, n_el))
  for method in ("bisect", "radix"):
    got = global_topk_masks(leaves, k=k, masks=elig, method=method)
    for g, r in zip(got, ref_global(leaves, k, elig)):
      np.testing.assert_array_equal(g, r)


@settings(max_examples=6)
@given(repeated_trees(), st.data())
def test_leafwise_matches_per_leaf_reference(tree, data):
  leaves, elig = tree
  ks = [data.draw(st.integers(0, x.size)) for x in leaves]
  got = leafwise_topk_masks(leaves, ks, masks=elig)
  for g, x, k, e in zip(got, leaves, ks, elig):
    np.testing.assert_array_equal(g, ref_leaf(x, k, e))


def test_leafwise_large_leaves_in_slabs_with_lazy_scores_under_jit():
  # 2**20-entry leaves are visited in slabs; three share one shape (one group).
  rng = np.random.default_rng(0)
  shape = (1024, 1024)
  ws = [rng.integers(-40, 40, size=shape).astype(np.float32) for _ in range(3)]
  other = rng.normal(size=(64, 48)).astype(np.float32)
  ks = [5, 700_000, 1 << 20]
  f = jax.jit(lambda ws, o, ks: leafwise_topk_masks(
      [LazyScores(jnp.abs, w) for w in ws] + [o], list(ks) + [100]))
  got = f(ws, other, ks)
  for g, w, k in zip(got[:3], ws, ks):
    # Reference: |w| descending, ties by flat index (numpy stable argsort).
    order = np.argsort(-np.abs(w).ravel(), kind="stable")[:k]
    ref = np.zeros(w.size, bool)
    ref[order] = True
    np.testing.assert_array_equal(np.asarray(g).ravel(), ref)
  np.testing.assert_array_equal(got[3], ref_leaf(other, 100))


def test_grouped_prune_and_drop_and_grow_equal_one_leaf_at_a_time():
  # The same leaves pruned as one tree (grouped) and one by one (singleton groups).
  rng = np.random.default_rng(1)
  params = {f"b{i}": {"w": rng.integers(-3, 4, size=(12, 10)).astype(np.float32),
                      "v": rng.normal(size=(10, 6)).astype(np.float32)} for i in range(4)}
  sparsity = {f"b{i}": {"w": 0.5 + 0.1 * i, "v": 0.3} for i in range(4)}
  _, masks = pruning.prune(params, None, sparsity)
  for name in params:
    _, one = pruning.prune({"x": params[name]}, None, {"x": sparsity[name]})
    for leaf in ("w", "v"):
      np.testing.assert_array_equal(masks[name][leaf], one["x"][leaf])
      assert int(masks[name][leaf].sum()) == round(params[name][leaf].size * (1 - sparsity[name][leaf]))
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
  got = pruning.drop_and_grow(params, masks, None, jax.tree.map(np.abs, grads), 0.4)
  for name in params:
    one = pruning.drop_and_grow({"x": params[name]}, {"x": masks[name]}, None,
                                {"x": jax.tree.map(np.abs, grads[name])}, 0.4)
    for tree_all, tree_one in zip(got, one):
      for leaf in ("w", "v"):
        np.testing.assert_array_equal(tree_all[name][leaf], tree_one["x"][leaf])


def test_leafwise_errors_name_the_leaf():
  s = {"a": jnp.ones(3), "b": jnp.ones(4)}
  with pytest.raises(ValueError, match="k=5 at 'b'"):
    leafwise_topk_masks(s, {"a": 1, "b": 5})
  with pytest.raises(ValueError, match="k has leaves"):
    leafwise_topk_masks(s, {"a": 1})
  with pytest.raises(TypeError, match="k at 'a' must be an integer"):
    leafwise_topk_masks(s, {"a": 0.5, "b": 1})


def test_leafwise_k_forms_share_one_path():
  # An int, a tree and a vector of counts give the same masks (eager and traced);
  # traced counts are clipped; concrete ones are checked, naming the leaf.
  rng = np.random.default_rng(2)
  s = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}
  ref = {name: ref_leaf(x, 3) for name, x in s.items()}
  sel = jax.jit(leafwise_topk_masks)
  for k in (3, {"a": 3, "b": jnp.int32(3)}, jnp.array([3, 3])):
    for got in (leafwise_topk_masks(s, k), sel(s, k)):
      for name in s:
        np.testing.assert_array_equal(got[name], ref[name])
  clipped = sel(s, {"a": 20, "b": -1})  # traced under jit: clipped to [0, size]
  assert np.asarray(clipped["a"]).all() and not np.asarray(clipped["b"]).any()
  with pytest.raises(ValueError, match=r"k=6 at 'b' is outside \[0, 5\]"):
    leafwise_topk_masks(s, 6)
  with pytest.raises(ValueError, match=r"k=-1 at 'a'"):
    leafwise_topk_masks(s, jnp.array([-1, 2]))
  with pytest.raises(ValueError, match=r"k=9 at 'b'"):  # a concrete entry next to a traced one
    jax.jit(lambda ka: leafwise_topk_masks(s, {"a": ka, "b": 9}))(2)
  with pytest.raises(TypeError, match="k must be an integer, got bool"):
    leafwise_topk_masks(s, True)
  with pytest.raises(TypeError, match="k must be integers, got float32"):
    leafwise_topk_masks(s, jnp.array([1.0, 2.0]))
