"""Tests of sparsejax.checkpoint: round trips, errors, corruption, crashes."""

import doctest
import glob
import os
import shutil
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from sparsejax import checkpoint as ckpt


class SparseState(NamedTuple):
  sparse_masks: dict
  sparse_count: jax.Array
  sparse_key: jax.Array
  raw_key: jax.Array


class Empty(NamedTuple):
  pass


def _state(seed=0):
  rng = np.random.default_rng(seed)
  params = {
      "fc1": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32),
              "bias": jnp.asarray(rng.normal(size=(16,)), jnp.float32)},
      "emb": jnp.asarray(rng.normal(size=(4, 8)), jnp.bfloat16),
      "layers": [jnp.asarray(rng.normal(size=(16, 16)), jnp.float16)],
  }
  masks = {"fc1": {"kernel": jnp.asarray(rng.random((8, 16)) < 0.3),
                   "bias": None},
           "emb": None,
           "layers": [jnp.asarray(rng.random((16, 16)) < 0.5)]}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  return {
      "params": params,
      "opt_state": tx.init(params),
      "sparse": SparseState(masks, jnp.asarray(seed + 3, jnp.int32),
                            jax.random.key(seed),
                            jax.random.PRNGKey(seed + 1)),
      "rbg_keys": jax.random.split(jax.random.key(seed, impl="rbg"), 3),
      "step": 11 + seed,
      "counts": jnp.arange(5, dtype=jnp.uint8),
      "nothing": None,
      "empty": (Empty(), {}, ()),
  }


def _bits(x):
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  x = np.asarray(x)
  return x.dtype, x.shape, x.tobytes()


def _assert_identical(a, b):
  """Same tree structure (classes included), leaf types, dtypes and bytes."""
  is_none = lambda x: x is None  # noqa: E731
  assert (jax.tree.structure(a, is_leaf=is_none)
          == jax.tree.structure(b, is_leaf=is_none))
  for (path, x), y in zip(
      jax.tree_util.tree_flatten_with_path(a, is_leaf=is_none)[0],
      jax.tree.leaves(b, is_leaf=is_none)):
    name = jax.tree_util.keystr(path)
    assert type(x) is type(y) or (isinstance(x, jax.Array)
                                  and isinstance(y, jax.Array)), name
    if x is None:
      continue
    if isinstance(x, (int, float)):
      assert x == y, name
      continue
    assert x.dtype == y.dtype, name
    assert _bits(x) == _bits(y), name


@pytest.fixture
def mngr(tmp_path):
  m = ckpt.checkpoint_manager(tmp_path / "ckpt", max_to_keep=2)
  yield m
  m.close()


def test_round_trip_is_exact(mngr):
  state = _state()
  assert ckpt.save_checkpoint(mngr, 5, state, metadata={"lr": 0.1, "n": [1]})
  restored = ckpt.restore_checkpoint(mngr, ckpt.abstract_state(state))
  assert restored.step == 5
  assert restored.metadata == {"lr": 0.1, "n": [1]}
  _assert_identical(restored.state, state)
  s = restored.state["sparse"]
  assert isinstance(s, SparseState)
  assert s.sparse_masks["fc1"]["kernel"].dtype == jnp.bool_
  assert s.sparse_masks["fc1"]["bias"] is None
  assert isinstance(restored.state["opt_state"][1][0], optax.ScaleByAdamState)
  assert isinstance(restored.state["empty"][0], Empty)
  assert restored.state["step"] == 11 and type(restored.state["step"]) is int
  # Keys still work as keys, and give the same random numbers.
  np.testing.assert_array_equal(jax.random.uniform(s.sparse_key, (4,)),
                                jax.random.uniform(state["sparse"].sparse_key,
                                                   (4,)))
  assert restored.state["rbg_keys"].dtype == state["rbg_keys"].dtype


def test_restore_against_concrete_target_and_numpy_leaves(mngr):
  state = {"w": np.arange(6, dtype=np.int32).reshape(2, 3),
           "m": np.array([True, False]), "x": jnp.float32(2.5),
           "s": np.float32(1.5), "i": np.int32(-3), "flag": True, "f": 0.25}
  ckpt.save_checkpoint(mngr, 0, state)
  restored = ckpt.restore_checkpoint(mngr, state).state
  assert isinstance(restored["w"], np.ndarray)
  _assert_identical(restored, state)


