"""sparsejax.analysis update sparsity and essential sparsity against hand-computed cases."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import analysis
from sparsejax.core.patterns import nm_mask


def test_unchanged_fraction_exact_tolerance_and_bf16():
  before = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([0.5, 0.5]), "step": jnp.array(3)}
  after = {"w": jnp.array([[1.0, 2.0 + 1e-3], [3.0 + 1e-6, 5.0]]), "b": jnp.array([0.5, 0.25]), "step": jnp.array(4)}
  r = analysis.unchanged_fraction(before, after)
  assert set(r.per_leaf) == {"w", "b"}  # the integer leaf is skipped
  assert float(r.per_leaf["w"]) == 0.25 and float(r.per_leaf["b"]) == 0.5
  assert float(r.total) == pytest.approx(2 / 6)
  assert float(analysis.unchanged_fraction(before, after, atol=1e-5).per_leaf["w"]) == 0.5
  # bf16 has 8 significant bits: 2.001 and 3.000001 round to 2 and 3; 5 != 4.
  assert float(analysis.unchanged_fraction(before, after, dtype=jnp.bfloat16).per_leaf["w"]) == 0.75
  # rtol="eps" in float32: 3 + 1e-6 is within 3 * 2**-23 ... no (1e-6 > 3.6e-7): only exact entries.
  assert float(analysis.unchanged_fraction(before, after, rtol="eps").per_leaf["w"]) == 0.25
  assert float(analysis.unchanged_fraction(before, after, rtol=1e-3).per_leaf["w"]) == 0.75
  sup = analysis.changed_support(before, after, dtype=jnp.bfloat16)
  np.testing.assert_array_equal(sup["w"], [[False, False], [False, True]])


def test_unchanged_fraction_bf16_leaves_and_errors():
  x = jnp.array([1.0, 1.0, 1.0], jnp.bfloat16)
  y = x + jnp.array([2.0 ** -10, 2.0 ** -6, 0.0], jnp.bfloat16)  # the first rounds back to 1
  assert float(analysis.unchanged_fraction({"w": x}, {"w": y}).total) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="only in the first: \\['v'\\]"):
    analysis.unchanged_fraction({"w": x, "v": x}, {"w": x})
  with pytest.raises(ValueError, match="'w' has shape"):
    analysis.unchanged_fraction({"w": x}, {"w": jnp.ones(2)})


def test_update_rank_matches_numpy():
  k = jax.random.split(jax.random.key(0), 3)
  before = {"a": jax.random.normal(k[0], (8, 6)), "conv": jnp.zeros((3, 3, 2, 4)), "bias": jnp.zeros(6)}
  u = jax.random.normal(k[1], (8, 2)) @ jax.random.normal(k[2], (2, 6))
  conv_u = jnp.zeros((3, 3, 2, 4)).at[0, 0, 0].set(1.0)
  after = {"a": before["a"] + u, "conv": conv_u, "bias": jnp.ones(6)}
  r = analysis.update_rank(before, after)
  assert set(r) == {"a", "conv"}
  assert int(r["a"]) == 2 == np.linalg.matrix_rank(np.asarray(u))
  assert int(r["conv"]) == 1
  assert int(analysis.update_rank(before, before)["a"]) == 0


def test_support_overlap_hand_computed():
  a = {"x": jnp.array([True, True, True, False, False, False, False, False]), "y": jnp.array([True, False])}
  b = {"x": jnp.array([True, True, False, False, False, False, False, True]), "y": jnp.array([False, False])}
  r = analysis.support_overlap(a, b)
  # |A| = 4, |B| = 3, |A&B| = 2, N = 10.
  assert float(r.overlap) == pytest.approx(2 / 4)
  assert float(r.chance_overlap) == pytest.approx(3 / 10)
  assert float(r.iou) == pytest.approx(2 / 5)
  e = 4 * 3 / 10
  assert float(r.chance_iou) == pytest.approx(e / (7 - e))


def _eval_sum_abs(p):
  return sum(jnp.sum(jnp.abs(v)) for v in jax.tree.leaves(p))


def test_magnitude_sweep_global_layer_and_batch_modes():
  p = {"a": jnp.array([[1.0, -2.0], [3.0, -4.0]]), "b": jnp.array([[10.0, 20.0]]), "bias": jnp.array([7.0])}
  sp = [0.0, 0.5, 0.75]
  # Global: 6 prunable weights (bias excluded); keep 6, 3 (20, 10, -4), round(1.5)=2 (20, 10).
  expected = [40.0 + 7, 34.0 + 7, 30.0 + 7]
  for batch in ["map", "vmap", "loop"]:
    c = analysis.magnitude_sweep(p, _eval_sum_abs, sp, batch=batch)
    np.testing.assert_allclose(c.metric, expected)
  # Per layer: 'a' keeps 2 (-4, 3) at 0.5, 1 at 0.75; 'b' keeps 1 (20) at both.
  c = analysis.magnitude_sweep(p, _eval_sum_abs, sp, scope="layer")
  np.testing.assert_allclose(c.metric, [47.0, 4 + 3 + 20 + 7, 4 + 20 + 7])
  with pytest.raises(ValueError, match="in \\[0, 1\\)"):
    analysis.magnitude_sweep(p, _eval_sum_abs, [1.0])


def test_nm_sweep_uses_core_nm_mask_and_knee():
  w = jax.random.normal(jax.random.key(0), (16, 4))
  p = {"w": w}
  c = analysis.nm_sweep(p, _eval_sum_abs, [(1, 4), (2, 4), (1, 8)])
  assert c.labels == ("dense", "2:4", "1:4", "1:8")
  np.testing.assert_allclose(c.sparsity, [0.0, 0.5, 0.75, 0.875])
  for (n, m), got in zip([(2, 4), (1, 4), (1, 8)], c.metric[1:]):
    ref = np.abs(np.asarray(w))[np.asarray(nm_mask(jnp.abs(w), n, m, axis=-2))].sum()
    assert got == pytest.approx(ref, rel=1e-6)
  curve = analysis.EssentialCurve(np.array([0.9, 0.0, 0.5, 0.7, 0.8]), np.array([0.2, 0.9, 0.9, 0.89, 0.5]), ())
  assert analysis.knee(curve, 0.02) == 0.7
  assert analysis.knee(curve, 0.0) == 0.5
  loss = curve._replace(metric=-curve.metric)
  assert analysis.knee(loss, 0.02, higher_is_better=False) == 0.7
  # A drop that recovers later does not extend the knee.
  bumpy = analysis.EssentialCurve(np.array([0., .5, .6, .7]), np.array([1., .5, 1., 1.]), ())
  assert analysis.knee(bumpy, 0.1) == 0.0
  with pytest.raises(ValueError, match="reference"):
    analysis.knee(analysis.EssentialCurve(np.array([.5]), np.array([1.]), ()), 0.1)


@pytest.mark.parametrize("name", ["updates", "essential", "mask_dynamics"])
def test_doctests(name):
  res = doctest.testmod(importlib.import_module(f"sparsejax.analysis.{name}"), optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
