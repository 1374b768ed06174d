"""CETT: cumulative errors of tail truncation, its thresholds and the PPL-p% sweep.

Luo et al. 2024, "Sparsing Law: Towards Large Language Models with Greater Activation
Sparsity" (arXiv:2411.02335). An FFN's output is ``y = sum_i a_i W_down[i, :]`` over its hidden
neurons ``i``. Neuron ``i`` contributes ``n_i = |a_i| * ||W_down[i, :]||``. Truncating every
neuron with ``n_i <= tau`` leaves the error ``e = sum_{n_i <= tau} a_i W_down[i, :]``, and

    CETT(tau) = mean over tokens of ||e|| / ||y||.

For a target CETT (e.g. 0.2) each layer gets the threshold ``tau`` reaching it; the activation
ratio is the fraction of neurons with ``n_i > tau``. Sweeping the CETT and evaluating the
perplexity gives the PPL-p% point: the sparsest setting whose perplexity is within ``p``
percent of the untruncated model. This works for any activation function (ReLU, SiLU, GELU),
which is why it compares them fairly.

``w_down`` uses the Flax Dense layout ``(d_ff, d_model)``: row ``i`` is neuron ``i``'s output
weights. Pass ``w_down.T`` for a PyTorch ``(out, in)`` weight.
"""

from __future__ import annotations

from typing import Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "CETTCurve",
  "activation_ratio",
  "cett",
  "cett_sweep",
  "cett_threshold",
  "neuron_contributions",
  "ppl_p_point",
  "truncate_activations",
]


def _check(fn: str, acts, w_down):
  acts = jnp.asarray(acts)
  w_down = jnp.asarray(w_down)
  if acts.ndim < 1 or w_down.ndim != 2 or acts.shape[-1] != w_down.shape[0]:
    raise ValueError(f"{fn}: need acts of shape (..., d_ff) and w_down of shape (d_ff, d_model) (Flax "
                     f"layout; pass W.T for a PyTorch weight), got {acts.shape} and {w_down.shape}.")
  return acts, w_down


def neuron_contributions(acts: jax.Array, w_down: jax.Array) -> jax.Array:
  """``n_i = |a_i| * ||W_down[i, :]||`` for every token and neuron: shape ``acts.shape``.

  >>> import jax.numpy as jnp
  >>> neuron_contributions(jnp.array([[2., -1.]]), jnp.array([[3., 4.], [0., 1.]])).tolist()
  [[10.0, 1.0]]
  """
  acts, w_down = _check("neuron_contributions", acts, w_down)
  return jnp.abs(acts) * jnp.linalg.norm(w_down.astype(jnp.float32), axis=1)


def truncate_activations(acts: jax.Array, w_down: jax.Array, tau) -> jax.Array:
  """Zeros the activations whose contribution ``n_i`` is at most ``tau`` (per token).

  Use it inside the model's forward pass to evaluate the truncated model.

  >>> import jax.numpy as jnp
  >>> truncate_activations(jnp.array([[2., -1.]]), jnp.array([[3., 4.], [0., 1.]]), 1.0).tolist()
  [[2.0, 0.0]]
  """
  n = neuron_contributions(acts, w_down)
  return jnp.where(n > tau, acts, jnp.zeros((), jnp.asarray(acts).dtype))


def cett(acts: jax.Array, w_down: jax.Array, tau) -> jax.Array:
  """Mean relative error ``||e|| / ||y||`` of truncating the neurons with ``n_i <= tau``.

  Tokens whose output is exactly zero contribute 0.

  Args:
    acts: FFN hidden activations (the input of the down projection), ``(..., d_ff)``.
    w_down: down projection ``(d_ff, d_model)``.
    tau: threshold (may be traced).

  Returns:
    Scalar float32 in [0, 1] (can exceed 1 when the dropped terms do not cancel).

  >>> import jax.numpy as jnp
  >>> round(float(cett(jnp.array([[2., -1.]]), jnp.array([[3., 4.], [0., 1.]]), 1.0)), 6)  # ||(0,-1)|| / ||(6,7)||
  0.108465
  """
  acts, w_down = _check("cett", acts, w_down)
  a = acts.astype(jnp.float32)
  w = w_down.astype(jnp.float32)
  n = jnp.abs(a) * jnp.linalg.norm(w, axis=1)
  full = jnp.linalg.norm(a @ w, axis=-1)
  tail = jnp.linalg.norm(jnp.where(n <= tau, a, 0.0) @ w, axis=-1)
  return jnp.mean(jnp.where(full > 0, tail / jnp.where(full > 0, full, 1.0), 0.0))


def activation_ratio(acts: jax.Array, w_down: jax.Array, tau) -> jax.Array:
  """Fraction of neurons kept (``n_i > tau``), averaged over tokens.

  >>> import jax.numpy as jnp
  >>> float(activation_ratio(jnp.array([[2., -1.]]), jnp.array([[3., 4.], [0., 1.]]), 1.0))
  0.5
  """
  return jnp.mean(neuron_contributions(acts, w_down) > tau, dtype=jnp.float32)


