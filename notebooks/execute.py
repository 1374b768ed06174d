"""Executes the notebooks top to bottom, as CI does; ``--write`` saves the outputs in place.

    python notebooks/execute.py                 # execute every notebook, report failures
    python notebooks/execute.py --write 03 05   # re-execute notebooks 03* and 05*, commit-ready

Each notebook runs in a fresh ``python3`` kernel of this interpreter (so it sees this jax), with
``JAX_PLATFORMS=cpu``, cwd ``notebooks/`` and the repository on ``PYTHONPATH``. Run ``--write``
from a venv with only the ``dev`` extra: the ``aot`` extra's CUDA plugin logs a "could not find
cuda drivers" line into every cell's stderr on a machine without a GPU, and
``tests/test_notebooks.py`` rejects committed outputs that carry such log lines.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent
ROOT = NOTEBOOK_DIR.parent
KERNEL_NAME = "python3"  # pinned: the ipykernel spec installed with the dev extra
TIMEOUT_S = 600  # per cell; the notebooks themselves take about a minute each


def notebooks() -> list[pathlib.Path]:
  """The committed notebooks, in order."""
  return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def kernel_env() -> dict[str, str]:
  """The kernel's environment: this one, CPU jax, the repository importable."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # the test suite's simulated devices are not the notebooks' setting
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def execute(path: pathlib.Path):
  """Runs ``path`` in a fresh kernel; returns the executed notebook (raises on a failed cell)."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  nb = nbformat.read(path, as_version=4)
  # jupyter_client maps the "python3" spec to sys.executable: the kernel runs this interpreter.
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=TIMEOUT_S,
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  client.execute(env=kernel_env())
  return nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("prefixes", nargs="*", help="notebook name prefixes (default: all)")
  parser.add_argument("--write", action="store_true", help="save the executed notebooks in place")
  args = parser.parse_args(argv)
  import nbformat  # pylint: disable=g-import-not-at-top
  paths = [p for p in notebooks() if not args.prefixes or p.name.startswith(tuple(args.prefixes))]
  if not paths:
    parser.error(f"no notebook in {NOTEBOOK_DIR} starts with {args.prefixes}")
  failed = []
  for path in paths:
    start = time.perf_counter()
    try:
      nb = execute(path)
    except Exception as e:  # pylint: disable=broad-except
      failed.append(path.name)
      print(f"FAILED {path.name}: {e}", file=sys.stderr)
      continue
    if args.write:
      nbformat.write(nb, path)
    print(f"ok {path.name} ({time.perf_counter() - start:.0f} s){' written' if args.write else ''}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
