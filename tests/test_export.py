"""Export of trained block masks to the block-sparse kernels (sparsejax.export, BlockSparseDense).

The exported model must compute what the masked-dense model computes (float tolerance), for
Linen param dicts, NNX ``State``, plain trees and whole NNX models; a mask that is not constant
on the blocks must be refused with an error naming the leaf.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax as sj
import sparsejax.optim as so
from pallas_kernels import BlockSparseMatrix, bsr_matmul
from sparsejax import export
from sparsejax.nn import BlockSparseDense

BS = (8, 8)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.relu(nn.Dense(32, name="Dense_0")(x))
    return nn.Dense(16, name="Dense_1")(h)


def masked(params, masks):
  return jax.tree.map(lambda m, w: w if m is None else w * m, masks, params,
                      is_leaf=lambda z: z is None)


def block_masks(params, sparsity=0.6):
  return sj.prune(params, None, sparsity, pattern=sj.Block(*BS))[1]


def test_linen_params_export_matches_masked_dense():
  x = jax.random.normal(jax.random.key(1), (4, 24))
  variables = LinenMLP().init(jax.random.key(0), x)
  masks = block_masks(variables)
  out = export.to_block_sparse(variables, masks, BS)
  p, q = variables["params"], out["params"]
  for layer in ("Dense_0", "Dense_1"):
    assert isinstance(q[layer]["kernel"], BlockSparseMatrix)
    np.testing.assert_array_equal(q[layer]["kernel"].to_dense(),
                                  p[layer]["kernel"] * masks["params"][layer]["kernel"])
    assert q[layer]["bias"] is p[layer]["bias"]  # dense leaves pass through

  def sparse_forward(q, x):  # the Linen model's computation on the exported tree
    h = jax.nn.relu(bsr_matmul(x, q["Dense_0"]["kernel"]) + q["Dense_0"]["bias"])
    return bsr_matmul(h, q["Dense_1"]["kernel"]) + q["Dense_1"]["bias"]

  want = LinenMLP().apply(masked(variables, masks), x)
  np.testing.assert_allclose(sparse_forward(q, x), want, rtol=1e-5, atol=1e-5)
  # Per layer, from the Linen Dense dicts.
  l0 = BlockSparseDense.from_params(p["Dense_0"], masks["params"]["Dense_0"], block_shape=BS)
  l1 = BlockSparseDense.from_params(p["Dense_1"], masks["params"]["Dense_1"]["kernel"],
                                    block_shape=BS)
  np.testing.assert_allclose(l1(jax.nn.relu(l0(x))), want, rtol=1e-5, atol=1e-5)


def test_nnx_state_and_plain_trees():
  model = nnx.Sequential(nnx.Linear(16, 24, rngs=nnx.Rngs(0)), nnx.Linear(24, 8, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  masks = block_masks(nnx.to_pure_dict(state))
  masks_state = jax.tree.map(lambda m: m, masks)
  out = export.to_block_sparse(state, masks_state, BS)
  x = jnp.linspace(-1, 1, 48).reshape(3, 16)
  kernels = [jax.tree.leaves(out, is_leaf=lambda z: isinstance(z, BlockSparseMatrix))]
  assert sum(isinstance(k, BlockSparseMatrix) for k in kernels[0]) == 2
  # A plain nested tuple with a masked non-kernel leaf: masked dense, not converted.
  w = jnp.arange(1., 257.).reshape(16, 16)
  tree = ({"kernel": w}, {"table": w})
  tm = ({"kernel": jnp.ones((16, 16), bool).at[:8].set(False)},
        {"table": jnp.eye(16, dtype=bool)})
  got = export.to_block_sparse(tree, tm, BS)
  np.testing.assert_array_equal(bsr_matmul(x, got[0]["kernel"]), x @ (w * tm[0]["kernel"]))
  np.testing.assert_array_equal(got[1]["table"], w * tm[1]["table"])
  with pytest.raises(ValueError, match="matches no masked 2-D leaf"):
    export.to_block_sparse(tree, tm, BS, include="nothing_here")
  # Per-path block shapes.
  got = export.to_block_sparse(tree, tm, {"kernel": (8, 16)})
  assert got[0]["kernel"].block_shape == (8, 16)


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.fc1 = nnx.Linear(16, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 32, rngs=rngs)
    self.head = nnx.Param(jax.random.normal(rngs.params(), (32, 8)))

  def __call__(self, x):
    return jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x)))) @ self.head[...]


def test_nnx_model_conversion_matches_masked_dense():
  model = MLP(nnx.Rngs(0))
  # Block masks as an nnx.Optimizer holds them (training itself: tests/test_block_training.py).
  tx = so.static_sparse(optax.adam(1e-2), sparsity=0.75, pattern=sj.Block(*BS),
                        distribution="uniform", include=("kernel", "head"))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  masks = so.get_masks(opt.opt_state)
  x = jax.random.normal(jax.random.key(1), (16, 16))
  want = nnx.clone(model)
  nnx.update(want, so.apply_state_masks(nnx.state(want, nnx.Param), opt.opt_state))
  fast = export.to_block_sparse_model(model, masks, BS)  # from the dense stored weights
  assert isinstance(fast.fc1, BlockSparseDense) and isinstance(fast.fc2, BlockSparseDense)
  assert isinstance(model.fc1, nnx.Linear)  # the trained model is not modified
  for name in ("fc1", "fc2"):
    np.testing.assert_array_equal(getattr(fast, name).mask(), masks[name]["kernel"])
  np.testing.assert_array_equal(fast.head[...], want.head[...])  # a masked non-Linear param
  assert not np.all(np.asarray(model.head[...]) == np.asarray(want.head[...]))
  np.testing.assert_allclose(fast(x), want(x), rtol=1e-5, atol=1e-5)


def test_not_block_constant_is_refused_naming_the_leaf():
  x = jnp.ones((1, 24))
  variables = LinenMLP().init(jax.random.key(0), x)
  masks = sj.prune(variables, None, 0.6)[1]  # unstructured
  with pytest.raises(ValueError, match=r"'params/Dense_0/kernel'.*not constant on \(8, 8\) blocks"):
    export.to_block_sparse(variables, masks, BS)
  with pytest.raises(ValueError, match=r"'Dense_1/kernel'.*not constant"):
    BlockSparseDense.from_params(variables["params"]["Dense_1"],
                                 masks["params"]["Dense_1"], block_shape=BS, path="Dense_1")
  model = MLP(nnx.Rngs(0))
  bad = sj.prune(nnx.to_pure_dict(nnx.state(model, nnx.Param)), None, 0.5,
                 selection={"fc1": {"kernel": True, "bias": False},
                            "fc2": {"kernel": False, "bias": False}, "head": False})[1]
  with pytest.raises(ValueError, match=r"'fc1/kernel'.*not constant"):
    export.to_block_sparse_model(model, bad, BS)
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(lambda v, m: export.to_block_sparse(v, m, BS))(variables, block_masks(variables))
  with pytest.raises(ValueError, match="bias shape"):
    BlockSparseDense.from_kernel(jnp.ones((8, 8)), jnp.ones((8, 8), bool), bias=jnp.ones(4),
                                 block_shape=BS)
  with pytest.raises(ValueError, match="does not divide"):
    export.to_block_sparse(variables, block_masks(variables), (5, 5))


def test_readme_train_then_export_section_runs():
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
  body = readme.split("## Train in blocks, export to the kernels", 1)[1].split("\n## ", 1)[0]
  (code,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
  namespace = {"__name__": "__readme__"}
  exec(compile(code, "README.md:train-export", "exec"), namespace)  # noqa: S102
  assert isinstance(namespace["fast"].layers[0], BlockSparseDense)


def test_export_doctests():
  import doctest  # pylint: disable=import-outside-toplevel
  res = doctest.testmod(export, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 0 and res.failed == 0
