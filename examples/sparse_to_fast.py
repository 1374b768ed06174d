"""Train with block sparsity, export to the block-sparse kernels, measure the speed-up.

A character-level transformer LM learns the bundled corpus (``examples/data``, the data of
``examples/train_sharded.py``) with block RigL (or block gradual magnitude pruning) at
``--sparsity`` in the MLP kernels (``sparsejax.optim.rigl(..., pattern=Block(r, c))``) and a
causal sliding-window block mask in attention (training runs the masked-dense model: dense
matmuls on masked weights, dense attention with the mask's token mask). Then:

1. export: ``sparsejax.export.to_block_sparse`` turns the MLP kernels into
   ``BlockSparseMatrix`` (run by ``pallas_kernels.bsr_matmul``), and attention runs
   ``pallas_kernels.attention.block_sparse_attention`` with the same block mask;
2. check: the exported model's logits equal the masked-dense model's (float tolerance);
3. measure, in one process on one device: tokens/s of inference (a forward over
   ``--bench-batch`` sequences) and of a training step (loss and gradients) for the
   exported model against the masked-dense one, alternating them ``--iters`` times and
   keeping each one's fastest run; prints a table and writes a plot to ``--out``. A third
   model, masked-dense MLPs with the block-sparse attention, splits the speed-up into its
   attention part and its MLP (``bsr_matmul``) part.

The backends are the automatic ones (``backend=None``): on CPU ``bsr_matmul`` runs its XLA:CPU
path and attention its blockwise XLA reference; on a GPU or TPU the Pallas kernels. The same
command runs everywhere::

  python examples/sparse_to_fast.py                       # CPU: a few minutes
  python examples/sparse_to_fast.py --method gmp --sparsity 0.9

The last line printed is ``RESULT {json}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing
sys.path.insert(0, HERE)

import sparsejax as sj  # noqa: E402
import sparsejax.optim as so  # noqa: E402
from pallas_kernels import BlockSparseMatrix, bsr_matmul  # noqa: E402
from pallas_kernels.attention import block_sparse_attention, sliding_window_mask  # noqa: E402
from sparsejax import export  # noqa: E402
from train_sharded import DEFAULT_CORPUS, CharData, load_corpus  # noqa: E402

MLP_KERNELS = r"fc[12]/kernel$"


@dataclasses.dataclass
class Config:
  steps: int = 300
  method: str = "rigl"
  sparsity: float = 0.9
  block: int = 32
  window: int = 128
  seq_len: int = 512
  batch_size: int = 8
  d_model: int = 128
  num_heads: int = 2
  mlp_dim: int = 1024
  num_layers: int = 2
  lr: float = 3e-3
  bench_batch: int = 8
  iters: int = 5
  seed: int = 0
  corpus: str = DEFAULT_CORPUS
  out: str = "sparse_to_fast"


# ----------------------------------------------------------------------------- model
def init_params(cfg: Config, vocab: int, key) -> dict:
  """A pre-LayerNorm decoder: ``embed -> [attention, MLP] x num_layers -> lm_head``."""
  d, f = cfg.d_model, cfg.mlp_dim
  keys = iter(jax.random.split(key, 4 + 4 * cfg.num_layers))
  normal = lambda shape, fan_in: jax.random.normal(next(keys), shape) * fan_in ** -0.5
  params = {"embed": normal((vocab, d), d), "pos": normal((cfg.seq_len, d), d) * 0.1,
            "ln_out": jnp.ones(d), "lm_head": {"kernel": normal((d, vocab), d)}}
  for i in range(cfg.num_layers):
    params[f"block{i}"] = {
        "ln1": jnp.ones(d), "qkv": {"kernel": normal((d, 3 * d), d)}, "proj": {"kernel": normal((d, d), d)},
        "ln2": jnp.ones(d), "fc1": {"kernel": normal((d, f), d), "bias": jnp.zeros(f)},
        "fc2": {"kernel": normal((f, d), f), "bias": jnp.zeros(d)},
    }
  return params


def _norm(x, scale):
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * scale


def _dense(x, kernel):
  """``x @ W`` for a dense kernel or a ``BlockSparseMatrix`` (the exported model)."""
  if isinstance(kernel, BlockSparseMatrix):
    return bsr_matmul(x, kernel)
  return x @ kernel


def forward(params, tokens, attend, num_heads: int):
  """Logits ``[batch, seq, vocab]``; ``attend(q, k, v)`` is the attention."""
  b, t = tokens.shape
  x = params["embed"][tokens] + params["pos"][:t]
  for i in range(sum(k.startswith("block") for k in params)):
    p = params[f"block{i}"]
    h = _norm(x, p["ln1"])
    q, k, v = jnp.split(_dense(h, p["qkv"]["kernel"]).reshape(b, t, 3 * num_heads, -1), 3, axis=2)
    x = x + _dense(attend(q, k, v).reshape(b, t, -1), p["proj"]["kernel"])
    h = _norm(x, p["ln2"])
    h = jax.nn.gelu(_dense(h, p["fc1"]["kernel"]) + p["fc1"]["bias"])
    x = x + _dense(h, p["fc2"]["kernel"]) + p["fc2"]["bias"]
  return _dense(_norm(x, params["ln_out"]), params["lm_head"]["kernel"])


def attention_fns(cfg: Config):
  """``(masked-dense attention, block-sparse attention, block mask)`` for the window mask."""
  mask = sliding_window_mask(cfg.seq_len, window=cfg.window, q_block=cfg.block)
  token_mask = jnp.asarray(mask.to_dense())  # [1, 1, seq, seq]

  def dense(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=token_mask, implementation="xla")

  def sparse(q, k, v):
    return block_sparse_attention(q, k, v, mask)

  return dense, sparse, mask


def loss_fn(params, batch, attend, num_heads):
  logits = forward(params, batch[:, :-1], attend, num_heads)
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


# ----------------------------------------------------------------------------- training
def make_optimizer(cfg: Config):
  inner = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.steps // 20), cfg.steps,
                                                         cfg.lr * 0.1), weight_decay=0.01)
  block = sj.Block(cfg.block, cfg.block)
  end = max(2, int(0.75 * cfg.steps))
  if cfg.method == "rigl":
    return so.rigl(inner, sparsity=cfg.sparsity, update_every=max(1, cfg.steps // 25), end_step=end,
                   pattern=block, distribution="uniform", include=MLP_KERNELS, key=cfg.seed)
  if cfg.method == "gmp":
    return so.gradual_magnitude_pruning(inner, sparsity=cfg.sparsity, begin_step=1, end_step=end,
                                        frequency=max(1, cfg.steps // 25), pattern=block,
                                        distribution="uniform", include=MLP_KERNELS)
  raise ValueError(f"--method {cfg.method!r}: use rigl or gmp")


def train(cfg: Config, data: CharData, attend):
  params = init_params(cfg, data.vocab_size, jax.random.key(cfg.seed))
  tx = make_optimizer(cfg)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, attend, cfg.num_heads)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  loss = None
  for i in range(cfg.steps):
    params, state, loss = step(params, state, jnp.asarray(data.batch(i, cfg.batch_size)))
    if i % max(1, cfg.steps // 5) == 0 or i == cfg.steps - 1:
      print(f"  step {i:4d}  loss {float(loss):.3f}", flush=True)
  return params, so.get_masks(state), float(loss)


# ----------------------------------------------------------------------------- measuring
def _fastest(calls: dict, iters: int) -> dict:
  """Fastest wall time of each call, alternating them ``iters`` times after a warm-up."""
  for f in calls.values():
    jax.block_until_ready(f())
  best = {k: float("inf") for k in calls}
  for _ in range(iters):
    for k, f in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(f())
      best[k] = min(best[k], time.perf_counter() - t)
  return best


def run(cfg: Config) -> dict:
  if cfg.seq_len % cfg.block or cfg.mlp_dim % cfg.block or cfg.d_model % cfg.block:
    raise ValueError(f"--block {cfg.block} must divide --seq-len, --d-model and --mlp-dim")
  dev = jax.devices()[0]
  print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
  data = CharData(load_corpus(cfg.corpus), cfg.seq_len, cfg.seed)
  dense_attend, sparse_attend, mask = attention_fns(cfg)
  print(f"training {cfg.steps} steps: block {cfg.method} at {cfg.sparsity:.0%} on {cfg.block}x{cfg.block} "
        f"MLP blocks, sliding window {cfg.window} (attention block density "
        f"{float(np.asarray(mask.block_states() > 0).mean()):.2f})", flush=True)
  params, masks, final_loss = train(cfg, data, dense_attend)

  # Export: masked MLP kernels -> BlockSparseMatrix; every other leaf as trained.
  masked = jax.tree.map(lambda p, m: p if m is None else jnp.where(m, p, 0), params, masks,
                        is_leaf=lambda x: x is None)
  fast = export.to_block_sparse(params, masks, (cfg.block, cfg.block), include=MLP_KERNELS)
  mlp = [fast[f"block{i}"][n]["kernel"] for i in range(cfg.num_layers) for n in ("fc1", "fc2")]
  density = sum(int(w.nnzb) for w in mlp) / sum(w.grid[0] * w.grid[1] for w in mlp)

  batch = jnp.asarray(data.batch(10**6, cfg.bench_batch, split="val"))
  tokens = batch[:, :-1]
  infer_dense = jax.jit(lambda p, t: forward(p, t, dense_attend, cfg.num_heads))
  infer_fast = jax.jit(lambda p, t: forward(p, t, sparse_attend, cfg.num_heads))
  logits_dense, logits_fast = infer_dense(masked, tokens), infer_fast(fast, tokens)
  err = float(jnp.max(jnp.abs(logits_fast - logits_dense)) / jnp.max(jnp.abs(logits_dense)))
  if not err < 1e-4:
    raise AssertionError(f"exported logits differ from the masked-dense model's: max rel error {err:.2e}")
  print(f"exported logits match the masked-dense model (max error {err:.1e} of max |logit|)", flush=True)

  grad_dense = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, dense_attend, cfg.num_heads)))
  # The exported model trains its stored blocks (index arrays are integers: allow_int).
  grad_fast = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, sparse_attend, cfg.num_heads), allow_int=True))
  # Masked-dense MLPs with the block-sparse attention: the attention part of the speed-up.
  grad_attn = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, sparse_attend, cfg.num_heads)))
  t = _fastest({
      ("infer", "dense"): lambda: infer_dense(masked, tokens),
      ("infer", "fast"): lambda: infer_fast(fast, tokens),
      ("infer", "attn"): lambda: infer_fast(masked, tokens),
      ("train", "dense"): lambda: grad_dense(masked, batch),
      ("train", "fast"): lambda: grad_fast(fast, batch),
      ("train", "attn"): lambda: grad_attn(masked, batch),
  }, cfg.iters)
  n_tokens = tokens.size
  rows = []
  for kind in ("infer", "train"):
    d, f, a = t[kind, "dense"], t[kind, "fast"], t[kind, "attn"]
    rows.append(dict(pass_=kind, dense_tokens_per_s=n_tokens / d, exported_tokens_per_s=n_tokens / f, speedup=d / f,
                     dense_ms=d * 1e3, exported_ms=f * 1e3, sparse_attention_only_ms=a * 1e3,
                     attention_speedup=d / a, mlp_speedup=a / f))
  print(f"\n{'pass':<22} {'masked-dense tok/s':>18} {'exported tok/s':>15} {'speed-up':>9} "
        f"{'of which attention':>18} {'MLPs':>6}")
  names = {"infer": "inference (forward)", "train": "train step (loss+grad)"}
  for r in rows:
    print(f"{names[r['pass_']]:<22} {r['dense_tokens_per_s']:18.0f} {r['exported_tokens_per_s']:15.0f} "
          f"{r['speedup']:8.2f}x {r['attention_speedup']:17.2f}x {r['mlp_speedup']:5.2f}x")
  print("(attention: masked-dense model with block-sparse attention vs masked-dense; MLPs: exported vs that model)")
  print(f"(batch {cfg.bench_batch} x {cfg.seq_len} tokens, MLP block density {density:.3f}, fastest of "
        f"{cfg.iters} alternated runs, device {dev.device_kind})")

  os.makedirs(cfg.out, exist_ok=True)
  plot = os.path.join(cfg.out, "sparse_to_fast.png")
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = np.arange(len(rows))
  ax.bar(x - 0.2, [r["dense_tokens_per_s"] for r in rows], 0.4, label="masked dense")
  ax.bar(x + 0.2, [r["exported_tokens_per_s"] for r in rows], 0.4, label="exported (block-sparse)")
  for i, r in enumerate(rows):
    ax.annotate(f"{r['speedup']:.2f}x", (i + 0.2, r["exported_tokens_per_s"]), ha="center", va="bottom")
  ax.set_xticks(x, [names[r["pass_"]] for r in rows])
  ax.set_ylabel("tokens / s")
  ax.set_title(f"{cfg.method} {cfg.sparsity:.0%} MLP blocks + window {cfg.window}, {dev.platform}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(plot, dpi=120)
  plt.close(fig)
  print(f"plot: {plot}")
  return dict(final_loss=final_loss, logits_max_rel_error=err, mlp_block_density=density, plot=plot,
              device=dev.device_kind, rows=rows)


def parse_args(argv=None) -> Config:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  for f in dataclasses.fields(Config):
    p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
  return Config(**vars(p.parse_args(argv)))


def main(argv=None):
  result = run(parse_args(argv))
  print("RESULT " + json.dumps(result))
  return result


if __name__ == "__main__":
  main()
