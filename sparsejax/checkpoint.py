"""Checkpointing of sparse training state with orbax-checkpoint.

A training state is any pytree: params, an optax state holding ``NamedTuple``
states, ``bool`` masks, ``None`` (dense) mask leaves and empty states, step
counters, raw ``uint32`` or typed (``jax.random.key``) PRNG keys. It is saved
through an :class:`orbax.checkpoint.CheckpointManager` as three items:

- ``state``: the array leaves, as a nested dict of their key paths (typed keys
  stored as their ``key_data``, ``None`` leaves and empty nodes not stored);
- ``sparsejax_layout``: JSON describing every leaf (path, kind, shape, dtype,
  PRNG implementation) and a 64-bit fingerprint of each leaf's bytes;
- ``metadata``: the user's JSON metadata.

Restoring is always done against a *target* (the state itself or its abstract
version from :func:`abstract_state`): the tree structure (``NamedTuple``\\ s,
``None`` leaves, empty states) comes from the target, each leaf is restored
with the target's sharding, and the checkpoint must match the target leaf for
leaf (path, shape and dtype; a bool mask is never cast to float or back).
Any difference, a missing step, an unreadable file or a fingerprint mismatch
raises a :class:`CheckpointError` and no partial state is returned. Saves are
atomic (orbax writes a temporary directory and renames it when complete), so a
crash during a save leaves the previous checkpoints intact.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import weakref
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax import lax

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CheckpointMismatchError",
    "CheckpointCorruptedError",
    "CheckpointExistsError",
    "Restored",
    "abstract_state",
    "checkpoint_manager",
    "save_checkpoint",
    "restore_checkpoint",
    "restore_metadata",
]

_STATE = "state"
_LAYOUT = "sparsejax_layout"
_METADATA = "metadata"
_FORMAT = 1


class CheckpointError(ValueError):
  """Base class of the errors raised when a checkpoint cannot be saved or restored."""


class CheckpointExistsError(CheckpointError, FileExistsError):
  """The step to save already exists (or is older than the latest saved step)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
  """The requested step (or any step) is not in the checkpoint directory."""


class CheckpointMismatchError(CheckpointError):
  """The checkpoint does not match the target (other model or other state)."""


class CheckpointCorruptedError(CheckpointError):
  """The checkpoint files are truncated, missing or their bytes changed."""


class Restored(NamedTuple):
  """Result of :func:`restore_checkpoint`.

  Attributes:
    state: the restored state, with the target's tree structure and shardings.
    metadata: the JSON metadata saved with it (``{}`` when none was given).
    step: the restored step.
  """
  state: Any
  metadata: dict
  step: int


# ----------------------------------------------------------------------------
# Leaf description.


def _is_none(x):
  return x is None


def _key_name(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def _path_names(path) -> tuple[str, ...]:
  return tuple(_key_name(k) for k in path)


def _is_key_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jax.dtypes.prng_key)


class _Leaf(NamedTuple):
  path: tuple[str, ...]
  kind: str  # "none" | "array" | "key" | "scalar"
  shape: tuple[int, ...]
  dtype: str


def _describe_leaf(names, leaf) -> _Leaf:
  """Kind, shape and dtype of one state (or target) leaf."""
  if leaf is None:
    return _Leaf(names, "none", (), "")
  if isinstance(leaf, (bool, int, float, complex)):  # Python scalars.
    return _Leaf(names, "scalar", (), str(jnp.asarray(leaf).dtype))
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    kind = "key" if _is_key_dtype(leaf.dtype) else "array"
    return _Leaf(names, kind, tuple(int(d) for d in leaf.shape),
                 str(leaf.dtype))
  raise TypeError(
      f"Leaf '{'/'.join(names)}' of type {type(leaf).__name__} cannot be "
      "checkpointed: state leaves must be arrays, jax.ShapeDtypeStruct, Python "
      "or numpy scalars, PRNG keys or None. Put other values in `metadata`.")


