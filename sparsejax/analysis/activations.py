"""Activation sparsity: capture hidden activations, count their nonzeros, top-k activation.

Li et al. 2023, "The Lazy Neuron Phenomenon: On Emergence of Activation Sparsity in
Transformers" (ICLR): after training, only a few percent of the post-ReLU MLP activations of a
token are nonzero. The statistics here treat an activation tensor of shape ``(..., features)``
as ``tokens x neurons``: every leading axis (batch, sequence) indexes tokens, the last axis
indexes neurons.
"""

from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sparsejax.core import paths as _paths

__all__ = [
  "ActivationStats",
  "activation_sparsity",
  "capture_activations",
  "dead_neurons",
  "nonzero_fraction",
  "nonzero_per_neuron",
  "nonzero_per_token",
  "topk_activation",
]


def _key(path: str) -> str:
  """Captured-tensor name from a flattened intermediates path.

  Drops the Linen ``intermediates`` collection, NNX ``value`` attributes, the ``__call__``
  method name of a module's output and the index of a value recorded once:
  ``intermediates/fc1/__call__/0`` and ``fc1/__call__/value/0`` both become ``fc1``.
  """
  parts = [p for p in path.split("/") if p != "value"]
  if parts and parts[0] == "intermediates":
    parts = parts[1:]
  if len(parts) > 1 and parts[-2] == "__call__":
    parts = parts[:-2] + parts[-1:]
  return "/".join(parts)


def _flatten_intermediates(tree: Any) -> dict[str, jax.Array]:
  """``{name: array}``; a value recorded once is named without its index, repeats as ``name/i``."""
  groups: dict[str, list] = {}
  for path, leaf in _paths.paths_with_leaves(tree):
    name = _key(path)
    stem, _, idx = name.rpartition("/")
    if idx.isdigit():
      groups.setdefault(stem or "__call__", []).append(leaf)
    else:
      groups.setdefault(name, []).append(leaf)
  out = {}
  for name, leaves in groups.items():
    if len(leaves) == 1:
      out[name] = leaves[0]
    else:
      out.update({f"{name}/{i}": leaf for i, leaf in enumerate(leaves)})
  return out


def _filter(fn: str, acts: dict[str, jax.Array], include) -> dict[str, jax.Array]:
  if include is None:
    return acts
  pats = [include] if isinstance(include, (str, re.Pattern)) else list(include)
  out = {}
  for p in pats:
    if not isinstance(p, (str, re.Pattern)):
      raise TypeError(f"{fn}: include must be a regex or a sequence of regexes, got {p!r}.")
    try:
      rx = re.compile(p) if isinstance(p, str) else p
    except re.error as e:
      raise ValueError(f"{fn}: invalid include regex {p!r}: {e}.") from None
    hits = {k: v for k, v in acts.items() if rx.search(k)}
    if not hits:
      raise ValueError(f"{fn}: include regex {rx.pattern!r} matches no captured tensor; captured names are "
                       f"{sorted(acts)}. Name a module (its output) or a sown value.")
    out.update(hits)
  return {k: acts[k] for k in acts if k in out}


