"""Ahead-of-time compilation for a TPU or NVIDIA GPU that this machine does not have.

XLA compiles for a target topology without its devices: libtpu's compiler (Mosaic TPU) for TPUs,
the CUDA plugin and ``ptxas`` for GPUs. This runs the real device compilers, so it catches what
lowering alone cannot (Triton module verification, ptxas limits, VMEM/SMEM overflow, spills).
Nothing runs on a device: a compile says a program is accepted and how much memory it takes,
not that it is correct or fast.

Targets (:data:`TARGETS`): ``"tpu:v5e"``, ``"tpu:v6e"``, ``"tpu:v5p"`` (one chip of a 2x2 slice),
``"cuda:h100"``, ``"cuda:h200"``, ``"cuda:a100"`` (one GPU), and slices for sharded programs:
``"tpu:v5e-8"``, ``"tpu:v6e-8"``, ``"tpu:v5p-8"``, ``"cuda:h100x8"``, ``"cuda:h200x8"``.

Needs the optional ``aot`` extra (``pip install -e ".[aot]"``: ``jax[tpu,cuda12-local]`` at the
installed jax version) and, for GPUs, a ``ptxas`` that accepts the PTX that jax emits (CUDA >= 12.8
on ``PATH``; the CUDA plugin runs the first ``ptxas`` on ``PATH``, then ``/usr/local/cuda``).
``JAX_PLATFORMS=cpu`` may stay set: topologies are built without initialising a TPU/GPU backend.

>>> import jax, jax.numpy as jnp
>>> if missing_dependencies("tpu:v5e"):  # doctest: +SKIP
...   print(missing_dependencies("tpu:v5e"))
>>> report = compile_for(lambda x: x @ x, jax.ShapeDtypeStruct((256, 256), jnp.bfloat16),
...                      target="tpu:v5e")  # doctest: +SKIP
>>> report.ok, report.memory["argument"]  # doctest: +SKIP
(True, 131072)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

__all__ = ["TARGETS", "Target", "KernelStats", "CompileReport", "target", "missing_dependencies",
           "compile_for", "versions", "parse_ptxas", "memory_stats", "mesh", "devices",
           "target_context"]

_TARGET_DIR = Path(__file__).parent / "targets"


@dataclasses.dataclass(frozen=True)
class Target:
  """A compile target.

  Attributes:
    name: e.g. ``"tpu:v5e"``.
    platform: ``"tpu"`` or ``"cuda"``.
    topology: the topology string (TPU: ``"v5e:2x2"``; CUDA: ``"1x1x8"``).
    num_devices: devices the program is compiled for (1 for single-chip targets; a single-chip
      TPU target compiles for the first chip of the smallest slice libtpu accepts).
    config_file: for CUDA, the ``GpuTargetConfigProto`` text file in ``pallas_kernels/targets``.
    description: what the target is, for tables.
  """

  name: str
  platform: str
  topology: str
  num_devices: int
  config_file: str | None = None
  description: str = ""


def _tpu(name, topology, n, description):
  return Target(name, "tpu", topology, n, None, description)


def _gpu(name, n, config, description):
  return Target(name, "cuda", f"1x1x{n}", n, config, description)


TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("tpu:v5e", "v5e:2x2", 1, "one TPU v5e chip"),
    _tpu("tpu:v6e", "v6e:2x2", 1, "one TPU v6e (Trillium) chip"),
    _tpu("tpu:v5p", "v5p:2x2x1", 1, "one TPU v5p chip (2 TensorCores, megacore)"),
    _tpu("tpu:v5e-8", "v5e:2x4", 8, "TPU v5e-8 slice (8 chips)"),
    _tpu("tpu:v6e-8", "v6e:2x4", 8, "TPU v6e-8 slice (8 chips)"),
    _tpu("tpu:v5p-8", "v5p:2x2x1", 4, "TPU v5p-8 slice (4 chips, 8 TensorCores)"),
    _gpu("cuda:h100", 1, "h100_sxm.txtpb", "one NVIDIA H100 SXM 80 GB"),
    _gpu("cuda:h200", 1, "h200_sxm.txtpb", "one NVIDIA H200 SXM 141 GB"),
    _gpu("cuda:a100", 1, "a100_sxm.txtpb", "one NVIDIA A100 SXM4 40 GB (sm_80)"),
    _gpu("cuda:h100x8", 8, "h100_sxm.txtpb", "8 NVIDIA H100 SXM on one host"),
    _gpu("cuda:h200x8", 8, "h200_sxm.txtpb", "8 NVIDIA H200 SXM on one host"),
)}


def target(name: str | Target) -> Target:
  """Looks up a target by name.

  >>> target("tpu:v5e-8").num_devices
  8
  """
  if isinstance(name, Target):
    return name
  if name not in TARGETS:
    raise ValueError(f"unknown compile target {name!r}; expected one of {sorted(TARGETS)}")
  return TARGETS[name]


def _ptxas() -> str | None:
  """The ``ptxas`` the CUDA plugin runs: the first on ``PATH``, else ``/usr/local/cuda``'s."""
  found = shutil.which("ptxas")
  if found:
    return found
  fallback = Path("/usr/local/cuda/bin/ptxas")
  return str(fallback) if fallback.exists() else None


