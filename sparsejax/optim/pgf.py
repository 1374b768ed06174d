"""Progressive gradient flow for N:M sparsity (Bambhaniya et al. 2024).

Also called "progressive gradient masking". Two schedules on top of
:func:`sparsejax.optim.nm_training`, each with an optional dense warm-up
(``dense_steps``) and a hard-mask fine-tune phase (the last
``finetune_steps`` of ``total_steps``):

* :func:`mdgf` (mask decay): the forward pass uses
  ``W * (m + (1 - m) * beta_t)``, ``beta_t`` decaying linearly
  (``max(1 - rate * t, 0)``) or exponentially (``exp(-rate * t)``).
* :func:`sdgf` (structure decay): a schedule of N:M patterns converging to the
  target (stepwise, geometric, densify or custom).

The reference implementation counts ``t`` from the start of training, so
``beta`` already decays during the dense warm-up; ``count_from="sparse"``
(default) counts from the start of the sparse phase instead.
"""

from __future__ import annotations

import math
import jax.numpy as jnp
import optax

from sparsejax import schedules
from sparsejax.optim.nm import grouping_axis, nm_training

__all__ = ["mdgf", "sdgf"]


def _phases(total_steps, dense_steps, finetune_steps):
  """(dense_steps, finetune_start or None); values may be traced."""
  schedules.check_step("dense_steps", dense_steps, 0)
  if total_steps is not None:
    schedules.check_step("total_steps", total_steps, 0, lo_open=True)
  if finetune_steps is None:
    return dense_steps, None
  schedules.check_step("finetune_steps", finetune_steps, 0)
  if total_steps is None:
    raise ValueError("finetune_steps needs total_steps (the fine-tune phase is the "
                     "last finetune_steps of total_steps)")
  t, d, f = (schedules.concrete(x) for x in (total_steps, dense_steps, finetune_steps))
  if None not in (t, d, f) and t - f <= d:
    raise ValueError(f"total_steps ({t:g}) must exceed dense_steps ({d:g}) + "
                     f"finetune_steps ({f:g})")
  return dense_steps, total_steps - finetune_steps


def mdgf(inner: optax.GradientTransformation, *, nm="2:4", rate, kind: str = "linear",
         total_steps=None, dense_steps=0, finetune_steps=None, count_from: str = "sparse",
         decay=0.0, axis: int | None = None, include=None, exclude=None,
         ) -> optax.GradientTransformationExtraArgs:
  """MDGF: N:M training whose pruned weights fade out of the forward pass.

  Use :func:`sparsejax.optim.forward_params` for the forward weights
  ``W * (m + (1 - m) * beta_t)`` (``straight_through=False`` also scales the
  pruned weights' gradients by ``beta_t``).

  Args:
    inner: the optimizer.
    nm: target pattern (``"2:4"``, ``(1, 8)``, ...).
    rate: decay constant ``c`` (linear: ``beta = max(1 - c t, 0)``;
      exponential: ``beta = exp(-c t)``).
    kind: ``"linear"`` or ``"exponential"``.
    total_steps: length of training (needed with ``finetune_steps``).
    dense_steps: dense warm-up steps.
    finetune_steps: final hard-mask fine-tune steps (``None``: no fine-tune).
    count_from: ``"sparse"`` (t counts from the end of the warm-up) or
      ``"start"`` (the reference code's behaviour).
    decay: optional SR-STE ``lambda_W``.
    axis: grouping axis (``None``: the pattern's axis or -2).
    include: regex(es) of leaf paths to sparsify (default: ndim >= 2).
    exclude: regex(es) of leaf paths to keep dense.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and run the loss on :func:`~sparsejax.optim.forward_params`
    (NNX: :func:`~sparsejax.optim.forward_model`); see the rules in
    :mod:`sparsejax.optim`.

  >>> import jax, jax.numpy as jnp, optax
  >>> from sparsejax.optim import get_beta
  >>> tx = mdgf(optax.sgd(0.1), nm="1:2", rate=0.25)
  >>> p = {'w': jnp.ones((2, 2))}
  >>> s, update = tx.init(p), jax.jit(tx.update)
  >>> for _ in range(2):
  ...   _, s = update({'w': jnp.zeros((2, 2))}, s, p)
  >>> float(get_beta(s))
  0.5
  """
  if kind not in ("linear", "exponential"):
    raise ValueError(f"kind={kind!r}: use 'linear' or 'exponential'")
  if count_from not in ("sparse", "start"):
    raise ValueError(f"count_from={count_from!r}: use 'sparse' or 'start'")
  schedules.check_range("rate", rate, 0.0, math.inf)
  dense, ft_start = _phases(total_steps, dense_steps, finetune_steps)
  fn = schedules.linear_beta if kind == "linear" else schedules.exponential_beta

  def beta(step):
    t = jnp.asarray(step) - (jnp.asarray(dense) if count_from == "sparse" else 0)
    return fn(jnp.maximum(t, 0), rate)

  return nm_training(inner, patterns=((0, nm),), axis=axis, decay=decay, beta=beta,
                     dense_steps=dense, finetune_start=ft_start, include=include,
                     exclude=exclude)