def test_keep_last_n_and_missing_step(mngr):
  state = _state()
  for step in range(5):
    ckpt.save_checkpoint(mngr, step, state, metadata={"step": step})
  mngr.wait_until_finished()
  assert list(mngr.all_steps()) == [3, 4]
  assert ckpt.restore_metadata(mngr) == {"step": 4}
  assert ckpt.restore_metadata(mngr, 3) == {"step": 3}
  with pytest.raises(ckpt.CheckpointNotFoundError,
                     match=r"step 1 .*available steps: \[3, 4\]"):
    ckpt.restore_checkpoint(mngr, state, step=1)
  with pytest.raises(FileNotFoundError):  # also a FileNotFoundError
    ckpt.restore_metadata(mngr, 0)


def test_empty_directory(tmp_path):
  with ckpt.checkpoint_manager(tmp_path / "none") as m:
    with pytest.raises(ckpt.CheckpointNotFoundError, match="No checkpoint in"):
      ckpt.restore_checkpoint(m, {"w": jnp.ones(2)})


def test_save_interval_and_force(tmp_path):
  with ckpt.checkpoint_manager(tmp_path / "c", save_interval_steps=10,
                               max_to_keep=None) as m:
    state = {"w": jnp.ones(3)}
    assert ckpt.save_checkpoint(m, 0, state)
    assert not ckpt.save_checkpoint(m, 5, state)
    assert ckpt.save_checkpoint(m, 7, state, force=True)
    assert ckpt.save_checkpoint(m, 10, state)
    m.wait_until_finished()
    assert list(m.all_steps()) == [0, 7, 10]


@pytest.mark.parametrize("change, path", [
    (lambda s: s["sparse"]._replace(sparse_masks={
        **s["sparse"].sparse_masks,
        "fc1": {"kernel": s["sparse"].sparse_masks["fc1"]["kernel"]
                .astype(jnp.float32), "bias": None}}),
     "sparse/sparse_masks/fc1/kernel"),
    (lambda s: s["sparse"]._replace(sparse_count=jnp.float32(0)),
     "sparse/sparse_count"),
    (lambda s: s["sparse"]._replace(sparse_key=jax.random.key(0, impl="rbg")),
     "sparse/sparse_key"),
])
def test_dtype_mismatch_is_never_cast(mngr, change, path):
  state = _state()
  ckpt.save_checkpoint(mngr, 1, state)
  target = dict(state, sparse=change(state))
  with pytest.raises(ckpt.CheckpointMismatchError, match=f"'{path}'"):
    ckpt.restore_checkpoint(mngr, ckpt.abstract_state(target))


def test_restoring_bool_into_float_and_back_raises(mngr):
  ckpt.save_checkpoint(mngr, 0, {"m": jnp.ones((2, 2), jnp.float32)})
  with pytest.raises(ckpt.CheckpointMismatchError, match="float32.*bool"):
    ckpt.restore_checkpoint(mngr, {"m": jnp.ones((2, 2), bool)})


def test_other_model_names_first_mismatching_leaf(mngr):
  state = _state()
  ckpt.save_checkpoint(mngr, 1, state)
  wider = _state()
  wider["params"]["fc1"]["kernel"] = jnp.zeros((8, 32))
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match=r"'opt_state/1/0/mu/fc1/kernel'.*float32\(8, 16\)"
                     r".*float32\(8, 32\)"):
    # opt_state leaves come before params (sorted dict keys).
    ckpt.restore_checkpoint(mngr, dict(state, opt_state=jax.eval_shape(
        optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init,
        wider["params"])))
  extra = _state()
  extra["params"]["fc2"] = {"kernel": jnp.zeros((16, 4))}
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="target leaf 'params/fc2/kernel' is not in the"):
    ckpt.restore_checkpoint(mngr, extra)
  fewer = _state()
  del fewer["params"]["emb"]
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="checkpoint leaf 'params/emb' is not in the target"):
    ckpt.restore_checkpoint(mngr, fewer)
  dense = _state()
  dense["sparse"] = dense["sparse"]._replace(
      sparse_masks={**dense["sparse"].sparse_masks, "layers": [None]})
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match="'sparse/sparse_masks/layers/0'.*bool.*None"):
    ckpt.restore_checkpoint(mngr, dense)


def _data_files(directory, step):
  files = [f for f in glob.glob(f"{directory}/{step}/state/**/d/*",
                                recursive=True) if os.path.isfile(f)]
  assert files, f"no data files found under {directory}/{step}/state"
  return files


