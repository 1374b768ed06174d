"""Block-sparse flash attention: time, effective TFLOP/s and ratio to the ideal, one process.

For every sequence length it times the dense references first (our dense mask on
each backend, ``jax.nn.dot_product_attention(implementation="cudnn")`` when cuDNN
is there), then, for every mask, checks each backend's forward and gradients
against the XLA reference on a slice (batch 1, two heads; exit 1 on a mismatch)
and times forward and forward+backward. Peers on the same inputs and block mask:
cuDNN for the dense and causal masks, torch FlexAttention (``torch.compile``d,
BlockMask built from our kv lists) for every mask when torch imports.

Effective TFLOP/s count the visited blocks only: forward ``4 * q_block * kv_block
* head_dim`` per visited block and (batch, head); forward+backward 3.5x that.
The ideal for a mask of block density ``d`` is ``d`` x the best dense time of the
same pass measured in this process (ours or cuDNN); ``x ideal`` is time / ideal.

GPU (H100/H200), all defaults (bf16, batch 4, 16 heads, head_dim 128, seq 4096 and
16384, 128 x 128 blocks):

    python benchmarks/attention.py --json attention.json

CPU smoke run (checks that everything runs; CPU timings mean nothing):

    JAX_PLATFORMS=cpu python benchmarks/attention.py --seqs 256 --batch 1 --heads 2 \\
        --head-dim 32 --block 32 --window 64 --doc-min 32 --doc-max 96 \\
        --backends interpret,reference --iters 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import resolve_backend
from pallas_kernels.attention import (BlockMask, block_mask_from_blocks, block_sparse_attention,
                                      causal_mask, document_mask, full_mask,
                                      segment_ids_from_lengths, sliding_window_mask)
from pallas_kernels.attention.testing import relative_error

MASKS = ("dense", "causal", "window", "documents", "random50", "random25", "random10")


def _build_mask(name: str, s: int, args, rng) -> BlockMask:
  blk = dict(q_block=args.block)
  if name == "dense":
    return full_mask(s, **blk)
  if name == "causal":
    return causal_mask(s, **blk)
  if name == "window":
    return sliding_window_mask(s, window=args.window, **blk)
  if name == "documents":
    segs = []
    for _ in range(args.batch):
      lengths = []
      while sum(lengths) < s:
        lengths.append(int(rng.integers(args.doc_min, args.doc_max + 1)))
      segs.append(np.asarray(segment_ids_from_lengths(jnp.asarray(lengths), s)))
    return document_mask(jnp.asarray(np.stack(segs)), **blk)
  if name.startswith("random"):
    d = int(name[len("random"):]) / 100
    n = s // args.block
    count = max(1, round(d * n * n))
    blocks = np.zeros((args.heads, n * n), bool)
    for h in range(args.heads):
      blocks[h, rng.permutation(n * n)[:count]] = True
    return block_mask_from_blocks(jnp.asarray(blocks.reshape(args.heads, n, n)), q_len=s,
                                  **blk)
  raise ValueError(f"--masks: unknown mask {name!r}; choose from {MASKS}")


def _slice_mask(m: BlockMask, b: int, h: int) -> BlockMask:
  """The mask of the first ``b`` batch rows and ``h`` heads (broadcast rows stay)."""
  def cut(x):
    return x[:min(b, x.shape[0]), :min(h, x.shape[1])]
  mm = m.mask_mod
  if mm is not None:
    mm = dataclasses.replace(mm, q_data=tuple(x[:b] for x in mm.q_data),
                             kv_data=tuple(x[:b] for x in mm.kv_data))
  # Rebuilt from the kv lists, so the transposed lists and the work orders match the slice.
  return BlockMask.from_kv_lists(
      cut(m.full_kv_counts), cut(m.full_kv_indices), cut(m.partial_kv_counts),
      cut(m.partial_kv_indices), q_len=m.q_len, kv_len=m.kv_len, q_block=m.q_block,
      kv_block=m.kv_block, mask_mod=mm)


def _time(fn, *args, iters: int, repeats: int = 5) -> float:
  """Median over ``repeats`` of the mean time of ``iters`` calls (seconds), after warm-up."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / iters)
  return statistics.median(samples)


def _fwd_fns(attn):
  fwd = jax.jit(attn)

  @jax.jit
  def fwd_bwd(q, k, v, do):
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(do)

  return fwd, fwd_bwd