def sdgf(inner: optax.GradientTransformation, *, nm="1:8", kind: str = "stepwise",
         total_steps, dense_steps=0, finetune_steps=None, num_frames=None, custom=None,
         decay=0.0, axis: int | None = None, include=None, exclude=None,
         ) -> optax.GradientTransformationExtraArgs:
  """SDGF: N:M training through a schedule of patterns ending at ``nm``.

  The sparse phase ``[dense_steps, total_steps - finetune_steps)`` is split
  into frames (:func:`sparsejax.schedules.sdgf_starts`) with the patterns of
  :func:`sparsejax.schedules.sdgf_patterns`; the fine-tune phase uses the
  target pattern, frozen and hard. Every pattern's M must divide the grouping
  axis of every sparsified leaf (checked at ``init``).

  Args:
    inner: the optimizer.
    nm: target pattern.
    kind: ``"stepwise"``, ``"geometric"``, ``"densify"`` or ``"custom"``.
    total_steps: length of training.
    num_frames: number of frames for geometric/densify (default 4).
    custom: ``{start_step: "n:m"}`` for ``kind="custom"``.
    dense_steps, finetune_steps, decay, axis, include, exclude: as in
      :func:`mdgf`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: keep it the outermost
    transformation and run the loss on :func:`~sparsejax.optim.forward_params`
    (NNX: :func:`~sparsejax.optim.forward_model`); see the rules in
    :mod:`sparsejax.optim`.

  >>> import jax, jax.numpy as jnp, optax
  >>> from sparsejax.optim import get_target_sparsity
  >>> tx = sdgf(optax.sgd(0.1), nm="1:4", total_steps=4)
  >>> p = {'w': jnp.ones((4, 2))}
  >>> s, update, out = tx.init(p), jax.jit(tx.update), []
  >>> for _ in range(4):
  ...   out.append(float(get_target_sparsity(s)))
  ...   _, s = update({'w': jnp.zeros((4, 2))}, s, p)
  >>> out
  [0.25, 0.5, 0.75, 0.75]
  """
  dense, ft_start = _phases(total_steps, dense_steps, finetune_steps)
  if kind == "custom":
    pats = schedules.sdgf_schedule(nm, "custom", total_steps=total_steps,
                                   dense_steps=dense, custom=custom)
  else:
    patterns = schedules.sdgf_patterns(nm, kind, num_frames=num_frames)
    starts = schedules.sdgf_starts(
        len(patterns), total_steps=total_steps, dense_steps=dense,
        finetune_steps=0 if finetune_steps is None else finetune_steps)
    pats = tuple((starts[i], p) for i, p in enumerate(patterns))
  if ft_start is not None:
    pats = pats + ((ft_start, schedules.parse_nm(nm)),)
  return nm_training(inner, patterns=pats, axis=grouping_axis(axis, nm), decay=decay,
                     dense_steps=dense, finetune_start=ft_start, include=include,
                     exclude=exclude)