def missing_dependencies(name: str | Target) -> str | None:
  """``None`` if ``name`` can be compiled for here, else what to install (one sentence).

  >>> missing_dependencies("tpu:v5e") is None or "install" in missing_dependencies("tpu:v5e")
  True
  """
  t = target(name)
  fix = 'install the aot extra: pip install -e ".[aot]" (jax[tpu,cuda12-local] at jax ' + jax.__version__ + ")"
  if t.platform == "tpu":
    if importlib.util.find_spec("libtpu") is None:
      return f"{t.name} needs libtpu: {fix}"
    return None
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None:
    return f"{t.name} needs the CUDA PJRT plugin: {fix}"
  if _ptxas() is None:
    return f"{t.name} needs ptxas (CUDA >= 12.8) on PATH: install the CUDA toolkit's compiler"
  return None


_TOPOLOGIES: dict[str, Any] = {}


def topology(name: str | Target):
  """The ``jax`` topology of a target (cached); its ``.devices`` are compile-only devices."""
  t = target(name)
  missing = missing_dependencies(t)
  if missing:
    raise RuntimeError(missing)
  key = t.platform + ":" + t.topology + ":" + (t.config_file or "")
  if key not in _TOPOLOGIES:
    from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
    if t.platform == "tpu":
      # Compile-only: no TPU to share, so several processes (test workers, a sweep) may load
      # libtpu at once instead of failing on its lockfile.
      os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
      _TOPOLOGIES[key] = topologies.get_topology_desc(topology_name=t.topology, platform="tpu")
    else:
      config = (_TARGET_DIR / t.config_file).read_text()
      _TOPOLOGIES[key] = topologies.get_topology_desc(platform="cuda", target_config=config,
                                                      topology=t.topology)
  return _TOPOLOGIES[key]


def devices(name: str | Target) -> list:
  """The target's compile-only devices (``num_devices`` of them)."""
  t = target(name)
  return list(topology(t).devices)[: t.num_devices]


def mesh(name: str | Target, shape: Sequence[int] | None = None,
         axis_names: Sequence[str] = ("x",)) -> jax.sharding.Mesh:
  """A ``Mesh`` over the target's devices (default: one axis over all of them).

  >>> mesh("tpu:v5e-8", (2, 4), ("data", "model")).shape  # doctest: +SKIP
  OrderedDict({'data': 2, 'model': 4})
  """
  devs = devices(name)
  shape = (len(devs),) if shape is None else tuple(shape)
  if int(np.prod(shape)) != len(devs):
    raise ValueError(f"mesh shape {shape} needs {int(np.prod(shape))} devices; {target(name).name} "
                     f"has {len(devs)}")
  return jax.sharding.Mesh(np.array(devs, dtype=object).reshape(shape), tuple(axis_names))


