"""Schedules against hand-computed vectors and independent float64 formulas."""

import doctest
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparsejax import schedules as sch


@pytest.mark.smoke
@pytest.mark.parametrize("t, want", [(0, 0.0), (100, 0.2439), (200, 0.4392), (500, 0.7875),
                                     (900, 0.8991), (1000, 0.9), (5000, 0.9)])
def test_cubic_vector(t, want):
  # Zhu & Gupta 2017 (gradual pruning) schedule: s_i=0, s_f=0.9, t0=0, n=10, dt=100.
  got = float(sch.polynomial_sparsity(t, 0.9, 0, 1000))
  assert got == pytest.approx(want, abs=1e-4)


@given(t=st.integers(-50, 3000), b=st.integers(0, 500), span=st.integers(0, 2000),
       si=st.floats(0, 0.5), sf=st.floats(0, 0.99), power=st.sampled_from([1, 2, 3]))
def test_polynomial_matches_float64(t, b, span, si, sf, power):
  e = b + span
  if span == 0:
    frac = 1.0 if t >= b else 0.0
  else:
    frac = min(max((t - b) / span, 0.0), 1.0)
  want = sf + (si - sf) * (1 - frac) ** power
  got = float(sch.polynomial_sparsity(t, sf, b, e, si, power))
  assert got == pytest.approx(want, abs=2e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("t, want", [(0, 0.3), (18750, 0.25607), (37500, 0.15), (56250, 0.04393),
                                     (75000, 0.0), (90000, 0.0)])
def test_cosine_drop_vector(t, want):
  assert float(sch.cosine_drop_fraction(t, 0.3, 75000)) == pytest.approx(want, abs=1e-5)


@pytest.mark.smoke
@pytest.mark.parametrize("t, want", [(0, 1.0), (1000, 0.8), (2500, 0.5), (5000, 0.0), (9000, 0.0)])
def test_mdgf_linear_vector(t, want):
  assert float(sch.linear_beta(t, 2e-4)) == pytest.approx(want, abs=1e-6)


@pytest.mark.smoke
@pytest.mark.parametrize("t, want", [(0, 1.0), (1000, 0.90484), (10000, 0.36788), (50000, 0.00674)])
def test_mdgf_exponential_vector(t, want):
  assert float(sch.exponential_beta(t, 1e-4)) == pytest.approx(want, abs=1e-5)


@pytest.mark.smoke
def test_sdgf_vectors():
  assert sch.sdgf_patterns("1:8") == ((7, 8), (4, 8), (2, 8), (1, 8))
  assert sch.sdgf_patterns("1:16") == ((15, 16), (8, 16), (4, 16), (2, 16), (1, 16))
  assert sch.sdgf_patterns("1:8", "geometric") == ((8, 64), (4, 32), (2, 16), (1, 8))
  assert sch.sdgf_patterns("1:8", "densify") == ((1, 64), (1, 32), (1, 16), (1, 8))
  got = sch.sdgf_schedule("1:8", total_steps=100, dense_steps=10, finetune_steps=10)
  assert [k for k, _ in got] == [10, 30, 50, 70]
  assert [p for _, p in got] == [(7, 8), (4, 8), (2, 8), (1, 8)]
  custom = sch.sdgf_schedule("1:8", "custom", total_steps=100, custom={0: "4:8", 60: (1, 8)})
  assert custom == ((0, (4, 8)), (60, (1, 8)))


@given(total=st.integers(20, 5000), dense=st.integers(0, 200), ft=st.integers(0, 200),
       f=st.integers(1, 6))
def test_sdgf_starts_match_python_reference(total, dense, ft, f):
  if total - dense - ft <= 0:
    with pytest.raises(ValueError, match="total_steps"):
      sch.sdgf_starts(f, total_steps=total, dense_steps=dense, finetune_steps=ft)
    return
  got = sch.sdgf_starts(f, total_steps=total, dense_steps=dense, finetune_steps=ft).tolist()
  want = [dense + (i * (total - dense - ft)) // f for i in range(f)]
  assert got == want
  assert got[0] == dense and got[-1] < total - ft


def test_sdgf_index_and_periodic():
  starts = (10, 30, 50, 70)
  want = [0] * 30 + [1] * 20 + [2] * 20 + [3] * 30
  assert [int(sch.sdgf_index(t, starts)) for t in range(100)] == want
  on = [t for t in range(40) if bool(sch.periodic(t, 7, 3, 30))]
  assert on == [3, 10, 17, 24, 30]
  on = [t for t in range(40) if bool(sch.periodic(t, 5))]
  assert on == list(range(0, 40, 5))
  one = [float(sch.one_shot_sparsity(t, 0.5, 3)) for t in range(6)]
  assert one == [0, 0, 0, 0.5, 0.5, 0.5]


def test_traced_arguments_one_trace():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(t, s, b, e, every, a, rate):
    return (sch.polynomial_sparsity(t, s, b, e), sch.periodic(t, every, b, e),
            sch.cosine_drop_fraction(t, a, e), sch.linear_beta(t, rate),
            sch.exponential_beta(t, rate),
            sch.sdgf_starts(4, total_steps=e, dense_steps=b, finetune_steps=0))
  for t in range(0, 1200, 100):
    out = f(t, 0.9, 0, 1000, 100, 0.3, 2e-4)
    assert float(out[0]) == pytest.approx(0.9 * (1 - (1 - min(t, 1000) / 1000) ** 3), abs=1e-5)
    assert bool(out[1]) == (t <= 1000)
    assert float(out[2]) == pytest.approx(0.15 * (1 + math.cos(math.pi * min(t, 1000) / 1000)),
                                          abs=1e-5)
  assert out[5].tolist() == [0, 250, 500, 750]


@pytest.mark.smoke
def test_bad_inputs():
  with pytest.raises(ValueError, match="final_sparsity"):
    sch.polynomial_sparsity(0, 1.5, 0, 10)
  with pytest.raises(ValueError, match="end_step"):
    sch.polynomial_sparsity(0, 0.5, 10, 5)
  with pytest.raises(ValueError, match="update frequency"):
    sch.periodic(0, 0)
  with pytest.raises(ValueError, match="end_step"):
    sch.cosine_drop_fraction(0, 0.3, 0)
  with pytest.raises(ValueError, match="power of two"):
    sch.sdgf_patterns("3:8")
  with pytest.raises(ValueError, match="unknown SDGF kind"):
    sch.sdgf_patterns("1:8", "zigzag")
  with pytest.raises(ValueError, match="1 <= N <= M"):
    sch.parse_nm("5:4")
  with pytest.raises(ValueError, match="'2:4'"):
    sch.parse_nm("2-4")
  with pytest.raises(ValueError, match="after the dense warm-up"):
    sch.sdgf_schedule("1:8", "custom", total_steps=100, dense_steps=10, custom={20: "1:8"})


def test_parse_nm_forms():
  from sparsejax.core.patterns import NM
  assert sch.parse_nm("1:8") == sch.parse_nm((1, 8)) == sch.parse_nm(NM(1, 8)) == (1, 8)
  assert np.int64(3) and sch.parse_nm([np.int64(2), np.int64(4)]) == (2, 4)
  assert isinstance(sch.linear_beta(jnp.int32(3), 0.1), jax.Array)


def test_doctests():
  res = doctest.testmod(sch, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 5 and res.failed == 0
