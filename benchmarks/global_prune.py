"""Global magnitude pruning: exact top-k by reductions vs concatenate + sort / top_k.

Prunes ``--size`` float32 parameters spread over ``--leaves`` leaves (2-D kernels
of varied shapes) to ``--sparsity`` with one global magnitude threshold, on CPU:

* ``ours radix``   sparsejax ``global_topk_masks(params, density, score_fn=jnp.abs)``
  (2 histogram passes: 20-bit then 12-bit digits, no concatenation; exact count, ties by
  leaf order then flat index);
* ``ours bisect``  same API, ``method="bisect"`` (32 fused count passes);
* ``concat+sort``  ``t = jnp.sort(concatenate(|p|))[N - k]``, masks ``|p| >= t``;
* ``concat+top_k`` ``t = lax.top_k(concatenate(|p|), k)[0][-1]``, masks ``|p| >= t``;
* ``one pass``     masks ``|p| >= c`` for a fixed ``c``: one read of the params and
  one write of the masks, the ideal lower bound for any method.

All methods run in one process on the same arrays (AOT-compiled first, then
timed; min over ``--repeats``; compile time printed separately). Memory is
reported two ways:

* ``xla temp/out``: ``compiled.memory_analysis()`` temporary and output bytes
  (what XLA allocates beyond the arguments);
* ``rss extra`` (``--rss``): each method re-run in a fresh subprocess; the peak
  resident set (``VmHWM`` of /proc/self/status, reset through
  /proc/self/clear_refs after the params exist and the function is compiled)
  minus ``VmRSS`` just before the call.

Usage::

  python benchmarks/global_prune.py --size 1e6            # quick
  python benchmarks/global_prune.py --size 1e8 --rss      # the recorded run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.core.selection import global_topk_masks, num_to_keep

METHODS = ("ours radix", "ours bisect", "concat+sort", "concat+top_k", "one pass")


def make_params(size: int, leaves: int, seed: int = 0) -> list[jax.Array]:
  """``leaves`` 2-D float32 arrays of varied shapes totalling about ``size`` elements."""
  rng = np.random.default_rng(seed)
  w = rng.uniform(0.2, 1.8, size=leaves)
  sizes = np.maximum((w / w.sum() * size).astype(np.int64), 64)
  key = jax.random.key(seed)
  out = []
  for i, n in enumerate(sizes):
    cols = int(rng.choice([64, 128, 256, 512, 1024]))
    rows = max(1, int(n) // cols)
    out.append(jax.random.normal(jax.random.fold_in(key, i), (rows, cols), jnp.float32))
  return out


def build(method: str, k: int, density: float):
  if method == "ours radix":
    return lambda p, d: global_topk_masks(p, density=d, score_fn=jnp.abs, method="radix")
  if method == "ours bisect":
    return lambda p, d: global_topk_masks(p, density=d, score_fn=jnp.abs, method="bisect")
  if method == "concat+sort":
    def f(p, d):
      cat = jnp.concatenate([jnp.abs(x).ravel() for x in p])
      kk = num_to_keep(cat.size, d)
      t = jnp.sort(cat)[cat.size - kk]
      return [jnp.abs(x) >= t for x in p]
    return f
  if method == "concat+top_k":
    def f(p, d):
      del d
      cat = jnp.concatenate([jnp.abs(x).ravel() for x in p])
      t = lax.top_k(cat, k)[0][-1]
      return [jnp.abs(x) >= t for x in p]
    return f
  if method == "one pass":
    return lambda p, d: [jnp.abs(x) >= 1.6448536 * d / d for x in p]
  raise ValueError(method)


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise RuntimeError(field)


def run_one(method, params, k, density, repeats):
  f = jax.jit(build(method, k, density))
  d = jnp.float32(density)
  t0 = time.perf_counter()
  c = f.lower(params, d).compile()
  compile_s = time.perf_counter() - t0
  ma = c.memory_analysis()
  times = []
  out = None
  for _ in range(repeats):
    del out
    t0 = time.perf_counter()
    out = jax.block_until_ready(c(params, d))
    times.append(time.perf_counter() - t0)
  kept = int(sum(int(jnp.sum(m, dtype=jnp.int32)) for m in out))
  return dict(method=method, time=min(times), temp=ma.temp_size_in_bytes, out=ma.output_size_in_bytes, kept=kept,
              compile=compile_s)


def rss_child(method, size, leaves, sparsity):
  params = make_params(size, leaves)
  jax.block_until_ready(params)
  total = sum(x.size for x in params)
  density = 1.0 - sparsity
  k = int(num_to_keep(total, density))
  f = jax.jit(build(method, k, density))
  d = jnp.float32(density)
  c = f.lower(params, d).compile()
  with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # reset VmHWM to the current RSS
  before = _status("VmRSS")
  out = jax.block_until_ready(c(params, d))
  peak = _status("VmHWM")
  del out
  print(json.dumps(dict(method=method, rss_extra=peak - before)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", type=float, default=1e8, help="total number of float32 parameters")
  ap.add_argument("--leaves", type=int, default=100)
  ap.add_argument("--sparsity", type=float, default=0.9)
  ap.add_argument("--repeats", type=int, default=2, help="timed calls per method (min reported)")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--rss", action="store_true", help="also measure peak RSS per method in subprocesses")
  ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  size = int(args.size)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  if args.rss_child:
    rss_child(args.rss_child, size, args.leaves, args.sparsity)
    return

  params = make_params(size, args.leaves)
  jax.block_until_ready(params)
  total = sum(x.size for x in params)
  density = 1.0 - args.sparsity
  k = int(num_to_keep(total, density))
  print(f"global magnitude pruning: {total:,} float32 params ({total * 4 / 2**20:.0f} MiB) in {len(params)} leaves, "
        f"sparsity {args.sparsity} -> keep k = {k:,}")
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"{platform.machine()}")
  rows = []
  for m in methods:
    r = run_one(m, params, k, density, args.repeats)
    rows.append(r)
    print(f"  {m:14s} {r['time']:8.3f} s", flush=True)
  if args.rss:
    for r in rows:
      cmd = [sys.executable, os.path.abspath(__file__), "--size", str(size), "--leaves", str(args.leaves),
             "--sparsity", str(args.sparsity), "--rss-child", r["method"]]
      res = subprocess.run(cmd, capture_output=True, text=True, check=True)
      r["rss_extra"] = json.loads(res.stdout.strip().splitlines()[-1])["rss_extra"]
  by = {r["method"]: r for r in rows}
  ref_sort = by.get("concat+sort", {}).get("time")
  ours = by.get("ours radix", {}).get("time")
  ideal = by.get("one pass", {}).get("time")
  mib = 2**20
  print()
  print(f"{'method':14s} {'time s':>9s} {'sort/this':>9s} {'this/ours':>9s} {'this/ideal':>10s} "
        f"{'xla temp MiB':>12s} {'xla out MiB':>11s} {'rss extra MiB':>13s} {'kept':>12s} {'compile s':>9s}")
  for r in rows:
    def ratio(a, b):
      return f"{a / b:.2f}x" if a and b else "-"
    rss = f"{r['rss_extra'] / mib:.0f}" if "rss_extra" in r else "-"
    print(f"{r['method']:14s} {r['time']:9.3f} {ratio(ref_sort, r['time']):>9s} {ratio(r['time'], ours):>9s} "
          f"{ratio(r['time'], ideal):>10s} {r['temp'] / mib:12.0f} {r['out'] / mib:11.0f} {rss:>13s} {r['kept']:12,d} {r['compile']:9.1f}")
  if "ours radix" in by and by["ours radix"]["kept"] != k:
    print(f"ERROR: ours kept {by['ours radix']['kept']} != k = {k}")
    sys.exit(1)


if __name__ == "__main__":
  main()
