"""Compile time of one N:M training step (SDGF, STE) for small and large M.

A small MLP (kernels 64x256, 256x256, 256x64; every input axis divisible by 16),
``optax.adam(1e-3)`` inside each transformation. For every row, in one process:
``jax.jit(train_step).lower(...).compile()`` in process CPU seconds (wall in
brackets), its ratio to the first row, the number of lines of the optimized
HLO, and the compiled step's run time (min of 20 runs). SDGF ``"1:16"``
(stepwise) runs the patterns 15:16, 8:16, 4:16, 2:16, 1:16; ``"2:4"`` runs
3:4, 2:4.

    python benchmarks/nm_compile.py
    python benchmarks/nm_compile.py --only sdgf-2:4,sdgf-1:16
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import optax

import sparsejax.optim as so

SHAPES = ((64, 256), (256, 256), (256, 64))


def make_params():
  keys = jax.random.split(jax.random.key(0), len(SHAPES))
  return {f"l{i}": {"kernel": jax.random.normal(k, s) / s[0] ** 0.5, "bias": jnp.zeros(s[1])}
          for i, (k, s) in enumerate(zip(keys, SHAPES))}


def loss(params, x):
  h = x
  for i in range(len(SHAPES)):
    h = h @ params[f"l{i}"]["kernel"] + params[f"l{i}"]["bias"]
    h = jax.nn.relu(h) if i < len(SHAPES) - 1 else h
  return jnp.mean(h ** 2)


def rows():
  return {
      "sdgf-2:4": lambda o: so.sdgf(o, nm="2:4", total_steps=1000),
      "sdgf-1:16": lambda o: so.sdgf(o, nm="1:16", total_steps=1000),
      "ste-2:4": lambda o: so.ste(o, nm="2:4"),
      "ste-1:16": lambda o: so.ste(o, nm="1:16"),
      "ste-8:16": lambda o: so.ste(o, nm="8:16"),
  }


def compile_step(factory, params, x, repeats=20):
  tx = factory(optax.adam(1e-3))
  state = tx.init(params)

  def step(p, s, x):
    g = jax.grad(lambda q: loss(so.forward_params(q, s), x))(p)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  c0, t0 = time.process_time(), time.perf_counter()
  compiled = jax.jit(step).lower(params, state, x).compile()
  cpu, wall = time.process_time() - c0, time.perf_counter() - t0
  jax.block_until_ready(compiled(params, state, x))
  runs = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(params, state, x))
    runs.append(time.perf_counter() - t0)
  return cpu, wall, len(compiled.as_text().splitlines()), min(runs)


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--only", default=None, help="comma-separated row names")
  args = ap.parse_args()
  names = list(rows()) if args.only is None else args.only.split(",")
  print(f"{platform.processor() or platform.machine()}, {jax.default_backend()}, Python "
        f"{platform.python_version()}, jax {jax.__version__}, optax {optax.__version__}")
  params, x = make_params(), jnp.ones((32, SHAPES[0][0]))
  compile_step(lambda o: so.ste(o, nm="2:4"), params, x)  # warm-up (first compile is slower)
  print("| step | compile s CPU (wall) | / first row | optimized HLO lines | step ms (min of 20) |")
  print("|---|---|---|---|---|")
  first = None
  for name in names:
    cpu, wall, lines, run = compile_step(rows()[name], params, x)
    first = first or cpu
    print(f"| {name} | {cpu:.2f} ({wall:.2f}) | {cpu / first:.2f}x | {lines} | {run * 1e3:.2f} |",
          flush=True)


if __name__ == "__main__":
  main()
