"""Importance scores: which weights matter (larger score = keep).

Every function here returns a *score tree* with the structure of ``params``; the
pruning functions (:mod:`sparsejax.core.pruning`) keep the largest scores of the
leaves they mask and ignore the scores of dense leaves. All functions are pure
and jit-able.

- :func:`magnitude` ``|w|`` (magnitude pruning, GMP, IMP).
- :func:`random_scores` i.i.d. uniform scores from an explicit PRNG key.
- :func:`hash_random_scores` (:func:`hash_scores`) the same from a counter hash, lazily.
- :func:`saliency` ``|g * w|`` (SNIP, Lee et al. 2019).
- :func:`gradient_magnitude` ``|g|`` (RigL growth).
- :func:`grasp` Hessian-gradient scores (GraSP, Wang et al. 2020).
- :func:`synflow_scores` / :func:`synflow_masks` iterative synaptic flow (Tanaka et al. 2020).
- :func:`movement_update` movement-pruning accumulation ``S - g * w`` (Sanh et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core.selection import LazyScores

PyTree = Any

__all__ = [
    "magnitude",
    "random_scores",
    "hash_uniform",
    "hash_scores",
    "hash_random_scores",
    "saliency",
    "gradient_magnitude",
    "grasp",
    "synflow_scores",
    "synflow_masks",
    "synflow_densities",
    "movement_update",
]


def _path(kp) -> str:
  from sparsejax.core.paths import path_str  # pylint: disable=import-outside-toplevel
  return path_str(kp)


def _check_same_structure(ref: PyTree, other: PyTree, ref_name: str, other_name: str) -> None:
  """Raises ValueError naming the first leaf path where two trees differ."""
  ref_l, ref_def = jax.tree_util.tree_flatten_with_path(ref)
  oth_l, oth_def = jax.tree_util.tree_flatten_with_path(other)
  if ref_def == oth_def:
    for (kp, a), (_, b) in zip(ref_l, oth_l):
      if np.shape(a) != np.shape(b):
        raise ValueError(
            f"{other_name} leaf {_path(kp)!r} has shape {np.shape(b)} but the {ref_name} leaf has "
            f"shape {np.shape(a)}; pass a tree of the same structure and shapes as {ref_name}.")
    return
  ref_paths = [_path(kp) for kp, _ in ref_l]
  oth_paths = [_path(kp) for kp, _ in oth_l]
  for rp, op in zip(ref_paths, oth_paths):
    if rp != op:
      raise ValueError(
          f"{other_name} does not match the structure of {ref_name}: leaf {op!r} of {other_name} is "
          f"where {ref_name} has {rp!r}; pass a tree with the same structure as {ref_name}.")
  if len(ref_paths) != len(oth_paths):
    longer, name = (ref_paths, ref_name) if len(ref_paths) > len(oth_paths) else (oth_paths, other_name)
    extra = longer[min(len(ref_paths), len(oth_paths))]
    raise ValueError(
        f"{other_name} does not match the structure of {ref_name}: leaf {extra!r} exists only in "
        f"{name}; pass a tree with the same structure as {ref_name}.")
  raise ValueError(
      f"{other_name} does not match the structure of {ref_name} (same leaf paths, different "
      f"containers: {oth_def} vs {ref_def}); pass a tree with the same structure as {ref_name}.")


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def magnitude(params: PyTree) -> PyTree:
  """Magnitude scores ``|w|``.

  Args:
    params: parameter pytree.

  Returns:
    A tree of ``|w|`` with the structure and dtypes of ``params``.

  >>> import jax.numpy as jnp
  >>> magnitude({"w": jnp.array([[-2.0, 1.0]])})["w"]
  Array([[2., 1.]], dtype=float32)
  """
  return jax.tree.map(jnp.abs, params)


def random_scores(params: PyTree, key: jax.Array) -> PyTree:
  """I.i.d. ``uniform[0, 1)`` float32 scores, one independent stream per leaf.

  Leaf ``i`` (in ``jax.tree`` leaf order) uses ``jax.random.fold_in(key, i)``, so the scores
  are deterministic for a fixed key and do not change when other leaves change shape.
  Pruning with them gives exact-count random masks (unlike Bernoulli masks).

  Args:
    params: parameter pytree (only shapes are used).
    key: a ``jax.random`` key.

  Returns:
    A float32 score tree with the structure of ``params``.

  >>> import jax
  >>> s = random_scores({"w": jax.numpy.zeros((2, 3))}, jax.random.key(0))
  >>> s["w"].shape, bool((s["w"] >= 0).all() & (s["w"] < 1).all())
  ((2, 3), True)
  """
  leaves, treedef = jax.tree.flatten(params)
  out = [jax.random.uniform(jax.random.fold_in(key, i), np.shape(leaf), jnp.float32)
         for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def _fmix32(x):
  """murmur3's 32-bit finaliser (a bijection with full avalanche)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def hash_uniform(key, shape, salt: int = 0) -> jax.Array:
  """Uniform ``[0, 1)`` float32 scores from a counter hash of the flat index.

  A cheap alternative to ``jax.random.uniform`` for random masks and SET's
  growth (a few integer ops per entry instead of Threefry): deterministic given ``key``,
  independent of device layout (a pure function of each entry's global
  index), distinct streams for distinct ``salt`` (leaf number).

  >>> u = hash_uniform(jax.random.key(0), (1000,))
  >>> bool((u >= 0).all() & (u < 1).all()), round(float(u.mean()), 1)
  (True, 0.5)
  """
  return hash_scores(key, shape, salt).evaluate()


