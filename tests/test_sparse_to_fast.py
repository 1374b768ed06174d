"""examples/sparse_to_fast.py end to end with a tiny model: train block RigL, export, compare."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import sparse_to_fast  # noqa: E402


def test_train_export_measure(tmp_path):
  result = sparse_to_fast.main([
      "--steps", "3", "--seq-len", "64", "--window", "32", "--block", "16", "--d-model", "32",
      "--num-heads", "2", "--mlp-dim", "64", "--num-layers", "1", "--bench-batch", "1", "--iters", "1",
      "--sparsity", "0.75", "--out", str(tmp_path),
  ])
  # run() raises unless the exported logits match the masked-dense ones; check what it reports.
  assert result["logits_max_rel_error"] < 1e-4
  assert np.isfinite(result["final_loss"])
  assert result["mlp_block_density"] == 0.25  # 75% of the 2 x 4 (and 4 x 2) blocks removed
  assert [r["pass_"] for r in result["rows"]] == ["infer", "train"]
  for r in result["rows"]:
    assert r["dense_tokens_per_s"] > 0 and r["exported_tokens_per_s"] > 0
    np.testing.assert_allclose(r["speedup"], r["dense_ms"] / r["exported_ms"])
    # The speed-up splits into attention (dense -> sparse attention) times MLPs (-> bsr_matmul).
    np.testing.assert_allclose(r["attention_speedup"], r["dense_ms"] / r["sparse_attention_only_ms"])
    np.testing.assert_allclose(r["attention_speedup"] * r["mlp_speedup"], r["speedup"])
  assert os.path.getsize(tmp_path / "sparse_to_fast.png") > 0
