"""Sparse-training comparison on scikit-learn's digits (ships offline).

Trains the same MLP (64 -> 256 -> 256 -> 10) with Adam, dense and with the
sparsejax.optim transformations: one-shot magnitude pruning, gradual magnitude
pruning, static ERK, SET and RigL at ``--sparsity`` (default 90%), and SR-STE
and MDGF at 2:4 and 1:8 (N:M along the input axis of every kernel). Prints a
table (method, sparsity achieved over the kernels, test accuracy, train time)
and writes a plot of test accuracy vs step.

    python examples/compare_digits.py [--steps 2000] [--sparsity 0.9] [--seed 0]
                                      [--out digits_comparison.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax.optim as so
from sparsejax.core import paths as core_paths

WIDTHS = (64, 256, 256, 10)


@dataclasses.dataclass
class Result:
  """Outcome of one training run."""
  method: str
  sparsity: float          # fraction of zeros over the kernels, as used in the forward pass
  accuracy: float          # final test accuracy
  seconds: float           # wall-clock training time (compilation included)
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


def methods(sparsity: float, steps: int) -> dict[str, Callable[[Any], Any] | None]:
  """Method name -> factory wrapping the inner optimizer (None: dense)."""
  every = max(1, steps // 40)
  pct = f"{round(sparsity * 100):g}%"
  return {
      "dense": None,
      f"one-shot magnitude {pct}": lambda o: so.one_shot_pruning(
          o, sparsity=sparsity, step=steps // 2),
      f"gradual magnitude {pct}": lambda o: so.gradual_magnitude_pruning(
          o, sparsity=sparsity, begin_step=steps // 10, end_step=steps * 6 // 10,
          frequency=every),
      f"static ERK {pct}": lambda o: so.static_sparse(o, sparsity=sparsity, distribution="erk"),
      f"SET {pct}": lambda o: so.set_training(
          o, sparsity=sparsity, update_every=every, end_step=steps * 3 // 4),
      f"RigL {pct}": lambda o: so.rigl(
          o, sparsity=sparsity, update_every=every, end_step=steps * 3 // 4),
      "SR-STE 2:4": lambda o: so.srste(o, nm="2:4"),
      "SR-STE 1:8": lambda o: so.srste(o, nm="1:8"),
      "MDGF 2:4": lambda o: so.mdgf(o, nm="2:4", rate=2.0 / steps, total_steps=steps,
                                    finetune_steps=steps // 10),
      "MDGF 1:8": lambda o: so.mdgf(o, nm="1:8", rate=2.0 / steps, total_steps=steps,
                                    finetune_steps=steps // 10),
  }


def kernel_sparsity(params) -> float:
  sel = core_paths.select(params)
  leaves = [p for p, s in zip(jax.tree.leaves(params), jax.tree.leaves(sel)) if s]
  zeros = sum(int(jnp.sum(p == 0)) for p in leaves)
  return zeros / sum(p.size for p in leaves)


def train(name: str, factory, data, *, steps: int, seed: int, lr: float, batch_size: int,
          evals: int, progress=None) -> Result:
  """Trains one method; returns its :class:`Result`."""
  x_tr, y_tr, x_te, y_te = data
  key = jax.random.key(seed)
  k_init, k_data = jax.random.split(key)
  params = init_mlp(k_init)
  inner = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05))
  sparse = factory is not None
  tx = factory(inner) if sparse else inner
  state = tx.init(params)
  if sparse:
    params = so.apply_state_masks(params, state)  # start from the initial masks

  def weights(p, s):
    return so.forward_params(p, s) if sparse else p

  def loss_fn(p, s, xb, yb):
    logits = mlp(weights(p, s), xb)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def accuracy(p, s):
    return jnp.mean(jnp.argmax(mlp(weights(p, s), x_te), -1) == y_te)

  @jax.jit
  def run_chunk(p, s, keys):
    def body(carry, k):
      p, s = carry
      idx = jax.random.randint(k, (batch_size,), 0, x_tr.shape[0])
      g = jax.grad(loss_fn)(p, s, x_tr[idx], y_tr[idx])
      u, s = tx.update(g, s, p)
      return (optax.apply_updates(p, u), s), None
    (p, s), _ = jax.lax.scan(body, (p, s), keys)
    return p, s, accuracy(p, s)

  chunk = max(1, steps // evals)
  sizes = [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])
  t0 = time.perf_counter()
  done, eval_steps, curve = 0, [], []
  for size in sizes:
    keys = jax.random.split(jax.random.fold_in(k_data, done), size)
    params, state, acc = run_chunk(params, state, keys)
    done += size
    eval_steps.append(done)
    curve.append(float(acc))
    if progress is not None:
      progress.update(size)
      progress.set_postfix_str(f"{name}: acc {curve[-1]:.3f}")
  seconds = time.perf_counter() - t0
  final = weights(params, state)
  return Result(name, kernel_sparsity(final), curve[-1], seconds, eval_steps, curve)


def run(*, steps: int = 2000, sparsity: float = 0.9, seed: int = 0, lr: float = 3e-3,
        batch_size: int = 128, evals: int = 40, only: list[str] | None = None,
        progress: bool = True) -> list[Result]:
  """Runs the comparison; ``only`` keeps methods whose name contains one of the
  given substrings (case-insensitive)."""
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"--sparsity {sparsity} must be in [0, 1)")
  if steps < 10:
    raise ValueError(f"--steps {steps} must be >= 10")
  data = load_data(seed)
  table = methods(sparsity, steps)
  if only:
    table = {k: v for k, v in table.items() if any(o.lower() in k.lower() for o in only)}
  bar = None
  if progress:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    bar = tqdm(total=steps * len(table), unit="step", desc="training", file=sys.stderr,
               mininterval=0.5, dynamic_ncols=True)
  try:
    return [train(name, f, data, steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                  evals=evals, progress=bar) for name, f in table.items()]
  finally:
    if bar is not None:
      bar.close()


def format_table(results: list[Result]) -> str:
  lines = [f"{'method':<26} {'sparsity':>8} {'test acc':>8} {'train s':>8}",
           "-" * 53]
  for r in results:
    lines.append(f"{r.method:<26} {r.sparsity:>8.3f} {r.accuracy:>8.4f} {r.seconds:>8.1f}")
  return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(9, 5.5))
  for r in results:
    ax.plot(r.steps, r.curve, label=f"{r.method} ({r.accuracy:.3f})",
            linestyle="-" if r.method == "dense" or ":" not in r.method else "--")
  ax.set_xlabel("step")
  ax.set_ylabel("test accuracy")
  lo = min(min(r.curve) for r in results)
  ax.set_ylim(max(0.0, min(0.8, lo)), 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  ax.set_title("sklearn digits MLP: dense vs sparse training (sparsejax.optim)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  ap = argparse.ArgumentParser(
      description="Compare dense and sparse training of an MLP on sklearn digits: "
      "one-shot and gradual magnitude pruning, static ERK, SET, RigL (at --sparsity), "
      "SR-STE and MDGF at 2:4 and 1:8. Prints a table and writes an accuracy-vs-step plot.")
  ap.add_argument("--sparsity", type=float, default=0.9,
                  help="target sparsity of the unstructured methods, in [0, 1) (default 0.9)")
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
  t0 = time.perf_counter()
  results = run(steps=args.steps, sparsity=args.sparsity, seed=args.seed, lr=args.lr,
                batch_size=args.batch_size, only=only, progress=not args.no_progress)
  print(format_table(results))
  plot(results, args.out)
  print(f"plot written to {args.out} (total {time.perf_counter() - t0:.0f} s)")
  return results


if __name__ == "__main__":
  main()