def _hash_at(w0, w1, index):
  x = _fmix32(index.astype(jnp.uint32) * jnp.uint32(0x9E3779B1) + w0)
  x = _fmix32(x ^ w1)
  return (x >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def hash_scores(key, shape, salt: int = 0) -> LazyScores:
  """:func:`hash_uniform` as :class:`~sparsejax.core.selection.LazyScores`.

  The selection evaluates the hash inside its passes; no score array is stored.

  >>> s = hash_scores(jax.random.key(0), (4, 3))
  >>> bool((s.evaluate() == hash_uniform(jax.random.key(0), (4, 3))).all())
  True
  """
  w0, w1 = _stream_words(key, salt)
  return LazyScores(_hash_at, w0, w1, shape=tuple(shape), index=True)


def _stream_words(key, salt):
  """Two uint32 words of stream ``salt`` (int or int array) of ``key``, by integer mixing.

  (Not ``jax.random.fold_in`` + ``bits``: a Threefry program per leaf and
  step compiles in ~0.1 s each, minutes for a few hundred leaves. An array
  of salts gives all streams' words in one vector operation.)
  """
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  data = jnp.ravel(data).astype(jnp.uint32)
  s = jnp.asarray(salt).astype(jnp.uint32) * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)
  h0, h1 = _fmix32(s), _fmix32(s ^ jnp.uint32(0x85EBCA6B))
  for i in range(data.shape[0]):
    h0 = _fmix32(h0 ^ data[i] + jnp.uint32((0x27D4EB2F * (i + 1)) & 0xFFFFFFFF))
    h1 = _fmix32(h1 + (data[i] ^ jnp.uint32((0x165667B1 * (i + 1)) & 0xFFFFFFFF)))
  return h0, _fmix32(h1 ^ h0)


def hash_random_scores(params: PyTree, key: jax.Array) -> PyTree:
  """Uniform ``[0, 1)`` scores of every leaf from a counter hash, lazily.

  The cheap counterpart of :func:`random_scores` (leaf ``i`` uses
  :func:`hash_scores` with ``salt=i``): the selection evaluates the hash
  inside its passes, so nothing is stored and no Threefry program is compiled
  per leaf. Random initial masks (``init_scores="random"``) use it.

  >>> import jax
  >>> s = hash_random_scores({"w": jax.numpy.zeros((2, 3))}, jax.random.key(0))
  >>> s["w"].shape, bool((s["w"].evaluate() < 1).all())
  ((2, 3), True)
  """
  leaves, treedef = jax.tree.flatten(params)
  w0, w1 = _stream_words(key, np.arange(len(leaves)))  # every leaf's words at once
  return jax.tree.unflatten(treedef, [LazyScores(_hash_at, w0[i], w1[i], shape=np.shape(x), index=True)
                                      for i, x in enumerate(leaves)])