@dataclasses.dataclass(frozen=True)
class KernelStats:
  """``ptxas -v`` figures of one GPU kernel (per thread unless said otherwise).

  Attributes:
    name: the kernel's entry name.
    registers: registers per thread.
    spill_stores, spill_loads: bytes of spill stores / loads per thread.
    stack_frame: stack frame bytes per thread.
    smem: static shared memory bytes per CTA (ptxas; the dynamic shared memory that Mosaic GPU
      and Triton kernels use is set at launch and not in ptxas's report).
    source: ``"mosaic_gpu"``, ``"triton"`` (a Pallas Triton kernel), ``"jax_triton"`` (a
      Triton-language kernel called through ``jax_triton.triton_call``) or ``"xla"`` (XLA's own
      fusions).
    warnings: ptxas warnings about this kernel (e.g. serialised wgmma).
  """

  name: str
  registers: int
  spill_stores: int
  spill_loads: int
  stack_frame: int
  smem: int
  source: str = "xla"
  warnings: tuple[str, ...] = ()

  @property
  def spills(self) -> int:
    return max(self.spill_stores, self.spill_loads)


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """The outcome of one ahead-of-time compile.

  Attributes:
    target: the target name.
    ok: whether the device compiler accepted the program.
    error: the first lines of the error when not ``ok``.
    compile_seconds: wall time of lowering plus compiling.
    memory: per-device bytes from ``memory_analysis()`` (``argument``, ``output``, ``temp``,
      ``alias``, ``generated_code``, and ``peak`` = argument + output + temp - alias).
    kernels: GPU kernels' ptxas figures (empty on TPU).
    flops, bytes_accessed: XLA's cost analysis (Pallas calls count what their
      ``pl.CostEstimate`` says), ``None`` where XLA gives none.
  """

  target: str
  ok: bool
  error: str | None = None
  compile_seconds: float = 0.0
  memory: dict[str, int] = dataclasses.field(default_factory=dict)
  kernels: tuple[KernelStats, ...] = ()
  flops: float | None = None
  bytes_accessed: float | None = None

  @property
  def max_registers(self) -> int | None:
    regs = [k.registers for k in self.kernels]
    return max(regs) if regs else None

  @property
  def max_spills(self) -> int | None:
    spills = [k.spills for k in self.kernels]
    return max(spills) if spills else None


_FUNC = re.compile(r"Function properties for (\S+)")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(text: str, source: str = "xla") -> list[KernelStats]:
  """Parses ``ptxas -v`` output into one :class:`KernelStats` per entry function.

  >>> out = '''ptxas info    : Compiling entry function 'k' for 'sm_90a'
  ... ptxas info    : Function properties for k
  ...     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
  ... ptxas info    : Used 168 registers, used 1 barriers, 1 bytes smem'''
  >>> parse_ptxas(out)[0].registers, parse_ptxas(out)[0].spills
  (168, 4)
  """
  stats: dict[str, dict] = {}
  warnings: dict[str, list[str]] = {}
  current = None
  for line in text.splitlines():
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
      current = m.group(1)
      stats.setdefault(current, {})
      continue
    m = _FUNC.search(line)
    if m:
      current = m.group(1)
      stats.setdefault(current, {})
      continue
    if current is None:
      continue
    m = _STACK.search(line)
    if m:
      stats[current].update(stack_frame=int(m.group(1)), spill_stores=int(m.group(2)),
                            spill_loads=int(m.group(3)))
      continue
    m = re.search(r"Used (\d+) registers", line)
    if m:
      smem = re.search(r"(\d+) bytes smem", line)
      stats[current].update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
      continue
    if "warning" in line.lower() and current:
      warnings.setdefault(current, []).append(line.strip())
  out = []
  for name, s in stats.items():
    if "registers" not in s:
      continue  # a non-entry function's properties
    out.append(KernelStats(name, s["registers"], s.get("spill_stores", 0), s.get("spill_loads", 0),
                           s.get("stack_frame", 0), s.get("smem", 0), source,
                           tuple(warnings.get(name, ()))))
  return out