def capture_activations(model: Any, *args: Any, variables: Any = None, include: str | Sequence[str] | None = None,
                        transform: Callable[[jax.Array], jax.Array] | None = None,
                        **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
  """Runs a Flax model and returns its output and the tensors it computed, by name.

  Without editing the model, every submodule's output is recorded (Flax NNX: ``nnx.capture``
  with ``method_outputs=nnx.Intermediate``; Linen: ``apply(..., capture_intermediates=True)``),
  together with any values the model sows (``self.sow(nnx.Intermediate, 'h', h)`` in NNX,
  ``self.sow('intermediates', 'h', h)`` in Linen). A module's output is named by its path
  (``"fc1"``, ``"blocks/0/mlp/up"``); a sown value by its path and name. Activation functions
  called as plain functions (``nnx.relu(self.fc1(x))``) are not modules: capture the layer
  before them and pass the activation as ``transform`` (or sow the post-activation value).

  Works under jit (the names are static): ``nnx.jit`` for NNX models (or ``nnx.split`` /
  ``nnx.merge`` inside ``jax.jit``; a closed-over NNX module cannot be mutated from inside
  ``jax.jit``), ``jax.jit`` for Linen.

  Args:
    model: an ``nnx.Module`` or a Linen ``nn.Module``.
    *args: positional arguments of the model call.
    variables: Linen variables (``{'params': ...}``); must be None for NNX models.
    include: regex or regexes (``re.search`` on the names) selecting tensors; None keeps all.
    transform: applied to every selected tensor, e.g. ``jax.nn.relu`` to turn a captured
      pre-activation into the post-activation.
    **kwargs: keyword arguments of the model call.

  Returns:
    ``(output, {name: tensor})``.

  Raises:
    ValueError: an ``include`` regex that matches no name (the message lists the names), or
      ``variables`` missing for a Linen model.

  >>> import jax, jax.numpy as jnp
  >>> from flax import nnx
  >>> class MLP(nnx.Module):
  ...   def __init__(self, rngs):
  ...     self.fc1, self.fc2 = nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)
  ...   def __call__(self, x):
  ...     return self.fc2(nnx.relu(self.fc1(x)))
  >>> _, acts = capture_activations(MLP(nnx.Rngs(0)), jnp.ones((5, 3)), include='fc1', transform=jax.nn.relu)
  >>> {k: v.shape for k, v in acts.items()}
  {'fc1': (5, 4)}
  """
  fn = "capture_activations"
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  if isinstance(model, nnx.Module):
    if variables is not None:
      raise ValueError(f"{fn}: variables are only for Linen models; an NNX module holds its own state.")
    out, inter = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate)(*args, **kwargs)
    tree = nnx.to_pure_dict(inter) if hasattr(nnx, "to_pure_dict") else inter
  elif isinstance(model, nn.Module):
    if variables is None:
      raise ValueError(f"{fn}: a Linen model needs variables=..., e.g. variables=model.init(key, x).")
    variables = {k: v for k, v in dict(variables).items() if k != "intermediates"}
    out, state = model.apply(variables, *args, capture_intermediates=True, mutable=["intermediates"], **kwargs)
    tree = state["intermediates"]
  else:
    raise TypeError(f"{fn}: model must be a flax nnx.Module or linen.Module, got {type(model).__name__}.")
  acts = _filter(fn, _flatten_intermediates(tree), include)
  if transform is not None:
    acts = {k: transform(v) for k, v in acts.items()}
  return out, acts


def _active(a: jax.Array, threshold) -> jax.Array:
  a = jnp.asarray(a)
  if a.ndim == 0:
    raise ValueError("activation statistics need an array of shape (..., features), got a scalar.")
  return jnp.abs(a) > threshold


def nonzero_fraction(a: jax.Array, *, threshold: float = 0.0) -> jax.Array:
  """Fraction of entries with ``|a| > threshold`` (the Lazy Neuron percentage, as a fraction).

  >>> import jax.numpy as jnp
  >>> float(nonzero_fraction(jnp.array([[0., 1.], [2., 0.]])))
  0.5
  """
  return jnp.mean(_active(a, threshold), dtype=jnp.float32)


def nonzero_per_token(a: jax.Array, *, threshold: float = 0.0) -> jax.Array:
  """Fraction of active neurons of each token: shape ``a.shape[:-1]``.

  >>> import jax.numpy as jnp
  >>> nonzero_per_token(jnp.array([[0., 1.], [2., 3.]])).tolist()
  [0.5, 1.0]
  """
  return jnp.mean(_active(a, threshold), axis=-1, dtype=jnp.float32)