def saliency(params: PyTree, grads: PyTree) -> PyTree:
  """Connection sensitivity ``|g * w|`` (SNIP).

  SNIP (Lee et al. 2019) computes ``grads`` of the loss on one minibatch at initialisation and
  keeps the global top-k of these scores (``prune_global``).

  Args:
    params: parameter pytree.
    grads: gradient pytree with the same structure and shapes.

  Returns:
    The score tree ``|grads * params|``.

  Raises:
    ValueError: the trees differ in structure or a leaf's shape (the message names the leaf).

  >>> import jax.numpy as jnp
  >>> saliency({"w": jnp.array([2.0, -3.0])}, {"w": jnp.array([-1.0, 1.0])})["w"]
  Array([2., 3.], dtype=float32)
  """
  _check_same_structure(params, grads, "params", "grads")
  return jax.tree.map(lambda w, g: jnp.abs(g * w), params, grads)


def gradient_magnitude(grads: PyTree) -> PyTree:
  """Gradient magnitude ``|g|`` (the RigL growth criterion).

  For RigL pass the *dense* gradient with respect to the masked weights (do not mask the
  gradient before scoring).

  >>> import jax.numpy as jnp
  >>> gradient_magnitude({"w": jnp.array([-0.5, 0.25])})["w"]
  Array([0.5 , 0.25], dtype=float32)
  """
  return jax.tree.map(jnp.abs, grads)


def grasp(loss_fn: Callable[..., jax.Array], params: PyTree, batch: Any, *,
          temperature: float = 200.0) -> PyTree:
  """GraSP scores (gradient signal preservation), in the keep-largest convention.

  Following ``alecwangcq/GraSP`` (``pruner/GraSP.py``): ``g = grad L`` (held constant),
  ``Hg = grad_theta (g . grad_theta L)`` (a Hessian-gradient product, computed here as a
  forward-over-reverse ``jax.jvp`` of ``jax.grad``), ``S = -theta * Hg`` normalised by
  ``|sum S| + 1e-10`` (the sum runs over every leaf; the normaliser is a positive constant, so
  the ranking is unaffected). GraSP removes the *largest* ``S``; this function returns ``-S``
  so that, like every score here, the largest scores are kept.

  Args:
    loss_fn: ``loss_fn(params, batch, temperature) -> scalar``; it must compute the loss on the
      logits divided by ``temperature`` (GraSP uses ``T = 200``).
    params: float parameter pytree.
    batch: anything ``loss_fn`` accepts (GraSP's configs use 10 samples per class).
    temperature: the logit temperature passed to ``loss_fn``.

  Returns:
    The score tree ``theta * Hg / (|sum(-theta * Hg)| + 1e-10)``.

  >>> import jax, jax.numpy as jnp
  >>> def loss_fn(p, batch, t):
  ...   x, y = batch
  ...   logits = (x @ p["w"]) / t
  ...   return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])
  >>> p = {"w": jnp.array([[1.0, -1.0], [0.5, 2.0]])}
  >>> batch = (jnp.array([[1.0, 2.0], [3.0, -1.0]]), jnp.array([0, 1]))
  >>> grasp(loss_fn, p, batch, temperature=1.0)["w"].shape
  (2, 2)
  """

  def loss(p):
    return loss_fn(p, batch, temperature)

  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not _is_float(leaf):
      raise TypeError(
          f"grasp needs floating-point params, but leaf {_path(kp)!r} has dtype "
          f"{jnp.result_type(leaf)}; remove non-float leaves (e.g. with jax.tree.map / a filter) "
          "before scoring.")
  g = jax.lax.stop_gradient(jax.grad(loss)(params))
  _, hg = jax.jvp(jax.grad(loss), (params,), (g,))
  s = jax.tree.map(lambda w, h: -(w * h), params, hg)
  total = sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(s))
  norm = jnp.abs(total) + 1e-10
  return jax.tree.map(lambda x: (-x / norm).astype(x.dtype), s)


