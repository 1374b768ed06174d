"""The "xla_cpu" bsr_matmul backend (loops of GEMMs over the stored blocks) against float64.

Value, dx and dW (check_bsr_matmul: masked-dense float64 reference, padding slots get exact
zero gradients) on ragged shapes, empty block rows/columns, group sizes that end inside the next
output block, 16-bit inputs; plus jit with a traced mask, grad, vmap and non-finite locality.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels import bsr_from_dense, bsr_matmul
from pallas_kernels.matmul import xla_cpu
from pallas_kernels.matmul.testing import check_bsr_matmul, dense_reference, random_block_mask, relative_error

CASES = [
    # ragged token count, leading batch dims, empty block rows and columns
    dict(m_shape=(2, 9), k=64, n=96, block=(16, 32), density=0.5, empty_rows=1, empty_cols=1),
    # nothing stored: every output and gradient is an exact zero
    dict(m_shape=(33,), k=128, n=64, block=(32, 16), density=0.0),
    # everything stored, one block column
    dict(m_shape=(16,), k=128, n=32, block=(32, 32), density=1.0),
    # many small blocks: groups of 8 that end inside the next output block, no padding slots
    dict(m_shape=(7,), k=256, n=128, block=(16, 16), density=0.3, empty_rows=3, empty_cols=2, slack=0),
    # one token, tall blocks
    dict(m_shape=(1,), k=64, n=128, block=(64, 8), density=0.6),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['block']}-d{c['density']}")
def test_matches_float64_reference(case):
  check_bsr_matmul("xla_cpu", **case)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype):
  check_bsr_matmul("xla_cpu", m_shape=(24,), k=256, n=64, block=(32, 16), density=0.6, dtype=dtype, seed=3)


def test_accumulates_in_float32():
  # Sums of 512 ones are exact with float32 accumulation; a bfloat16 running sum stalls at 256.
  w = bsr_from_dense(jnp.ones((512, 512), jnp.bfloat16), np.ones((512, 512), bool), (128, 128))
  f = jax.jit(lambda x, b: jax.vjp(lambda x, b: bsr_matmul(x, dataclasses.replace(w, blocks=b), backend="xla_cpu"), x, b))
  y, vjp = f(jnp.ones((512, 512), jnp.bfloat16), w.blocks)
  for a in (y, *vjp(jnp.ones_like(y))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), 512.0)


@settings(max_examples=3, deadline=None)
@given(
    kb=st.integers(1, 5), nb=st.integers(1, 5), br=st.sampled_from([4, 16, 32]), bc=st.sampled_from([8, 16]),
    m=st.integers(1, 12), density=st.floats(0, 1), seed=st.integers(0, 2**16),
)
def test_property_matches_reference(kb, nb, br, bc, m, density, seed):
  check_bsr_matmul("xla_cpu", m_shape=(m,), k=kb * br, n=nb * bc, block=(br, bc), density=density, seed=seed)


def _case(seed=0, k=96, n=64, block=(16, 16), density=0.4, m=5):
  rng = np.random.default_rng(seed)
  mask = random_block_mask(rng, (k, n), block, density, empty_rows=1, empty_cols=1)
  w_dense = rng.standard_normal((k, n)).astype(np.float32)
  x = rng.standard_normal((m, k)).astype(np.float32)
  return mask, w_dense, x


def test_traced_mask_under_jit_and_grad():
  # The block structure is traced (a mask that changes during training), capacity static.
  mask, w_dense, x = _case()
  capacity = int(mask[::16, ::16].sum()) + 3

  @jax.jit
  def loss_and_grads(w_dense, mask, x):
    loss = lambda x, w_dense: jnp.sum(jnp.sin(bsr_matmul(x, bsr_from_dense(w_dense, mask, (16, 16), capacity=capacity), backend="xla_cpu")))
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w_dense)

  loss, (dx, dw) = loss_and_grads(jnp.asarray(w_dense), jnp.asarray(mask), jnp.asarray(x))
  wm = np.where(mask, w_dense.astype(np.float64), 0)
  y = x.astype(np.float64) @ wm
  dy = np.cos(y)
  _, dx_ref, dw_ref = dense_reference(x, w_dense, mask, dy)
  np.testing.assert_allclose(float(loss), np.sin(y).sum(), rtol=1e-5)
  assert relative_error(dx, dx_ref) < 1e-5
  assert relative_error(dw, dw_ref) < 1e-5


def test_vmap_over_tokens_and_weights():
  mask, w_dense, x = _case(seed=1)
  w = bsr_from_dense(jnp.asarray(w_dense), mask, (16, 16))
  xs = jnp.stack([jnp.asarray(x), 2 * jnp.asarray(x) + 1])
  ys = jax.vmap(lambda x: bsr_matmul(x, w, backend="xla_cpu"))(xs)
  for x_i, y_i in zip(xs, ys):
    assert relative_error(y_i, dense_reference(x_i, w_dense, mask, np.zeros((5, 64)))[0]) < 1e-5
  scales = jnp.array([1.0, -3.0])
  ys = jax.vmap(lambda s: bsr_matmul(jnp.asarray(x), dataclasses.replace(w, blocks=w.blocks * s), backend="xla_cpu"))(scales)
  y_ref = dense_reference(x, w_dense, mask, np.zeros((5, 64)))[0]
  for s, y_i in zip(scales, ys):
    assert relative_error(y_i, float(s) * y_ref) < 1e-5


def test_non_finite_values_stay_in_their_blocks():
  # A NaN input feeds only the output blocks whose stored blocks read it, and a NaN weight only
  # its own output block column: the group that ends inside the next column reads zeros there.
  k = n = 64
  block_mask = np.zeros((4, 4), bool)
  block_mask[0, 0] = block_mask[1, 0] = block_mask[2, 1] = block_mask[3, 1] = True
  mask = np.repeat(np.repeat(block_mask, 16, 0), 16, 1)
  w_dense = np.ones((k, n), np.float32)
  w_dense[0, 0] = np.nan  # block (0, 0)
  w = bsr_from_dense(jnp.asarray(w_dense), mask, (16, 16))
  x = np.ones((3, k), np.float32)
  y = np.asarray(bsr_matmul(jnp.asarray(x), w, backend="xla_cpu"))
  assert np.isnan(y[:, 0]).all() and np.isfinite(y[:, 1:]).all()
  np.testing.assert_array_equal(y[:, 16:32], 32.0)
  x[1, 40] = np.inf  # block row 2 -> output block column 1 only
  w_ok = bsr_from_dense(jnp.ones((k, n)), mask, (16, 16))
  y = np.asarray(bsr_matmul(jnp.asarray(x), w_ok, backend="xla_cpu"))
  assert np.isinf(y[1, 16:32]).all() and np.isfinite(np.delete(y, np.s_[16:32], axis=1)).all()
  assert np.isfinite(y[[0, 2]]).all()


def test_group_size_follows_mean_blocks_per_output():
  assert xla_cpu._group(32, capacity=410, groups=64, dtype=jnp.float32) == 4  # 128 // 32 cap
  assert xla_cpu._group(32, capacity=410, groups=64, dtype=jnp.bfloat16) == 8
  assert xla_cpu._group(64, capacity=64, groups=64, dtype=jnp.bfloat16) == 1
  assert xla_cpu._group(256, capacity=64, groups=1, dtype=jnp.float32) == 1


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks the CPU choice")
def test_cpu_dispatch_and_explicit_reference_agree():
  mask, w_dense, x = _case(seed=2)
  w = bsr_from_dense(jnp.asarray(w_dense), mask, (16, 16))
  auto = jax.jit(lambda x: bsr_matmul(x, w))
  assert "while" in auto.lower(jnp.asarray(x)).as_text()  # the looped path, not a dense dot
  ref = bsr_matmul(jnp.asarray(x), w, backend="reference")
  assert relative_error(auto(jnp.asarray(x)), ref) < 1e-6


def test_token_tiles_with_a_ragged_last_tile(monkeypatch):
  # Long inputs run in passes of TOKEN_TILE rows (dW sums the passes); 21 rows = 2 tiles of 8 + 5.
  monkeypatch.setattr(xla_cpu, "TOKEN_TILE", 8)
  check_bsr_matmul("xla_cpu", m_shape=(3, 7), k=64, n=96, block=(16, 32), density=0.5, empty_rows=1, empty_cols=1)


def test_benchmark_script_checks_and_breaks_down_the_cpu_path(capsys, monkeypatch):
  # benchmarks/bsr_matmul.py: the table run checks value, dx and dW against the dense masked
  # product (exit status 1 on a wrong result); --breakdown times the parts of the forward.
  import importlib.util  # noqa: PLC0415
  import pathlib  # noqa: PLC0415
  import sys  # noqa: PLC0415

  path = pathlib.Path(__file__).parents[1] / "benchmarks" / "bsr_matmul.py"
  spec = importlib.util.spec_from_file_location("bsr_matmul_benchmark", path)
  bench = importlib.util.module_from_spec(spec)
  monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks the module up
  spec.loader.exec_module(bench)
  common = ["--sizes", "128", "--tokens", "24", "--block", "32", "--densities", "0.25", "--dtype", "f32"]
  assert bench.main([*common, "--backend", "xla_cpu", "--peers", "", "--iters", "1", "--budget", "0", "--interleave", "1"]) == 0
  table = capsys.readouterr().out
  rows = [ln.split() for ln in table.splitlines() if "bsr_matmul[xla_cpu]" in ln and not ln.lstrip().startswith("Row(")]
  assert [r[4] for r in rows] == ["fwd", "fwd+bwd"] and all(r[9] == "ok" for r in rows), table
  assert bench.main([*common, "--breakdown"]) == 0
  out = capsys.readouterr().out
  # 4 of 16 blocks stored, 1 per column on average: g = 1, so one chunk GEMM per stored block.
  assert "4 chunk GEMMs [24, 32] x [32, 32] (g=1, 1 token pass(es))" in out, out
  for part in ("chunk GEMM alone", "chunk GEMM in a fori_loop", "chunk input gather", "xla_cpu forward"):
    assert part in out, out
