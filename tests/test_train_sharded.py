"""examples/train_sharded.py: a few steps on 8 simulated devices, resumed."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from sparsejax import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_sharded.py")
TINY = ["--d-model", "32", "--mlp-dim", "64", "--num-layers", "1",
        "--num-heads", "2", "--seq-len", "32", "--batch-size", "16",
        "--log-every", "1"]


def _load_example():
  spec = importlib.util.spec_from_file_location("train_sharded", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_sharded"] = module  # dataclasses look the module up.
  spec.loader.exec_module(module)
  return module


def _run(args, devices=8):
  # No persistent compilation cache (it would save the recompilations): with
  # jax 0.10.2, executables with CPU collectives compiled with the cache
  # enabled deadlock in XLA's rendezvous.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, SCRIPT, *TINY, *args],
                        capture_output=True, text=True, timeout=300, env=env,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  last = proc.stdout.strip().splitlines()[-1]
  assert last.startswith("RESULT "), proc.stdout
  return json.loads(last[len("RESULT "):]), proc.stderr


def _bits(x):
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


_COMMON = ["--steps", "6", "--method", "rigl", "--sparsity", "0.75",
           "--save-every", "3"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """Six uninterrupted RigL steps on 8 devices, checkpoints at steps 3, 6."""
  straight = tmp_path_factory.mktemp("straight")
  result, err = _run([*_COMMON, "--checkpoint-dir", str(straight)])
  return straight, result, err


def test_resume_on_eight_devices_is_bit_identical(tmp_path, straight_run):
  straight, result, err = straight_run
  directory = tmp_path / "resumed"
  common = _COMMON
  assert result["devices"] == 8 and result["mesh"] == {"data": 8, "model": 1}
  assert result["steps_run"] == 6
  assert abs(result["sparsity"] - 0.75) < 0.01
  assert np.isfinite(result["train_loss"]) and np.isfinite(result["val_loss"])
  assert "step" in err  # the progress bar (tqdm writes to stderr)

  # A run interrupted after step 3: its directory holds only step 3.
  shutil.copytree(straight, directory)
  shutil.rmtree(directory / "6")
  resumed, err = _run([*common, "--checkpoint-dir", str(directory),
                       "--resume"])
  assert "resumed from step 3" in err
  assert resumed["steps_run"] == 3
  assert resumed["train_loss"] == result["train_loss"]
  assert resumed["val_loss"] == result["val_loss"]

  # The final states are bit-identical (params, masks, optimizer state).
  example = _load_example()
  cfg = example.Config(steps=6, method="rigl", sparsity=0.75, d_model=32,
                       mlp_dim=64, num_layers=1, num_heads=2, seq_len=32,
                       batch_size=16)
  trainer = example.Trainer(cfg)
  states = []
  for d in (straight, directory):
    with ckpt.checkpoint_manager(d) as m:
      restored = ckpt.restore_checkpoint(m, trainer.abstract_state())
      assert restored.step == 6
      assert restored.metadata["config"]["method"] == "rigl"
      states.append(restored.state)
  a, b = (jax.tree.leaves(s) for s in states)
  assert len(a) == len(b) > 10
  for x, y in zip(a, b):
    assert _bits(x) == _bits(y)
  masks = example.so.get_masks(states[0]["opt_state"])
  params = states[0]["params"]
  kernel = params["block0"]["fc1"]["kernel"]
  mask = masks["block0"]["fc1"]["kernel"]
  assert mask.dtype == np.bool_ and mask.sharding == kernel.sharding
  assert not np.any(np.asarray(kernel)[~np.asarray(mask)])  # exact zeros


def test_other_settings_refuse_to_resume(straight_run):
  directory = straight_run[0]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, SCRIPT, *TINY, "--steps", "6", "--method", "set",
       "--checkpoint-dir", str(directory), "--resume", "--no-progress"],
      capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert proc.returncode != 0
  assert "other settings" in proc.stderr and "'method': ('rigl', 'set')" in (
      proc.stderr)


def test_runs_on_one_device(tmp_path):
  result, _ = _run(["--steps", "2", "--method", "srste", "--no-progress",
                    "--checkpoint-dir", str(tmp_path / "c")], devices=1)
  assert result["devices"] == 1 and result["mesh"] == {"data": 1, "model": 1}
  assert np.isfinite(result["train_loss"])
  assert abs(result["sparsity"] - 0.5) < 1e-6  # 2:4


def test_corpus_is_the_generated_one():
  example = _load_example()
  with open(example.DEFAULT_CORPUS, encoding="utf-8") as f:
    assert f.read() == example.make_corpus()