def synflow_densities(density, rounds: int) -> jax.Array:
  """The SynFlow density schedule ``d_k = density ** ((k + 1) / rounds)``, k = 0..rounds-1.

  >>> d = synflow_densities(0.01, 100)
  >>> [round(float(d[k]), 5) for k in (0, 9, 49, 99)]
  [0.95499, 0.63096, 0.1, 0.01]
  """
  if not isinstance(rounds, (int, np.integer)) or rounds < 1:
    raise ValueError(f"rounds must be a positive Python int, got {rounds!r}.")
  k = jnp.arange(1, rounds + 1, dtype=jnp.float32)
  return jnp.asarray(density, jnp.float32) ** (k / rounds)


def _selection_flags(params: PyTree, selection, fn: str = "select") -> list[bool]:
  """One static bool per leaf of ``params``; ``selection`` is a bool tree or a mask tree."""
  # pylint: disable=import-outside-toplevel
  from sparsejax.core.paths import select
  from sparsejax.core.pruning import _flat, _leaves_like
  if selection is None:
    selection = select(params)
  paths = _flat(params)[0]
  flags = _leaves_like(paths, selection, "selection", fn)
  return [f is not None and f is not False for f in flags]


def synflow_scores(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree,
                   input_shape: Sequence[int], *, masks: PyTree | None = None,
                   normalize: bool | None = None) -> PyTree:
  """One round of SynFlow scores ``|theta * dR/dtheta|``, ``R = sum(f(|theta| * m, ones))``.

  Params are replaced by their absolute values (signs are irrelevant: only masks come out of
  SynFlow), masked entries are zeroed, an all-ones input of ``input_shape`` is fed forward and
  the scores are ``|theta * dR/dtheta|``.

  Precision (``R`` is a product over depth and overflows float32 on deep nets):

  - with ``jax_enable_x64`` on, everything is computed in float64 (the reference behaviour);
  - otherwise (``normalize=None`` or ``True``) it runs in float32 and every floating leaf with
    ``ndim >= 2`` is divided by ``c = sum(|theta|) / shape[-1]`` (its mean absolute column sum,
    so an all-ones input keeps activations of order one). For a positively homogeneous network
    (ReLU / linear / pooling layers, no biases) every score is then multiplied by the same
    positive constant ``1 / prod(c)``, so rankings and masks equal the float64 ones. Biases and
    norm shifts break homogeneity: there the normalised ranking is an approximation.

  Args:
    apply_fn: ``apply_fn(params, x) -> output`` (e.g. ``lambda p, x: model.apply({"params": p},
      x)``; batch norm in inference mode).
    params: parameter pytree.
    input_shape: full input shape including the batch dimension, e.g. ``(1, 28, 28, 1)``.
    masks: optional mask tree (``None`` on dense leaves); masked-out weights score 0.
    normalize: force (True) or disable (False) the per-leaf normalisation; None = on unless
      x64 is enabled.

  Returns:
    A score tree (float64 with x64 on, else float32).

  >>> import jax.numpy as jnp
  >>> p = {"a": jnp.array([[1.0, -2.0]]), "b": jnp.array([[3.0], [4.0]])}
  >>> synflow_scores(lambda p, x: x @ p["a"] @ p["b"], p, (1, 1), normalize=False)["b"]
  Array([[3.],
         [8.]], dtype=float32)
  """
  x64 = bool(jax.config.jax_enable_x64)
  dtype = jnp.float64 if x64 else jnp.float32
  if normalize is None:
    normalize = not x64
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if masks is None:
    mask_leaves = [None] * len(leaves)
  else:
    from sparsejax.core.pruning import _leaves_like  # pylint: disable=import-outside-toplevel
    mask_leaves = _leaves_like([_path(kp) for kp, _ in leaves], masks, "masks", "synflow_scores")
  lin = []
  for (kp, leaf), m in zip(leaves, mask_leaves):
    if not _is_float(leaf):
      raise TypeError(
          f"synflow needs floating-point params, but leaf {_path(kp)!r} has dtype "
          f"{jnp.result_type(leaf)}; pass only the float parameters to apply_fn.")
    a = jnp.abs(jnp.asarray(leaf)).astype(dtype)
    if m is not None:
      a = jnp.where(m, a, jnp.zeros((), dtype))
    if normalize and a.ndim >= 2:
      c = jnp.sum(a) / a.shape[-1]
      a = a / jnp.where(c > 0, c, 1.0).astype(dtype)
    lin.append(a)
  lin_params = jax.tree.unflatten(treedef, lin)
  x = jnp.ones(tuple(input_shape), dtype)

  def r_fn(p):
    return jnp.sum(apply_fn(p, x))

  g = jax.grad(r_fn)(lin_params)
  return jax.tree.map(lambda w, gw: jnp.abs(w * gw), lin_params, g)


