"""The notebooks (notebooks/*.ipynb): committed executed, and re-executed here.

``test_notebook_executes`` (marker ``notebooks``) runs every notebook top to bottom with nbclient
in a fresh ``python3`` kernel of the running interpreter, cwd ``notebooks/``; any error, including
a failed assertion in the final cell, fails the test. The structural checks below run in the
ordinary suite: every committed notebook carries its outputs, shows at least one image, and ends
with an ``assert`` cell, and no cell output carries C++ log lines (see ``notebooks/execute.py``).
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("notebooks_execute", ROOT / "notebooks" / "execute.py")
executor = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(executor)
NOTEBOOK_DIR = executor.NOTEBOOK_DIR
NOTEBOOKS = executor.notebooks()
# C++ log lines (absl/XLA: "I0000 00:00:... file.cc:31] ...") and absl's pre-init banner; a
# committed notebook was executed in a venv whose plugins log into the cells (notebooks/execute.py).
_LOG_LINE = re.compile(r"^([IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ |WARNING: All log messages before absl)",
                       re.MULTILINE)

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
  noisy = [i for i, c in enumerate(cells) for o in c.outputs
           if o.output_type == "stream" and _LOG_LINE.search(o.text)]
  assert not noisy, (f"{path.name}: code cells {noisy} carry C++ log lines; re-execute it with "
                     "`python notebooks/execute.py --write` from a venv without the aot extra")
  assert _has_assert(cells[-1].source), f"{path.name}: the last code cell must assert the claim"
  first = nb.cells[0]
  assert first.cell_type == "markdown" and "claim" in first.source.lower(), (
      f"{path.name}: the first cell must be markdown stating the paper's claim and citation")


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_executes(path):
  nbclient = pytest.importorskip("nbclient", reason="pip install -e '.[dev]' (nbclient)")
  pytest.importorskip("ipykernel", reason="pip install -e '.[dev]' (ipykernel)")
  try:
    executor.execute(path)
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name} failed ({sys.executable}):\n{e}", pytrace=False)
