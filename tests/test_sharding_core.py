"""sparsejax.core under a device mesh (8 simulated CPU devices).

Each core function runs on params laid out in one of three layouts
(replicated data parallel, FSDP over ``data``, tensor parallel over
``model``) and is compared with the same function on one device: masks,
counts, scores and pruned params must be bit-identical, params-structured
outputs (masks, pruned params, grown positions) must keep the params'
shardings, and the compiled HLO must not all-gather a whole parameter or
score array. Layouts rotate over the cases to bound compile time.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from sparsejax import sharding as shd
from sparsejax.core import distributions, imp, masks as M, patterns, pruning
from sparsejax.core import scores, selection, soup


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  return {"fc1": {"kernel": f(64, 128), "bias": f(128)},
          "fc2": {"kernel": f(128, 32)},
          "conv": f(3, 3, 8, 16)}


def _is_params_like(x):
  return isinstance(x, dict) and set(x) == {"fc1", "fc2", "conv"}


@functools.lru_cache(maxsize=None)
def _layout(mode):
  mesh = (shd.make_mesh((-1, 2), ("data", "model")) if mode == "tensor"
          else shd.make_mesh())
  return shd.param_shardings(_params(), mesh, mode)


def _pruned(p, sparsity=0.8):
  return pruning.prune(p, scores.magnitude(p), sparsity)


CASES = {
    # name: (function of (params, grads, key), layouts)
    "apply_and_count": (lambda p, g, k: (lambda m: (
        M.apply_masks(g, m), M.nnz(m), M.global_sparsity(m, p),
        M.leaf_sparsity(m), M.mask_and(m, M.mask_or(m, m))))(
            _pruned(p, 0.7)[1]), ("tensor",)),
    "patterns": (lambda p, g, k: {
        "topk": patterns.topk_mask(jnp.abs(p["fc1"]["kernel"]), 0.1),
        "nm": patterns.nm_mask(jnp.abs(p["fc1"]["kernel"]), 2, 4),
        "block": patterns.block_mask(jnp.abs(p["fc1"]["kernel"]), 0.25,
                                     (8, 16)),
        "channel": patterns.channel_mask(jnp.abs(p["fc2"]["kernel"]), 0.5),
    }, ("fsdp",)),
    "prune_uniform": (lambda p, g, k: _pruned(p),
                      ("replicated", "fsdp", "tensor")),
    "prune_erk_random": (lambda p, g, k: pruning.prune(
        p, scores.random_scores(p, k), distributions.erdos_renyi(p, 0.8)),
                         ("fsdp",)),
    "prune_nm": (lambda p, g, k: pruning.prune(
        p, scores.magnitude(p), 0.5, pattern=patterns.NM(2, 4)), ("tensor",)),
    "prune_global": (lambda p, g, k: (
        pruning.prune_global(p, scores.saliency(p, g), 0.9),
        pruning.prune_global(p, scores.magnitude(p), 0.9, normalize=True)),
                     ("tensor",)),
    "global_topk": (lambda p, g, k: selection.global_topk_masks(
        scores.magnitude(p), density=0.05), ("fsdp",)),
    "drop_and_grow": (lambda p, g, k: (lambda pm: pruning.drop_and_grow(
        pm[0], pm[1], None, scores.gradient_magnitude(g), 0.3))(_pruned(p)),
                      ("fsdp", "tensor")),
    "regrow": (lambda p, g, k: (lambda pm: pruning.regrow(
        pm[0], pm[1], scores.gradient_magnitude(g), 0.5))(_pruned(p)),
               ("fsdp",)),
    "imp_rewind_movement_soup": (lambda p, g, k: (
        (lambda pm: imp.rewind(pm[0], pm[1], g))(imp.imp_prune(p, None, 0.2)),
        scores.movement_update(None, p, g),
        (lambda m: soup.sparse_soup([M.apply_masks(p, m), M.apply_masks(g, m)],
                                    [m, m]))(_pruned(p, 0.5)[1])),
                                 ("tensor",)),
}

PARAMS = [(case, mode) for case in sorted(CASES) for mode in CASES[case][1]]


@functools.lru_cache(maxsize=None)
def _single_device(case):
  one = SingleDeviceSharding(jax.devices()[0])
  args = jax.device_put((_params(0), _params(1)), one)
  return jax.jit(CASES[case][0])(*args, jax.random.key(3))


@functools.lru_cache(maxsize=None)
def _sharded(case, mode):
  """(outputs, compiled HLO text) of the case on the mesh layout."""
  sh = _layout(mode)
  args = (jax.device_put(_params(0), sh), jax.device_put(_params(1), sh),
          jax.random.key(3))
  jitted = jax.jit(CASES[case][0])
  return jitted(*args), jitted.lower(*args).compile().as_text()


@pytest.mark.parametrize("case, mode", PARAMS)
def test_sharded_equals_single_device(case, mode):
  sh = _layout(mode)
  sharded, _ = _sharded(case, mode)

  # Bit-identical to one device.
  single = _single_device(case)
  a = jax.tree.leaves(sharded, is_leaf=M.is_none)
  b = jax.tree.leaves(single, is_leaf=M.is_none)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert (x is None) == (y is None)
    if x is not None:
      x, y = np.asarray(x), np.asarray(y)
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(x, y)

  # Params-structured outputs keep the params' shardings.
  n_trees = 0
  for tree in jax.tree.leaves(sharded, is_leaf=_is_params_like):
    if not _is_params_like(tree):
      continue
    n_trees += 1
    for x, s in zip(jax.tree.leaves(tree, is_leaf=M.is_none),
                    jax.tree.leaves(sh)):
      if x is not None:
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  assert n_trees or case in ("patterns", "global_topk") or (
      case == "apply_and_count")


# Regression: with jax>=0.12, global selection once all-gathered the whole
# mask of a sharded 4-D leaf (a data-dependence token took
# ``jnp.ravel(mask)[0]``); fixed in sparsejax/core/selection.py.
@pytest.mark.parametrize("case, mode", PARAMS)
def test_no_all_gather_of_a_whole_array(case, mode):
  sh = _layout(mode)
  _, hlo = _sharded(case, mode)
  sizes = [x.size for x, s in zip(jax.tree.leaves(_params()),
                                  jax.tree.leaves(sh))
           if not s.is_fully_replicated]
  for dtype, shape in shd.collective_shapes(hlo):
    assert not sizes or int(np.prod(shape)) < min(sizes), (
        f"{case}/{mode}: all-gather of a whole array {dtype}{shape}")


def test_global_topk_uses_no_gather_and_matches_numpy():
  # Independent reference: numpy top-k over the concatenated magnitudes.
  params = _params(5)
  sh = _layout("fsdp")
  k = 321
  masks = jax.jit(lambda p: selection.global_topk_masks(
      scores.magnitude(p), k=k))(jax.device_put(params, sh))
  flat = np.concatenate([np.abs(np.asarray(x)).ravel()
                         for x in jax.tree.leaves(params)])
  thr = np.sort(flat)[-k]
  got = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(masks)])
  np.testing.assert_array_equal(got, flat >= thr)
