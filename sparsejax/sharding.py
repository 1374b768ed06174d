"""Device meshes and shardings for sparse training.

sparsejax functions and transformations are sharding-agnostic: lay the params
out with :class:`jax.sharding.NamedSharding` (see :func:`param_shardings`),
give the optimizer state the matching shardings (:func:`opt_state_shardings`:
masks and every params-shaped buffer follow their param, counters and keys are
replicated) and ``jax.jit`` the train step with these shardings. Masks,
scores and thresholds are then computed shard-locally with reductions; no
step gathers a whole parameter onto one device.

>>> import jax, jax.numpy as jnp, optax
>>> from jax.sharding import PartitionSpec as P
>>> mesh = make_mesh()
>>> params = {"w": jnp.ones((8 * jax.device_count(), 4)), "b": jnp.zeros(3)}
>>> shardings = param_shardings(params, mesh, "fsdp")
>>> shardings["w"].spec == P("data"), shardings["b"].spec == P()
(True, True)
>>> state_sh = opt_state_shardings(optax.adam(1e-3), params, shardings)
>>> state_sh[0].mu["w"].spec == P("data")
True
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "make_mesh",
    "param_shardings",
    "batch_sharding",
    "replicated",
    "match_param_shardings",
    "opt_state_shardings",
    "collective_shapes",
]

_MODES = ("replicated", "fsdp", "tensor")


def make_mesh(shape: Sequence[int] | None = None,
              axis_names: Sequence[str] = ("data",), *,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A device mesh over all devices (``jax.devices()``: every host's).

  Works unchanged on one CPU, simulated CPU devices
  (``--xla_force_host_platform_device_count``), GPUs and TPU slices, and on
  several hosts after ``jax.distributed.initialize()``. The axes are of the
  ``Auto`` type (classic sharding propagation).

  Args:
    shape: size of each axis; one entry may be ``-1`` (inferred). Default: all
      devices on the first axis, 1 on the others.
    axis_names: axis names, e.g. ``("data",)`` or ``("data", "model")``.
    devices: devices to use (default ``jax.devices()``).

  Returns:
    The mesh.

  >>> mesh = make_mesh((-1, 1), ("data", "model"))
  >>> mesh.axis_names, mesh.shape["model"]
  (('data', 'model'), 1)
  """
  axis_names = tuple(axis_names)
  n = len(devices) if devices is not None else jax.device_count()
  if shape is None:
    shape = (n,) + (1,) * (len(axis_names) - 1)
  shape = [int(s) for s in shape]
  if len(shape) != len(axis_names):
    raise ValueError(f"make_mesh: shape {tuple(shape)} and axis_names "
                     f"{axis_names} differ in length.")
  if shape.count(-1) > 1:
    raise ValueError("make_mesh: at most one axis size may be -1.")
  if -1 in shape:
    rest = int(np.prod([s for s in shape if s != -1]))
    if rest <= 0 or n % rest:
      raise ValueError(f"make_mesh: {n} devices cannot be split into "
                       f"{tuple(shape)}.")
    shape[shape.index(-1)] = n // rest
  if int(np.prod(shape)) != n:
    raise ValueError(f"make_mesh: shape {tuple(shape)} holds "
                     f"{int(np.prod(shape))} devices, but there are {n}. Use "
                     "-1 for one axis to infer its size.")
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  return jax.make_mesh(tuple(shape), axis_names, axis_types=axis_types,
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that places a full copy on every device of ``mesh``.

  >>> replicated(make_mesh()).spec == jax.sharding.PartitionSpec()
  True
  """
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, data_axis: str = "data") -> NamedSharding:
  """Sharding of a batch split along its leading axis over ``data_axis``.

  >>> batch_sharding(make_mesh()).spec == jax.sharding.PartitionSpec("data")
  True
  """
  return NamedSharding(mesh, P(data_axis))


def _leaf_spec(shape, mode, mesh, data_axis, model_axis):
  if mode == "replicated" or not shape:
    return P()
  if mode == "fsdp":
    size = mesh.shape[data_axis]
    dims = [i for i, d in enumerate(shape) if d % size == 0 and d >= size]
    if not dims:
      return P()
    dim = max(dims, key=lambda i: (shape[i], -i))  # largest, then first.
    return P(*([None] * dim + [data_axis]))
  # tensor parallel: output features (last dim) if divisible, else inputs.
  size = mesh.shape[model_axis]
  if len(shape) < 2:
    return P()
  for dim in (len(shape) - 1, len(shape) - 2):
    if shape[dim] % size == 0:
      return P(*([None] * dim + [model_axis]))
  return P()


def param_shardings(params, mesh: Mesh, mode: str = "fsdp", *,
                    data_axis: str = "data", model_axis: str = "model"):
  """``NamedSharding``\\ s for ``params`` in a standard layout.

  Modes:

  - ``"replicated"``: every leaf on every device (plain data parallelism;
    the batch is split over ``data_axis``);
  - ``"fsdp"``: each leaf split along its largest dimension divisible by the
    ``data_axis`` size (fully sharded data parallelism); others replicated;
  - ``"tensor"``: leaves of rank >= 2 split over ``model_axis`` along their
    last dimension (or the one before when the last does not divide):
    Megatron-style tensor parallelism; 1-D leaves replicated.

  Args:
    params: params pytree (arrays or ``jax.ShapeDtypeStruct``).
    mesh: the device mesh.
    mode: one of ``"replicated"``, ``"fsdp"``, ``"tensor"``.
    data_axis: mesh axis for FSDP.
    model_axis: mesh axis for tensor parallelism.

  Returns:
    A pytree of ``NamedSharding`` with the params' structure.

  >>> import jax.numpy as jnp
  >>> mesh = make_mesh((-1, 1), ("data", "model"))
  >>> spec = param_shardings({"w": jnp.ones((3, 4))}, mesh, "tensor")["w"].spec
  >>> spec == jax.sharding.PartitionSpec(None, "model")
  True
  """
  if mode not in _MODES:
    raise ValueError(f"param_shardings: unknown mode {mode!r}; use one of "
                     f"{_MODES}.")
  axis = data_axis if mode == "fsdp" else model_axis
  if mode != "replicated" and axis not in mesh.shape:
    raise ValueError(f"param_shardings: mode {mode!r} needs a mesh axis "
                     f"named {axis!r}; the mesh has {tuple(mesh.axis_names)}.")
  return jax.tree.map(
      lambda x: NamedSharding(mesh, _leaf_spec(tuple(np.shape(x)), mode, mesh,
                                               data_axis, model_axis)),
      params)


def _names(path) -> tuple[str, ...]:
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _replicated_like(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, P())
  if isinstance(sharding, P):
    return P()
  return sharding  # SingleDeviceSharding and co. are already "replicated".


def _drop_dim(sharding, ndim, dim):
  """``sharding`` of a rank-``ndim`` array, with dimension ``dim`` removed."""
  if isinstance(sharding, NamedSharding):
    spec = list(sharding.spec) + [None] * (ndim - len(sharding.spec))
    del spec[dim]
    return NamedSharding(sharding.mesh, P(*spec))
  if isinstance(sharding, P):
    spec = list(sharding) + [None] * (ndim - len(sharding))
    del spec[dim]
    return P(*spec)
  return sharding


def match_param_shardings(tree, params, param_shardings_tree, *,
                          default=None):
  """Shardings for any tree holding params-shaped buffers (masks, scores...).

  A leaf of ``tree`` whose key path ends with a param's key path (e.g.
  ``.../mu/fc1/kernel`` or ``sparse_masks/fc1/kernel`` for param
  ``fc1/kernel``) and has that param's shape gets the param's sharding; a
  leaf with the param's shape minus one dimension (factored second moments
  such as Adafactor's) gets the sharding without that dimension; ``None``
  leaves stay ``None``; every other leaf (step counters, PRNG keys,
  schedule values) is replicated (``default`` if given).

  Args:
    tree: a pytree (arrays or ``jax.ShapeDtypeStruct``), e.g. an optimizer
      state from ``jax.eval_shape(tx.init, params)``.
    params: the params pytree (arrays or ``jax.ShapeDtypeStruct``).
    param_shardings_tree: shardings (``NamedSharding`` or ``PartitionSpec``)
      with the params' structure.
    default: sharding for leaves that match no param.

  Returns:
    A pytree of shardings with ``tree``'s structure (``None`` where ``tree``
    has ``None``).

  >>> import jax, jax.numpy as jnp
  >>> from jax.sharding import PartitionSpec as P
  >>> params = {"fc": {"kernel": jnp.ones((4, 2))}}
  >>> tree = {"count": jnp.zeros([]), "masks": {"fc": {"kernel": None}},
  ...         "mu": {"fc": {"kernel": jnp.ones((4, 2))}}}
  >>> out = match_param_shardings(tree, params, {"fc": {"kernel": P("data")}})
  >>> out["count"] == P(), out["masks"]["fc"]["kernel"]
  (True, None)
  >>> out["mu"]["fc"]["kernel"] == P("data")
  True
  """
  flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_shardings = jax.tree.leaves(
      param_shardings_tree,
      is_leaf=lambda x: isinstance(x, (jax.sharding.Sharding, P)))
  if len(flat_params) != len(flat_shardings):
    raise ValueError(
        f"match_param_shardings: params have {len(flat_params)} leaves but "
        f"the shardings tree has {len(flat_shardings)}; give one sharding per "
        "param leaf (same tree structure).")
  index = {}
  for (path, p), s in zip(flat_params, flat_shardings):
    index[_names(path)] = (tuple(np.shape(p)), s)
  if default is None:
    default = _replicated_like(flat_shardings[0]) if flat_shardings else None

  def one(path, leaf):
    if leaf is None:
      return None
    names = _names(path)
    shape = tuple(np.shape(leaf))
    for k in range(len(names), -1, -1):
      if k == 0 and len(index) != 1:
        break
      hit = index.get(names[len(names) - k:])
      if hit is None:
        continue
      p_shape, s = hit
      if shape == p_shape:
        return s
      if len(shape) == len(p_shape) - 1:
        for dim in range(len(p_shape) - 1, -1, -1):
          if p_shape[:dim] + p_shape[dim + 1:] == shape:
            return _drop_dim(s, len(p_shape), dim)
      return default
    return default

  return jax.tree_util.tree_map_with_path(one, tree,
                                          is_leaf=lambda x: x is None)


def opt_state_shardings(tx, params, param_shardings_tree, *, default=None):
  """Shardings of ``tx.init(params)`` from the params' shardings.

  Every params-shaped buffer of the state (sparse masks, moments, traces,
  scores) gets its param's sharding, everything else is replicated; see
  :func:`match_param_shardings`. Use it as ``out_shardings`` of a jitted init
  and as in/out shardings of the train step, or as the restore target's
  shardings of a checkpoint.

  Args:
    tx: an ``optax.GradientTransformation`` (or any object with ``init``).
    params: the params (arrays or ``jax.ShapeDtypeStruct``; nothing is
      computed, ``tx.init`` is only traced).
    param_shardings_tree: shardings with the params' structure.
    default: sharding for non-param leaves (default: replicated).

  Returns:
    A pytree of shardings with the structure of ``tx.init(params)``.

  >>> import jax, jax.numpy as jnp, optax
  >>> mesh = make_mesh()
  >>> params = {"w": jnp.ones((jax.device_count(), 2))}
  >>> sh = opt_state_shardings(optax.sgd(0.1, momentum=0.9), params,
  ...                          param_shardings(params, mesh))
  >>> sh[0].trace["w"].spec == jax.sharding.PartitionSpec("data")
  True
  """
  abstract = jax.eval_shape(tx.init, params)
  return match_param_shardings(abstract, params, param_shardings_tree,
                               default=default)


_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z]*)?)\[([0-9,]*)\]")


def collective_shapes(compiled, op: str = "all-gather"
                      ) -> list[tuple[str, tuple[int, ...]]]:
  """Result ``(dtype, shape)`` of every ``op`` collective in compiled HLO.

  Use it to check that a sharded step never gathers a whole parameter: none
  of the shapes returned for ``"all-gather"`` should have a parameter's full
  size. Asynchronous forms (``all-gather-start``) and tuple results of
  combined collectives are included (for ``-start`` forms the operands too).

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``)
      or its HLO text.
    op: HLO collective name: ``"all-gather"``, ``"all-reduce"``,
      ``"all-to-all"``, ``"collective-permute"``, ``"reduce-scatter"``.

  Returns:
    A list of ``(dtype, shape)``, one per array produced.

  >>> import jax, jax.numpy as jnp
  >>> f = jax.jit(lambda x: x * 2).lower(jnp.ones((4, 4))).compile()
  >>> collective_shapes(f)
  []
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  pattern = re.compile(r"=\s*(.+?)\s+" + re.escape(op) + r"(?:-start)?\(")
  out = []
  for line in text.splitlines():
    m = pattern.search(line)
    if m:
      for dtype, dims in _ARRAY_RE.findall(m.group(1)):
        out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out