def synflow_masks(apply_fn: Callable[[PyTree, jax.Array], jax.Array], params: PyTree,
                  input_shape: Sequence[int], density, *, rounds: int = 100,
                  selection: PyTree | None = None, normalize: bool | None = None) -> PyTree:
  """Iterative SynFlow masks (Tanaka et al. 2020; ``ganguli-lab/Synaptic-Flow``).

  ``rounds`` times: score with :func:`synflow_scores` under the current masks and keep the
  global top ``d_k = density ** ((k + 1) / rounds)`` of the selected weights (only currently
  kept weights compete, so masks shrink monotonically). The final global density is exactly
  ``round(n_selected * density)`` kept weights. See :func:`synflow_scores` for precision.

  Args:
    apply_fn: ``apply_fn(params, x) -> output``.
    params: parameter pytree.
    input_shape: full input shape including the batch dimension.
    density: final global density over the selected leaves (may be traced).
    rounds: number of pruning rounds (static; the paper uses 100).
    selection: tree of static bools (``select(params)`` by default: leaves with ``ndim >= 2``).
    normalize: see :func:`synflow_scores`.

  Returns:
    A mask tree (bool on selected leaves, None on dense ones).

  >>> import jax, jax.numpy as jnp
  >>> p = {"a": jax.random.normal(jax.random.key(0), (4, 8)), "b": jnp.ones((8, 2))}
  >>> m = synflow_masks(lambda p, x: x @ p["a"] @ p["b"], p, (1, 4), 0.25, rounds=10)
  >>> int(m["a"].sum() + m["b"].sum())
  12
  """
  from sparsejax.core.selection import global_topk_masks, num_to_keep  # pylint: disable=import-outside-toplevel

  flags = _selection_flags(params, selection, "synflow_masks")
  leaves, treedef = jax.tree.flatten(params)
  masks0 = jax.tree.unflatten(
      treedef, [jnp.ones(np.shape(x), bool) if f else None for x, f in zip(leaves, flags)])
  n_sel = sum(int(np.prod(np.shape(x))) for x, f in zip(leaves, flags) if f)
  dens = synflow_densities(density, rounds)

  def body(k, masks):
    s = synflow_scores(apply_fn, params, input_shape, masks=masks, normalize=normalize)
    s = jax.tree.map(lambda m, x: None if m is None else x, masks, s, is_leaf=lambda x: x is None)
    return global_topk_masks(s, k=num_to_keep(n_sel, dens[k]), masks=masks)

  return jax.lax.fori_loop(0, rounds, body, masks0)


def movement_update(scores: PyTree | None, params: PyTree, grads: PyTree) -> PyTree:
  """Accumulates movement scores ``S <- S - g * w`` (hard movement pruning, Sanh et al. 2020).

  Weights moving away from zero (``g * w < 0``) gain score. Call once per step with the
  step's gradients; prune with the accumulated scores (keep the largest).

  Args:
    scores: accumulated scores (float32 tree like ``params``) or None to start from zeros.
    params: parameter pytree.
    grads: gradient pytree like ``params``.

  Returns:
    The updated float32 score tree.

  >>> import jax.numpy as jnp
  >>> s = movement_update(None, {"w": jnp.array([1.0, -1.0])}, {"w": jnp.array([0.5, 0.5])})
  >>> movement_update(s, {"w": jnp.array([1.0, -1.0])}, {"w": jnp.array([0.5, 0.5])})["w"]
  Array([-1.,  1.], dtype=float32)
  """
  _check_same_structure(params, grads, "params", "grads")
  if scores is None:
    scores = jax.tree.map(lambda w: jnp.zeros(np.shape(w), jnp.float32), params)
  else:
    _check_same_structure(params, scores, "params", "scores")
  return jax.tree.map(
      lambda s, w, g: s - g.astype(jnp.float32) * w.astype(jnp.float32), scores, params, grads)