def test_swapped_data_files_are_detected(mngr):
  # Step 2's array files replaced by those of step 1 (same shapes, other
  # values): orbax restores them without complaint, the fingerprints do not.
  a = {"w": jnp.arange(4096, dtype=jnp.float32).reshape(64, 64),
       "mask": jnp.arange(4096).reshape(64, 64) % 3 == 0}
  b = {"w": a["w"] + 1.0, "mask": a["mask"]}
  ckpt.save_checkpoint(mngr, 1, a)
  ckpt.save_checkpoint(mngr, 2, b)
  mngr.wait_until_finished()
  root = str(mngr.directory)
  shutil.rmtree(os.path.join(root, "2", "state"))
  shutil.copytree(os.path.join(root, "1", "state"),
                  os.path.join(root, "2", "state"))
  with pytest.raises(ckpt.CheckpointCorruptedError,
                     match="step 2.*'w'.*fingerprint mismatch"):
    ckpt.restore_checkpoint(mngr, b)
  _assert_identical(ckpt.restore_checkpoint(mngr, a, step=1).state, a)


def _data_files(directory, step):
  files = [f for f in glob.glob(f"{directory}/{step}/state/**/d/*",
                                recursive=True) if os.path.isfile(f)]
  assert files, f"no data files found under {directory}/{step}/state"
  return files


