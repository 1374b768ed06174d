"""Start-up cost of sparse training: train-step compile and ``tx.init`` time vs adamw.

Builds an NNX transformer (``--blocks`` pre-LN blocks, d_model 256, 4 heads,
MLP 1024, byte vocabulary 256, context 128: 12 leaves per block, 4 of them
masked kernels; 12 blocks = 150 leaves, 51 masked, 9.6M params) and, for every
sparsity transformation wrapped around ``optax.adamw(1e-3)``, measures in one
process:

* ``step compile``: ``jax.jit(train_step).lower(...).compile()`` of a full
  train step (forward, backward, ``tx.update``, ``optax.apply_updates``);
* ``init``: ``jax.jit(tx.init)`` lowered, compiled and run once (what the
  first ``tx.init`` call of a jitted training setup costs), and the plain
  eager ``tx.init(params)`` call;

in process CPU seconds (steady on a shared machine; wall seconds are printed
in brackets), each divided by the same figure for plain ``optax.adamw(1e-3)`` (measured
first, and again at the end: both adamw figures are printed). Then the
global selection on the same params: ``prune_global`` (``|W|``, 90%) and
``global_topk_masks`` (``score_fn=jnp.abs``) against concatenate +
``lax.top_k`` (compile and run time, run = min of ``--repeats``).

Targets (issue 13): RigL/SET/GMP step compile <= 1.5x adamw; ``tx.init``
<= 3 s; ``prune_global`` / ``global_topk_masks`` compile <= 5 s with a
run-time advantage over concatenate + top_k.

    python benchmarks/compile_time.py --blocks 12 24
    python benchmarks/compile_time.py --blocks 12 --only rigl,set
    python benchmarks/compile_time.py --blocks 12 --only rigl --floor

``--floor`` measures what is left without the per-leaf selection: every
``leafwise_topk_masks`` call is replaced by ``scores > 0`` (wrong masks, same
program otherwise), so the rows show the cost of the rest of the sparse
step (masking, projection, counts, the mask-update ``lax.cond``).
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax import lax

import sparsejax.optim as so
from sparsejax.core import pruning
from sparsejax.core.selection import global_topk_masks, num_to_keep

D_MODEL, HEADS, D_MLP, VOCAB, CONTEXT = 256, 4, 1024, 256, 128


class Block(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.qkv = nnx.Linear(D_MODEL, 3 * D_MODEL, rngs=rngs)
    self.out = nnx.Linear(D_MODEL, D_MODEL, rngs=rngs)
    self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.up = nnx.Linear(D_MODEL, D_MLP, rngs=rngs)
    self.down = nnx.Linear(D_MLP, D_MODEL, rngs=rngs)

  def __call__(self, x):
    b, t, _ = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    heads = lambda a: a.reshape(b, t, HEADS, D_MODEL // HEADS)  # noqa: E731
    a = jax.nn.dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + self.out(a.reshape(b, t, D_MODEL))
    return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class Transformer(nnx.Module):
  def __init__(self, blocks: int, rngs):
    self.embed = nnx.Embed(VOCAB, D_MODEL, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (CONTEXT, D_MODEL)))
    self.blocks = nnx.List([Block(rngs) for _ in range(blocks)]) if hasattr(nnx, "List") \
        else [Block(rngs) for _ in range(blocks)]
    self.ln = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.head = nnx.Linear(D_MODEL, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[None, : tokens.shape[1]]
    for blk in self.blocks:
      x = blk(x)
    return self.head(self.ln(x))


def transformations(total: int = 1000):
  every = 100
  return {
      "gmp": lambda o: so.gradual_magnitude_pruning(o, sparsity=0.8, end_step=total,
                                                    frequency=every),
      "one_shot": lambda o: so.one_shot_pruning(o, sparsity=0.8, step=every),
      "static": lambda o: so.static_sparse(o, sparsity=0.8),
      "set": lambda o: so.set_training(o, sparsity=0.8, update_every=every, end_step=total),
      "rigl": lambda o: so.rigl(o, sparsity=0.8, update_every=every, end_step=total),
      "ste": lambda o: so.ste(o, nm="2:4"),
      "srste": lambda o: so.srste(o, nm="2:4"),
      "mdgf": lambda o: so.mdgf(o, nm="1:8", rate=1e-3),
      "sdgf": lambda o: so.sdgf(o, nm="1:8", total_steps=total),
      "gradient_masking": lambda o: so.gradient_masking(o, fraction=0.5),
  }


USES_FORWARD = ("ste", "srste", "mdgf", "sdgf")


def step_fn(graphdef, tx, uses_forward):
  def loss(params, state, tokens):
    p = so.forward_params(params, state) if uses_forward else params
    logits = nnx.merge(graphdef, p)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(params, state, tokens):
    g = jax.grad(loss)(params, state, tokens)
    u, state = tx.update(g, state, params)
    return optax.apply_updates(params, u), state
  return step


def timed(f):
  """(process CPU seconds, wall seconds, result): CPU time is steadier on a shared machine."""
  t0, c0 = time.perf_counter(), time.process_time()
  out = f()
  jax.block_until_ready(out)
  return time.process_time() - c0, time.perf_counter() - t0, out


def measure(graphdef, params, tokens, name, factory):
  tx = factory(optax.adamw(1e-3))
  init_s, init_w, state = timed(lambda: jax.jit(tx.init).lower(params).compile()(params))
  eager_s, _, _ = timed(lambda: tx.init(params))
  step = jax.jit(step_fn(graphdef, tx, name in USES_FORWARD), donate_argnums=(0, 1))
  comp_s, comp_w, _ = timed(lambda: step.lower(params, state, tokens).compile())
  return {"init": init_s, "init wall": init_w, "eager": eager_s, "compile": comp_s,
          "compile wall": comp_w}


def concat_topk(p, k):
  cat = jnp.concatenate([jnp.abs(x).ravel() for x in p])
  t = lax.top_k(cat, k)[0][-1]
  return [jnp.abs(x) >= t for x in p]


def global_rows(params, repeats):
  leaves = [x for x in jax.tree.leaves(params) if x.ndim >= 2]
  total = sum(x.size for x in leaves)
  k = int(num_to_keep(total, 0.1))
  fns = {
      "prune_global(|W|, 0.9)": (lambda p: pruning.prune_global(p, None, 0.9)[1], params),
      "global_topk_masks(score_fn=abs)": (
          lambda p: global_topk_masks(p, density=0.1, score_fn=jnp.abs), leaves),
      "concatenate + lax.top_k": (lambda p: concat_topk(p, k), leaves),
  }
  rows = {}
  for name, (f, arg) in fns.items():
    comp_s, comp_w, compiled = timed(lambda: jax.jit(f).lower(arg).compile())  # noqa: B023
    runs = [timed(lambda: compiled(arg))[1] for _ in range(repeats)]  # noqa: B023
    rows[name] = (comp_s, comp_w, min(runs))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--blocks", type=int, nargs="+", default=[12, 24])
  ap.add_argument("--only", default=None, help="comma-separated transformation names")
  ap.add_argument("--repeats", type=int, default=3, help="timed runs of the global selection")
  ap.add_argument("--no-global", action="store_true", help="skip the global selection rows")
  ap.add_argument("--floor", action="store_true",
                  help="replace the per-leaf selection by scores > 0 (the cost of everything else)")
  args = ap.parse_args()
  if args.floor:
    from sparsejax.core import selection  # pylint: disable=import-outside-toplevel

    def no_selection(scores, k, *, masks=None, score_fn=None, method="auto", radix_bits=None):
      del k, method, radix_bits
      _, leaves, _ = selection._flatten(scores, masks, score_fn)
      return jax.tree.unflatten(jax.tree.structure(scores, is_leaf=selection.is_lazy),
                                [leaf.evaluate() > 0 for leaf in leaves])
    selection.leafwise_topk_masks = no_selection
    print("FLOOR: per-leaf selection replaced by scores > 0 (masks are not the method's)")
  names = list(transformations())
  if args.only:
    names = [n for n in names if n in args.only.split(",")]
  print(f"{platform.processor() or platform.machine()}, {jax.device_count()} "
        f"{jax.default_backend()} device(s), Python {platform.python_version()}, "
        f"jax {jax.__version__}, flax {__import__('flax').__version__}, "
        f"optax {optax.__version__}")
  for blocks in args.blocks:
    model = Transformer(blocks, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    leaves = jax.tree.leaves(params)
    n_masked = sum(x.ndim >= 2 for x in leaves)
    tokens = jax.random.randint(jax.random.key(1), (8, CONTEXT + 1), 0, VOCAB)
    print(f"\n## {blocks}-block NNX transformer: {len(leaves)} leaves, {n_masked} masked, "
          f"{sum(x.size for x in leaves) / 1e6:.2f}M params, batch 8 x {CONTEXT}")
    measure(graphdef, params, tokens, "adamw", lambda o: o)  # warm-up (first compiles are slower)
    base = measure(graphdef, params, tokens, "adamw", lambda o: o)
    print(f"adamw: step compile {base['compile']:.2f} s CPU ({base['compile wall']:.2f} s wall), "
          f"jit(init) {base['init']:.2f} s CPU, eager init {base['eager']:.2f} s CPU", flush=True)
    print("CPU seconds of this process (wall seconds in brackets)")
    print("| transformation | step compile s | / adamw | jit(tx.init) s | / adamw | eager tx.init s |")
    print("|---|---|---|---|---|---|")
    facts = transformations()
    for name in names:
      r = measure(graphdef, params, tokens, name, facts[name])
      print(f"| {name} | {r['compile']:.2f} ({r['compile wall']:.1f}) | "
            f"{r['compile'] / base['compile']:.2f}x | {r['init']:.2f} ({r['init wall']:.1f}) | "
            f"{r['init'] / base['init']:.2f}x | {r['eager']:.2f} |", flush=True)
    again = measure(graphdef, params, tokens, "adamw", lambda o: o)
    print(f"adamw again: step compile {again['compile']:.2f} s CPU ({again['compile wall']:.2f} s "
          f"wall), jit(init) {again['init']:.2f} s CPU")
    if not args.no_global:
      print("\n| global selection (90% sparsity) | compile s CPU (wall) | run s (wall) | "
            "run / concat+top_k |")
      print("|---|---|---|---|")
      rows = global_rows(params, args.repeats)
      ref = rows["concatenate + lax.top_k"][2]
      for name, (c, cw, r) in rows.items():
        print(f"| {name} | {c:.2f} ({cw:.1f}) | {r:.4f} | {r / ref:.3f}x |", flush=True)


if __name__ == "__main__":
  main()
