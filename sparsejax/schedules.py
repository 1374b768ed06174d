"""Sparsity schedules: pure functions of the (possibly traced) step count.

Every function here is jit-able: ``step`` and the numeric arguments may be
traced arrays (for example under ``optax.inject_hyperparams``). Arguments are
range-checked when they are concrete Python or NumPy values, so a bad value
raises at construction time and a traced one never forces a host sync.

The formulas follow the papers cited below (test vectors in ``tests/test_schedules.py``):

* :func:`polynomial_sparsity` -- gradual magnitude pruning (Zhu & Gupta 2017).
* :func:`one_shot_sparsity` -- a step function at one step.
* :func:`periodic` -- "update every ``every`` steps in ``[begin, end]``".
* :func:`cosine_drop_fraction` -- the SET/RigL drop fraction.
* :func:`linear_beta`, :func:`exponential_beta` -- MDGF mask decay.
* :func:`sdgf_patterns`, :func:`sdgf_starts`, :func:`sdgf_schedule`,
  :func:`sdgf_index` -- SDGF sequences of N:M patterns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "polynomial_sparsity",
    "one_shot_sparsity",
    "periodic",
    "cosine_drop_fraction",
    "linear_beta",
    "exponential_beta",
    "sdgf_patterns",
    "sdgf_starts",
    "sdgf_schedule",
    "sdgf_index",
    "parse_nm",
    "check_range",
    "check_step",
]


def concrete(x: Any) -> float | None:
  """Returns ``float(x)`` for a concrete scalar, ``None`` for a traced one."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    arr = np.asarray(x)
  except Exception:  # pylint: disable=broad-except
    return None
  if arr.shape != ():
    raise ValueError(f"expected a scalar, got an array of shape {arr.shape}")
  return float(arr)


def _fmt(x: Any) -> str:
  """A number as the user wrote it: integers without a trailing ``.0``."""
  if isinstance(x, (bool, np.bool_)):
    return repr(bool(x))
  if isinstance(x, (int, np.integer)) or (
      isinstance(x, (np.ndarray, jax.Array)) and jnp.issubdtype(x.dtype, jnp.integer)):
    return str(int(x))
  return repr(float(np.asarray(x)))


def _bound(x: float) -> str:
  return f"{x:g}"


def check_range(name: str, value: Any, lo: float, hi: float, *,
                lo_open: bool = False, hi_open: bool = False,
                fix: str = "") -> None:
  """Raises ``ValueError`` if a concrete ``value`` lies outside its range.

  >>> check_range("frequency", 0, 1, math.inf)
  Traceback (most recent call last):
  ...
  ValueError: frequency=0 is outside [1, inf]
  """
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{name}={value!r} is a string; pass a number" + (f" ({fix})" if fix else ""))
  v = concrete(value)
  if v is None:
    return
  ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok or math.isnan(v):
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    msg = f"{name}={_fmt(value)} is outside {lb}{_bound(lo)}, {_bound(hi)}{rb}"
    raise ValueError(msg + (f"; {fix}" if fix else ""))


def check_step(name: str, value: Any, lo: int = 0, *, lo_open: bool = False,
               fix: str = "") -> None:
  """Raises for a concrete step count that is not an integer or is below ``lo``.

  Step arguments (``begin_step``, ``frequency``, ``update_every``...) count
  optimizer updates, so ``2.5`` is rejected rather than rounded. Traced values
  (``optax.inject_hyperparams``) are not checked.

  >>> check_step("update_every", 2.5, 1)
  Traceback (most recent call last):
  ...
  TypeError: update_every=2.5 must be an integer number of steps
  """
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name}={value!r} is a bool; pass an integer number of steps")
  check_range(name, value, lo, math.inf, lo_open=lo_open, fix=fix)
  v = concrete(value)
  if v is not None and v != int(v):
    raise TypeError(f"{name}={_fmt(value)} must be an integer number of steps"
                    + (f"; {fix}" if fix else ""))


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def polynomial_sparsity(step, final_sparsity, begin_step, end_step,
                        initial_sparsity=0.0, power=3):
  """Polynomial (cubic by default) sparsity ramp of gradual magnitude pruning.

  ``s_t = s_f + (s_i - s_f) * (1 - clip((t - t0) / (t1 - t0), 0, 1)) ** power``:
  ``s_i`` before ``begin_step``, ``s_f`` from ``end_step`` on.

  Args:
    step: the step count ``t`` (int, possibly traced).
    final_sparsity: ``s_f`` in ``[0, 1)``.
    begin_step: ``t0``.
    end_step: ``t1 >= t0`` (``t1 == t0`` gives a step function).
    initial_sparsity: ``s_i`` in ``[0, 1)``.
    power: the exponent (3 in Zhu & Gupta).

  Returns:
    A float32 scalar.

  >>> round(float(polynomial_sparsity(100, 0.9, 0, 1000)), 4)
  0.2439
  """
  check_range("final_sparsity", final_sparsity, 0.0, 1.0, hi_open=True)
  check_range("initial_sparsity", initial_sparsity, 0.0, 1.0, hi_open=True)
  check_range("power", power, 0.0, math.inf, lo_open=True,
              fix="the ramp exponent must be positive (3: cubic)")
  b, e = concrete(begin_step), concrete(end_step)
  if b is not None and e is not None and e < b:
    raise ValueError(f"end_step={_fmt(end_step)} < begin_step={_fmt(begin_step)}: the ramp "
                     "must end after it begins")

  t = _f32(step)
  span = _f32(end_step) - _f32(begin_step)
  frac = jnp.where(span > 0, (t - _f32(begin_step)) / jnp.maximum(span, 1.0),
                   (t >= _f32(begin_step)).astype(jnp.float32))
  frac = jnp.clip(frac, 0.0, 1.0)
  s_f, s_i = _f32(final_sparsity), _f32(initial_sparsity)
  return s_f + (s_i - s_f) * (1.0 - frac) ** _f32(power)