def nonzero_per_neuron(a: jax.Array, *, threshold: float = 0.0) -> jax.Array:
  """Fraction of tokens on which each neuron is active: shape ``(features,)``.

  >>> import jax.numpy as jnp
  >>> nonzero_per_neuron(jnp.array([[0., 1.], [2., 3.]])).tolist()
  [0.5, 1.0]
  """
  act = _active(a, threshold)
  return jnp.mean(act.reshape(-1, act.shape[-1]), axis=0, dtype=jnp.float32)


def dead_neurons(a: jax.Array, *, threshold: float = 0.0) -> jax.Array:
  """Number of neurons inactive on every token (int32 scalar).

  >>> import jax.numpy as jnp
  >>> int(dead_neurons(jnp.array([[0., 1., 0.], [2., 3., 0.]])))
  1
  """
  act = _active(a, threshold)
  return jnp.sum(~jnp.any(act.reshape(-1, act.shape[-1]), axis=0), dtype=jnp.int32)


class ActivationStats(NamedTuple):
  """Activation-sparsity statistics of one tensor (see :func:`activation_sparsity`)."""
  nonzero_fraction: jax.Array
  per_token: jax.Array
  per_neuron: jax.Array
  dead_neurons: jax.Array


def activation_sparsity(acts: Any, *, threshold: float = 0.0) -> dict[str, ActivationStats]:
  """Per-layer statistics of a dict (or any pytree) of activations, keyed by path.

  Args:
    acts: ``{name: tensor}`` as returned by :func:`capture_activations`, or any pytree of
      arrays of shape ``(..., features)``.
    threshold: an entry counts as active when ``|a| > threshold``.

  Returns:
    ``{path: ActivationStats(nonzero_fraction, per_token, per_neuron, dead_neurons)}``.

  >>> import jax.numpy as jnp
  >>> s = activation_sparsity({'fc1': jnp.array([[0., 1., 0.], [2., 3., 0.]])})['fc1']
  >>> float(s.nonzero_fraction), [round(float(t), 3) for t in s.per_token], int(s.dead_neurons)
  (0.5, [0.333, 0.667], 1)
  """
  out = {}
  for path, a in _paths.paths_with_leaves(acts):
    if np.ndim(a) == 0:
      raise ValueError(f"activation_sparsity: activation at '{path}' is a scalar; expected (..., features).")
    out[path] = ActivationStats(nonzero_fraction(a, threshold=threshold), nonzero_per_token(a, threshold=threshold),
                                nonzero_per_neuron(a, threshold=threshold), dead_neurons(a, threshold=threshold))
  return out


def topk_activation(x: jax.Array, k: int, *, by_magnitude: bool = False) -> jax.Array:
  """Keeps the ``k`` largest entries of each token (last axis) and zeros the rest.

  The top-k activation of Li et al. 2023: ``k`` is per token (per row), not over the batch.
  Exactly ``k`` entries survive per row (ties: the lower index wins). Gradients flow to the
  kept entries only.

  Args:
    x: array of shape ``(..., features)``.
    k: static number kept per token, ``1 <= k <= features``.
    by_magnitude: rank by ``|x|`` instead of ``x``.

  Returns:
    Array like ``x``.

  >>> import jax.numpy as jnp
  >>> topk_activation(jnp.array([[3., -1., 2., 5.], [0., 1., 1., 0.]]), 2).tolist()
  [[3.0, 0.0, 0.0, 5.0], [0.0, 1.0, 1.0, 0.0]]
  """
  x = jnp.asarray(x)
  if x.ndim == 0:
    raise ValueError("topk_activation: x must have shape (..., features), got a scalar.")
  if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 1 <= k <= x.shape[-1]:
    raise ValueError(f"topk_activation: k must be a Python int in [1, {x.shape[-1]}] (features), got {k!r}.")
  score = jnp.abs(x) if by_magnitude else x
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(score), int(k))
  keep = jnp.sum(jax.nn.one_hot(idx, x.shape[-1], dtype=jnp.bool_), axis=-2, dtype=jnp.int32) > 0
  return jnp.where(keep, x, jnp.zeros((), x.dtype))