def _run_ptxas(ptx_file: Path) -> str:
  """``ptxas -v`` on an XLA-dumped PTX module (XLA does not keep ptxas's report)."""
  text = ptx_file.read_text(errors="replace")
  m = re.search(r"^\.target\s+(\S+)", text, re.M)
  arch = m.group(1).rstrip(",") if m else "sm_90a"
  with tempfile.TemporaryDirectory() as tmp:
    proc = subprocess.run([_ptxas(), "-v", f"-arch={arch}", str(ptx_file), "-o", f"{tmp}/out.cubin"],
                          capture_output=True, text=True, check=False, timeout=600)
  return proc.stdout + proc.stderr


# Mosaic GPU compiles each distinct kernel once per process (and dumps it only then): the figures
# of kernels seen before, by the kernel hash in the custom call.
_MOSAIC_SEEN: dict[str, KernelStats] = {}


def _gpu_kernel_stats(mosaic_dir: Path, xla_dir: Path, ir: str) -> list[KernelStats]:
  dumped = []
  for f in sorted(mosaic_dir.glob("*.ptxas"), key=lambda f: f.stat().st_mtime_ns):
    dumped += [dataclasses.replace(k, name=f"{f.stem}:{k.name}")
               for k in parse_ptxas(f.read_text(errors="replace"), "mosaic_gpu")]
  hashes = list(dict.fromkeys(re.findall(r'custom_call @mosaic_gpu\w*\([^\n]*?kernel_hash = "([^"]*)"', ir)))
  new = [h for h in hashes if h not in _MOSAIC_SEEN]
  if len(new) == len(dumped):
    _MOSAIC_SEEN.update(zip(new, dumped))
    stats = [_MOSAIC_SEEN[h] for h in hashes]
  else:  # cannot match dumps to kernels: report what was dumped
    stats = dumped
  for f in sorted(xla_dir.glob("*.ptx")):
    stats += parse_ptxas(_run_ptxas(f), "xla")
  return stats


def memory_stats(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled executable (see :class:`CompileReport`)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {
      "argument": int(m.argument_size_in_bytes),
      "output": int(m.output_size_in_bytes),
      "temp": int(m.temp_size_in_bytes),
      "alias": int(m.alias_size_in_bytes),
      "generated_code": int(m.generated_code_size_in_bytes),
  }
  out["peak"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def _cost(compiled) -> tuple[float | None, float | None]:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends give none)
    return None, None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost:
    return None, None
  return cost.get("flops"), cost.get("bytes accessed")


@contextlib.contextmanager
def _env(name: str, value: str):
  old = os.environ.get(name)
  os.environ[name] = value
  try:
    yield
  finally:
    if old is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = old


@contextlib.contextmanager
def target_context(name: str | Target):
  """What tracing for a target needs: an abstract mesh whose device is the target's (kernels
  that look up the TPU generation or GPU SM count read it) and, on GPU, the default device
  (the Triton lowering asks for one)."""
  t = target(name)
  dev = devices(t)[0]
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  kind = dev.device_kind
  cores = (getattr(dev, "num_cores", None) or getattr(dev, "core_count", None)
           or (132 if t.platform == "cuda" else 1))
  abstract = mesh_lib.AbstractDevice(device_kind=kind, num_cores=cores,
                                     platform="gpu" if t.platform == "cuda" else "tpu")
  amesh = mesh_lib.AbstractMesh((1,), ("_aot",), abstract_device=abstract)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.sharding.use_abstract_mesh(amesh))
    if t.platform == "cuda":
      stack.enter_context(jax.default_device(dev))
    yield


def _place(args, sharding):
  def leaf(x):
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
      return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
  return jax.tree.map(leaf, args)