def one_shot_sparsity(step, sparsity, at_step):
  """Sparsity ``0`` before ``at_step`` and ``sparsity`` from it on.

  >>> [round(float(one_shot_sparsity(t, 0.9, 5)), 6) for t in (4, 5, 6)]
  [0.0, 0.9, 0.9]
  """
  check_range("sparsity", sparsity, 0.0, 1.0, hi_open=True)
  return jnp.where(jnp.asarray(step) >= at_step, _f32(sparsity), 0.0)


def periodic(step, every, begin_step=0, end_step=None):
  """Whether ``step`` is a mask-update step.

  True at ``begin, begin + every, ...`` while ``step <= end_step`` and, so that
  a ramp always reaches its end value, at ``end_step`` itself.

  Args:
    step: the step count (possibly traced).
    every: period, ``>= 1``.
    begin_step: first update step.
    end_step: last update step (``None``: no end).

  Returns:
    A bool scalar.

  >>> [int(t) for t in range(12) if periodic(t, 4, 1, 10)]
  [1, 5, 9, 10]
  """
  check_step("every (update frequency)", every, 1,
             fix="use an update frequency of at least 1 step")
  step = jnp.asarray(step)
  every = jnp.maximum(jnp.asarray(every), 1)
  since = step - begin_step
  on = (since >= 0) & (since % every == 0)
  if end_step is not None:
    on = (on & (step <= end_step)) | (step == end_step)
  return on


def cosine_drop_fraction(step, initial_fraction, end_step):
  """SET/RigL drop fraction ``a/2 * (1 + cos(pi * min(t, T) / T))``.

  >>> round(float(cosine_drop_fraction(18750, 0.3, 75000)), 5)
  0.25607
  """
  check_range("drop_fraction", initial_fraction, 0.0, 1.0)
  check_range("end_step", end_step, 0, math.inf, lo_open=True,
              fix="the drop fraction decays to 0 at end_step > 0")
  t = jnp.minimum(_f32(step), _f32(end_step))
  return _f32(initial_fraction) / 2 * (1 + jnp.cos(jnp.pi * t / _f32(end_step)))


def linear_beta(step, rate):
  """MDGF linear mask decay ``max(1 - rate * t, 0)``.

  >>> float(linear_beta(2500, 2e-4))
  0.5
  """
  check_range("decay rate", rate, 0.0, math.inf)
  return jnp.maximum(1.0 - _f32(rate) * _f32(step), 0.0)


def exponential_beta(step, rate):
  """MDGF exponential mask decay ``exp(-rate * t)``.

  >>> round(float(exponential_beta(10000, 1e-4)), 5)
  0.36788
  """
  check_range("decay rate", rate, 0.0, math.inf)
  return jnp.exp(-_f32(rate) * _f32(step))


def parse_nm(nm: Any) -> tuple[int, int]:
  """Parses an N:M pattern given as ``"2:4"``, ``(2, 4)`` or an object with
  ``n`` and ``m`` attributes, checking ``1 <= n <= m``.

  >>> parse_nm("2:4")
  (2, 4)
  """
  if isinstance(nm, str):
    parts = nm.split(":")
    try:
      if len(parts) != 2:
        raise ValueError
      n, m = int(parts[0]), int(parts[1])
    except ValueError:
      raise ValueError(f"N:M pattern {nm!r} must look like 'n:m' with integers, e.g. '2:4'") from None
  elif hasattr(nm, "n") and hasattr(nm, "m"):
    n, m = nm.n, nm.m
  elif isinstance(nm, Sequence) and len(nm) == 2:
    n, m = nm
  else:
    raise TypeError(f"N:M pattern {nm!r} must be 'n:m', (n, m) or NM(n, m)")
  try:
    n, m = int(n), int(m)
  except (TypeError, ValueError) as e:
    raise TypeError(f"N:M pattern {nm!r} needs static integers n and m (with "
                    "optax.inject_hyperparams pass it as a string or list "
                    "it in static_args)") from e
  if not 1 <= n <= m:
    raise ValueError(f"N:M pattern {n}:{m} needs 1 <= N <= M")
  return n, m


