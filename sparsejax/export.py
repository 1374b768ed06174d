"""From trained masks to the block-sparse kernels: one call per model.

Train with a block pattern (``pattern=sparsejax.Block(r, c)`` in
:func:`~sparsejax.optim.rigl`, :func:`~sparsejax.optim.gradual_magnitude_pruning`, ...),
then convert:

- :func:`to_block_sparse`: a param tree (Linen dict, NNX ``State``, plain dict) + its
  sparsejax mask tree -> the same tree with every masked Dense kernel replaced by a
  :class:`pallas_kernels.BlockSparseMatrix` (run it with :func:`pallas_kernels.bsr_matmul`);
- :func:`to_block_sparse_model`: an NNX model + mask tree -> a copy whose masked
  ``nnx.Linear`` layers are :class:`~sparsejax.nn.BlockSparseDense`;
- per layer: :meth:`BlockSparseDense.from_kernel <sparsejax.nn.BlockSparseDense.from_kernel>`,
  :meth:`~sparsejax.nn.BlockSparseDense.from_params` (Linen ``nn.Dense`` dicts) and
  :meth:`~sparsejax.nn.BlockSparseDense.from_linear`.

The converted model computes what the masked-dense model computes (``W * m``): values
outside the mask are dropped. A kernel whose mask is not constant on the blocks is refused
with a ``ValueError`` naming the leaf -- it is never re-pruned to fit. Masked leaves that are
not converted (not matched by ``include``, or not 2-D) come back as masked dense arrays
``where(m, W, 0)``. Export runs eagerly (outside ``jit``): it needs concrete masks to size
each matrix.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.matmul import BlockSparseMatrix, bsr_from_dense
from sparsejax.core import masks as core_masks
from sparsejax.core.paths import path_str
from sparsejax.nn.block_sparse_dense import BlockSparseDense
from sparsejax.optim.state import _unwrap

__all__ = ["to_block_sparse", "to_block_sparse_model", "DEFAULT_INCLUDE"]

DEFAULT_INCLUDE = r"(^|/)kernel$"
"""Leaves converted by default: paths ending in ``kernel`` (Linen ``nn.Dense``, ``nnx.Linear``)."""

_is_none = core_masks.is_none


def _patterns(include) -> list[re.Pattern]:
  if include is None:
    include = DEFAULT_INCLUDE
  if isinstance(include, str):
    include = [include]
  return [re.compile(p) for p in include]


def _concrete_mask(path: str, m) -> np.ndarray:
  if isinstance(m, jax.core.Tracer):
    raise TypeError(f"{path!r}: the mask is traced; call the export outside jax.jit (it needs "
                    "concrete masks to size each block-sparse matrix).")
  return np.asarray(m)


def _pure(tree):
  """Arrays instead of NNX Variables; an ``nnx.State`` as its pure nested dict."""
  tree = _unwrap(tree)
  return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _block_shape_for(block_shape, path: str):
  if callable(block_shape):
    return block_shape(path)
  if isinstance(block_shape, dict):
    for rx, bs in block_shape.items():
      if re.search(rx, path):
        return bs
    raise ValueError(f"{path!r}: no block_shape pattern of {sorted(block_shape)} matches this "
                     "leaf; add one or exclude the leaf with include=.")
  return block_shape


def to_block_sparse(params: Any, masks: Any, block_shape: Any, *,
                    include: str | Sequence[str] | None = None,
                    capacity: int | None = None) -> Any:
  """Replaces every masked Dense kernel of ``params`` by a ``BlockSparseMatrix``.

  Args:
    params: trained param tree (Linen ``{'params': ...}`` or its inner dict, NNX ``State``
      of ``nnx.Param`` variables, plain nested dicts / tuples).
    masks: its sparsejax mask tree (``None`` on dense leaves), e.g.
      ``sparsejax.optim.get_masks(opt_state)``.
    block_shape: ``(br, bc)`` of the matrices, the ``Block(br, bc)`` the masks were trained
      with (a coarser multiple works too); or ``{regex: (br, bc)}`` per leaf path.
    include: regex(es) (``re.search`` on ``/``-joined paths) of the masked 2-D leaves to
      convert; default :data:`DEFAULT_INCLUDE` (paths ending in ``kernel``). An explicit
      ``include`` that converts nothing raises.
    capacity: block slots per matrix (static); default the mask's block count.

  Returns:
    A tree like ``params`` (an NNX ``State`` comes back as its pure nested dict, as
    ``nnx.to_pure_dict`` gives): a ``BlockSparseMatrix`` on each converted leaf,
    ``where(m, W, 0)`` on other masked leaves, dense leaves unchanged.

  Raises:
    ValueError: a converted leaf's mask is not constant on ``block_shape`` blocks, the block
      does not divide the kernel, or the mask tree does not match ``params`` (the message
      names the leaf path).
    TypeError: traced masks (call it outside ``jit``) or an unsupported dtype.

  >>> import jax.numpy as jnp, sparsejax as sj
  >>> from pallas_kernels import bsr_matmul
  >>> params = {"fc": {"kernel": jnp.arange(64.).reshape(8, 8), "bias": jnp.ones(8)}}
  >>> _, masks = sj.prune(params, None, 0.5, pattern=sj.Block(4, 4))
  >>> out = to_block_sparse(params, masks, (4, 4))
  >>> type(out["fc"]["kernel"]).__name__, int(out["fc"]["kernel"].nnzb)
  ('BlockSparseMatrix', 2)
  >>> x = jnp.ones((2, 8))
  >>> bool(jnp.allclose(bsr_matmul(x, out["fc"]["kernel"]), x @ (params["fc"]["kernel"] * masks["fc"]["kernel"])))
  True
  """
  pure, masks = _pure(params), _pure(masks)
  core_masks.validate_masks(masks, pure)
  pats = _patterns(include)
  m_leaves, _ = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  p_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure, is_leaf=_is_none)
  by_path = {path_str(kp): m for kp, m in m_leaves}
  out = []
  for kp, w in p_leaves:
    path = path_str(kp)
    m = by_path.get(path)
    if m is None:
      out.append(w)
      continue
    mask = _concrete_mask(path, m)
    if np.ndim(w) == 2 and any(rx.search(path) for rx in pats):
      out.append(bsr_from_dense(w, jnp.asarray(mask), _block_shape_for(block_shape, path),
                                capacity=capacity, path=path))
    else:
      out.append(jnp.where(mask, w, jnp.zeros((), jnp.result_type(w))))
  if include is not None and not any(isinstance(x, BlockSparseMatrix) for x in out):
    masked = [p for p, m in by_path.items() if m is not None]
    raise ValueError(f"to_block_sparse: include={include!r} matches no masked 2-D leaf; masked "
                     f"leaves are {masked}.")
  return jax.tree_util.tree_unflatten(treedef, out)


def _child(node, key):
  return node[key] if isinstance(key, int) or not hasattr(node, key) else getattr(node, key)


def _set_child(node, key, value) -> None:
  if isinstance(key, int) or not hasattr(node, key):
    node[key] = value
  else:
    setattr(node, key, value)


def to_block_sparse_model(model: nnx.Module, masks: Any, block_shape: Any, *,
                          capacity: int | None = None, dtype: Any | None = None,
                          backend: str | None = None) -> nnx.Module:
  """A copy of an NNX model whose masked ``nnx.Linear`` layers are ``BlockSparseDense``.

  Every ``nnx.Linear`` whose kernel has a mask in ``masks`` is converted with
  :meth:`~sparsejax.nn.BlockSparseDense.from_linear`; other masked ``nnx.Param`` leaves (convs,
  custom kernels) get their mask applied (``where(m, W, 0)``), and the rest of the model is
  unchanged. ``model`` itself is not modified.

  Args:
    model: the trained NNX model.
    masks: mask tree over ``nnx.state(model, nnx.Param)``, e.g. ``get_masks(opt.opt_state)``
      of an ``nnx.Optimizer(model, tx, wrt=nnx.Param)``.
    block_shape: ``(br, bc)`` or ``{regex: (br, bc)}`` per kernel path (``"fc1/kernel"``).
    capacity: block slots per layer (default: the mask's block count).
    dtype: computation dtype of the converted layers (default: as the inputs and params).
    backend: matmul backend of the converted layers (``None``: by platform).

  Returns:
    The converted model.

  Raises:
    ValueError: a mask not constant on the blocks (naming the kernel path) or a mask tree
      that does not match the model's params.

  >>> import jax, jax.numpy as jnp, optax, sparsejax as sj
  >>> from flax import nnx
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.fc1, self.fc2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.fc2(jax.nn.relu(self.fc1(x)))
  >>> model = MLP(nnx.Rngs(0))
  >>> tx = sj.rigl(optax.adam(1e-3), sparsity=0.5, end_step=1000, pattern=sj.Block(8, 8),
  ...              exclude="fc2")
  >>> opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  >>> masks = sj.get_masks(opt.opt_state)
  >>> nnx.update(model, sj.apply_state_masks(nnx.state(model, nnx.Param), opt.opt_state))
  >>> fast = to_block_sparse_model(model, masks, (8, 8))
  >>> type(fast.fc1).__name__, type(fast.fc2).__name__
  ('BlockSparseDense', 'Linear')
  >>> x = jnp.ones((2, 16))
  >>> bool(jnp.allclose(fast(x), model(x), atol=1e-5))
  True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"to_block_sparse_model: expected an nnx.Module, got {type(model).__name__}; "
                    "for param trees use to_block_sparse(params, masks, block_shape).")
  model = nnx.clone(model)
  state, masks = _pure(nnx.state(model, nnx.Param)), _pure(masks)
  core_masks.validate_masks(masks, state)
  by_path = {path_str(kp): m for kp, m in
             jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]}
  converted = set()
  linears = [(tuple(p), node) for p, node in nnx.iter_graph(model)
             if isinstance(node, nnx.Linear)]
  for path, linear in linears:
    kpath = "/".join(str(k) for k in path + ("kernel",))
    m = by_path.get(kpath)
    if m is None:
      continue
    new = BlockSparseDense.from_linear(linear, jnp.asarray(_concrete_mask(kpath, m)),
                                       block_shape=_block_shape_for(block_shape, kpath),
                                       capacity=capacity, dtype=dtype, backend=backend,
                                       path=kpath)
    parent = model
    for key in path[:-1]:
      parent = _child(parent, key)
    _set_child(parent, path[-1], new)
    converted.add(kpath)
  # Masked params that are not Linear kernels: apply their masks (the masked-dense model).
  for kp, m in jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)[0]:
    path = path_str(kp)
    if m is None or path in converted:
      continue
    keys = [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in kp]
    node = model
    for key in keys[:-1]:
      node = _child(node, key)
    var = _child(node, keys[-1])
    var[...] = jnp.where(jnp.asarray(_concrete_mask(path, m)), var[...],
                         jnp.zeros((), var[...].dtype))
  return model
