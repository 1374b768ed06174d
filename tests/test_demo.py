"""The main job (examples/compare_digits.py): CLI, outputs and quality on digits."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_demo():
  spec = importlib.util.spec_from_file_location("compare_digits",
                                                ROOT / "examples" / "compare_digits.py")
  mod = importlib.util.module_from_spec(spec)
  sys.modules["compare_digits"] = mod  # dataclasses look the module up
  spec.loader.exec_module(mod)
  return mod


@pytest.mark.smoke
def test_help_documents_flags(capsys):
  demo = load_demo()
  with pytest.raises(SystemExit) as e:
    demo.main(["--help"])
  assert e.value.code == 0
  out = capsys.readouterr().out
  for flag in ("--sparsity", "--steps", "--seed", "--out"):
    assert flag in out


def test_cli_writes_table_and_plot(tmp_path, capsys):
  demo = load_demo()
  out = tmp_path / "plot.png"
  results = demo.main(["--steps", "20", "--only", "dense,one-shot,sr-ste 1:8", "--out", str(out),
                       "--no-progress", "--sparsity", "0.8,0.95"])
  text = capsys.readouterr().out
  assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert [r.method for r in results] == ["dense", "one-shot magnitude 80%",
                                         "one-shot magnitude 95%", "SR-STE 1:8"]
  for r in results:
    assert r.method in text
    assert len(r.curve) == len(r.steps) and r.steps[-1] == 20
  assert results[0].sparsity == 0.0
  assert results[1].sparsity == pytest.approx(0.8, abs=2e-3)
  assert results[2].sparsity == pytest.approx(0.95, abs=2e-3)
  assert results[3].sparsity == pytest.approx(0.875, abs=1e-6)
  # The sweep table: one row per method family, one column per sparsity, each run's accuracy.
  sweep = text[text.index("test accuracy by sparsity"):].splitlines()
  header = sweep[1].split()
  assert header == ["method", "0%", "80%", "87.5%", "95%"]
  rows = {line[:20].strip(): line[20:] for line in sweep[3:] if line.strip() and "plot" not in line}
  assert list(rows) == ["dense", "one-shot magnitude", "SR-STE"]
  cells = {name: [row[8 * i:8 * (i + 1)].strip() for i in range(len(header) - 1)]
           for name, row in rows.items()}
  assert cells["one-shot magnitude"] == ["", f"{results[1].accuracy:.4f}", "",
                                         f"{results[2].accuracy:.4f}"]
  assert cells["SR-STE"] == ["", "", f"{results[3].accuracy:.4f}", ""]
  assert cells["dense"][0] == f"{results[0].accuracy:.4f}"
  with pytest.raises(ValueError, match="sparsity"):
    demo.run(steps=20, sparsity=1.2, progress=False)
  with pytest.raises(ValueError, match="sparsity"):
    demo.run(steps=20, sparsity=[0.5, -0.1], progress=False)


def test_sweep_compiles_once_per_family():
  """A family's sweep reuses one compiled training chunk (sparsity is a traced argument) and
  gives the same result as a separate run at that sparsity."""
  demo = load_demo()
  data = demo.load_data(0)
  table = demo.methods([0.5, 0.9], steps=12)
  compiled = {}
  kw = dict(steps=12, seed=0, lr=3e-3, batch_size=32, evals=2)
  swept = [demo.train(table[f"static ERK {p}"], data, compiled=compiled, **kw) for p in ("50%", "90%")]
  assert list(compiled) == [("static ERK", None)]
  alone = demo.train(table["static ERK 90%"], data, **kw)
  assert swept[1].curve == alone.curve and swept[1].sparsity == alone.sparsity
  assert swept[0].sparsity == pytest.approx(0.5, abs=2e-3)


@pytest.mark.slow
def test_quality_on_digits():
  demo = load_demo()
  res = {r.method: r for r in demo.run(steps=800, seed=0, progress=False, sparsity=0.9,
                                       only=["dense", "gradual", "rigl", "sr-ste 2:4"])}
  dense = res["dense"].accuracy
  assert dense > 0.95
  assert res["gradual magnitude 90%"].sparsity == pytest.approx(0.9, abs=1e-3)
  assert res["RigL 90%"].sparsity == pytest.approx(0.9, abs=2e-3)
  assert res["SR-STE 2:4"].sparsity == pytest.approx(0.5, abs=1e-6)
  assert res["gradual magnitude 90%"].accuracy >= dense - 0.03
  assert res["RigL 90%"].accuracy >= dense - 0.03
  assert res["SR-STE 2:4"].accuracy >= dense - 0.02
