"""Sparse-training comparison on scikit-learn's digits (ships offline).

Trains the same MLP (64 -> 256 -> 256 -> 10) with Adam, dense and with the
sparsejax.optim transformations: one-shot magnitude pruning, gradual magnitude
pruning, static ERK, SET and RigL at each sparsity of ``--sparsity`` (default
the sweep 80, 90, 95, 98%), and SR-STE and MDGF at 2:4 and 1:8 (N:M along the
input axis of every kernel). Prints a table per run (method, sparsity achieved
over the kernels, test accuracy, train time) and a sweep table (test accuracy of
each method by sparsity), and writes a plot: accuracy vs sparsity, and accuracy
vs step at the highest sparsity.

    python examples/compare_digits.py [--steps 2000] [--sparsity 0.8,0.9,0.95,0.98]
                                      [--seed 0] [--out digits_comparison.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax.optim as so
from sparsejax.core import paths as core_paths

WIDTHS = (64, 256, 256, 10)
SWEEP = (0.8, 0.9, 0.95, 0.98)


@dataclasses.dataclass
class Result:
  """Outcome of one training run."""
  method: str
  family: str              # the method without its sparsity ("RigL", "SR-STE", "dense")
  target: float            # requested sparsity (N:M: 1 - N/M)
  nm: bool                 # an N:M method (sparsity fixed by its pattern)
  sparsity: float          # fraction of zeros over the kernels, as used in the forward pass
  accuracy: float          # final test accuracy
  seconds: float           # wall-clock training time (incl. compilation for the first run of a family)
  steps: list[int]         # evaluation steps
  curve: list[float]       # test accuracy at those steps


def load_data(seed: int, test_fraction: float = 0.2):
  """Digits, scaled to [0, 1], split with a fixed stratified permutation."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  x, y = load_digits(return_X_y=True)
  x = (x / 16.0).astype(np.float32)
  rng = np.random.default_rng(seed)
  test_idx = []
  for c in np.unique(y):
    idx = rng.permutation(np.flatnonzero(y == c))
    test_idx.extend(idx[:int(round(len(idx) * test_fraction))])
  test = np.zeros(len(y), bool)
  test[test_idx] = True
  return (jnp.asarray(x[~test]), jnp.asarray(y[~test]), jnp.asarray(x[test]),
          jnp.asarray(y[test]))


def init_mlp(key, widths=WIDTHS):
  keys = jax.random.split(key, len(widths) - 1)
  params = {}
  for i, (k, (a, b)) in enumerate(zip(keys, zip(widths[:-1], widths[1:]))):
    params[f"fc{i + 1}"] = {"kernel": jax.random.normal(k, (a, b)) * math.sqrt(2.0 / a),
                            "bias": jnp.zeros(b)}
  return params


def mlp(params, x):
  n = len(params)
  for i in range(1, n + 1):
    x = x @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"]
    if i < n:
      x = jax.nn.relu(x)
  return x


@dataclasses.dataclass
class Method:
  """One run of the comparison.

  ``factory(inner, sparsity)`` wraps the inner optimizer (None: dense); ``sparsity`` may be
  traced, so one compilation serves a family's whole sweep.
  """
  family: str                  # "RigL", "SR-STE", ...
  target: float                # requested sparsity (N:M: 1 - N/M)
  factory: Callable[[Any, Any], Any] | None
  pattern: str | None = None   # N:M pattern, named instead of the sparsity

  @property
  def name(self) -> str:
    if self.factory is None:
      return self.family
    if self.pattern is not None:
      return f"{self.family} {self.pattern}"
    return f"{self.family} {self.target * 100:g}%"


