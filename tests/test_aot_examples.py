"""``examples/train_sharded.py --aot``: the sharded train step compiled for a TPU v5e-8 slice on
this CPU machine (marked ``aot``; needs the ``aot`` extra)."""

import dataclasses
import importlib.util
import os
import sys

import pytest

from pallas_kernels import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_sharded.py")


def _load_example():
  spec = importlib.util.spec_from_file_location("train_sharded_aot", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["train_sharded_aot"] = module  # dataclasses look the module up.
  spec.loader.exec_module(module)
  return module


@pytest.mark.aot
def test_train_step_compiles_for_tpu_v5e_8(capsys):
  missing = aot.missing_dependencies("tpu:v5e-8")
  if missing:
    pytest.skip(missing)
  ex = _load_example()
  cfg = dataclasses.replace(ex.Config(), method="static", sparsity=0.5, d_model=32, mlp_dim=64,
                            num_layers=1, num_heads=2, seq_len=32, batch_size=16)
  rows = ex.compile_for_target(cfg, "tpu:v5e-8")
  assert [(r["layout"], r["mesh"]) for r in rows] == [
      ("fsdp", {"data": 8, "model": 1}), ("tensor", {"data": 4, "model": 2})]
  fsdp, tensor = (r["memory"] for r in rows)
  # Params, masks and Adam moments are split 8 ways under FSDP, 2 ways under tensor parallelism
  # (batch-sharded activations aside): the per-device state is larger for the latter.
  assert 0 < fsdp["argument"] < tensor["argument"]
  assert all(m["peak"] >= m["argument"] for m in (fsdp, tensor))
  ex.print_memory_table("tpu:v5e-8", rows)
  out = capsys.readouterr().out
  assert "train step compiled for tpu:v5e-8" in out and "fsdp" in out and "tensor" in out