def _flatten(tree):
  """(paths, leaves, descriptions, treedef) with None kept as a leaf."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_none)
  names = [_path_names(p) for p, _ in flat]
  leaves = [x for _, x in flat]
  desc = [_describe_leaf(n, x) for n, x in zip(names, leaves)]
  return leaves, desc, treedef


def _storage_names(desc: list[_Leaf]) -> list[tuple[str, ...] | None]:
  """The nested-dict key path under which each stored leaf lives."""
  out, seen = [], {}
  for d in desc:
    if d.kind == "none":
      out.append(None)
      continue
    names = d.path if d.path else ("root",)
    joined = ".".join(names)
    if joined in seen:
      raise ValueError(
          f"Leaves '{'/'.join(seen[joined])}' and '{'/'.join(names)}' map to "
          f"the same checkpoint name '{joined}'. Rename a key (avoid '.' in "
          "dict keys) so that every leaf path is distinct.")
    seen[joined] = names
    out.append(names)
  return out


def _nest(names_list, values) -> dict:
  root: dict = {}
  for names, value in zip(names_list, values):
    if names is None:
      continue
    node = root
    for n in names[:-1]:
      child = node.setdefault(n, {})
      if not isinstance(child, dict):
        raise ValueError(
            f"Leaf path '{'/'.join(names)}' collides with another leaf. "
            "Rename a key so that no leaf path is a prefix of another.")
      node = child
    if names[-1] in node:
      raise ValueError(
          f"Leaf path '{'/'.join(names)}' collides with another leaf. Rename "
          "a key so that no leaf path is a prefix of another.")
    node[names[-1]] = value
  return root


def _unnest(names_list, tree):
  out = []
  for names in names_list:
    if names is None:
      out.append(None)
      continue
    node = tree
    for n in names:
      node = node[n]
    out.append(node)
  return out


# ----------------------------------------------------------------------------
# Fingerprints: a position-dependent 64-bit hash of each leaf's bytes, computed
# on device by elementwise ops and a sum (mod 2**32), so it is the same for any
# sharding and never gathers an array onto one device.


def _fmix32(h):
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def _words(x):
  """The bits of ``x`` as uint32 words (one trailing axis for wide dtypes)."""
  dtype = np.dtype(x.dtype)
  if dtype == np.bool_:
    return x.astype(jnp.uint32)
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.stack([_words(jnp.real(x)), _words(jnp.imag(x))], axis=-1)
  bits = dtype.itemsize * 8
  unsigned = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}
  try:
    if bits in unsigned:
      return lax.bitcast_convert_type(x, unsigned[bits]).astype(jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.uint32)  # 64-bit: adds an axis.
  except (TypeError, ValueError):  # Sub-byte dtypes (int4, float4...).
    wide = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else jnp.int32
    return lax.bitcast_convert_type(x.astype(wide), jnp.uint32)


def _fingerprint(x):
  w = _words(x)
  idx = jnp.zeros(w.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(w.ndim)):
    idx = idx + lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(
        stride % 2**32)
    stride *= w.shape[axis]
  out = []
  for seed in (0x243F6A88, 0x85A308D3):
    pos = _fmix32(idx * jnp.uint32(0x9E3779B9) + jnp.uint32(seed))
    out.append(jnp.sum(_fmix32(w ^ pos), dtype=jnp.uint32))
  return jnp.stack(out)


@jax.jit
def _fingerprints(leaves):
  return [_fingerprint(x) for x in leaves]


def _leaf_fingerprints(values) -> list[list[int]]:
  """Fingerprints of array values, one jit call per set of devices."""
  groups: dict[Any, list[int]] = {}
  for i, v in enumerate(values):
    if isinstance(v, jax.Array):
      key = frozenset(d.id for d in v.sharding.device_set)
    else:
      key = None
    groups.setdefault(key, []).append(i)
  result: list[Any] = [None] * len(values)
  for idxs in groups.values():
    fps = _fingerprints([values[i] for i in idxs])
    for i, fp in zip(idxs, fps):
      result[i] = [int(v) for v in np.asarray(fp)]
  return result


# ----------------------------------------------------------------------------
# Public API.


def abstract_state(state, shardings=None):
  """Abstract version of ``state``: a restore target without any data.

  Array leaves become :class:`jax.ShapeDtypeStruct` with the leaf's sharding
  (or the matching leaf of ``shardings``, to restore into another device
  layout); ``None`` leaves, empty nodes, Python scalars and the tree structure
  (``NamedTuple``, dicts, tuples) are kept.

  Args:
    state: a state pytree, concrete or abstract (e.g. from ``jax.eval_shape``).
    shardings: optional pytree of :class:`jax.sharding.Sharding` with the
      state's structure (``None`` where the state has ``None``, or a prefix of
      it); a ``None`` sharding keeps the leaf's own.

  Returns:
    The abstract state.

  >>> import jax, jax.numpy as jnp
  >>> abstract_state({"w": jnp.zeros((2, 3)), "mask": None})["w"].shape
  (2, 3)
  """
  def one(leaf, sharding=None):
    if leaf is None or isinstance(leaf, (bool, int, float, complex)):
      return leaf
    if sharding is None:
      sharding = getattr(leaf, "sharding", None)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

  if shardings is None:
    return jax.tree.map(one, state, is_leaf=_is_none)
  return jax.tree.map(lambda s, x: jax.tree.map(lambda y: one(y, s), x,
                                                is_leaf=_is_none),
                      shardings, state, is_leaf=_is_none)


def _wait_at_exit(ref):
  manager = ref()
  if manager is not None:
    manager.wait_until_finished()


def _register_wait_at_exit(manager):
  """Waits for ``manager``'s pending saves when the main thread ends.

  It must run before ``concurrent.futures`` refuses new work at interpreter
  shutdown (orbax's writers need it), which happens before ``atexit``
  handlers: hence ``threading._register_atexit`` (callbacks run in reverse
  order of registration, so this one runs first).
  """
  register = getattr(threading, "_register_atexit", None)
  if register is None:  # pragma: no cover - very old or future Pythons.
    return
  try:
    register(functools.partial(_wait_at_exit, weakref.ref(manager)))
  except RuntimeError:  # pragma: no cover - already shutting down.
    pass


def checkpoint_manager(directory, *, max_to_keep: int | None = 3,
                       save_interval_steps: int = 1, async_save: bool = True,
                       **options) -> ocp.CheckpointManager:
  """An orbax ``CheckpointManager`` set up for :func:`save_checkpoint`.

  It keeps the last ``max_to_keep`` steps, saves asynchronously by default,
  removes temporary directories left by a crashed save, and waits for pending
  saves when the interpreter exits (call ``manager.close()`` or use it as a
  context manager to wait earlier).

  Args:
    directory: checkpoint root directory (created if missing).
    max_to_keep: number of most recent steps kept (``None``: all).
    save_interval_steps: :func:`save_checkpoint` only saves steps that are
      multiples of this (unless ``force=True``).
    async_save: write in a background thread; the next save, ``close()``,
      ``wait_until_finished()`` or interpreter exit waits for it.
    **options: further ``ocp.CheckpointManagerOptions`` fields.

  Returns:
    The checkpoint manager.

  >>> import tempfile
  >>> with checkpoint_manager(tempfile.mkdtemp(), max_to_keep=2) as mngr:
  ...   print(mngr.all_steps())
  []
  """
  directory = os.fspath(directory)
  if "://" not in directory:
    directory = os.path.abspath(directory)
  opts = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=options.pop("cleanup_tmp_directories", True),
      create=options.pop("create", True), **options)
  manager = ocp.CheckpointManager(
      directory, options=opts,
      item_handlers={
          _STATE: ocp.StandardCheckpointHandler(),
          _LAYOUT: ocp.JsonCheckpointHandler(),
          _METADATA: ocp.JsonCheckpointHandler(),
      })
  _register_wait_at_exit(manager)
  return manager


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state, *,
                    metadata: Mapping[str, Any] | None = None,
                    force: bool = False) -> bool:
  """Saves ``state`` (and JSON ``metadata``) as ``step``.

  The save is asynchronous when the manager is: arrays are copied off the
  devices before this returns, files are written in the background; errors of
  a background write surface at the next save or ``wait_until_finished()``.

  Args:
    manager: from :func:`checkpoint_manager` (any ``ocp.CheckpointManager``
      works).
    step: the step number, a non-negative int newer than every saved step
      (unless ``force``).
    state: the state pytree (see the module docstring for allowed leaves).
    metadata: JSON-serialisable mapping saved alongside (config, data
      position...).
    force: save even if the manager's save interval would skip this step,
      overwrite the step if it exists (the old files are deleted first, after
      pending saves finish), and allow a step older than the latest one.

  Returns:
    Whether a checkpoint was saved: ``False`` only when the save interval
    skips ``step`` (``save_interval_steps`` of :func:`checkpoint_manager`).

  Raises:
    CheckpointExistsError: ``step`` already exists, or is older than the latest
      saved step (orbax would silently skip it), and ``force`` is False.
    TypeError: ``step`` is not an integer.

  >>> import tempfile, jax.numpy as jnp
  >>> mngr = checkpoint_manager(tempfile.mkdtemp(), async_save=False)
  >>> save_checkpoint(mngr, 0, {"w": jnp.ones(3), "mask": None},
  ...                 metadata={"lr": 0.1})
  True
  >>> mngr.close()
  """
  if metadata is None:
    metadata = {}
  if not isinstance(metadata, Mapping):
    raise TypeError(
        f"metadata must be a JSON-serialisable mapping, got "
        f"{type(metadata).__name__}; wrap it, e.g. {{'value': metadata}}.")
  try:
    metadata = json.loads(json.dumps(dict(metadata)))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f"metadata is not JSON-serialisable ({e}); store arrays in the state "
        "and only plain Python values in metadata.") from e
  if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
    raise TypeError(f"save_checkpoint: step={step!r} must be a Python int (e.g. int(step)).")
  if step < 0:
    raise ValueError(f"save_checkpoint: step={int(step)} must be >= 0.")
  step = int(step)
  existing = manager.all_steps()
  where = getattr(manager, "directory", "the checkpoint directory")
  if step in existing:
    if not force:
      raise CheckpointExistsError(
          f"save_checkpoint: step {step} already exists in {where}; pass force=True to "
          "overwrite it, or save under a new step.")
    manager.wait_until_finished()
    manager.delete(step)
  elif existing and step < max(existing) and not force:
    raise CheckpointExistsError(
        f"save_checkpoint: step {step} is older than the latest saved step {max(existing)} in "
        f"{where}; pass force=True to save it anyway, or delete the newer steps.")
  if not force and not manager.should_save(step):
    return False
  leaves, desc, _ = _flatten(state)
  storage = _storage_names(desc)
  values = []
  for d, leaf in zip(desc, leaves):
    if d.kind == "none":
      values.append(None)
    elif d.kind == "key":
      values.append(jax.random.key_data(leaf))
    elif d.kind == "scalar":
      values.append(np.asarray(jnp.asarray(leaf)))
    else:
      values.append(leaf)
  arrays = [v for v in values if v is not None]
  fps = iter(_leaf_fingerprints(arrays))
  layout = {
      "format": _FORMAT,
      "leaves": [{
          "path": list(d.path),
          "kind": d.kind,
          "shape": list(d.shape),
          "dtype": d.dtype,
          "impl": (str(jax.random.key_impl(leaf)) if d.kind == "key" else None),
          "fingerprint": (next(fps) if d.kind != "none" else None),
      } for d, leaf in zip(desc, leaves)],
  }
  try:
    return manager.save(
        step,
        args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(_nest(storage, values)),
            _LAYOUT: ocp.args.JsonSave(layout),
            _METADATA: ocp.args.JsonSave(metadata),
        }),
        force=force)
  except ocp.checkpoint_manager.StepAlreadyExistsError as e:  # e.g. a concurrent save
    raise CheckpointExistsError(
        f"save_checkpoint: step {step} already exists in {where}; pass force=True to "
        "overwrite it, or save under a new step.") from e


def _resolve_step(manager, step):
  steps = list(manager.all_steps())
  where = os.fspath(manager.directory)
  if step is None:
    if not steps:
      raise CheckpointNotFoundError(
          f"No checkpoint in {where}: nothing to restore. Save one first or "
          "point to the right directory.")
    return max(steps)
  if step not in steps:
    raise CheckpointNotFoundError(
        f"No checkpoint for step {step} in {where}; available steps: "
        f"{sorted(steps)}. Pass one of them, or step=None for the latest.")
  return step


def _read_json_items(manager, step):
  try:
    items = manager.restore(step, args=ocp.args.Composite(**{
        _LAYOUT: ocp.args.JsonRestore(), _METADATA: ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptedError(
        f"Checkpoint step {step} in {os.fspath(manager.directory)} is "
        f"unreadable (truncated or corrupted, or not written by sparsejax): "
        f"{type(e).__name__}: {str(e)[:400]}") from e
  layout = items[_LAYOUT]
  if not isinstance(layout, dict) or layout.get("format") != _FORMAT:
    raise CheckpointCorruptedError(
        f"Checkpoint step {step} in {os.fspath(manager.directory)} has no "
        "valid sparsejax layout: it was not written by "
        "sparsejax.save_checkpoint, or its layout file is damaged.")
  return layout, (items[_METADATA] or {})


def restore_metadata(manager: ocp.CheckpointManager,
                     step: int | None = None) -> dict:
  """The JSON metadata saved with ``step`` (default: the latest step).

  Args:
    manager: the checkpoint manager.
    step: step to read; ``None`` for the latest.

  Returns:
    The metadata dict.

  >>> import tempfile, jax.numpy as jnp
  >>> mngr = checkpoint_manager(tempfile.mkdtemp(), async_save=False)
  >>> _ = save_checkpoint(mngr, 3, {"w": jnp.ones(2)}, metadata={"seed": 1})
  >>> restore_metadata(mngr)
  {'seed': 1}
  >>> mngr.close()
  """
  step = _resolve_step(manager, step)
  return _read_json_items(manager, step)[1]


def _fmt(entry) -> str:
  if entry["kind"] == "none":
    return "None"
  if entry["kind"] == "key":
    return f"PRNG key {entry['dtype']}{tuple(entry['shape'])}"
  return f"{entry['dtype']}{tuple(entry['shape'])}"


def _compare(saved: list[dict], target: list[_Leaf], where: str):
  """Raises CheckpointMismatchError at the first leaf that differs."""
  saved_paths = {tuple(e["path"]) for e in saved}
  target_paths = {t.path for t in target}
  for i in range(max(len(saved), len(target))):
    s = saved[i] if i < len(saved) else None
    t = target[i] if i < len(target) else None
    if s is not None and t is not None and tuple(s["path"]) == t.path:
      t_entry = {"kind": t.kind, "shape": list(t.shape), "dtype": t.dtype}
      kinds = {s["kind"], t.kind}
      same_kind = s["kind"] == t.kind or kinds == {"array", "scalar"}
      if (not same_kind or list(s["shape"]) != list(t.shape)
          or s["dtype"] != t.dtype):
        raise CheckpointMismatchError(
            f"Checkpoint {where} does not match the target at leaf "
            f"'{'/'.join(t.path)}': checkpoint has {_fmt(s)}, target has "
            f"{_fmt(t_entry)}. Restore with the state (model, optimizer, "
            "sparsity config) that was saved; dtypes are never cast.")
      continue
    if t is not None and t.path not in saved_paths:
      raise CheckpointMismatchError(
          f"Checkpoint {where} does not match the target: target leaf "
          f"'{'/'.join(t.path)}' is not in the checkpoint (different model or "
          "optimizer?). Build the target from the same model, optimizer and "
          "sparsity config that were saved.")
    if s is not None and tuple(s["path"]) not in target_paths:
      raise CheckpointMismatchError(
          f"Checkpoint {where} does not match the target: checkpoint leaf "
          f"'{'/'.join(s['path'])}' is not in the target (different model or "
          "optimizer?). Build the target from the same model, optimizer and "
          "sparsity config that were saved.")
    name = "/".join(t.path if t is not None else s["path"])
    raise CheckpointMismatchError(
        f"Checkpoint {where} does not match the target: leaves are in a "
        f"different order at '{name}'. Build the target from the same model "
        "and optimizer that were saved.")


def _data_sharding(sharding, ndim_extra: int):
  """Sharding of ``key_data`` of a key array with the given sharding."""
  if sharding is None or ndim_extra == 0:
    return sharding
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec) + (None,) * ndim_extra
    return jax.sharding.NamedSharding(sharding.mesh,
                                      jax.sharding.PartitionSpec(*spec))
  if isinstance(sharding, jax.sharding.SingleDeviceSharding):
    return sharding
  raise TypeError(
      f"Cannot restore a PRNG key with sharding {sharding}; use a "
      "NamedSharding or a SingleDeviceSharding for key leaves.")


def restore_checkpoint(manager: ocp.CheckpointManager, target, *,
                       step: int | None = None) -> Restored:
  """Restores a checkpoint into the structure, dtypes and shardings of target.

  Args:
    manager: the checkpoint manager.
    target: the state (concrete or abstract, see :func:`abstract_state`);
      each array leaf is restored with its sharding (a leaf without one goes
      to the default device), so passing a target laid out on another mesh
      reshards the checkpoint on the fly.
    step: the step to restore; ``None`` for the latest.

  Returns:
    ``Restored(state, metadata, step)``.

  Raises:
    CheckpointNotFoundError: no such step (the message lists the available
      ones) or an empty directory.
    CheckpointMismatchError: the checkpoint holds another state (the message
      names the first differing leaf path).
    CheckpointCorruptedError: files are missing, truncated or altered.

  >>> import tempfile, jax.numpy as jnp
  >>> mngr = checkpoint_manager(tempfile.mkdtemp(), async_save=False)
  >>> state = {"w": jnp.arange(3.0), "mask": jnp.array([True, False, True])}
  >>> _ = save_checkpoint(mngr, 1, state)
  >>> restored = restore_checkpoint(mngr, abstract_state(state))
  >>> restored.state["mask"].dtype, restored.step
  (dtype('bool'), 1)
  >>> mngr.close()
  """
  manager.wait_until_finished()
  step = _resolve_step(manager, step)
  where = f"step {step} in {os.fspath(manager.directory)}"
  layout, metadata = _read_json_items(manager, step)
  leaves, desc, treedef = _flatten(target)
  _compare(layout["leaves"], desc, where)
  storage = _storage_names(desc)
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = []
  for d, leaf in zip(desc, leaves):
    if d.kind == "none":
      abstract.append(None)
      continue
    sharding = getattr(leaf, "sharding", None) or default
    if d.kind == "key":
      data = jax.eval_shape(jax.random.key_data,
                            jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
      abstract.append(jax.ShapeDtypeStruct(
          data.shape, data.dtype,
          sharding=_data_sharding(sharding, data.ndim - len(d.shape))))
    else:
      abstract.append(jax.ShapeDtypeStruct(d.shape, np.dtype(d.dtype),
                                           sharding=sharding))
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(_nest(storage, abstract))}))[_STATE]
    values = _unnest(storage, restored)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptedError(
        f"Checkpoint {where} could not be read (truncated or corrupted "
        f"files): {type(e).__name__}: {str(e)[:400]}") from e
  arrays = [v for v in values if v is not None]
  for v, a in zip(arrays, [a for a in abstract if a is not None]):
    if tuple(v.shape) != tuple(a.shape) or v.dtype != a.dtype:
      raise CheckpointCorruptedError(
          f"Checkpoint {where} returned {v.dtype}{tuple(v.shape)} for a "
          f"{a.dtype}{tuple(a.shape)} leaf: the files are inconsistent.")
  fps = iter(_leaf_fingerprints(arrays))
  out = []
  for entry, d, leaf, value in zip(layout["leaves"], desc, leaves, values):
    if d.kind == "none":
      out.append(None)
      continue
    if next(fps) != entry["fingerprint"]:
      raise CheckpointCorruptedError(
          f"Checkpoint {where} is corrupted: the bytes of leaf "
          f"'{'/'.join(d.path)}' differ from those saved (fingerprint "
          "mismatch). Restore an earlier step.")
    if d.kind == "key":
      value = jax.random.wrap_key_data(value, impl=entry["impl"])
      if value.dtype != leaf.dtype:
        raise CheckpointMismatchError(
            f"Checkpoint {where}: PRNG key leaf '{'/'.join(d.path)}' has "
            f"implementation {entry['impl']} but the target has "
            f"{leaf.dtype}.")
    elif d.kind == "scalar" and isinstance(leaf, (bool, int, float, complex)):
      value = type(leaf)(np.asarray(value).item())
    elif isinstance(leaf, np.generic):
      value = np.asarray(value)[()]
    elif isinstance(leaf, np.ndarray):
      value = np.asarray(value)
    out.append(value)
  return Restored(jax.tree_util.tree_unflatten(treedef, out), metadata, step)
