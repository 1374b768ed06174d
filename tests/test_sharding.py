"""sparsejax.sharding: meshes, param / optimizer-state shardings, HLO checks."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import sparsejax.optim as so
from sparsejax import sharding as shd

# --- helpers ------------------------------------------------------------------


def test_make_mesh_shapes_and_errors():
  mesh = shd.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.shape["data"] == 8
  mesh = shd.make_mesh((-1, 2), ("data", "model"))
  assert dict(mesh.shape) == {"data": 4, "model": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  mesh = shd.make_mesh(None, ("data", "model"))
  assert dict(mesh.shape) == {"data": 8, "model": 1}
  assert shd.make_mesh(devices=jax.devices()[:2]).shape["data"] == 2
  with pytest.raises(ValueError, match="at most one"):
    shd.make_mesh((-1, -1), ("a", "b"))
  with pytest.raises(ValueError, match="cannot be split"):
    shd.make_mesh((-1, 3), ("a", "b"))
  with pytest.raises(ValueError, match="holds 4 devices, but there are 8"):
    shd.make_mesh((2, 2), ("a", "b"))
  with pytest.raises(ValueError, match="differ in length"):
    shd.make_mesh((8,), ("a", "b"))


def _tree():
  return {"emb": jnp.zeros((10, 16)), "fc": {"kernel": jnp.zeros((16, 24)),
                                            "bias": jnp.zeros(24)},
          "out": {"kernel": jnp.zeros((24, 3))}, "scale": jnp.zeros(5),
          "conv": jnp.zeros((3, 3, 8, 16))}


def test_param_shardings_modes():
  mesh = shd.make_mesh((-1, 2), ("data", "model"))
  params = _tree()
  fsdp = jax.tree.map(lambda s: s.spec, shd.param_shardings(params, mesh))
  assert fsdp == {"emb": P(None, "data"), "fc": {"kernel": P(None, "data"),
                                                 "bias": P("data")},
                  "out": {"kernel": P("data")}, "scale": P(),
                  "conv": P(None, None, None, "data")}
  tp = jax.tree.map(lambda s: s.spec,
                    shd.param_shardings(params, mesh, "tensor"))
  assert tp == {"emb": P(None, "model"), "fc": {"kernel": P(None, "model"),
                                                "bias": P()},
                "out": {"kernel": P("model")}, "scale": P(),
                "conv": P(None, None, None, "model")}
  rep = shd.param_shardings(params, mesh, "replicated")
  assert all(s.spec == P() for s in jax.tree.leaves(rep))
  with pytest.raises(ValueError, match="unknown mode 'zero3'"):
    shd.param_shardings(params, mesh, "zero3")
  with pytest.raises(ValueError, match="axis named 'model'"):
    shd.param_shardings(params, shd.make_mesh(), "tensor")
  # The shardings are usable: every leaf is placed without error.
  placed = jax.device_put(params, shd.param_shardings(params, mesh))
  assert len(placed["fc"]["kernel"].addressable_shards) == 8


def test_opt_state_shardings_of_optax_states():
  mesh = shd.make_mesh()
  params = _tree()
  sh = shd.param_shardings(params, mesh)
  tx = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
      optax.masked(optax.trace(0.9), {"emb": False, "fc": True, "out": True,
                                      "scale": False, "conv": True}))
  out = shd.opt_state_shardings(tx, params, sh)
  adam = out[1].inner_state[0]
  assert jax.tree.map(lambda s: s.spec, adam.mu) == jax.tree.map(
      lambda s: s.spec, sh)
  assert adam.nu["fc"]["kernel"] == sh["fc"]["kernel"]
  assert adam.count.spec == P()
  assert out[1].hyperparams["learning_rate"].spec == P()
  assert out[2].inner_state.trace["fc"]["kernel"] == sh["fc"]["kernel"]
  # Factored second moments (Adafactor): the param's sharding minus one dim.
  fact = shd.opt_state_shardings(
      optax.adafactor(1e-3, min_dim_size_to_factor=8), params, sh)
  vr = optax.tree.get(fact, "v_row")
  vc = optax.tree.get(fact, "v_col")
  assert vr["fc"]["kernel"].spec == P(None)  # (16,): dim 1 dropped
  assert vc["fc"]["kernel"].spec == P("data")  # (24,): dim 0 dropped
  assert vr["conv"].spec in (P(None, None, None), P(None, None, "data"))
  # PartitionSpecs in, PartitionSpecs out.
  specs = jax.tree.map(lambda s: s.spec, sh)
  out = shd.opt_state_shardings(optax.adam(1e-3), params, specs)
  assert out[0].mu["out"]["kernel"] == P("data") and out[0].count == P()


def test_opt_state_shardings_of_sparse_states():
  mesh = shd.make_mesh((-1, 2), ("data", "model"))
  params = _tree()
  sh = shd.param_shardings(params, mesh, "tensor")
  tx = so.rigl(optax.adam(1e-3), sparsity=0.8, end_step=1000)
  out = shd.opt_state_shardings(tx, params, sh)
  st = so.get_sparse_state(out)
  assert st.sparse_masks["fc"]["bias"] is None
  assert st.sparse_masks["fc"]["kernel"] == sh["fc"]["kernel"]
  assert st.sparse_masks["conv"] == sh["conv"]
  for leaf in (st.sparse_step, st.sparse_key, st.sparse_target,
               st.sparse_beta):
    assert leaf.spec == P()
  assert st.sparse_inner[0].mu["emb"] == sh["emb"]
  # A state built with these shardings keeps them.
  state = jax.jit(tx.init, out_shardings=out)(jax.device_put(params, sh))
  masks = so.get_masks(state)
  assert masks["fc"]["kernel"].sharding == sh["fc"]["kernel"]
  with pytest.raises(ValueError, match="one sharding per param leaf"):
    shd.match_param_shardings(state, params, {"only": sh["emb"]})


def test_collective_shapes_finds_gathers():
  mesh = shd.make_mesh()
  x = jax.device_put(jnp.ones((64, 8)), NamedSharding(mesh, P("data")))
  gathered = jax.jit(lambda x: jnp.sort(x.ravel())).lower(x).compile()
  assert ("f32", (512,)) in shd.collective_shapes(gathered)
  reduced = jax.jit(jnp.sum).lower(x).compile()
  assert shd.collective_shapes(reduced) == []
  assert ("f32", ()) in shd.collective_shapes(reduced, "all-reduce")


def test_doctests():
  res = doctest.testmod(shd, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 5 and res.failed == 0