_RESTORE_DAMAGED = """
import sys
sys.path.insert(0, sys.argv[2])
from test_checkpoint import _state
from sparsejax import checkpoint as ckpt
with ckpt.checkpoint_manager(sys.argv[1]) as m:
  try:
    ckpt.restore_checkpoint(m, ckpt.abstract_state(_state()), step=2)
    print("RESTORED step 2")
  except ckpt.CheckpointError as e:
    print(f"{type(e).__name__}: {e}".replace(chr(10), " "))
  ckpt.restore_checkpoint(m, _state(), step=1)
  print("RESTORED step 1")
"""


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "layout"])
def test_damaged_files_raise(tmp_path, damage):
  directory = tmp_path / "c"
  state = _state()
  with ckpt.checkpoint_manager(directory) as m:
    ckpt.save_checkpoint(m, 1, state)
    ckpt.save_checkpoint(m, 2, state)
  if damage == "layout":
    files = [os.path.join(directory, "2", "sparsejax_layout", "metadata")]
  else:
    files = _data_files(directory, 2)
  for name in files:  # Every data file: orbax only reads some of them.
    size = os.path.getsize(name)
    if damage == "flip":
      with open(name, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    elif damage == "delete":
      os.remove(name)
    else:
      with open(name, "r+b") as f:
        f.truncate(size // 2)
  # The failing restore runs in a child process: after a failed read, orbax
  # leaves tensorstore callbacks that later hit a closed asyncio loop and are
  # reported as unraisable exceptions in whatever test runs next.
  proc = subprocess.run(
      [sys.executable, "-c", _RESTORE_DAMAGED, str(directory),
       os.path.dirname(__file__)],
      capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("CheckpointCorruptedError: Checkpoint step 2"), (
      lines)
  assert lines[1] == "RESTORED step 1"  # The other step is untouched.


def test_bad_leaves_and_metadata_raise(mngr):
  with pytest.raises(TypeError, match="'a/b' of type str"):
    ckpt.save_checkpoint(mngr, 0, {"a": {"b": "text"}})
  with pytest.raises(TypeError, match="JSON"):
    ckpt.save_checkpoint(mngr, 0, {"a": jnp.ones(1)},
                         metadata={"x": jnp.ones(2)})
  with pytest.raises(ValueError, match="same checkpoint name 'a.b'"):
    ckpt.save_checkpoint(mngr, 0, {"a.b": jnp.ones(1), "a": {"b": jnp.ones(1)}})
  assert not list(mngr.all_steps())


def test_reshard_one_device_to_mesh_and_back(tmp_path):
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  state = _state()
  single = SingleDeviceSharding(devices[3])
  on_one = jax.device_put(state, single)
  with ckpt.checkpoint_manager(tmp_path / "c") as m:
    ckpt.save_checkpoint(m, 0, on_one)

    def sharding_of(x):
      if np.ndim(x) == 0:
        return NamedSharding(mesh, P())
      if x.ndim >= 2 and x.shape[0] % 4 == 0 and x.shape[1] % 2 == 0:
        return NamedSharding(mesh, P("data", "model"))
      if x.ndim >= 1 and x.shape[0] % 4 == 0:
        return NamedSharding(mesh, P("data"))
      return NamedSharding(mesh, P())

    shardings = jax.tree.map(sharding_of, state)
    target = ckpt.abstract_state(state, shardings)
    restored = ckpt.restore_checkpoint(m, target).state
    _assert_identical(restored, state)
    for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      if isinstance(x, jax.Array):
        assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
    assert restored["sparse"].sparse_masks["fc1"]["kernel"].sharding.spec == P(
        "data", "model")
    assert len(restored["params"]["fc1"]["kernel"].addressable_shards) == 8

    # And back: save the sharded state, restore it on one device.
    ckpt.save_checkpoint(m, 1, restored)
    back = ckpt.restore_checkpoint(
        m, ckpt.abstract_state(state, jax.tree.map(lambda _: single, state)))
    _assert_identical(back.state, state)
    for x in jax.tree.leaves(back.state):
      if isinstance(x, jax.Array):
        assert x.sharding == single


def test_fingerprint_independent_of_sharding():
  mesh = jax.make_mesh((8,), ("d",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  x = jnp.arange(64 * 8, dtype=jnp.float32).reshape(64, 8)
  sharded = jax.device_put(x, NamedSharding(mesh, P("d")))
  fp = ckpt._leaf_fingerprints([x, sharded, np.asarray(x)])
  assert fp[0] == fp[1] == fp[2]
  # Any single-element change, or moving values around, changes it.
  one_ulp = x.at[13, 5].set(jnp.nextafter(x[13, 5], jnp.inf))
  assert ckpt._leaf_fingerprints([one_ulp])[0] != fp[0]
  assert ckpt._leaf_fingerprints([x.T.reshape(64, 8)])[0] != fp[0]


# --- processes: crash mid-save, wait at exit, restore in a new process -------

_CHILD_PRELUDE = """
import os, sys, signal
import jax, jax.numpy as jnp
from sparsejax import checkpoint as ckpt
directory = sys.argv[1]
def state(v):
  return {"w": jnp.full((256, 512), v, jnp.float32),
          "mask": jnp.arange(256 * 512).reshape(256, 512) % int(v + 2) == 0}
"""


def _run_child(body, *args, expect_rc=0, xla_flags=None):
  code = _CHILD_PRELUDE + textwrap.dedent(body)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  proc = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                        capture_output=True, text=True, timeout=120, env=env)
  assert proc.returncode == expect_rc, proc.stdout + proc.stderr
  return proc.stdout


def _expected(v):
  return {"w": jnp.full((256, 512), v, jnp.float32),
          "mask": jnp.arange(256 * 512).reshape(256, 512) % int(v + 2) == 0}


def test_crash_during_commit_keeps_last_good_checkpoint(tmp_path):
  directory = tmp_path / "c"
  # The child saves step 1, then dies (SIGKILL) at the moment orbax renames
  # the fully written temporary directory of step 2 into place.
  out = _run_child("""
      m = ckpt.checkpoint_manager(directory, max_to_keep=1)
      ckpt.save_checkpoint(m, 1, state(1.0)); m.wait_until_finished()
      real_rename, real_replace = os.rename, os.replace
      def dying(src, dst, *a, **k):
        if os.path.basename(str(src)).startswith("2.orbax-checkpoint-tmp"):
          print("killed while committing", flush=True)
          os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *a, **k)
      os.rename = os.replace = dying
      ckpt.save_checkpoint(m, 2, state(2.0))
      m.wait_until_finished()
      print("save finished")
      """, directory, expect_rc=-9)
  assert "killed while committing" in out
  assert glob.glob(str(directory / "2.orbax-checkpoint-tmp*"))
  with ckpt.checkpoint_manager(directory, max_to_keep=1) as m:
    assert list(m.all_steps()) == [1]
    restored = ckpt.restore_checkpoint(m, ckpt.abstract_state(_expected(1.0)))
    assert restored.step == 1
    _assert_identical(restored.state, _expected(1.0))
    with pytest.raises(ckpt.CheckpointNotFoundError, match=r"\[1\]"):
      ckpt.restore_checkpoint(m, _expected(2.0), step=2)
    # The next save of step 2 succeeds over the debris.
    ckpt.save_checkpoint(m, 2, _expected(2.0))
    m.wait_until_finished()
    _assert_identical(ckpt.restore_checkpoint(m, _expected(2.0)).state,
                      _expected(2.0))
  assert not glob.glob(str(directory / "*orbax-checkpoint-tmp*"))


def test_crash_while_writing_keeps_last_good_checkpoint(tmp_path):
  directory = tmp_path / "c"
  # SIGKILL as soon as the temporary directory of step 2 appears, i.e. while
  # its arrays are being written in the background thread.
  _run_child("""
      import glob, time
      m = ckpt.checkpoint_manager(directory, max_to_keep=1)
      ckpt.save_checkpoint(m, 1, state(1.0)); m.wait_until_finished()
      ckpt.save_checkpoint(m, 2, state(2.0))
      t0 = time.time()
      while (not glob.glob(os.path.join(directory, "2.orbax-checkpoint-tmp*"))
             and time.time() - t0 < 30):
        pass
      os.kill(os.getpid(), signal.SIGKILL)
      """, directory, expect_rc=-9)
  with ckpt.checkpoint_manager(directory, max_to_keep=1) as m:
    steps = list(m.all_steps())
    # Whatever the exact moment of the crash, the latest listed step restores
    # completely and correctly; step 1 is only gone if step 2 is complete.
    assert steps in ([1], [2]), steps
    value = float(steps[-1])
    _assert_identical(ckpt.restore_checkpoint(m, _expected(value)).state,
                      _expected(value))


def test_async_save_is_completed_at_interpreter_exit(tmp_path):
  directory = tmp_path / "c"
  _run_child("""
      m = ckpt.checkpoint_manager(directory)
      for step in range(3):
        ckpt.save_checkpoint(m, step, state(float(step)),
                             metadata={"step": step})
      print("exiting without waiting", flush=True)
      """, directory)
  with ckpt.checkpoint_manager(directory) as m:
    assert list(m.all_steps()) == [0, 1, 2]
    restored = ckpt.restore_checkpoint(m, _expected(2.0))
    assert restored.metadata == {"step": 2}
    _assert_identical(restored.state, _expected(2.0))


def test_single_device_process_to_eight_device_mesh(tmp_path):
  directory = tmp_path / "c"
  _run_child("""
      assert jax.device_count() == 1, jax.devices()
      with ckpt.checkpoint_manager(directory) as m:
        ckpt.save_checkpoint(m, 0, {**state(3.0), "key": jax.random.key(7)})
      """, directory, xla_flags="--xla_force_host_platform_device_count=1")
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  expected = {**_expected(3.0), "key": jax.random.key(7)}
  shardings = {"w": NamedSharding(mesh, P("data")),
               "mask": NamedSharding(mesh, P(None, "data")),
               "key": NamedSharding(mesh, P())}
  with ckpt.checkpoint_manager(directory) as m:
    restored = ckpt.restore_checkpoint(
        m, ckpt.abstract_state(expected, shardings)).state
  _assert_identical(restored, expected)
  assert restored["mask"].sharding == shardings["mask"]
  assert restored["key"].sharding == shardings["key"]


def test_flax_nnx_model_and_optimizer_state(tmp_path):
  from flax import nnx  # pylint: disable=import-outside-toplevel
  import sparsejax.optim as so  # pylint: disable=import-outside-toplevel

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.fc1 = nnx.Linear(8, 16, rngs=rngs)
      self.fc2 = nnx.Linear(16, 4, rngs=rngs)

  def build(seed):
    model = MLP(nnx.Rngs(seed))
    tx = so.rigl(optax.adam(1e-3), sparsity=0.5, end_step=1000, key=seed)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, opt = build(0)
  with ckpt.checkpoint_manager(tmp_path / "c") as m:
    ckpt.save_checkpoint(m, 1, nnx.state((model, opt)))
    model2, opt2 = build(1)  # other weights and masks
    assert not np.array_equal(so.get_masks(opt2.opt_state)["fc1"]["kernel"],
                              so.get_masks(opt.opt_state)["fc1"]["kernel"])
    target = ckpt.abstract_state(nnx.state((model2, opt2)))
    restored = ckpt.restore_checkpoint(m, target)
  nnx.update((model2, opt2), restored.state)
  np.testing.assert_array_equal(model2.fc1.kernel[...], model.fc1.kernel[...])
  for a, b in zip(jax.tree.leaves(so.get_masks(opt2.opt_state)),
                  jax.tree.leaves(so.get_masks(opt.opt_state))):
    assert a.dtype == jnp.bool_
    np.testing.assert_array_equal(a, b)


def test_doctests():
  res = doctest.testmod(ckpt, optionflags=doctest.ELLIPSIS)
  assert res.attempted > 5 and res.failed == 0
