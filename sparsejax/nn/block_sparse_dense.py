"""Flax NNX block-sparse Dense layer running on the ``pallas_kernels`` block-sparse matmul."""

from __future__ import annotations

import dataclasses

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.matmul import BlockSparseMatrix, bsr_from_dense, bsr_matmul

# The index arrays of the format, including its precomputed heaviest-first visit orders
# (without them the GPU kernels would sort on every call).
_INDEX_FIELDS = ("row_ptr", "row_idx", "col_idx", "col_ptr", "col_slot", "row_order", "col_order")


class BlockSparseIndex(nnx.Variable):
  """Index arrays of a block-sparse weight: state, but not a trainable ``nnx.Param``."""


class BlockSparseDense(nnx.Module):
  """``y = x @ W + b`` with a block-sparse ``(in, out)`` kernel ``W``.

  The trainable parameter is ``blocks`` (``[capacity, br, bc]``, the stored blocks); the block
  structure lives in :class:`BlockSparseIndex` variables, which ``nnx.Optimizer(wrt=nnx.Param)``
  leaves alone. ``capacity`` is fixed, so :meth:`set_mask` can move blocks (RigL/SET in block
  pattern) inside ``nnx.jit`` without changing shapes.

  Args:
    in_features: input size.
    out_features: output size.
    block_shape: ``(br, bc)``; must divide ``(in_features, out_features)``.
    mask: bool ``(in, out)`` block mask (e.g. ``sparsejax.core.patterns.block_mask``); default
      all blocks.
    capacity: number of block slots; default the mask's block count.
    use_bias: whether to add a bias.
    dtype: computation dtype; default the promotion of input and parameter dtypes.
    param_dtype: parameter dtype.
    kernel_init: initializer of the dense ``(in, out)`` kernel, masked afterwards.
    bias_init: bias initializer.
    backend: matmul backend (see ``pallas_kernels.bsr_matmul``); ``None`` picks by platform.
    rngs: ``nnx.Rngs`` for the initializers.

  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> layer = BlockSparseDense(32, 16, block_shape=(16, 16), rngs=nnx.Rngs(0))
  >>> layer(jnp.ones((4, 32))).shape, layer.blocks[...].shape
  ((4, 16), (2, 16, 16))
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      block_shape: tuple[int, int] = (128, 128),
      mask: jax.Array | None = None,
      capacity: int | None = None,
      use_bias: bool = True,
      dtype: Any | None = None,
      param_dtype: Any = jnp.float32,
      kernel_init: Any = nnx.initializers.lecun_normal(),
      bias_init: Any = nnx.initializers.zeros_init(),
      backend: str | None = None,
      rngs: nnx.Rngs,
  ):
    kernel = kernel_init(rngs.params(), (in_features, out_features), param_dtype)
    if mask is None:
      mask = jnp.ones((in_features, out_features), bool)
    w = bsr_from_dense(kernel, mask, block_shape, capacity=capacity, path="kernel")
    self.in_features, self.out_features = in_features, out_features
    self.shape = w.shape
    self.dtype, self.backend = dtype, backend
    self.blocks = nnx.Param(w.blocks)
    for name in _INDEX_FIELDS:
      setattr(self, name, BlockSparseIndex(getattr(w, name)))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None

  @property
  def weight(self) -> BlockSparseMatrix:
    """The kernel as a :class:`pallas_kernels.BlockSparseMatrix`."""
    return BlockSparseMatrix(blocks=self.blocks[...], shape=self.shape,
                             **{n: getattr(self, n)[...] for n in _INDEX_FIELDS})

  def __call__(self, x: jax.Array) -> jax.Array:
    w = self.weight
    if self.dtype is not None:
      x = x.astype(self.dtype)
      w = dataclasses.replace(w, blocks=w.blocks.astype(self.dtype))
    y = bsr_matmul(x, w, backend=self.backend, path="kernel")
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y

  def dense_kernel(self) -> jax.Array:
    """The dense ``(in, out)`` kernel (zeros outside stored blocks)."""
    return self.weight.to_dense()

  def mask(self) -> jax.Array:
    """The bool ``(in, out)`` block mask of the stored blocks."""
    return self.weight.mask()

  def set_mask(self, mask: jax.Array) -> None:
    """Moves the stored blocks to ``mask`` (jit-able, capacity unchanged).

    Blocks kept by both masks keep their values; newly grown blocks start at zero.
    """
    w = bsr_from_dense(self.dense_kernel(), mask, self.weight.block_shape, capacity=self.weight.capacity, path="kernel")
    self.blocks[...] = w.blocks
    for name in _INDEX_FIELDS:
      getattr(self, name)[...] = getattr(w, name)

  @classmethod
  def from_kernel(
      cls,
      kernel: jax.Array,
      mask: jax.Array,
      *,
      bias: jax.Array | None = None,
      block_shape: tuple[int, int],
      capacity: int | None = None,
      dtype: Any | None = None,
      backend: str | None = None,
      path: str = "kernel",
  ) -> BlockSparseDense:
    """From a trained dense ``(in, out)`` kernel, its block mask and an optional bias.

    Values outside the mask are dropped (the layer computes ``x @ (kernel * mask) + bias``). The
    mask must be constant on ``block_shape`` blocks, as masks trained with
    ``pattern=sparsejax.Block(*block_shape)`` are; otherwise a ``ValueError`` names ``path``
    and the first partly kept block (the kernel is never re-pruned). Call it outside ``jit``
    (the mask must be concrete unless ``capacity`` is given).

    >>> import jax.numpy as jnp
    >>> kernel, bias = jnp.arange(32.).reshape(4, 8), jnp.ones(8)
    >>> mask = jnp.zeros((4, 8), bool).at[:2, 4:].set(True)
    >>> layer = BlockSparseDense.from_kernel(kernel, mask, bias=bias, block_shape=(2, 4))
    >>> bool(jnp.allclose(layer(jnp.ones((1, 4))), jnp.ones((1, 4)) @ (kernel * mask) + bias))
    True
    """
    kernel = jnp.asarray(kernel)
    # Validates shapes, dtype and block-constancy with ``path`` in the error messages.
    w = bsr_from_dense(kernel, mask, block_shape, capacity=capacity, path=path)
    if bias is not None and tuple(jnp.shape(bias)) != (kernel.shape[1],):
      raise ValueError(f"{path!r}: bias shape {tuple(jnp.shape(bias))} does not match the kernel's "
                       f"output size {kernel.shape[1]}; pass the layer's (out,) bias.")
    return cls(
        kernel.shape[0],
        kernel.shape[1],
        block_shape=block_shape,
        mask=mask,
        capacity=w.capacity,
        use_bias=bias is not None,
        dtype=dtype,
        param_dtype=kernel.dtype,
        kernel_init=lambda *_: kernel,
        bias_init=lambda *_: jnp.asarray(bias, kernel.dtype),
        backend=backend,
        rngs=nnx.Rngs(0),
    )

  @classmethod
  def from_params(
      cls,
      params: Any,
      mask: Any,
      *,
      block_shape: tuple[int, int],
      capacity: int | None = None,
      dtype: Any | None = None,
      backend: str | None = None,
      path: str = "",
  ) -> BlockSparseDense:
    """From a Flax Linen ``nn.Dense`` param dict (``{'kernel': ..., 'bias': ...}``) and its mask.

    ``mask`` is the kernel's bool mask, or the matching sub-tree of a sparsejax mask tree
    (``{'kernel': mask, 'bias': None}``). ``path`` (e.g. ``"params/Dense_0"``) prefixes the
    leaf names in error messages.

    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> dense = nn.Dense(8)
    >>> p = dense.init(jax.random.key(0), jnp.ones((1, 4)))["params"]
    >>> mask = jnp.zeros((4, 8), bool).at[:, :4].set(True)
    >>> layer = BlockSparseDense.from_params(p, mask, block_shape=(4, 4))
    >>> x = jnp.ones((2, 4))
    >>> bool(jnp.allclose(layer(x), dense.apply({"params": {"kernel": p["kernel"] * mask, "bias": p["bias"]}}, x)))
    True
    """
    where = f"{path}/kernel" if path else "kernel"
    if not hasattr(params, "keys") or "kernel" not in params:
      raise ValueError(f"{path or 'params'}: expected a Dense param dict with a 'kernel' (and "
                       f"optionally 'bias'), got {type(params).__name__}"
                       + (f" with keys {sorted(params.keys())}" if hasattr(params, "keys") else ""))
    extra = sorted(set(params.keys()) - {"kernel", "bias"})
    if extra:
      raise ValueError(f"{path or 'params'}: a Dense param dict holds 'kernel' and 'bias', not "
                       f"{extra}; convert Dense layers only.")
    if hasattr(mask, "keys"):
      if mask.get("bias") is not None:
        raise ValueError(f"{path or 'params'}: the bias is masked; BlockSparseDense keeps a dense "
                         "bias (exclude biases from the sparse transformation).")
      mask = mask["kernel"]
    if mask is None:
      raise ValueError(f"{where!r}: the kernel has no mask (it is dense); keep it as nn.Dense.")
    return cls.from_kernel(params["kernel"], mask, bias=params.get("bias"),
                           block_shape=block_shape, capacity=capacity, dtype=dtype,
                           backend=backend, path=where)

  @classmethod
  def from_linear(
      cls,
      linear: nnx.Linear,
      mask: jax.Array,
      *,
      block_shape: tuple[int, int],
      capacity: int | None = None,
      dtype: Any | None = None,
      backend: str | None = None,
      path: str = "kernel",
  ) -> BlockSparseDense:
    """Converts a trained ``nnx.Linear`` and its block mask (values outside the mask are dropped).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> dense = nnx.Linear(32, 32, rngs=nnx.Rngs(0))
    >>> mask = jnp.zeros((32, 32), bool).at[:16, 16:].set(True)
    >>> sparse = BlockSparseDense.from_linear(dense, mask, block_shape=(16, 16))
    >>> bool(jnp.allclose(sparse(jnp.ones((2, 32))), jnp.ones((2, 32)) @ (dense.kernel[...] * mask) + dense.bias[...]))
    True
    """
    bias = None if linear.bias is None else linear.bias[...]
    return cls.from_kernel(linear.kernel[...], mask, bias=bias, block_shape=block_shape,
                           capacity=capacity, dtype=dtype, backend=backend, path=path)
