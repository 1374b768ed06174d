"""Block-sparse matmul ``y = x @ W``: time, effective TFLOP/s and ratio to the ideal, with peers.

One process, one call: for each size S (in = out = S; tokens = S, or each of ``--tokens``) it
times the dense ``jnp.dot``
(forward, and forward+backward = three products), then for each block density d builds a random
block mask with exactly round(d * blocks) blocks, checks ``pallas_kernels.bsr_matmul`` (value,
dx and dW) against the dense masked product on the device, and times it. Printed per row:

* time: median wall time of a synchronised call (ms);
* TFLOP/s: effective throughput over the stored blocks only (2 * S * nnzb * br * bc FLOPs
  forward, three times that forward+backward);
* x ideal: time / (d * dense time of the same pass, measured in this process);
* vs dense: dense time of the same pass / time (the speed-up over ``jnp.dot``).

Timing: each measurement is the median of up to ``--iters`` calls; with ``--interleave R`` the
dense and block-sparse calls of one row are instead alternated R times and the minimum of each
is kept (on a shared machine the minimum is the least disturbed run, and alternating exposes
both to the same load).

Peers, same masks: ``jax.experimental.sparse.BCSR`` (element-sparse CSR of W^T, y^T = W^T @ x^T)
and, when torch imports, torch BSR (``to_sparse_bsr``, y^T = W^T_bsr @ x^T; forward+backward
when torch supports it). A peer whose call exceeds ``--peer-budget`` seconds is timed once and
skipped at higher densities of that size.

    python benchmarks/bsr_matmul.py                                   # GPU/TPU: 8192 and 4096, bf16
    python benchmarks/bsr_matmul.py --backend mosaic_gpu,triton       # H100/H200: both GPU kernels
    python benchmarks/bsr_matmul.py --sizes 512 --backend interpret   # CPU smoke run
    python benchmarks/bsr_matmul.py --sizes 2048 4096 --tokens 256 1024 4096 --block 32 \
        --densities 0.1 0.25 --dtype f32 --backend xla_cpu --peers '' --interleave 5   # CPU
    python benchmarks/bsr_matmul.py --sizes 2048 --tokens 1024 --block 32 --densities 0.1 \
        --dtype f32 --breakdown   # CPU: where the xla_cpu forward's time goes

``--breakdown`` (CPU) times the parts of the ``"xla_cpu"`` forward instead of the table: the
chunk GEMM ``[tile, g * br] x [g * br, bc]`` alone, the same GEMM in a ``fori_loop`` whose
operands are dynamic slices (the copy XLA:CPU makes before every dot in a loop), the chunk's
input gather in a loop (added into a float32 tile so that the loop keeps it) and the dense dot,
then compares chunks x (per-chunk cost) with the measured forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

try:
  import pallas_kernels  # noqa: F401
except ImportError:  # run from a checkout without installing
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from pallas_kernels import bsr_from_dense, bsr_matmul, default_backend
from pallas_kernels.matmul.testing import expand_block_mask, relative_error

DTYPES = {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}
TOL = {"bf16": 2e-2, "f16": 5e-3, "f32": 5e-3}  # tf32 on GPU for f32


def timeit(fn, *, iters: int, budget: float) -> tuple[float, int]:
  """Median seconds of ``fn()`` (which must block), after one warm-up; stops early past ``budget``."""
  fn()
  times: list[float] = []
  start = time.perf_counter()
  while len(times) < iters and (not times or time.perf_counter() - start < budget):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times), len(times)


def block(tree):
  return jax.block_until_ready(tree)


def exact_block_mask(rng, grid, density):
  nblocks = grid[0] * grid[1]
  keep = int(round(density * nblocks))
  flat = np.zeros(nblocks, bool)
  flat[rng.permutation(nblocks)[:keep]] = True
  return flat.reshape(grid)


@dataclasses.dataclass
class Row:
  tokens: int
  size: int
  density: float
  impl: str
  pass_: str
  ms: float | None
  tflops: float | None
  ratio: float | None
  runs: int = 0
  note: str = ""
  speedup: float | None = None


def ours(backend, interpret):
  """Jitted forward and forward+backward of bsr_matmul."""
  fwd = jax.jit(lambda x, w: bsr_matmul(x, w, backend=backend, interpret=interpret))

  @jax.jit
  def fwd_bwd(x, w, dy):
    f = lambda x, b: bsr_matmul(x, dataclasses.replace(w, blocks=b), backend=backend, interpret=interpret)
    y, vjp = jax.vjp(f, x, w.blocks)
    return y, *vjp(dy)

  return fwd, fwd_bwd


def check_ours(x, w_dense, mask, dy, w, fwd_bwd, dtype_name):
  """Value, dx and dW against the dense masked product computed by XLA in float32 on device."""
  f32 = lambda a: a.astype(jnp.float32)
  wm = jnp.where(mask, f32(w_dense), 0)
  hi = jax.lax.Precision.HIGHEST
  y_ref = jnp.dot(f32(x), wm, precision=hi)
  dx_ref = jnp.dot(f32(dy), wm.T, precision=hi)
  dw_ref = jnp.where(mask, jnp.dot(f32(x).T, f32(dy), precision=hi), 0)
  y, dx, db = fwd_bwd(x, w, dy)
  dw = dataclasses.replace(w, blocks=db).to_dense()
  errs = {k: relative_error(np.asarray(a, np.float32), np.asarray(b)) for k, a, b in (("y", y, y_ref), ("dx", dx, dx_ref), ("dW", dw, dw_ref))}
  ok = all(e < TOL[dtype_name] for e in errs.values())
  return ok, errs


def bench_bcsr(x, w_masked_t, dy, block_shape, args):
  """jax.experimental.sparse BCSR of W^T (out, in): y^T = W^T @ x^T."""
  del block_shape  # element-sparse
  from jax.experimental import sparse  # noqa: PLC0415

  wt = sparse.BCSR.fromdense(w_masked_t)
  fwd = jax.jit(lambda data, x: (sparse.BCSR((data, wt.indices, wt.indptr), shape=wt.shape) @ x.T).T)

  @jax.jit
  def fwd_bwd(data, x, dy):
    y, vjp = jax.vjp(fwd, data, x)
    return y, *vjp(dy)

  out = {"fwd": timeit(lambda: block(fwd(wt.data, x)), iters=args.iters, budget=args.peer_budget)}
  err = relative_error(np.asarray(fwd(wt.data, x), np.float32), np.asarray(jnp.dot(x.astype(jnp.float32), w_masked_t.T.astype(jnp.float32))))
  try:
    out["fwd+bwd"] = timeit(lambda: block(fwd_bwd(wt.data, x, dy)), iters=args.iters, budget=args.peer_budget)
  except Exception as e:  # noqa: BLE001 (report, do not stop the run)
    out["fwd+bwd"] = f"n/a ({type(e).__name__})"
  return out, err


def bench_torch(x, w_masked_t, dy, block_shape, args):
  """torch BSR of W^T (out, in): y^T = W^T_bsr @ x^T."""
  import torch  # noqa: PLC0415

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  tdtype = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16, jnp.dtype(jnp.float32): torch.float32}[jnp.dtype(x.dtype)]
  tt = lambda a: torch.from_numpy(np.asarray(a, np.float32)).to(dev, tdtype)
  wt = tt(w_masked_t).to_sparse_bsr(block_shape[::-1])
  xt, dyt = tt(x).T.contiguous(), tt(dy).T.contiguous()
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def fwd():
    with torch.no_grad():
      y = wt @ xt
    sync()
    return y

  out = {"fwd": timeit(fwd, iters=args.iters, budget=args.peer_budget)}
  err = relative_error(fwd().float().T.cpu().numpy(), np.asarray(jnp.dot(x.astype(jnp.float32), w_masked_t.T.astype(jnp.float32))))
  try:
    wg = wt.detach().clone().requires_grad_(True)
    xg = xt.detach().clone().requires_grad_(True)

    def fwd_bwd():
      y = wg @ xg
      y.backward(dyt)
      sync()

    out["fwd+bwd"] = timeit(fwd_bwd, iters=args.iters, budget=args.peer_budget)
  except Exception as e:  # noqa: BLE001
    out["fwd+bwd"] = f"n/a ({type(e).__name__}: {str(e)[:60]})"
  return out, err


def _per_call(fn, *args, n=50):
  """Seconds per call of a jitted ``fn`` (mean of ``n`` back-to-back calls, best of 3)."""
  fn(*args).block_until_ready()
  best = float("inf")
  for _ in range(3):
    t = time.perf_counter()
    for _ in range(n):
      r = fn(*args)
    r.block_until_ready()
    best = min(best, (time.perf_counter() - t) / n)
  return best


def cpu_breakdown(args, size, tokens, dtype, block_shape, density, rng):
  """Prints the parts of the xla_cpu forward (see the module docstring, ``--breakdown``)."""
  from jax import lax  # noqa: PLC0415

  from pallas_kernels.matmul import xla_cpu  # noqa: PLC0415

  (br, bc), kb, nb = block_shape, size // block_shape[0], size // block_shape[1]
  bmask = exact_block_mask(rng, (kb, nb), density)
  w_dense = jax.random.normal(jax.random.key(1), (size, size), jnp.float32).astype(dtype)
  w = bsr_from_dense(w_dense, jnp.asarray(expand_block_mask(bmask, block_shape)), block_shape)
  x = jax.random.normal(jax.random.key(0), (tokens, size), dtype)
  tile = min(tokens, xla_cpu.TOKEN_TILE)
  g = xla_cpu._group(br, w.capacity, nb, dtype)
  per_col = bmask.sum(axis=0)
  chunks = -(-tokens // tile) * int((-(-per_col // g)).sum())
  ct = xla_cpu._dot_dtype(dtype)
  overhead = _per_call(jax.jit(lambda a: a + 1), jnp.ones(8), n=200)
  dot = jax.jit(lambda a, b: lax.dot(a.astype(ct), b.astype(ct), preferred_element_type=jnp.float32))
  a, b = jnp.ones((tile, g * br), dtype), jnp.ones((g * br, bc), dtype)
  t_dot = _per_call(dot, a, b) - overhead
  n = 64
  big_a, big_b = jnp.ones((tile, n * g * br), dtype), jnp.ones((n * g * br, bc), dtype)

  @jax.jit
  def dot_loop(big_a, big_b):  # 16-bit operands sliced as uint16, as xla_cpu does
    def body(i, acc):
      ai = xla_cpu._float(lax.dynamic_slice(xla_cpu._bits(big_a), (0, i * g * br), (tile, g * br)), dtype)
      bi = xla_cpu._float(lax.dynamic_slice(xla_cpu._bits(big_b), (i * g * br, 0), (g * br, bc)), dtype)
      return acc + lax.dot(ai.astype(ct), bi.astype(ct), preferred_element_type=jnp.float32)
    return lax.fori_loop(0, n, body, jnp.zeros((tile, bc), jnp.float32))

  slabs = xla_cpu._bits(x[:tile]).reshape(tile, kb, br)
  idx = jnp.asarray(rng.integers(0, kb, (n, g)), jnp.int32)

  @jax.jit
  def gather_loop(slabs, idx):  # each gathered tile is added into a float32 tile that the loop keeps
    def body(i, acc):
      return acc + jnp.take(slabs, idx[i], axis=1, mode="clip").astype(jnp.float32).reshape(tile, g * br)
    return lax.fori_loop(0, n, body, jnp.zeros((tile, g * br), jnp.float32))

  t_dot_loop = _per_call(dot_loop, big_a, big_b, n=3) / n
  t_gather = _per_call(gather_loop, slabs, idx, n=3) / n
  fwd = jax.jit(lambda x, w: xla_cpu.spmm(x, w))
  t_fwd = _per_call(fwd, x, w, n=3)
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
  t_dense = _per_call(dense, x, w_dense, n=3)
  gf = lambda flops, t: flops / t / 1e9
  chunk_flops = 2 * tile * g * br * bc
  print(f"breakdown {args.dtype} {size}x{size} blocks {block_shape} d={bmask.mean():.3f} tokens={tokens}: "
        f"{chunks} chunk GEMMs [{tile}, {g * br}] x [{g * br}, {bc}] (g={g}, {-(-tokens // tile)} token pass(es))")
  print(f"  dense jnp.dot [{tokens}, {size}] x [{size}, {size}]: {t_dense * 1e3:.2f} ms = {gf(2 * tokens * size**2, t_dense):.0f} GFLOP/s")
  print(f"  chunk GEMM alone (one jit call, less {overhead * 1e6:.1f} us dispatch): {t_dot * 1e6:.1f} us = {gf(chunk_flops, t_dot):.0f} GFLOP/s")
  print(f"  chunk GEMM in a fori_loop on dynamic-slice operands: {t_dot_loop * 1e6:.1f} us/iter = {gf(chunk_flops, t_dot_loop):.0f} GFLOP/s")
  print(f"  chunk input gather in a fori_loop ({tile * g * br * jnp.dtype(dtype).itemsize / 1024:.0f} KiB): "
        f"{t_gather * 1e6:.1f} us/iter = {tile * g * br * jnp.dtype(dtype).itemsize / t_gather / 1e9:.2f} GB/s")
  est = chunks * (t_dot_loop + t_gather)
  print(f"  xla_cpu forward: {t_fwd * 1e3:.2f} ms = {gf(2 * tokens * int(bmask.sum()) * br * bc, t_fwd):.0f} GFLOP/s on the stored blocks, "
        f"{t_dense / t_fwd:.2f}x dense; chunks x (GEMM in loop + gather) = {est * 1e3:.2f} ms; "
        f"chunks x GEMM alone = {chunks * t_dot * 1e3:.2f} ms")


PEERS = {"bcsr": ("jax.experimental.sparse.BCSR", bench_bcsr), "torch": ("torch BSR", bench_torch)}


def interleaved(calls: dict, rounds: int) -> tuple[dict, dict]:
  """Alternates the calls ``rounds`` times after a warm-up.

  Returns ``({key: (min wall seconds, rounds)}, {key: min process CPU seconds})``; CPU time
  (all threads of this process) counts the work done, not the time spent waiting for cores
  that other processes hold, so its ratios are the steadier ones on a shared machine.
  """
  for f in calls.values():
    f()
  best = {k: float("inf") for k in calls}
  cpu = dict(best)
  for _ in range(rounds):
    for k, f in calls.items():
      t, c = time.perf_counter(), time.process_time()
      f()
      best[k] = min(best[k], time.perf_counter() - t)
      cpu[k] = min(cpu[k], time.process_time() - c)
  return {k: (t, rounds) for k, t in best.items()}, cpu


def run_size(args, size, tokens, dtype, block_shape, backends, peers, torch_ok, rng, rows) -> int:
  """Dense, ours and peers for one (size, tokens); appends to ``rows``, returns the failure count."""
  failures = 0
  keys = jax.random.split(jax.random.key(args.seed + size), 3)
  x = jax.random.normal(keys[0], (tokens, size), dtype)
  w_dense = (jax.random.normal(keys[1], (size, size), jnp.float32) / np.sqrt(size)).astype(dtype)
  dy = jax.random.normal(keys[2], (tokens, size), dtype)

  dense_fwd = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))

  @jax.jit
  def dense_fwd_bwd(x, w, dy):
    y, vjp = jax.vjp(dense_fwd, x, w)
    return y, *vjp(dy)

  dense_calls = {
      "fwd": lambda: block(dense_fwd(x, w_dense)),
      "fwd+bwd": lambda: block(dense_fwd_bwd(x, w_dense, dy)),
  }
  dense = {k: timeit(f, iters=args.iters, budget=args.budget) for k, f in dense_calls.items()}
  for pass_, (t, n) in dense.items():
    flops = 2 * tokens * size**2 * (3 if pass_ == "fwd+bwd" else 1)
    rows.append(Row(tokens, size, 1.0, "dense jnp.dot", pass_, t * 1e3, flops / t / 1e12, None, n))
    print(f"  {rows[-1]}", flush=True)

  grid = (size // block_shape[0], size // block_shape[1])
  skip = {} if torch_ok or "torch" not in peers else {"torch": "skipped (torch does not import)"}
  for density in args.densities:
    bmask = exact_block_mask(rng, grid, density)
    nnzb = int(bmask.sum())
    d = nnzb / bmask.size
    mask = jnp.asarray(expand_block_mask(bmask, block_shape))
    w = bsr_from_dense(w_dense, mask, block_shape)
    fwd_flops = 2 * tokens * nnzb * block_shape[0] * block_shape[1]

    def add(impl, results, note="", dense_times=None):
      for pass_ in ("fwd", "fwd+bwd"):
        r = results.get(pass_)
        if isinstance(r, tuple):
          t, n = r
          flops = fwd_flops * (3 if pass_ == "fwd+bwd" else 1)
          t_dense = (dense_times or dense)[pass_][0]
          ideal = d * t_dense
          rows.append(Row(tokens, size, d, impl, pass_, t * 1e3, flops / t / 1e12, t / ideal if ideal else None, n, note, t_dense / t))
        else:
          rows.append(Row(tokens, size, d, impl, pass_, None, None, None, 0, r or note))
        print(f"  {rows[-1]}", flush=True)

    for backend in backends:
      fwd, fwd_bwd = ours(backend, args.interpret)
      ok, errs = check_ours(x, w_dense, mask, dy, w, fwd_bwd, args.dtype)  # check, then time
      failures += not ok
      note = ("ok " if ok else "WRONG ") + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
      calls = {"fwd": lambda: block(fwd(x, w)), "fwd+bwd": lambda: block(fwd_bwd(x, w, dy))}
      dense_now = None
      if args.interleave:
        both, cpu = interleaved({**{("ours", k): f for k, f in calls.items()}, **{("dense", k): f for k, f in dense_calls.items()}}, args.interleave)
        timed = {k: both["ours", k] for k in calls}
        dense_now = {k: both["dense", k] for k in calls}
        note += (f" (min of {args.interleave} alternated runs; dense {dense_now['fwd'][0] * 1e3:.1f} / "
                 f"{dense_now['fwd+bwd'][0] * 1e3:.1f} ms; CPU-time speed-up fwd "
                 f"{cpu['dense', 'fwd'] / cpu['ours', 'fwd']:.2f}x, fwd+bwd "
                 f"{cpu['dense', 'fwd+bwd'] / cpu['ours', 'fwd+bwd']:.2f}x)")
      else:
        timed = {k: timeit(f, iters=args.iters, budget=args.budget) for k, f in calls.items()}
      add(f"bsr_matmul[{backend or 'auto: ' + default_backend()}]", timed, note, dense_now)

    w_masked_t = jnp.where(mask, w_dense, 0).T
    for peer in peers:
      label, run = PEERS[peer]
      if peer in skip:
        add(label, {}, skip[peer])
        continue
      try:
        res, err = run(x, w_masked_t, dy, block_shape, args)
      except Exception as e:  # noqa: BLE001 (a peer failing must not stop the run)
        add(label, {}, f"failed: {type(e).__name__}: {str(e)[:80]}")
        continue
      if any(isinstance(r, tuple) and r[0] > args.peer_budget for r in res.values()):
        skip[peer] = f"skipped (over {args.peer_budget:g} s per call at a lower density)"
      add(label, res, f"err y={err:.1e}")
  return failures


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[8192, 4096], help="in = out (and tokens unless --tokens)")
  p.add_argument("--tokens", type=int, nargs="+", default=None, help="rows of x (default: each size)")
  p.add_argument("--interleave", type=int, default=0, help="alternate ours and dense R times, keep minima (wall and CPU time)")
  p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 1.0])
  p.add_argument("--block", type=int, nargs="+", default=[128], help="br [bc]")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
  p.add_argument("--backend", default="auto", help="comma list of auto, mosaic_gpu, triton, tpu, interpret, xla_cpu, reference")
  p.add_argument("--interpret", action="store_true", help="run the chosen Pallas kernel in interpret mode")
  p.add_argument("--peers", default="bcsr,torch", help="comma list of bcsr, torch; '' for none")
  p.add_argument("--iters", type=int, default=20)
  p.add_argument("--budget", type=float, default=5.0, help="seconds of timed runs per measurement")
  p.add_argument("--peer-budget", type=float, default=10.0, help="a slower peer call is timed once, then skipped")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="also write all rows to this file")
  p.add_argument("--breakdown", action="store_true", help="CPU: time the parts of the xla_cpu forward instead")
  args = p.parse_args(argv)

  dtype = DTYPES[args.dtype]
  block_shape = (args.block[0], args.block[-1])
  backends = [None if b == "auto" else b for b in args.backend.split(",") if b]
  peers = [s for s in args.peers.split(",") if s]
  unknown = set(peers) - set(PEERS)
  if unknown:
    p.error(f"unknown peers {sorted(unknown)}; choose from {sorted(PEERS)}")
  try:
    import torch  # noqa: F401, PLC0415

    torch_ok = True
  except ImportError:
    torch_ok = False
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
        f"auto backend: {default_backend()}, interpret={args.interpret}, "
        f"dtype {args.dtype}, blocks {block_shape}", flush=True)
  rows: list[Row] = []
  failures = 0
  rng = np.random.default_rng(args.seed)

  if args.breakdown:
    for size in args.sizes:
      for tokens in args.tokens or [size]:
        for density in args.densities:
          cpu_breakdown(args, size, tokens, dtype, block_shape, density, rng)
    return 0
  for size in args.sizes:
    for tokens in args.tokens or [size]:
      failures += run_size(args, size, tokens, dtype, block_shape, backends, peers, torch_ok, rng, rows)

  print("\nBlock-sparse matmul, " + f"{args.dtype}, blocks {block_shape}, device {dev.device_kind}")
  print(f"{'tokens':>6} {'size':>6} {'density':>7} {'impl':<34} {'pass':<8} {'ms':>9} {'TFLOP/s':>8} {'x ideal':>8} {'vs dense':>8}  note")
  for r in rows:
    ms = f"{r.ms:9.3f}" if r.ms is not None else f"{'-':>9}"
    tf = f"{r.tflops:8.3f}" if r.tflops is not None else f"{'-':>8}"
    ra = f"{r.ratio:8.2f}" if r.ratio is not None else f"{'-':>8}"
    sp = f"{r.speedup:7.2f}x" if r.speedup is not None else f"{'-':>8}"
    print(f"{r.tokens:>6} {r.size:>6} {r.density:>7.3f} {r.impl:<34} {r.pass_:<8} {ms} {tf} {ra} {sp}  {r.note}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in rows], f, indent=1)
  if failures:
    print(f"\n{failures} correctness check(s) FAILED")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
