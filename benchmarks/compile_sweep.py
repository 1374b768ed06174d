"""Compiles every kernel configuration for TPU and NVIDIA GPU targets ahead of time, on a machine
without those devices, and prints (and writes) a table per target.

For each configuration (``pallas_kernels.aot_cases``): compiled yes/no, compile seconds,
per-device memory (argument + output + temp bytes), XLA's cost-analysis FLOPs (what the
kernels' ``pl.CostEstimate`` tells XLA) and, on GPU, the Pallas kernels' registers, spill bytes
per thread and stack frame from ptxas. A compile proves that the device compiler accepts the
kernel; it says nothing about results or speed (nothing runs).

Usage (needs the aot extra: ``pip install -e ".[aot]"``):
  python benchmarks/compile_sweep.py                                  # everything
  python benchmarks/compile_sweep.py --targets cuda:h100 --kinds attention --filter dkv
  python benchmarks/compile_sweep.py --markdown benchmarks/compile_sweep.md --json out.json

Exit status 1 if any supported configuration failed to compile or a GPU kernel spills more
than ``--max-spill`` bytes per thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from pallas_kernels import aot, aot_cases  # noqa: E402

DEFAULT_TARGETS = ("tpu:v5e", "tpu:v6e", "tpu:v5p", "cuda:h100")


def _kib(n):
  return f"{n / 1024:.0f}" if n is not None else ""


def _pallas_stats(report):
  """Registers/spills of the Pallas kernels (Mosaic GPU dumps, Triton kernels by name)."""
  ks = [k for k in report.kernels if k.source in ("mosaic_gpu", "triton")]
  if not ks:
    return "", "", "", ""
  regs = "/".join(str(k.registers) for k in ks)
  spills = "/".join(str(k.spills) for k in ks)
  stack = "/".join(str(k.stack_frame) for k in ks)
  warns = "; ".join(sorted({w.split(":", 2)[-1].strip()[:60] for k in ks for w in k.warnings}))
  return regs, spills, stack, warns


def run_case(case, target_name):
  if case.skip:
    return {"case": case.name, "target": target_name, "status": "unsupported", "reason": case.skip}
  fn, args = case.build()
  report = aot.compile_for(fn, *args, target=target_name)
  row = {"case": case.name, "target": target_name, "status": "ok" if report.ok else "FAILED",
         "seconds": round(report.compile_seconds, 1), "memory": report.memory,
         "flops": report.flops, "bytes_accessed": report.bytes_accessed,
         "error": report.error}
  regs, spills, stack, warns = _pallas_stats(report)
  row.update(registers=regs, spills=spills, stack=stack, warnings=warns,
             kernels=[vars(k) | {"warnings": list(k.warnings)} for k in report.kernels
                      if k.source in ("mosaic_gpu", "triton")])
  return row


def markdown(rows, versions, command):
  out = [f"Versions: {', '.join(f'{k} {v}' for k, v in versions.items())}.", "",
         f"Command: `{command}`", ""]
  for target_name in dict.fromkeys(r["target"] for r in rows):
    t = aot.target(target_name)
    part = [r for r in rows if r["target"] == target_name]
    ok = sum(r["status"] == "ok" for r in part)
    bad = sum(r["status"] == "FAILED" for r in part)
    uns = sum(r["status"] == "unsupported" for r in part)
    out += [f"#### {target_name} ({t.description}): {ok} compiled, {bad} failed, {uns} not supported by the backend", ""]
    gpu = t.platform == "cuda"
    head = "| configuration | compiled | s | peak KiB/device | GFLOP (cost est.) |"
    head += " registers | spill B/thread | stack B |" if gpu else ""
    out += [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in part:
      if r["status"] == "unsupported":
        cells = [r["case"], "n/a: " + r["reason"][:90].replace("|", "/"), "", "", ""]
        cells += ["", "", ""] if gpu else []
      else:
        mem = r.get("memory") or {}
        flops = r.get("flops")
        cells = [r["case"], "yes" if r["status"] == "ok" else "**no**: " + (r["error"] or "").splitlines()[0][:120].replace("|", "/"),
                 f"{r.get('seconds', '')}", _kib(mem.get("peak")),
                 f"{flops / 1e9:.2f}" if flops else ""]
        if gpu:
          cells += [r.get("registers", ""), r.get("spills", ""), r.get("stack", "")]
      out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.append("")
  return "\n".join(out)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--targets", nargs="+", default=list(DEFAULT_TARGETS))
  p.add_argument("--kinds", nargs="+", default=["matmul", "attention"], choices=["matmul", "attention"])
  p.add_argument("--filter", default="", help="only configurations whose name contains all these comma-separated words")
  p.add_argument("--max-spill", type=int, default=200, help="GPU spill bound in bytes per thread")
  p.add_argument("--markdown", help="write the tables to this file")
  p.add_argument("--json", help="write every row (with per-kernel ptxas figures) to this file")
  args = p.parse_args(argv)
  command = "python benchmarks/compile_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
  versions = aot.versions()
  print("versions:", versions, flush=True)
  rows, failures = [], []
  words = [w for w in args.filter.split(",") if w]
  start = time.perf_counter()
  for target_name in args.targets:
    missing = aot.missing_dependencies(target_name)
    if missing:
      print(f"{target_name}: skipped: {missing}", flush=True)
      continue
    platform = aot.target(target_name).platform
    cases = [c for kind in args.kinds
             for c in (aot_cases.matmul_cases(platform) if kind == "matmul" else aot_cases.attention_cases(platform))
             if all(w in c.name for w in words)]
    for case in cases:
      row = run_case(case, target_name)
      rows.append(row)
      spill = max((k["spill_stores"] for k in row.get("kernels", [])), default=0)
      spill = max(spill, max((k["spill_loads"] for k in row.get("kernels", [])), default=0))
      bad = row["status"] == "FAILED" or spill > args.max_spill
      if bad:
        failures.append(row)
      line = f"{target_name:12s} {case.name:55s} {row['status']:11s} {row.get('seconds', '')!s:>6}"
      if row["status"] == "unsupported":
        line += "  " + row["reason"][:80]
      elif row["status"] == "FAILED":
        line += "  " + (row["error"] or "").splitlines()[0][:160]
      else:
        line += f"  peak {_kib(row['memory'].get('peak'))} KiB"
        if row.get("registers"):
          line += f"  regs {row['registers']}  spills {row['spills']}"
        if spill > args.max_spill:
          line += f"  SPILLS > {args.max_spill}"
      print(line, flush=True)
  table = markdown(rows, versions, command)
  print("\n" + table)
  print(f"{len(rows)} configurations, {len(failures)} failures, {time.perf_counter() - start:.0f} s")
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"versions": versions, "command": command, "rows": rows}, f, indent=1, default=str)
  return 1 if failures else 0


if __name__ == "__main__":
  sys.exit(main())