def _is_pow2(x: int) -> bool:
  return x >= 1 and (x & (x - 1)) == 0


def sdgf_patterns(target, kind="stepwise", *, num_frames=None):
  """The N:M patterns of the SDGF (structure decay) frames, for a target ``N:M``.

  * ``"stepwise"``: ``F = log2(M/N) + 1`` frames; ``(M-1):M``, then
    ``(M/2**i):M`` (needs ``M/N`` a power of two).
  * ``"geometric"``: ``F = 4``; ``N*2**(F-1-i) : M*2**(F-1-i)``.
  * ``"densify"``: ``F = 4``; ``N : M*2**(F-1-i)``.

  Args:
    target: final pattern (``"1:8"``, ``(1, 8)``, ...).
    kind: one of the kinds above.
    num_frames: overrides ``F`` for geometric/densify.

  Returns:
    A tuple of ``(n, m)``, one per frame, ending at the target.

  >>> sdgf_patterns("1:8", "geometric")
  ((8, 64), (4, 32), (2, 16), (1, 8))
  """
  n, m = parse_nm(target)
  if kind == "stepwise":
    if m % n or not _is_pow2(m // n):
      raise ValueError(f"stepwise SDGF needs M/N a power of two, got {n}:{m}")
    f = int(round(math.log2(m // n))) + 1
    return tuple([(m - 1, m)] + [(m >> i, m) for i in range(1, f)])
  if kind in ("geometric", "densify"):
    if num_frames is not None:
      check_step("num_frames", num_frames, 1)
    f = 4 if num_frames is None else int(num_frames)
    if kind == "geometric":
      return tuple((n << (f - 1 - i), m << (f - 1 - i)) for i in range(f))
    return tuple((n, m << (f - 1 - i)) for i in range(f))
  raise ValueError(f"unknown SDGF kind {kind!r}: use 'stepwise', 'geometric', "
                   "'densify' or 'custom'")


def sdgf_starts(num_frames: int, *, total_steps, dense_steps=0, finetune_steps=0):
  """Start steps of the SDGF frames: ``dense + floor(i * L / F)``.

  ``L = total - dense - finetune`` is the sparse phase, split into ``F`` frames
  (exact integer arithmetic). The step arguments may be traced.

  >>> sdgf_starts(4, total_steps=100, dense_steps=10, finetune_steps=10).tolist()
  [10, 30, 50, 70]
  """
  t, d, f = concrete(total_steps), concrete(dense_steps), concrete(finetune_steps)
  if None not in (t, d, f) and (d < 0 or f < 0 or t - d - f <= 0):
    raise ValueError(f"SDGF needs total_steps ({t:g}) > dense_steps ({d:g}) + "
                     f"finetune_steps ({f:g}), both >= 0")
  length = (jnp.asarray(total_steps, jnp.int32) - jnp.asarray(dense_steps, jnp.int32)
            - jnp.asarray(finetune_steps, jnp.int32))
  i = jnp.arange(num_frames, dtype=jnp.int32)
  return jnp.asarray(dense_steps, jnp.int32) + (i * length) // num_frames


def sdgf_schedule(target, kind="stepwise", *, total_steps, dense_steps=0,
                  finetune_steps=0, num_frames=None, custom=None):
  """The whole SDGF schedule ``((start_step, (n, m)), ...)`` with concrete steps.

  ``kind="custom"`` takes ``custom={start_step: "n:m", ...}`` (first start at
  most ``dense_steps``); other kinds combine :func:`sdgf_patterns` and
  :func:`sdgf_starts`.

  >>> sdgf_schedule("1:8", total_steps=100, dense_steps=10, finetune_steps=10)
  ((10, (7, 8)), (30, (4, 8)), (50, (2, 8)), (70, (1, 8)))
  """
  if kind == "custom":
    if not isinstance(custom, Mapping) or not custom:
      raise ValueError("kind='custom' needs custom={start_step: 'n:m', ...}")
    for k in custom:
      check_step("custom start step", k, 0)
    out = tuple(sorted((int(k), parse_nm(v)) for k, v in custom.items()))
    if out[0][0] > dense_steps:
      raise ValueError(f"custom SDGF schedule starts at step {out[0][0]} after "
                       f"the dense warm-up ends ({dense_steps}): add a pattern "
                       f"for step {dense_steps}")
    return out
  pats = sdgf_patterns(target, kind, num_frames=num_frames)
  starts = sdgf_starts(len(pats), total_steps=total_steps, dense_steps=dense_steps,
                       finetune_steps=finetune_steps)
  return tuple((int(s), p) for s, p in zip(np.asarray(starts), pats))


def sdgf_index(step, starts):
  """Index of the active frame: the last ``i`` with ``starts[i] <= step``.

  Steps before ``starts[0]`` map to frame 0.

  >>> int(sdgf_index(35, (10, 30, 50, 70)))
  1
  """
  starts = jnp.asarray(starts, jnp.int32)
  idx = jnp.sum(jnp.asarray(step) >= starts) - 1
  return jnp.clip(idx, 0, starts.shape[0] - 1).astype(jnp.int32)