def methods(sparsities: Sequence[float], steps: int) -> dict[str, Method]:
  """Method name -> :class:`Method`: dense, the unstructured methods at every sparsity of
  ``sparsities``, and the N:M methods."""
  every = max(1, steps // 40)
  unstructured = {
      "one-shot magnitude": lambda o, s: so.one_shot_pruning(o, sparsity=s, step=steps // 2),
      "gradual magnitude": lambda o, s: so.gradual_magnitude_pruning(
          o, sparsity=s, begin_step=steps // 10, end_step=steps * 6 // 10, frequency=every),
      "static ERK": lambda o, s: so.static_sparse(o, sparsity=s, distribution="erk"),
      "SET": lambda o, s: so.set_training(
          o, sparsity=s, update_every=every, end_step=steps * 3 // 4),
      "RigL": lambda o, s: so.rigl(o, sparsity=s, update_every=every, end_step=steps * 3 // 4),
  }
  out = [Method("dense", 0.0, None)]
  out += [Method(family, s, make) for family, make in unstructured.items() for s in sparsities]
  for nm, density in (("2:4", 0.5), ("1:8", 0.125)):
    out.append(Method("SR-STE", 1 - density, lambda o, s, nm=nm: so.srste(o, nm=nm), nm))
  for nm, density in (("2:4", 0.5), ("1:8", 0.125)):
    out.append(Method("MDGF", 1 - density, lambda o, s, nm=nm: so.mdgf(
        o, nm=nm, rate=2.0 / steps, total_steps=steps, finetune_steps=steps // 10), nm))
  return {m.name: m for m in out}


def kernel_sparsity(params) -> float:
  sel = core_paths.select(params)
  leaves = [p for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)) if s]
  zeros = sum(int(jnp.sum(p == 0)) for p in leaves)
  return zeros / sum(p.size for p in leaves)


def train(method: Method, data, *, steps: int, seed: int, lr: float, batch_size: int,
          evals: int, progress=None, compiled: dict | None = None) -> Result:
  """Trains one method; returns its :class:`Result`.

  ``compiled`` caches the jitted training chunk per family (pass the same dict for every
  method of one comparison: data and hyperparameters must be the same).
  """
  name, factory = method.name, method.factory
  x_tr, y_tr, x_te, y_te = data
  key = jax.random.key(seed)
  k_init, k_data = jax.random.split(key)
  params = init_mlp(k_init)
  inner = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  sparse = factory is not None

  def make_tx(sparsity):
    return factory(inner, sparsity) if sparse else inner

  state = make_tx(method.target).init(params)
  if sparse:
    params = so.apply_state_masks(params, state)  # start from the initial masks

  def weights(p, s):
    return so.forward_params(p, s) if sparse else p

  def loss_fn(p, s, xb, yb):
    logits = mlp(weights(p, s), xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def accuracy(p, s):
    return jnp.mean(jnp.argmax(mlp(weights(p, s), x_te), -1) == y_te)

  def run_chunk(p, s, keys, sparsity):
    tx = make_tx(sparsity)

    def body(carry, k):
      p, s = carry
      idx = jax.random.randint(k, (batch_size,), 0, x_tr.shape[0])
      g = jax.grad(loss_fn)(p, s, x_tr[idx], y_tr[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(body, (p, s), keys)
    return p, s, accuracy(p, s)

  compiled = {} if compiled is None else compiled
  cache_key = (method.family, method.pattern)
  if cache_key not in compiled:
    compiled[cache_key] = jax.jit(run_chunk)
  run_chunk = compiled[cache_key]
  target = jnp.float32(method.target)

  chunk = max(1, steps // evals)
  sizes = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
  t0 = time.perf_counter()
  done, eval_steps, curve = 0, [], []
  for size in sizes:
    keys = jax.random.split(jax.random.fold_in(k_data, done), size)
    params, state, acc = run_chunk(params, state, keys, target)
    done += size
    eval_steps.append(done)
    curve.append(float(acc))
    if progress is not None:
      progress.update(size)
      progress.set_postfix_str(f"{name}: acc {curve[-1]:.3f}")
  seconds = time.perf_counter() - t0
  final = weights(params, state)
  return Result(name, method.family, method.target, method.pattern is not None,
                kernel_sparsity(final), curve[-1], seconds, eval_steps, curve)


def run(*, steps: int = 2000, sparsity: float | Sequence[float] = SWEEP, seed: int = 0,
        lr: float = 3e-3, batch_size: int = 128, evals: int = 40, only: list[str] | None = None,
        progress: bool = True) -> list[Result]:
  """Runs the comparison at every sparsity of ``sparsity`` (a float or a sweep); ``only``
  keeps methods whose name contains one of the given substrings (case-insensitive)."""
  sparsities = (sparsity,) if isinstance(sparsity, (int, float)) else tuple(sparsity)
  if not sparsities:
    raise ValueError("--sparsity needs at least one value, e.g. 0.9 or 0.8,0.9,0.95,0.98")
  for s in sparsities:
    if not 0.0 <= s < 1.0:
      raise ValueError(f"--sparsity {s} must be in [0, 1)")
  if steps < 10:
    raise ValueError(f"--steps {steps} must be >= 10")
  data = load_data(seed)
  table = methods(sorted(set(sparsities)), steps)
  if only:
    table = {k: v for k, v in table.items() if any(o.lower() in k.lower() for o in only)}
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=steps * len(table), unit="step", desc="training", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
  compiled = {}  # one compilation per method family, reused across the sweep
  try:
    return [train(m, data, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                  evals=evals, progress=bar, compiled=compiled) for m in table.values()]
  finally:
    if bar is not None:
      bar.close()


def format_table(results: list[Result]) -> str:
  lines = [f"{'method':<26} {'sparsity':>8} {'test acc':>8} {'train s':>8}",
           "-" * 53]
  for r in results:
    lines.append(f"{r.method:<26} {r.sparsity:>8.3f} {r.accuracy:>8.4f} {r.seconds:>8.1f}")
  return "\n".join(lines)


def _pct(s: float) -> str:
  return f"{s * 100:.4g}%"


def format_sweep(results: list[Result]) -> str:
  """Test accuracy of each method family (rows) at each sparsity (columns)."""
  cols = sorted({r.target for r in results})
  fams = list(dict.fromkeys(r.family for r in results))
  acc = {(r.family, r.target): r.accuracy for r in results}
  lines = ["test accuracy by sparsity",
           f"{'method':<20}" + "".join(f"{_pct(c):>8}" for c in cols),
           "-" * (20 + 8 * len(cols))]
  for f in fams:
    lines.append(f"{f:<20}" + "".join(
        f"{acc[(f, c)]:>8.4f}" if (f, c) in acc else f"{'':>8}" for c in cols))
  return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
  fams = list(dict.fromkeys(r.family for r in results))
  dense = [r for r in results if r.family == "dense"]
  color = {"dense": "k", **{f: f"C{i}" for i, f in enumerate(x for x in fams if x != "dense")}}
  for f in fams:  # left: final accuracy vs sparsity (x = -log10(density))
    rs = sorted((r for r in results if r.family == f), key=lambda r: r.target)
    xs = [-math.log10(1 - r.target) for r in rs]
    if f == "dense":
      ax1.axhline(rs[0].accuracy, color="k", linestyle="--", linewidth=1, label="dense")
    else:
      ax1.plot(xs, [r.accuracy for r in rs], marker="s" if rs[0].nm else "o", color=color[f],
               linestyle="--" if rs[0].nm else "-", label=f + (" (2:4, 1:8)" if rs[0].nm else ""))
  ticks = sorted({r.target for r in results if r.family != "dense"})
  ax1.set_xticks([-math.log10(1 - t) for t in ticks])
  ax1.set_xticklabels([_pct(t) for t in ticks], rotation=45)
  ax1.set_xlabel("sparsity of the kernels")
  ax1.set_ylabel("final test accuracy")
  ax1.grid(alpha=0.3)
  ax1.legend(fontsize=8, loc="lower left")
  ax1.set_title("accuracy vs sparsity")
  unstructured = [r for r in results if r.family != "dense" and not r.nm]
  top = max((r.target for r in unstructured), default=None)
  shown = dense + [r for r in unstructured if r.target == top]
  for r in shown:  # right: curves at the highest unstructured sparsity
    ax2.plot(r.steps, r.curve, label=f"{r.method} ({r.accuracy:.3f})", color=color[r.family],
             linestyle="--" if r.family == "dense" else "-")
  lo = min(min(r.curve) for r in shown)
  ax2.set_ylim(max(0.0, min(0.8, lo)), 1.0)
  ax2.set_xlabel("step")
  ax2.set_ylabel("test accuracy")
  ax2.grid(alpha=0.3)
  ax2.legend(fontsize=8, loc="lower right")
  ax2.set_title("accuracy vs step" + (f" at {_pct(top)}" if top is not None else ""))
  fig.suptitle("sklearn digits MLP: dense vs sparse training (sparsejax.optim)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description="Compare dense and sparse training of an MLP on sklearn digits: "
      "one-shot and gradual magnitude pruning, static ERK, SET, RigL (at each --sparsity), "
      "SR-STE and MDGF at 2:4 and 1:8. Prints a table per run and a sweep table (accuracy by "
      "sparsity), and writes a plot.")
  ap.add_argument("--sparsity", default=",".join(f"{s:g}" for s in SWEEP),
                  help="comma-separated target sparsities of the unstructured methods, each in "
                  "[0, 1) (default the sweep " + ",".join(f"{s:g}" for s in SWEEP) + ")")
  ap.add_argument("--steps", type=int, default=2000, help="training steps per method (default 2000)")
  ap.add_argument("--seed", type=int, default=0, help="seed for init, masks, data split and batches")
  ap.add_argument("--out", default="digits_comparison.png",
                  help="path of the PNG plot (default digits_comparison.png)")
  ap.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (default 3e-3)")
  ap.add_argument("--batch-size", type=int, default=128, help="minibatch size (default 128)")
  ap.add_argument("--only", default=None,
                  help="comma-separated substrings selecting methods, e.g. 'dense,rigl'")
  ap.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = ap.parse_args(argv)
  only = [s.strip() for s in args.only.split(",")] if args.only else None
  try:
    sparsities = [float(s) for s in args.sparsity.split(",") if s.strip()]
  except ValueError:
    ap.error(f"--sparsity {args.sparsity!r}: use comma-separated numbers, e.g. 0.8,0.9,0.95,0.98")
  t0 = time.perf_counter()
  results = run(steps=args.steps, sparsity=sparsities, seed=args.seed, lr=args.lr,
                batch_size=args.batch_size, only=only, progress=not args.no_progress)
  print(format_table(results))
  print()
  print(format_sweep(results))
  plot(results, args.out)
  print(f"plot written to {args.out} (total {time.perf_counter() - t0:.0f} s)")
  return results


if __name__ == "__main__":
  main()
