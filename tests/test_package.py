"""The top-level package: submodules reachable as attributes of ``import sparsejax``."""

import os
import subprocess
import sys

# A fresh interpreter: in the test session these modules are usually imported already.
_CHECK = """
import sys
import sparsejax as sj
heavy = ("sparsejax.export", "sparsejax.nn", "sparsejax.checkpoint", "flax.nnx", "orbax.checkpoint")
print(sorted(m for m in heavy if m in sys.modules))
print(sj.export.to_block_sparse.__module__, sj.nn.BlockSparseDense.__name__,
      sj.checkpoint.save_checkpoint is sj.save_checkpoint, "export" in dir(sj))
try:
  sj.no_such_name
except AttributeError as e:
  print(e)
"""


def test_submodules_are_lazy_attributes():
  proc = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.splitlines() == [
      "[]",  # import sparsejax loads none of them
      "sparsejax.export BlockSparseDense True True",
      "module 'sparsejax' has no attribute 'no_such_name'",
  ]