def compile_for(fn: Callable, *args, target: str | Target, static_argnums=(),  # pylint: disable=redefined-outer-name
                in_shardings=None, out_shardings=None, donate_argnums=(),
                keep_dump: str | None = None) -> CompileReport:
  """Compiles ``jax.jit(fn)(*args)`` for ``target`` and reports; never raises on a compile error.

  Args:
    fn: the function.
    *args: pytrees of ``jax.ShapeDtypeStruct`` (or arrays: only shape and dtype are used).
      Leaves without a sharding are put on the target's first device.
    target: a name from :data:`TARGETS`.
    static_argnums, in_shardings, out_shardings, donate_argnums: passed to ``jax.jit``.
    keep_dump: a folder to keep the GPU dumps in (default: a temporary folder, removed).

  Returns:
    A :class:`CompileReport`. Errors from lowering or compiling are reported in ``error``, with
    ``ok=False``; a missing dependency raises ``RuntimeError`` saying what to install.
  """
  t = globals()["target"](target)
  devs = devices(t)
  placed = _place(args, jax.sharding.SingleDeviceSharding(devs[0]))
  jit_kw = {"static_argnums": static_argnums, "donate_argnums": donate_argnums}
  if in_shardings is not None:
    jit_kw["in_shardings"] = in_shardings
  if out_shardings is not None:
    jit_kw["out_shardings"] = out_shardings
  with contextlib.ExitStack() as stack:
    dump = Path(keep_dump) if keep_dump else Path(stack.enter_context(tempfile.TemporaryDirectory()))
    mosaic_dir, xla_dir = dump / "mosaic_gpu", dump / "xla"
    mosaic_dir.mkdir(parents=True, exist_ok=True)
    xla_dir.mkdir(parents=True, exist_ok=True)
    options = {}
    if t.platform == "cuda":
      stack.enter_context(_env("MOSAIC_GPU_DUMP_TO", str(mosaic_dir)))
      options = {"xla_dump_to": str(xla_dir)}
    start = time.perf_counter()
    try:
      with target_context(t):
        # The platform named explicitly: jax >= 0.12 cannot name "gpu" devices' platform while
        # JAX_PLATFORMS=cpu keeps the CUDA backend uninitialised.
        lowered = jax.jit(fn, **jit_kw).trace(*placed).lower(lowering_platforms=(t.platform,))
      compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    except Exception as e:  # pylint: disable=broad-except  (a compile failure is a result)
      seconds = time.perf_counter() - start
      text = "".join(traceback.format_exception_only(type(e), e)).strip()
      return CompileReport(t.name, False, _shorten(text), seconds)
    seconds = time.perf_counter() - start
    kernels = []
    if t.platform == "cuda":
      # Triton kernels keep their pallas_call name; XLA's own fusions have names not in the IR.
      ir = lowered.as_text()
      kernels = [dataclasses.replace(k, source="triton")
                 if k.source == "xla" and re.search(rf'"{re.escape(k.name)}"', ir) else k
                 for k in _gpu_kernel_stats(mosaic_dir, xla_dir, ir)]
      if "custom_call @triton_kernel_call" in ir:  # jax_triton kernels carry their own PTX
        from pallas_kernels import _jax_triton  # pylint: disable=g-import-not-at-top
        kernels += _jax_triton.kernel_stats(ir)
    flops, nbytes = _cost(compiled)
    return CompileReport(t.name, True, None, seconds, memory_stats(compiled), tuple(kernels), flops,
                         nbytes)


def _shorten(text: str, limit: int = 2000) -> str:
  lines = [ln for ln in text.splitlines() if ln.strip()]
  keep = [ln for ln in lines if "error" in ln.lower()] or lines
  out = "\n".join(keep[:8])
  return out[:limit]


def versions() -> dict[str, str]:
  """Versions of what compiles: jax, jaxlib, libtpu, the CUDA plugin, ptxas.

  >>> sorted(versions())
  ['jax', 'jax-cuda12-plugin', 'jaxlib', 'libtpu', 'ptxas']
  """
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {"jax": jax.__version__}
  for dist in ("jaxlib", "libtpu", "jax-cuda12-plugin"):
    try:
      out[dist] = metadata.version(dist)
    except metadata.PackageNotFoundError:
      out[dist] = "not installed"
  ptxas = _ptxas()
  if ptxas:
    proc = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=False)
    m = re.search(r"release ([\d.]+), V([\d.]+)", proc.stdout)
    out["ptxas"] = f"{m.group(2) if m else proc.stdout.strip()} ({os.path.realpath(ptxas)})"
  else:
    out["ptxas"] = "not found"
  return out