def _check(backend, q, k, v, do, mask, args) -> float:
  b, h = 1, min(2, q.shape[2])
  g = q.shape[2] // k.shape[2]
  sl = lambda x, heads: x[:b, :, :heads]
  qs, dos = sl(q, h), sl(do, h)
  ks, vs = sl(k, max(1, h // g)), sl(v, max(1, h // g))
  ms = _slice_mask(mask, b, h)

  def run(be, *xs):
    f = lambda q_, k_, v_: block_sparse_attention(q_, k_, v_, ms, backend=be)
    out, vjp = jax.vjp(f, *xs[:3])
    return (out,) + vjp(xs[3])

  got = jax.jit(lambda *xs: run(backend, *xs))(qs, ks, vs, dos)
  f32 = [x.astype(jnp.float32) for x in (qs, ks, vs, dos)]
  ref = jax.jit(lambda *xs: run("reference", *xs))(*f32)
  return max(relative_error(a, r) for a, r in zip(got, ref))


def _torch_flex(mask: BlockMask, name: str, args, q, k, v, do):
  """Times torch FlexAttention with our block lists; returns (fwd_s, fwd_bwd_s, err) or None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch.nn.attention import flex_attention as fa  # pylint: disable=g-import-not-at-top
  except Exception:  # pylint: disable=broad-except
    return None
  if not torch.cuda.is_available():
    return None
  dev = "cuda"
  tt = lambda x: torch.from_numpy(np.asarray(x)).to(dev)
  s = q.shape[1]
  mm = mask.mask_mod
  mask_mod = None
  if name == "causal":
    mask_mod = lambda b, h, qi, ki: qi >= ki
  elif name == "window":
    w = args.window
    mask_mod = lambda b, h, qi, ki: (qi >= ki) & (qi - ki < w)
  elif name == "documents":
    seg = tt(mm.q_data[0])
    mask_mod = lambda b, h, qi, ki: seg[b, qi] == seg[b, ki]
  block = fa.BlockMask.from_kv_blocks(
      tt(mask.partial_kv_counts), tt(mask.partial_kv_indices), tt(mask.full_kv_counts),
      tt(mask.full_kv_indices), BLOCK_SIZE=(mask.q_block, mask.kv_block), mask_mod=mask_mod,
      seq_lengths=(s, s))
  to_t = lambda x: torch.from_dlpack(x).permute(0, 2, 1, 3).contiguous()
  tq, tk, tv, tdo = (to_t(x) for x in (q, k, v, do))
  enable_gqa = q.shape[2] != k.shape[2]
  flex = torch.compile(fa.flex_attention, dynamic=False)

  def fwd():
    return flex(tq, tk, tv, block_mask=block, enable_gqa=enable_gqa)

  def fwd_bwd():
    for t in (tq, tk, tv):
      t.grad = None
    out = flex(tq.requires_grad_(), tk.requires_grad_(), tv.requires_grad_(), block_mask=block,
               enable_gqa=enable_gqa)
    out.backward(tdo)
    return out

  def bench(fn):
    fn()
    fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(5):
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      for _ in range(args.iters):
        fn()
      end.record()
      torch.cuda.synchronize()
      samples.append(start.elapsed_time(end) / 1e3 / args.iters)
    return statistics.median(samples)

  with torch.no_grad():
    t_fwd = bench(fwd)
    ours = np.asarray(block_sparse_attention(q, k, v, mask).astype(jnp.float32))
    theirs = fwd().permute(0, 2, 1, 3).float().cpu().numpy()
  err = relative_error(theirs, ours)
  return t_fwd, bench(fwd_bwd), err


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seqs", default="4096,16384")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=None)
  p.add_argument("--head-dim", type=int, default=128)
  p.add_argument("--block", type=int, default=128)
  p.add_argument("--window", type=int, default=1024)
  p.add_argument("--doc-min", type=int, default=512)
  p.add_argument("--doc-max", type=int, default=2048)
  p.add_argument("--masks", default=",".join(MASKS))
  p.add_argument("--backends", default="auto", help="comma list; auto = platform default")
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--num-warps", type=int, default=None, help="triton backend")
  p.add_argument("--num-stages", type=int, default=None, help="triton backend")
  p.add_argument("--iters", type=int, default=10)
  p.add_argument("--tol", type=float, default=2e-2)
  p.add_argument("--no-peers", action="store_true")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  backends = [resolve_backend(None if b == "auto" else b) for b in args.backends.split(",")]
  dtype = jnp.dtype(args.dtype)
  kvh = args.heads if args.kv_heads is None else args.kv_heads
  rng = np.random.default_rng(0)
  on_gpu = jax.default_backend() == "gpu"
  print(f"# device: {jax.devices()[0].device_kind}  jax {jax.__version__}  backends {backends}  "
        f"{args.dtype} B={args.batch} H={args.heads} Hkv={kvh} D={args.head_dim} "
        f"block={args.block}")
  rows, failures = [], []
  for s in (int(x) for x in args.seqs.split(",")):
    key = jax.random.split(jax.random.PRNGKey(s), 4)
    q = jax.random.normal(key[0], (args.batch, s, args.heads, args.head_dim), dtype)
    k = jax.random.normal(key[1], (args.batch, s, kvh, args.head_dim), dtype)
    v = jax.random.normal(key[2], (args.batch, s, kvh, args.head_dim), dtype)
    do = jax.random.normal(key[3], q.shape, dtype)
    dense_blocks = args.batch * args.heads * (s // args.block) ** 2
    dense_fwd_flops = 4.0 * args.head_dim * args.block * args.block * dense_blocks
    best = {"fwd": float("inf"), "fwd_bwd": float("inf")}
    peers = {}

    def time_attn(attn):
      fwd, fwd_bwd = _fwd_fns(attn)
      return (_time(fwd, q, k, v, iters=args.iters),
              _time(fwd_bwd, q, k, v, do, iters=args.iters))

    if on_gpu and not args.no_peers:
      for causal in (False, True):
        try:
          attn = lambda q_, k_, v_, c=causal: jax.nn.dot_product_attention(
              q_, k_, v_, is_causal=c, implementation="cudnn")
          peers["cudnn", causal] = time_attn(attn)
        except Exception as e:  # pylint: disable=broad-except
          print(f"# cudnn (causal={causal}) unavailable: {type(e).__name__}: {e}"[:200])
      if ("cudnn", False) in peers:
        best["fwd"], best["fwd_bwd"] = peers["cudnn", False]
    for name in args.masks.split(","):
      mask = _build_mask(name, s, args, rng)
      visited = float(mask.num_visited_blocks()) * (args.batch // mask.batch) * (
          args.heads // mask.num_heads)
      d = visited / dense_blocks
      flops = dense_fwd_flops * d
      timed = []
      for be in backends:
        err = _check(be, q, k, v, do, mask, args)
        if not err < args.tol:
          failures.append((s, name, be, err))
        tri = dict(num_warps=args.num_warps, num_stages=args.num_stages) if be == "triton" else {}
        attn = lambda q_, k_, v_, m=mask, b=be, t=tri: block_sparse_attention(q_, k_, v_, m,
                                                                              backend=b, **t)
        timed.append((be, err) + time_attn(attn))
      if on_gpu and not args.no_peers:
        if name in ("dense", "causal") and ("cudnn", name == "causal") in peers:
          timed.append(("cudnn", float("nan")) + peers["cudnn", name == "causal"])
        flex = _torch_flex(mask, name, args, q, k, v, do)
        if flex is not None:
          timed.append(("flex", flex[2], flex[0], flex[1]))
      if name == "dense":
        for _, _, tf, tb in timed:
          best["fwd"], best["fwd_bwd"] = min(best["fwd"], tf), min(best["fwd_bwd"], tb)
      ideal = lambda t, pas: t / (d * best[pas]) if np.isfinite(best[pas]) else float("nan")
      for who, err, tf, tb in timed:
        row = dict(seq=s, mask=name, density=d, impl=who, check_err=err, fwd_ms=tf * 1e3,
                   fwd_tflops=flops / tf / 1e12, fwd_x_ideal=ideal(tf, "fwd"),
                   fwd_bwd_ms=tb * 1e3, fwd_bwd_tflops=3.5 * flops / tb / 1e12,
                   fwd_bwd_x_ideal=ideal(tb, "fwd_bwd"))
        rows.append(row)
        print(f"S={s:<6} {name:<10} d={d:5.3f} {who:<11} err={err:8.1e}  fwd {tf * 1e3:9.3f} ms "
              f"{row['fwd_tflops']:7.1f} TF/s {row['fwd_x_ideal']:6.2f}x ideal | fwd+bwd "
              f"{tb * 1e3:9.3f} ms {row['fwd_bwd_tflops']:7.1f} TF/s "
              f"{row['fwd_bwd_x_ideal']:6.2f}x ideal", flush=True)
  print("\n| seq | mask | density | impl | fwd ms | fwd TF/s | fwd x ideal | fwd+bwd ms | "
        "fwd+bwd TF/s | fwd+bwd x ideal |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['seq']} | {r['mask']} | {r['density']:.3f} | {r['impl']} | {r['fwd_ms']:.3f} | "
          f"{r['fwd_tflops']:.1f} | {r['fwd_x_ideal']:.2f} | {r['fwd_bwd_ms']:.3f} | "
          f"{r['fwd_bwd_tflops']:.1f} | {r['fwd_bwd_x_ideal']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), device=jax.devices()[0].device_kind, rows=rows,
                     failures=failures), f, indent=1)
  if failures:
    print(f"CHECK FAILED (relative error >= {args.tol}): {failures}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
