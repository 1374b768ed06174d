"""Tests for sparsejax.core.paths (leaf paths, selection) and the doctests of core-A modules."""

import doctest

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.core import masks as masks_mod
from sparsejax.core import paths as paths_mod
from sparsejax.core import patterns as patterns_mod
from sparsejax.core import selection as selection_mod
from sparsejax.core.paths import leaf_paths, path_str, select


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(6, 8, rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs), nnx.Linear(8, 8, rngs=rngs)])
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    x = self.norm(self.fc1(x))
    for b in self.blocks:
      x = jax.nn.relu(b(x))
    return self.head(x)


def _linen_params():
  class Net(linen.Module):
    @linen.compact
    def __call__(self, x):
      x = linen.Dense(8, name="fc1")(x)
      x = linen.LayerNorm(name="norm")(x)
      return linen.Conv(4, (3, 3), name="conv")(x.reshape(1, 2, 4, 1))

  return Net().init(jax.random.key(0), jnp.ones((1, 6)))


def test_path_str_pure_dict_and_sequences():
  tree = {"enc": ({"kernel": np.zeros((2, 2))}, [np.zeros(3), np.zeros(1)]), "b": np.zeros(2)}
  assert leaf_paths(tree) == ["b", "enc/0/kernel", "enc/1/0", "enc/1/1"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  assert [path_str(p) for p, _ in flat] == leaf_paths(tree)
  # Order is jax.tree leaf order.
  assert len(leaf_paths(tree)) == len(jax.tree.leaves(tree))


def test_nnx_state_paths_drop_value_and_match_pure_dict():
  model = MLP(nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  paths = leaf_paths(state)
  assert "fc1/kernel" in paths and "blocks/1/kernel" in paths and "norm/scale" in paths
  assert not any(p.endswith("/value") for p in paths)
  assert paths == leaf_paths(nnx.to_pure_dict(state))


def test_linen_paths_and_default_selection():
  params = _linen_params()
  sel = select(params)
  flat = dict(zip(leaf_paths(params), jax.tree.leaves(sel)))
  assert flat == {
    "params/conv/bias": False, "params/conv/kernel": True,
    "params/fc1/bias": False, "params/fc1/kernel": True,
    "params/norm/bias": False, "params/norm/scale": False,
  }


def test_select_include_exclude_semantics():
  p = {"a": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}, "emb": np.zeros((5, 2)), "s": np.float32(1.0)}
  assert select(p) == {"a": {"bias": False, "kernel": True}, "emb": True, "s": False}
  # include selects 1-D leaves too, never scalars.
  assert select(p, include=["bias", "kernel"]) == {"a": {"bias": True, "kernel": True}, "emb": False, "s": False}
  assert select(p, include="^s$|kernel") == {"a": {"bias": False, "kernel": True}, "emb": False, "s": False}
  assert select(p, exclude="^emb$") == {"a": {"bias": False, "kernel": True}, "emb": False, "s": False}
  assert select(p, include="a/", exclude="bias") == {"a": {"bias": False, "kernel": True}, "emb": False, "s": False}
  assert select(p, min_ndim=1) == {"a": {"bias": True, "kernel": True}, "emb": True, "s": False}
  # ShapeDtypeStruct leaves work (abstract params).
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32), p)
  assert select(abstract) == select(p)


def test_select_nnx_state_and_mask_roundtrip_through_model():
  model = MLP(nnx.Rngs(1))
  state = nnx.state(model, nnx.Param)
  sel = select(state, exclude="head")
  m = masks_mod.init_masks(state, sel)
  flat = dict(masks_mod.export_masks(m))
  assert sorted(flat) == ["blocks/0/kernel", "blocks/1/kernel", "fc1/kernel"]
  # Prune half of fc1 and push back into the model.
  m2 = masks_mod.import_masks({"fc1/kernel": np.arange(48).reshape(6, 8) % 2 == 0}, state)
  nnx.update(model, masks_mod.apply_masks(state, m2))
  k = np.asarray(model.fc1.kernel[...])
  assert (k[:, 1::2] == 0).all() and (k[:, ::2] != 0).all()
  y = model(jnp.ones((2, 6)))
  assert y.shape == (2, 3)


@pytest.mark.parametrize(
  "kwargs, exc, match",
  [
    (dict(include="decoder"), ValueError, r"include pattern 'decoder' matches no leaf path.*fc/kernel.*out/bias"),
    (dict(exclude=["fc", "nonexistent"]), ValueError, r"exclude pattern 'nonexistent'.*fc/bias"),
    (dict(include="fc(["), ValueError, r"invalid include regex"),
    (dict(include=[3]), TypeError, r"regex string"),
  ],
)
def test_select_bad_patterns(kwargs, exc, match):
  p = {"fc": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}, "out": {"bias": np.zeros(2)}}
  with pytest.raises(exc, match=match):
    select(p, **kwargs)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_select_non_float_leaf_names_path(dtype):
  p = {"fc": {"kernel": np.zeros((2, 2), dtype)}, "ok": np.zeros((2, 2), np.float32)}
  with pytest.raises(TypeError, match=r"leaf 'fc/kernel' has dtype .*exclude"):
    select(p)
  # Excluding it is the fix.
  assert select(p, exclude="fc") == {"fc": {"kernel": False}, "ok": True}


@pytest.mark.parametrize("module", [paths_mod, masks_mod, patterns_mod, selection_mod])
def test_doctests(module):
  res = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert res.attempted > 0
  assert res.failed == 0
