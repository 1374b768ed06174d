"""Bit-identical resume across processes for RigL, GMP and SR-STE.

Process 1 trains 2k steps straight (params sharded FSDP-style over 8 CPU
devices) and, on the way, saves step k to a second directory. Process 2 is a
new interpreter: it restores step k from that directory against an abstract
target and trains k more steps. The two step-2k checkpoints must hold
bit-identical params, masks, optimizer state, step counters and PRNG keys.
"""

import os
import subprocess
import sys

import jax
import numpy as np

from sparsejax import checkpoint as ckpt
from sparsejax.core import masks as masks_lib

K = 5

TRAINER = r'''
import sys
import jax, jax.numpy as jnp, numpy as np, optax
import sparsejax.optim as so
from sparsejax import checkpoint as ckpt
from sparsejax import sharding as shd

K = 5
METHODS = {
    "rigl": lambda: so.rigl(optax.adam(1e-2), sparsity=0.8, update_every=2,
                            begin_step=1, end_step=2 * K, key=4),
    "gmp": lambda: so.gradual_magnitude_pruning(
        optax.sgd(0.1, momentum=0.9), sparsity=0.9, begin_step=1,
        end_step=2 * K - 1, frequency=2),
    "srste": lambda: so.srste(optax.adamw(1e-2), nm="2:4"),
}


def init_params():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {"fc1": {"kernel": jax.random.normal(k1, (16, 64)) * 0.3,
                  "bias": jnp.zeros(64)},
          "fc2": {"kernel": jax.random.normal(k2, (64, 64)) * 0.2,
                  "bias": jnp.zeros(64)},
          "out": {"kernel": jax.random.normal(k3, (64, 8)) * 0.2}}


def setup(method):
  tx = METHODS[method]()
  mesh = shd.make_mesh()
  params = init_params()
  p_sh = shd.param_shardings(params, mesh, "fsdp")
  sh = {"params": p_sh, "opt_state": shd.opt_state_shardings(tx, params, p_sh),
        "step": shd.replicated(mesh), "key": shd.replicated(mesh)}

  def init():
    p = init_params()
    return {"params": p, "opt_state": tx.init(p),
            "step": jnp.zeros([], jnp.int32), "key": jax.random.key(42)}

  def loss_fn(p, opt_state, x, y):
    p = so.forward_params(p, opt_state)
    h = jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    h = jax.nn.relu(h @ p["fc2"]["kernel"] + p["fc2"]["bias"])
    logits = h @ p["out"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def train_step(state):
    key, sub = jax.random.split(state["key"])
    x = jax.random.normal(jax.random.fold_in(sub, 0), (32, 16))
    y = jax.random.randint(jax.random.fold_in(sub, 1), (32,), 0, 8)
    grads = jax.grad(loss_fn)(state["params"], state["opt_state"], x, y)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "step": state["step"] + 1, "key": key}

  init = jax.jit(init, out_shardings=sh)
  step = jax.jit(train_step, in_shardings=(sh,), out_shardings=sh)
  target = ckpt.abstract_state(jax.eval_shape(init), sh)
  return init, step, target


def main(mode, root):
  for method in METHODS:
    init, step, target = setup(method)
    with ckpt.checkpoint_manager(f"{root}/{method}-{mode}") as mngr:
      if mode == "straight":
        state = init()
        for i in range(2 * K):
          state = step(state)
          if i + 1 == K:  # A run that stops here, in another directory.
            with ckpt.checkpoint_manager(f"{root}/{method}-resumed") as m2:
              ckpt.save_checkpoint(m2, K, state, metadata={"method": method})
      else:
        restored = ckpt.restore_checkpoint(mngr, target)
        assert restored.step == K and restored.metadata == {"method": method}
        state = restored.state
        for _ in range(K):
          state = step(state)
      ckpt.save_checkpoint(mngr, 2 * K, state, metadata={"method": method})
    print(method, "done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
'''


def _run(script, mode, root):
  # No persistent compilation cache: with jax 0.10.2, executables with CPU
  # collectives compiled with the cache enabled deadlock in XLA's rendezvous.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, str(script), mode, str(root)],
                        capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc.stdout


def _leaves(tree):
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.numpy.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    out.append((jax.tree_util.keystr(path), np.asarray(x)))
  return out


def test_resume_in_new_process_is_bit_identical(tmp_path):
  script = tmp_path / "trainer.py"
  script.write_text(TRAINER)
  _run(script, "straight", tmp_path)
  out = _run(script, "resumed", tmp_path)
  assert out.split() == ["rigl", "done", "gmp", "done", "srste", "done"]

  namespace = {"__name__": "trainer"}
  exec(compile(TRAINER, str(script), "exec"), namespace)  # noqa: S102
  for method in ("rigl", "gmp", "srste"):
    _, _, target = namespace["setup"](method)
    states = []
    for run in ("straight", "resumed"):
      with ckpt.checkpoint_manager(tmp_path / f"{method}-{run}") as m:
        assert list(m.all_steps()) == ([2 * K] if run == "straight"
                                       else [K, 2 * K])
        states.append(ckpt.restore_checkpoint(m, target, step=2 * K).state)
    a, b = (_leaves(s) for s in states)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
      assert x.dtype == y.dtype, path
      np.testing.assert_array_equal(x, y, err_msg=f"{method}: {path}")
    straight = states[0]
    assert int(straight["step"]) == 2 * K
    masks = namespace["so"].get_masks(straight["opt_state"])
    kernel = masks["fc2"]["kernel"]
    assert kernel.dtype == np.bool_ and masks["fc2"]["bias"] is None
    assert kernel.sharding == straight["params"]["fc2"]["kernel"].sharding
    # The sparsity schedule has run to its target.
    sparsity = float(masks_lib.global_sparsity(masks))
    assert abs(sparsity - {"rigl": 0.8, "gmp": 0.9, "srste": 0.5}[method]) < (
        0.01), (method, sparsity)
