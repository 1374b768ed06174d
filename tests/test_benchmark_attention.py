"""benchmarks/attention.py's correctness slice: the sliced mask equals the mask built on the slice."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.attention import block_mask_from_blocks, document_mask, segment_ids_from_lengths

_PATH = pathlib.Path(__file__).parents[1] / "benchmarks" / "attention.py"
_spec = importlib.util.spec_from_file_location("attention_benchmark", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _assert_same_mask(got, want):
  got_leaves, got_def = jax.tree.flatten(got)
  want_leaves, want_def = jax.tree.flatten(want)
  assert got_def == want_def
  for g, w in zip(got_leaves, want_leaves):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  got.validate()


def test_slice_of_a_per_head_mask_rebuilds_its_lists_and_orders():
  blocks = np.random.default_rng(0).random((2, 4, 4, 4)) < 0.4  # [B', H', nq, nk]
  m = block_mask_from_blocks(jnp.asarray(blocks), q_len=64, q_block=16)
  want = block_mask_from_blocks(jnp.asarray(blocks[:1, :2]), q_len=64, q_block=16)
  _assert_same_mask(bench._slice_mask(m, 1, 2), want)  # pylint: disable=protected-access


def test_slice_of_a_document_mask_keeps_its_token_data():
  segs = jnp.stack([segment_ids_from_lengths(jnp.asarray(l), 64) for l in ([20, 44], [10, 30, 24])])
  m = document_mask(segs, q_block=16)
  _assert_same_mask(bench._slice_mask(m, 1, 2), document_mask(segs[:1], q_block=16))  # pylint: disable=protected-access
