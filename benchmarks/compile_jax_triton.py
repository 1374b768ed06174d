"""Compiles the ``jax_triton`` kernels (Triton language, ``jax_triton.triton_call``) for an NVIDIA
A100 (sm_80) without the device, and prints ptxas's registers, spills and shared memory.

The configurations of ``pallas_kernels.aot_cases`` (matmul ``M x K x N = 1024 x 2048 x 2048``,
half the blocks stored; attention ``B=1, H=2, S=2048``, 128 x 128 blocks) with the backend
``"jax_triton"``. ``smem`` is the dynamic shared memory of the launch (Triton's pipeline buffers,
from the kernel call jax-triton embeds). Nothing runs: a compile says that Triton and ptxas
accept the kernel for sm_80, not that it is fast.

Usage (needs the ``triton`` and ``aot`` extras and ptxas on PATH):
  python benchmarks/compile_jax_triton.py [--target cuda:a100] [--kinds matmul attention]

Exit status 1 if a configuration fails to compile, a forward kernel spills, or a kernel needs more
shared memory than a CTA may have on the target (jax-triton does not check it at compile time).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels import aot, aot_cases  # noqa: E402


_KERNEL_NAMES = {"spmm": "spmm_kernel", "spmm_t": "spmm_kernel", "sddmm": "sddmm_kernel",
                 "fwd": "fwd_kernel", "dq": "dq_kernel", "dkv": "dkv_kernel"}


def _cases(kinds):
  out = []
  if "matmul" in kinds:
    for case in aot_cases.matmul_cases("cuda"):
      case = dataclasses.replace(case, backend="jax_triton")
      out.append(dataclasses.replace(case, skip=aot_cases._matmul_skip("jax_triton", case.block, case.dtype)))  # pylint: disable=protected-access
  if "attention" in kinds:
    for kernel in aot_cases.ATTENTION_KERNELS:
      for head_dim in aot_cases.HEAD_DIMS:
        for mask in ("causal", "documents", "random"):
          out.append(aot_cases.Case("attention", kernel, "jax_triton", "bfloat16", (128, 128),
                                    head_dim, mask))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", default="cuda:a100")
  p.add_argument("--kinds", nargs="+", default=["matmul", "attention"], choices=["matmul", "attention"])
  p.add_argument("--filter", default="", help="only configurations whose name contains all these comma-separated words")
  args = p.parse_args(argv)
  missing = aot.missing_dependencies(args.target)
  if missing:
    print(missing)
    return 1
  print(f"target {args.target}; {aot.versions()}")
  print("| configuration | ok | compile s | kernel | registers | spill B | smem KiB |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  bad = 0
  words = [w for w in args.filter.split(",") if w]
  for case in _cases(args.kinds):
    if not all(w in case.name for w in words):
      continue
    if case.skip:
      print(f"| {case.name} | skip: {case.skip} | | | | | |")
      continue
    start = time.perf_counter()
    fn, fargs = case.build()
    report = aot.compile_for(fn, *fargs, target=args.target)
    seconds = time.perf_counter() - start
    if not report.ok:
      bad += 1
      print(f"| {case.name} | FAIL: {report.error.splitlines()[0][:120]} | {seconds:.1f} | | | | |")
      continue
    # The case's own kernel (jax-triton 0.4 keeps unused kernel calls: its DCE rule keeps all).
    kernels = [k for k in report.kernels
               if k.source == "jax_triton" and k.name == _KERNEL_NAMES[case.kernel]]
    for k in kernels:
      if (k.spills and case.kernel in ("spmm", "fwd")) or k.smem > _smem_limit(args.target):
        bad += 1
      print(f"| {case.name} | yes | {seconds:.1f} | {k.name} | {k.registers} | {k.spills} "
            f"| {k.smem / 1024:.0f} |")
    sys.stdout.flush()
  return 1 if bad else 0


def _smem_limit(target_name: str) -> int:
  """Shared memory a CTA may use on the target (a launch over it fails: compiles don't check)."""
  text = (aot._TARGET_DIR / aot.target(target_name).config_file).read_text()  # pylint: disable=protected-access
  return int(text.split("shared_memory_per_block_optin:")[1].split()[0])


if __name__ == "__main__":
  sys.exit(main())
