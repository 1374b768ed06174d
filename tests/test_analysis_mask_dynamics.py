"""sparsejax.analysis.mask_dynamics against hand-computed cases and numpy set algebra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsejax import analysis


def _tree(w, v):
  return {"dense": {"kernel": jnp.asarray(w, bool), "bias": None}, "out": jnp.asarray(v, bool)}


A = _tree([[1, 1], [0, 0]], [1, 0, 0])
B = _tree([[1, 0], [1, 0]], [1, 1, 0])


def test_hand_computed():
  # kernel: differ at (0,1),(1,0); out: differ at 1 -> 3.
  assert int(analysis.hamming_distance(A, B)) == 3
  # intersection: (0,0), out[0] = 2; union: (0,0),(0,1),(1,0), out[0], out[1] = 5.
  assert float(analysis.mask_iou(A, B)) == pytest.approx(2 / 5)
  # ever active: kernel 3 of 4, out 2 of 3 -> 5 / 7.
  assert float(analysis.itop_rate([A, B])) == pytest.approx(5 / 7)
  assert float(analysis.itop_rate((A,))) == pytest.approx(3 / 7)


def test_regrown_survival_hand_computed():
  before = _tree([[1, 1], [0, 0]], [0, 0, 1])
  after = _tree([[1, 0], [1, 1]], [1, 0, 0])  # grown: (1,0), (1,1), out[0]
  nxt = _tree([[0, 0], [1, 0]], [1, 1, 1])    # survivors: (1,0), out[0]
  assert int(analysis.regrown_count(before, after, nxt)) == 2
  assert float(analysis.regrown_survival(before, after, nxt)) == pytest.approx(2 / 3)
  assert np.isnan(float(analysis.regrown_survival(before, before, nxt)))


def test_ever_active_accumulates_and_jits():
  acc = analysis.ever_active(None, A)
  acc = jax.jit(analysis.ever_active)(acc, B)
  assert acc["dense"]["bias"] is None
  np.testing.assert_array_equal(acc["dense"]["kernel"], [[True, True], [True, False]])
  assert float(analysis.itop_rate([acc])) == pytest.approx(float(analysis.itop_rate([A, B])))
  assert int(jax.jit(analysis.hamming_distance)(A, B)) == 3
  assert float(jax.jit(analysis.mask_iou)(A, A)) == 1.0


def test_empty_masks_iou_is_one():
  z = {"w": jnp.zeros(4, bool)}
  assert float(analysis.mask_iou(z, z)) == 1.0
  assert int(analysis.hamming_distance(z, z)) == 0


def test_errors_name_the_leaf():
  with pytest.raises(ValueError, match="dense/bias"):
    analysis.hamming_distance(A, _tree([[1, 1], [0, 0]], [1, 0, 0]) | {"dense": {"kernel": A["dense"]["kernel"],
                                                                                  "bias": jnp.ones(2, bool)}})
  with pytest.raises(ValueError, match="'out'"):
    analysis.mask_iou(A, {"dense": A["dense"], "out": jnp.ones(4, bool)})
  with pytest.raises(TypeError, match="'out'"):
    analysis.mask_iou(A, {"dense": A["dense"], "out": jnp.ones(3)})
  with pytest.raises(ValueError, match="only in tree 1"):
    analysis.hamming_distance(A, {"dense": A["dense"]})
  with pytest.raises(ValueError, match="non-empty"):
    analysis.itop_rate([])


@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=3, max_size=3))
def test_invariants_match_numpy_sets(rows):
  a, b, c = (np.array(r) for r in rows)
  ta, tb, tc = ({"w": jnp.asarray(x)} for x in (a, b, c))
  ham = int(analysis.hamming_distance(ta, tb))
  assert ham == int(np.sum(a ^ b)) == int(analysis.hamming_distance(tb, ta))
  iou = float(analysis.mask_iou(ta, tb))
  union = np.sum(a | b)
  assert iou == pytest.approx(np.sum(a & b) / union if union else 1.0)
  # Hamming = |a|b| - |a&b|.
  assert ham == int(union - np.sum(a & b))
  # ITOP is monotone in the history and bounded by 1.
  r2, r3 = float(analysis.itop_rate([ta, tb])), float(analysis.itop_rate([ta, tb, tc]))
  assert float(analysis.itop_rate([ta])) <= r2 <= r3 <= 1.0
  assert r3 == pytest.approx(np.mean(a | b | c))
  grown = ~a & b
  s = float(analysis.regrown_survival(ta, tb, tc))
  if grown.any():
    assert s == pytest.approx(np.sum(grown & c) / np.sum(grown))
  else:
    assert np.isnan(s)
