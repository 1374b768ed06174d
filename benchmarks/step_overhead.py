"""Overhead of sparsejax.optim transformations on a jitted training step.

A 4-layer, 1024-wide MLP (about 4.2M parameters) trained with Adam: each
sparsity transformation wrapped around ``optax.adam`` against plain
``optax.adam``, measured in the same process, interleaved, on whatever device
JAX picks (CPU by default). Two figures per method:

* ordinary step: a step on which the masks do not change;
* mask-update step: a step on which they do (pruning, drop-and-grow).

STE-like methods (STE, SR-STE, MDGF, SDGF) and gradient masking recompute
their masks on every step (and STE-like ones mask the forward weights on every
step): all their steps are mask-update steps, reported in that column.

Targets: <= 1.05x on ordinary steps, <= 3x on mask-update steps.

    python benchmarks/step_overhead.py [--batch 256] [--rounds 7]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import sparsejax.optim as so
from sparsejax.core.patterns import nm_mask


def make_params(width: int, depth: int, key):
  keys = jax.random.split(key, depth)
  return {f"fc{i}": {"kernel": jax.random.normal(k, (width, width)) / jnp.sqrt(width),
                     "bias": jnp.zeros(width)} for i, k in enumerate(keys)}


def mlp(params, x):
  n = len(params)
  for i in range(n):
    x = x @ params[f"fc{i}"]["kernel"] + params[f"fc{i}"]["bias"]
    if i < n - 1:
      x = jax.nn.relu(x)
  return x


def methods(total: int):
  """name -> (factory(inner), update step or None, ordinary step)."""
  every = 100
  return {
      "gradual magnitude pruning": (lambda o: so.gradual_magnitude_pruning(
          o, sparsity=0.9, end_step=total, frequency=every), every, every + 1),
      "one-shot pruning": (lambda o: so.one_shot_pruning(o, sparsity=0.9, step=every),
                           every, every + 1),
      # Step 1 is not ordinary for hard methods: it counts the masked-out non-zeros once.
      "static ERK": (lambda o: so.static_sparse(o, sparsity=0.9), None, 2),
      "SET": (lambda o: so.set_training(o, sparsity=0.9, update_every=every, end_step=total),
              every, every + 1),
      "RigL": (lambda o: so.rigl(o, sparsity=0.9, update_every=every, end_step=total),
               every, every + 1),
      "RigL skip-gradient-on-update": (lambda o: so.rigl(
          o, sparsity=0.9, update_every=every, end_step=total,
          skip_gradient_on_update=True), every, every + 1),
      "STE 2:4": (lambda o: so.ste(o, nm="2:4"), None, 1),
      "SR-STE 2:4": (lambda o: so.srste(o, nm="2:4"), None, 1),
      "MDGF 1:8": (lambda o: so.mdgf(o, nm="1:8", rate=1e-3), None, 1),
      "SDGF 1:8": (lambda o: so.sdgf(o, nm="1:8", total_steps=total), None, 1),
      "gradient masking 50%": (lambda o: so.gradient_masking(o, fraction=0.5), None, 1),
  }


# Variants also timed against a partner method, paired in the same rounds, on
# both kinds of step: variant -> partner. skip_gradient_on_update must cost
# nothing on ordinary steps (<= 1.05x RigL without it).
PAIRED = {"RigL skip-gradient-on-update": "RigL"}


def component_steps(params):
  """The two per-step costs of STE-like methods, each alone on top of Adam.

  name -> (step, state): "forward masking" feeds ``W * m`` (fixed 2:4 masks,
  straight-through) to the model; "2:4 mask recompute" runs the N:M selection
  on the updated weights. Lower bounds for STE/SR-STE/MDGF/SDGF steps.
  """
  tx = optax.adam(1e-3)
  masks = jax.tree.map(lambda w: nm_mask(jnp.abs(w), 2, 4) if w.ndim == 2 else None, params)

  def forward(p):
    return jax.tree.map(lambda w, m: w if m is None else w + jax.lax.stop_gradient(
        jnp.where(m, w, 0) - w), p, masks, is_leaf=lambda v: v is None)

  def make(mask_forward, recompute):
    def loss(p, x, y):
      return jnp.mean((mlp(forward(p) if mask_forward else p, x) - y) ** 2)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, s, x, y):
      u, s_new = tx.update(jax.grad(loss)(p, x, y), s[0], p)
      p = optax.apply_updates(p, u)
      m = s[1]
      if recompute:
        m = jax.tree.map(lambda w, o: None if o is None else nm_mask(jnp.abs(w), 2, 4),
                         p, m, is_leaf=lambda v: v is None)
      return p, (s_new, m)
    return step

  state = (tx.init(params), masks)
  return {"(forward masking alone)": (make(True, False), state),
          "(2:4 mask recompute alone)": (make(False, True), state)}


def build_step(tx, uses_forward):
  def loss(params, state, x, y):
    p = so.forward_params(params, state) if uses_forward else params
    return jnp.mean((mlp(p, x) - y) ** 2)

  # Params and optimizer state are donated, as in a real training loop (state
  # that passes through unchanged, e.g. masks on ordinary steps, is not copied).
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x, y):
    g = jax.grad(loss)(params, state, x, y)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  return step


def with_step(state, t):
  """The same optimizer state at sparse step ``t`` (to time a chosen step kind)."""
  def fix(s):
    if isinstance(s, so.SparseState):
      return s._replace(sparse_step=jnp.asarray(t, jnp.int32))
    return s
  return jax.tree.map(fix, state, is_leaf=lambda s: isinstance(s, so.SparseState))


class Runner:
  """Carries (params, state) through donated steps, pinning the sparse step."""

  def __init__(self, step, params, state, t):
    self.step, self.t = step, t
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.tree.map(jnp.copy, state)

  def __call__(self, x, y):
    state = self.state if self.t is None else with_step(self.state, self.t)
    self.params, self.state = self.step(self.params, state, x, y)
    return self.params

  def time(self, x, y, calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step."""
    jax.block_until_ready(self(x, y))
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(calls):
      out = self(x, y)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls, (time.process_time() - c0) / calls


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
  ap.add_argument("--width", type=int, default=1024, help="MLP width (default 1024)")
  ap.add_argument("--depth", type=int, default=4, help="number of Dense layers (default 4)")
  ap.add_argument("--rounds", type=int, default=7,
                  help="interleaved timing rounds; the median is reported (default 7)")
  ap.add_argument("--calls", type=int, default=10, help="steps per timing (default 10)")
  ap.add_argument("--only", default=None, help="substring filter on method names")
  args = ap.parse_args()

  key = jax.random.key(0)
  params = make_params(args.width, args.depth, key)
  x = jax.random.normal(jax.random.key(1), (args.batch, args.width))
  y = jax.random.normal(jax.random.key(2), (args.batch, args.width))
  n_params = sum(p.size for p in jax.tree.leaves(params))
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, MLP {args.depth}x{args.width} ({n_params / 1e6:.1f}M params), "
        f"batch {args.batch}, median of {args.rounds} rounds x {args.calls} steps")

  base_tx = optax.adam(1e-3)
  base = Runner(build_step(base_tx, False), params, base_tx.init(params), None)

  rows = []
  paired_lines = []
  all_methods = methods(1000)
  entries = {n: (f, u, o, None) for n, (f, u, o) in all_methods.items()}
  entries.update({n: (None, None, None, so_) for n, so_ in component_steps(params).items()})
  for name, (factory, upd_t, ord_t, custom) in entries.items():
    if args.only and args.only.lower() not in name.lower():
      continue
    if custom is not None:
      kinds = {"ordinary": Runner(custom[0], params, custom[1], None)}
    else:
      tx = factory(optax.adam(1e-3))
      state = tx.init(params)
      uses_forward = any(k in name for k in ("STE", "MDGF", "SDGF"))
      step = build_step(tx, uses_forward)
      has_step = any(isinstance(s, so.SparseState) for s in jax.tree.leaves(
          state, is_leaf=lambda s: isinstance(s, so.SparseState)))
      kinds = {"ordinary": Runner(step, params, state, ord_t if has_step else None)}
      if upd_t is not None:
        kinds["mask update"] = Runner(step, params, state, upd_t)
      if name in PAIRED:
        p_factory, p_upd, p_ord = all_methods[PAIRED[name]]
        p_tx = p_factory(optax.adam(1e-3))
        p_step, p_state = build_step(p_tx, False), p_tx.init(params)
        kinds["partner ordinary"] = Runner(p_step, params, p_state, p_ord)
        kinds["partner mask update"] = Runner(p_step, params, p_state, p_upd)
    res = {k: [] for k in kinds}
    base_times = []
    for _ in range(args.rounds):
      base_times.append(base.time(x, y, args.calls))
      for k, runner in kinds.items():
        res[k].append(runner.time(x, y, args.calls))
    for kind in ("ordinary", "mask update"):  # per-round ratios to the partner
      partner = res.pop("partner " + kind, None)
      if partner is None:
        continue
      pr = statistics.median(a[0] / c[0] for a, c in zip(res[kind], partner))
      prc = statistics.median(a[1] / c[1] for a, c in zip(res[kind], partner))
      paired_lines.append(f"| {name} / {PAIRED[name]} | {kind} | {pr:.3f}x ({prc:.3f}x) |")
    b = statistics.median(t for t, _ in base_times)
    bc = statistics.median(c for _, c in base_times)
    row = {"method": name, "base_ms": b * 1e3, "component": custom is not None}
    for k, v in res.items():
      row[k] = statistics.median(t for t, _ in v) / b
      row[k + " cpu"] = statistics.median(c for _, c in v) / bc
    rows.append(row)
    every = upd_t is None and not name.startswith("static") and custom is None
    if every:  # every step updates the masks: no ordinary steps
      row["mask update"], row["mask update cpu"] = row.pop("ordinary"), row.pop("ordinary cpu")
    parts = [f"{k} {row[k]:.3f}x (cpu {row[k + ' cpu']:.3f}x)"
             for k in ("ordinary", "mask update") if k in row]
    print(f"{name:26s} adam {b * 1e3:6.1f} ms  " + "  ".join(parts), flush=True)

  print()
  print("Ratios to plain Adam, median over rounds; wall clock (process CPU time in brackets,")
  print("steadier on a shared machine).")
  print()
  print("| method | ordinary step / adam | mask-update step / adam |")
  print("|---|---|---|")
  for r in rows:
    od = (f"{r['ordinary']:.3f}x ({r['ordinary cpu']:.3f}x)" if "ordinary" in r
          else "(none: masks recomputed every step)")
    mu = (f"{r['mask update']:.2f}x ({r['mask update cpu']:.2f}x)" if "mask update" in r
          else "" if r["component"] else "(no mask updates)")
    print(f"| {r['method']} | {od} | {mu} |")
  if paired_lines:
    print()
    print("Paired: the variant's step over its partner's step of the same kind, timed in the")
    print("same rounds, median of the per-round ratios; wall clock (process CPU time).")
    print()
    print("| variant / partner | step | ratio |")
    print("|---|---|---|")
    print("\n".join(paired_lines))


if __name__ == "__main__":
  main()