def cett_threshold(acts: jax.Array, w_down: jax.Array, target, *, iters: int = 40) -> jax.Array:
  """Largest threshold ``tau`` with ``CETT(tau) <= target``, by bisection (jit-able).

  CETT is non-decreasing in ``tau``, from 0 at ``tau = 0`` to 1 at ``tau = max n_i``.

  Args:
    acts: calibration activations ``(..., d_ff)``.
    w_down: down projection ``(d_ff, d_model)``.
    target: target CETT in [0, 1] (may be traced).
    iters: bisection steps (static); 40 resolves float32.

  Returns:
    Scalar float32 threshold.

  >>> import jax, jax.numpy as jnp
  >>> a = jax.random.normal(jax.random.key(0), (64, 16))
  >>> w = jax.random.normal(jax.random.key(1), (16, 8))
  >>> tau = cett_threshold(a, w, 0.2)
  >>> bool(cett(a, w, tau) <= 0.2), bool(cett(a, w, tau * 1.01) > 0.2)
  (True, True)
  """
  acts, w_down = _check("cett_threshold", acts, w_down)
  hi0 = jnp.max(neuron_contributions(acts, w_down))

  def body(_, lohi):
    lo, hi = lohi
    mid = 0.5 * (lo + hi)
    ok = cett(acts, w_down, mid) <= target
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo, _ = jax.lax.fori_loop(0, iters, body, (jnp.zeros((), jnp.float32), hi0.astype(jnp.float32)))
  return lo


class CETTCurve(NamedTuple):
  """A CETT sweep (see :func:`cett_sweep`); arrays are indexed by sweep point."""
  cett: np.ndarray
  thresholds: dict[str, np.ndarray]
  activation_ratio: np.ndarray
  metric: np.ndarray


def cett_sweep(eval_fn: Callable[[dict[str, jax.Array]], jax.Array],
               layers: Mapping[str, tuple[jax.Array, jax.Array]], cett_targets: Sequence[float],
               *, iters: int = 40) -> CETTCurve:
  """Sweeps a common CETT over layers: thresholds, activation ratio and the user's metric.

  Args:
    eval_fn: ``eval_fn({layer: tau}) -> scalar`` (e.g. perplexity of the model whose FFN
      activations are truncated by :func:`truncate_activations` with these thresholds).
    layers: ``{layer: (calibration_acts, w_down)}``.
    cett_targets: CETT values, e.g. ``[0, 0.05, 0.1, 0.2, 0.3]``; include 0 to get the
      reference metric of the untruncated model for :func:`ppl_p_point`.
    iters: bisection steps per threshold.

  Returns:
    :class:`CETTCurve` with the activation ratio over all layers' neurons (size-weighted).

  >>> import jax, jax.numpy as jnp
  >>> a = jax.nn.relu(jax.random.normal(jax.random.key(0), (32, 16)))
  >>> w = jax.random.normal(jax.random.key(1), (16, 8))
  >>> ev = lambda taus: cett(a, w, taus['ffn'])
  >>> c = cett_sweep(ev, {'ffn': (a, w)}, [0.0, 0.1, 0.3])
  >>> bool(c.activation_ratio[0] >= c.activation_ratio[1] >= c.activation_ratio[2])
  True
  """
  if not layers:
    raise ValueError("cett_sweep: layers is empty; pass {name: (acts, w_down)}.")
  find = jax.jit(cett_threshold, static_argnames="iters")
  thresholds = {k: [] for k in layers}
  ratios, metrics = [], []
  for t in cett_targets:
    if not 0.0 <= float(t) <= 1.0:
      raise ValueError(f"cett_sweep: CETT target {t} outside [0, 1].")
    taus, kept, total = {}, 0.0, 0
    for name, (a, w) in layers.items():
      tau = find(a, w, jnp.float32(t), iters=iters)
      taus[name] = tau
      thresholds[name].append(float(tau))
      size = int(np.prod(np.shape(a)))
      kept += float(activation_ratio(a, w, tau)) * size
      total += size
    ratios.append(kept / total)
    metrics.append(float(eval_fn(taus)))
  return CETTCurve(np.asarray(cett_targets, np.float64), {k: np.asarray(v) for k, v in thresholds.items()},
                   np.asarray(ratios), np.asarray(metrics))


def ppl_p_point(curve: CETTCurve, p: float, *, reference: float | None = None) -> tuple[float, float]:
  """The PPL-p% point: the sweep point of lowest activation ratio whose metric is within ``p`` %.

  A point qualifies when ``metric <= reference * (1 + p / 100)``; ``reference`` defaults to the
  metric at CETT 0 (which must then be in the sweep).

  Args:
    curve: a :class:`CETTCurve` whose metric is perplexity-like (lower is better, positive).
    p: allowed relative increase in percent.
    reference: metric of the untruncated model.

  Returns:
    ``(cett, activation_ratio)`` of that point; the activation sparsity is ``1 - ratio``.

  >>> c = CETTCurve(np.array([0., .1, .2]), {}, np.array([.6, .3, .2]), np.array([10., 10.05, 11.]))
  >>> ppl_p_point(c, 1.0)
  (0.1, 0.3)
  """
  if reference is None:
    zero = np.flatnonzero(curve.cett == 0)
    if not zero.size:
      raise ValueError("ppl_p_point: the sweep has no CETT 0 point; include 0 in cett_targets or pass reference=.")
    reference = float(curve.metric[zero[0]])
  ok = curve.metric <= reference * (1.0 + p / 100.0)
  if not ok.any():
    raise ValueError(f"ppl_p_point: no sweep point has a metric within {p}% of {reference}.")
  i = int(np.argmin(np.where(ok, curve.activation_ratio, np.inf)))
  return float(curve.cett[i]), float(curve.activation_ratio[i])
