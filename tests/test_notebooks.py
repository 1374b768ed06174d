"""The notebooks (notebooks/*.ipynb): committed executed, and re-executed here.

``test_notebook_executes`` (marker ``notebooks``) runs every notebook top to bottom with nbclient
in a fresh ``python3`` kernel of the running interpreter, cwd ``notebooks/``; any error, including
a failed assertion in the final cell, fails the test. The structural checks below run in the
ordinary suite: every committed notebook carries its outputs, shows at least one image, and ends
with an ``assert`` cell.
"""

from __future__ import annotations

import ast
import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
KERNEL_NAME = "python3"  # pinned: the ipykernel spec installed with the dev extra
TIMEOUT_S = 600  # per cell; the notebooks themselves take about a minute each

nbformat = pytest.importorskip("nbformat", reason="pip install -e '.[dev]' (nbformat)")

IDS = [p.stem for p in NOTEBOOKS]


def _code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def _has_assert(source: str) -> bool:
  tree = ast.parse("\n".join(l for l in source.splitlines() if not l.lstrip().startswith(("%", "!"))))
  return any(isinstance(node, ast.Assert) for node in ast.walk(tree))


def test_notebooks_exist():
  assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_with_outputs(path):
  nb = nbformat.read(path, as_version=4)
  cells = _code_cells(nb)
  assert cells, f"{path.name}: no code cells"
  unexecuted = [i for i, c in enumerate(cells) if c.get("execution_count") is None]
  assert not unexecuted, f"{path.name}: code cells {unexecuted} were not executed; commit it executed"
  errors = [i for i, c in enumerate(cells) for o in c.outputs if o.output_type == "error"]
  assert not errors, f"{path.name}: code cells {errors} have error outputs"
  images = [o for c in cells for o in c.outputs
            if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
  assert images, f"{path.name}: no inline PNG output (plot)"
  assert _has_assert(cells[-1].source), f"{path.name}: the last code cell must assert the claim"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and "claim" in first.source.lower(), (
      f"{path.name}: the first cell must be markdown stating the paper's claim and citation")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path):
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient)")
  pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (ipykernel)")
  nb = nbformat.read(path, as_version=4)
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)  # conftest's 8 simulated devices are not the notebooks' setting
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  # The kernel is the running interpreter (jupyter_client maps a spec's "python" to
  # sys.executable), so the notebook sees the same jax as the test.
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=TIMEOUT_S,
                                   resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
  try:
    client.execute(env=env)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed ({sys.executable}):\n{e}", pytrace=False)
