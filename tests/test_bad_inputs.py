"""Bad inputs raise a clear error naming the offending leaf or argument (DESIGN.md contract 6).

One table of bad inputs across core, optim, checkpoint and the kernels; each entry asserts the
exception type and a message fragment that names the leaf path or argument. Add new cases to
``CASES`` (the count only grows). Also: ``None`` param leaves work in every optim
transformation, and checkpoints never silently skip an existing step (issue 14).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pallas_kernels as pk
import sparsejax.optim as so
from sparsejax import checkpoint as ckpt
from sparsejax import schedules
from sparsejax.core import masks as M
from sparsejax.core import pruning
from sparsejax.core.patterns import NM

P = {"w": jnp.arange(1.0, 33.0).reshape(8, 4), "b": jnp.ones(4)}
MASKS = {"w": jnp.ones((8, 4), bool), "b": None}
SGD = optax.sgd(0.1)


def _init(tx, params=P):
  return tx.init(params)


def _save_twice(tmp):
  with ckpt.checkpoint_manager(tmp / "a", async_save=False) as m:
    ckpt.save_checkpoint(m, 3, {"w": jnp.ones(2)})
    ckpt.save_checkpoint(m, 3, {"w": jnp.ones(2)})


def _save_older(tmp):
  with ckpt.checkpoint_manager(tmp / "b", async_save=False) as m:
    ckpt.save_checkpoint(m, 5, {"w": jnp.ones(2)})
    ckpt.save_checkpoint(m, 2, {"w": jnp.ones(2)})


def _save(tmp, step, metadata=None):
  with ckpt.checkpoint_manager(tmp / "c", async_save=False) as m:
    ckpt.save_checkpoint(m, step, {"w": jnp.ones(2)}, metadata=metadata)


def _restore_missing(tmp):
  with ckpt.checkpoint_manager(tmp / "d") as m:
    ckpt.restore_checkpoint(m, {"w": jnp.ones(2)}, step=4)


def _restore_other_shape(tmp):
  with ckpt.checkpoint_manager(tmp / "e", async_save=False) as m:
    ckpt.save_checkpoint(m, 0, {"w": jnp.ones(2)})
    ckpt.restore_checkpoint(m, {"w": jnp.ones(3)})


def _bsr(block_shape=(2, 2), mask=None, path="fc/kernel"):
  w = jnp.ones((8, 8))
  mask = jnp.ones((8, 8), bool) if mask is None else mask
  return pk.bsr_from_dense(w, mask, block_shape, path=path)


def _attn(q_shape=(1, 64, 2, 32), k_shape=(1, 64, 2, 32), dtype=jnp.float32, mask=None):
  q = jnp.ones(q_shape, dtype)
  k = v = jnp.ones(k_shape, jnp.float32)
  mask = pk.causal_mask(64, q_block=32) if mask is None else mask
  return pk.block_sparse_attention(q, k, v, mask, backend="reference")


# (id, fn(tmp_path), exception type, regex the message must contain: the leaf or argument)
CASES = [
    # ---- core: masks
    ("apply_masks/missing_leaf", lambda t: M.apply_masks(P, {"w": MASKS["w"]}), ValueError,
     r"apply_masks: mask tree has no leaf 'b'"),
    ("apply_masks/float_mask", lambda t: M.apply_masks(P, {"w": jnp.full((8, 4), 0.5), "b": None}),
     TypeError, r"apply_masks: mask at 'w' has dtype float32"),
    ("apply_masks/shape", lambda t: M.apply_masks(P, {"w": jnp.ones((4, 8), bool), "b": None}),
     ValueError, r"mask at 'w' has shape \(4, 8\)"),
    ("apply_masks/list_leaf", lambda t: M.apply_masks(P, {"w": [True] * 8, "b": None}),
     TypeError, r"mask at 'w' is a subtree"),
    ("validate_masks/mask_on_none_param",
     lambda t: M.validate_masks({"w": MASKS["w"], "b": jnp.ones(4, bool)}, {"w": P["w"], "b": None}),
     ValueError, r"mask at 'b' is an array but the param there is None"),
    # ---- core: prune
    ("prune/sparsity_string", lambda t: pruning.prune(P, None, "0.5"), TypeError,
     r"prune: sparsity='0.5' is a string"),
    ("prune/sparsity_one", lambda t: pruning.prune(P, None, 1.0), ValueError,
     r"sparsity at 'w' must be in \[0, 1\)"),
    ("prune/sparsity_negative", lambda t: pruning.prune(P, None, -0.1), ValueError,
     r"sparsity at 'w' must be in \[0, 1\)"),
    ("prune/per_leaf_string", lambda t: pruning.prune(P, None, {"w": "0.5", "b": None}), TypeError,
     r"prune: sparsity at 'w'='0.5' is a string"),
    ("prune/int_params", lambda t: pruning.prune({"w": jnp.ones((4, 4), jnp.int32)}, None, 0.5),
     TypeError, r"leaf 'w' has dtype int32"),
    ("prune/pattern_unknown_string", lambda t: pruning.prune(P, None, 0.5, pattern="2x4"),
     ValueError, r"prune: unknown pattern '2x4'"),
    ("prune/pattern_string_axis", lambda t: pruning.prune({"w": jnp.ones((6, 4))}, None, None,
                                                          pattern="2:4"),
     ValueError, r"NM\(2:4\) at 'w'.*not divisible by m=4"),
    ("prune/pattern_not_a_pattern", lambda t: pruning.prune(P, None, 0.5, pattern=3), TypeError,
     r"prune: pattern 3 is not a pattern"),
    ("prune/masks_extra_leaf", lambda t: pruning.prune(P, None, 0.5,
                                                       masks={**MASKS, "c": MASKS["w"]}),
     ValueError, r"masks has a leaf 'c'"),
    ("prune_global/sparsity_string", lambda t: pruning.prune_global(P, None, "0.5"), TypeError,
     r"prune_global: sparsity='0.5' is a string"),
    ("drop_and_grow/fraction", lambda t: pruning.drop_and_grow(P, MASKS, None, P, 1.5), ValueError,
     r"drop_fraction at 'w' must be in \[0, 1\]"),
    # ---- core: patterns
    ("NM/bad_string", lambda t: NM("2:4:8"), ValueError, r"'2:4:8' must look like 'n:m'"),
    ("NM/missing_m", lambda t: NM(2), TypeError, r"NM: missing m"),
    ("NM/string_and_m", lambda t: NM("2:4", 4), TypeError, r"NM\('2:4'\) or NM\(n, m\)"),
    ("NM/n_gt_m", lambda t: NM(4, 2), ValueError, r"need 1 <= n <= m, got 4:2"),
    ("NM/float_n", lambda t: NM(2.0, 4), TypeError, r"NM: n must be a Python int"),
    # ---- schedules
    ("schedules/power", lambda t: schedules.polynomial_sparsity(0, 0.5, 0, 10, power=0),
     ValueError, r"power=0 is outside \(0, inf\]"),
    ("schedules/every_float", lambda t: schedules.periodic(0, 2.5), TypeError,
     r"every \(update frequency\)=2.5 must be an integer"),
    ("schedules/string", lambda t: schedules.check_range("rate", "0.1", 0, 1), TypeError,
     r"rate='0.1' is a string"),
    # ---- optim: gradual magnitude pruning
    ("gmp/power_zero", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.8, end_step=10,
                                                              power=0),
     ValueError, r"power=0 is outside"),
    ("gmp/power_negative", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.8, end_step=10,
                                                                  power=-1),
     ValueError, r"power=-1 is outside"),
    ("gmp/initial_gt_final", lambda t: so.gradual_magnitude_pruning(
        SGD, sparsity=0.5, initial_sparsity=0.9, end_step=10), ValueError,
     r"initial_sparsity=0.9 > sparsity=0.5"),
    ("gmp/end_eq_begin", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.5, begin_step=4,
                                                                end_step=4),
     ValueError, r"end_step=4 <= begin_step=4"),
    ("gmp/frequency_float", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.5, end_step=10,
                                                                   frequency=2.5),
     TypeError, r"frequency=2.5 must be an integer"),
    ("gmp/frequency_zero", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.5, end_step=10,
                                                                  frequency=0),
     ValueError, r"frequency=0 is outside \[1, inf\]"),
    ("gmp/begin_float", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.5, begin_step=1.5,
                                                               end_step=10),
     TypeError, r"begin_step=1.5 must be an integer"),
    ("gmp/sparsity_one", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=1.0, end_step=10),
     ValueError, r"sparsity=1.0 is outside \[0, 1\)"),
    ("gmp/sparsity_string", lambda t: so.gradual_magnitude_pruning(SGD, sparsity="0.8",
                                                                   end_step=10),
     TypeError, r"sparsity='0.8' is a string"),
    ("gmp/distribution", lambda t: so.gradual_magnitude_pruning(SGD, sparsity=0.5, end_step=10,
                                                                distribution="erkk"),
     ValueError, r"unknown distribution 'erkk'"),
    # ---- optim: one-shot, static
    ("one_shot/step_float", lambda t: so.one_shot_pruning(SGD, sparsity=0.5, step=2.5), TypeError,
     r"step=2.5 must be an integer"),
    ("one_shot/step_negative", lambda t: so.one_shot_pruning(SGD, sparsity=0.5, step=-1),
     ValueError, r"step=-1 is outside \[0, inf\]"),
    ("static/scores", lambda t: so.static_sparse(SGD, sparsity=0.5, scores="snipp"), ValueError,
     r"unknown scores 'snipp'"),
    ("static/float_masks", lambda t: _init(so.static_sparse(
        SGD, masks={"w": jnp.ones((8, 4)), "b": None})), TypeError,
     r"mask at 'w' has dtype float32"),
    ("static/no_sparsity", lambda t: so.static_sparse(SGD), ValueError, r"needs a sparsity"),
    # ---- optim: SET / RigL
    ("rigl/end_before_begin", lambda t: so.rigl(SGD, sparsity=0.5, begin_step=10, end_step=5),
     ValueError, r"end_step=5 <= begin_step=10"),
    ("rigl/default_begin_after_end", lambda t: so.rigl(SGD, sparsity=0.5, end_step=50),
     ValueError, r"end_step=50 <= begin_step=100 \(default begin_step = update_every\)"),
    ("rigl/update_every_float", lambda t: so.rigl(SGD, sparsity=0.5, update_every=2.5,
                                                  end_step=100),
     TypeError, r"update_every=2.5 must be an integer"),
    ("rigl/end_step_float", lambda t: so.rigl(SGD, sparsity=0.5, end_step=100.5), TypeError,
     r"end_step=100.5 must be an integer"),
    ("rigl/drop_fraction", lambda t: so.rigl(SGD, sparsity=0.5, end_step=1000, drop_fraction=1.5),
     ValueError, r"drop_fraction=1.5 is outside \[0, 1\]"),
    ("set/sparsity_negative", lambda t: so.set_training(SGD, sparsity=-0.5, end_step=1000),
     ValueError, r"sparsity=-0.5 is outside \[0, 1\)"),
    # ---- optim: N:M
    ("ste/nm_string", lambda t: so.ste(SGD, nm="2x4"), ValueError, r"N:M pattern '2x4'"),
    ("ste/nm_order", lambda t: so.ste(SGD, nm=(3, 2)), ValueError, r"N:M pattern 3:2 needs"),
    ("ste/leaf_not_divisible", lambda t: _init(so.ste(SGD, nm="2:4"), {"w": jnp.ones((6, 4))}),
     ValueError, r"NM\(2:4\) at 'w'"),
    ("ste/no_inner", lambda t: so.ste(None, nm="2:4"), TypeError, r"needs the optimizer as `inner`"),
    ("mdgf/total_steps_float", lambda t: so.mdgf(SGD, nm="2:4", rate=0.1, total_steps=10.5,
                                                 finetune_steps=2),
     TypeError, r"total_steps=10.5 must be an integer"),
    ("mdgf/kind", lambda t: so.mdgf(SGD, nm="2:4", rate=0.1, kind="cubic"), ValueError,
     r"kind='cubic'"),
    ("sdgf/phases", lambda t: so.sdgf(SGD, nm="1:4", total_steps=10, dense_steps=5,
                                      finetune_steps=5),
     ValueError, r"total_steps \(10\) must exceed dense_steps \(5\) \+ finetune_steps \(5\)"),
    ("sdgf/num_frames_float", lambda t: so.sdgf(SGD, nm="1:4", kind="geometric", total_steps=10,
                                                num_frames=2.5),
     TypeError, r"num_frames=2.5 must be an integer"),
    ("sdgf/custom_step_float", lambda t: so.sdgf(SGD, nm="1:4", kind="custom", total_steps=10,
                                                 custom={0: "3:4", 2.5: "1:4"}),
     TypeError, r"custom start step=2.5 must be an integer"),
    ("sdgf/dense_steps_float", lambda t: so.sdgf(SGD, nm="1:4", total_steps=10, dense_steps=1.5),
     TypeError, r"dense_steps=1.5 must be an integer"),
    ("gradient_masking/fraction", lambda t: so.gradient_masking(SGD, fraction=0.0), ValueError,
     r"fraction=0.0 is outside \(0, 1\]"),
    ("update/no_params", lambda t: (lambda tx: tx.update(P, tx.init(P)))(
        so.one_shot_pruning(SGD, sparsity=0.5)), ValueError, r"need the params"),
    # ---- checkpoint
    ("checkpoint/existing_step", _save_twice, ckpt.CheckpointExistsError,
     r"step 3 already exists in .*; pass force=True to overwrite it"),
    ("checkpoint/older_step", _save_older, ckpt.CheckpointExistsError,
     r"step 2 is older than the latest saved step 5 .*force=True"),
    ("checkpoint/float_step", lambda t: _save(t, 2.5), TypeError, r"step=2.5 must be a Python int"),
    ("checkpoint/negative_step", lambda t: _save(t, -1), ValueError, r"step=-1 must be >= 0"),
    ("checkpoint/metadata", lambda t: _save(t, 0, metadata={"a": object()}), TypeError,
     r"metadata is not JSON-serialisable"),
    ("checkpoint/missing_step", _restore_missing, ckpt.CheckpointNotFoundError, r"step|[Nn]o checkpoint"),
    ("checkpoint/other_shape", _restore_other_shape, ckpt.CheckpointMismatchError, r"w"),
    # ---- kernels: block-sparse matmul
    ("bsr/block_not_dividing", lambda t: _bsr((3, 2)), ValueError,
     r"'fc/kernel': block_shape \(3, 2\) does not divide the weight shape \(8, 8\)"),
    ("bsr/mask_shape", lambda t: _bsr(mask=jnp.ones((4, 8), bool)), ValueError,
     r"'fc/kernel': mask shape \(4, 8\) does not match"),
    ("bsr/mask_dtype", lambda t: _bsr(mask=jnp.ones((8, 8))), TypeError,
     r"'fc/kernel': mask dtype must be bool"),
    ("bsr_matmul/x_shape", lambda t: pk.bsr_matmul(jnp.ones((3, 7)), _bsr(), path="fc/kernel"),
     ValueError, r"'fc/kernel': x has shape \(3, 7\)"),
    ("bsr_matmul/not_bsr", lambda t: pk.bsr_matmul(jnp.ones((3, 8)), jnp.ones((8, 8)),
                                                   path="fc/kernel"),
     TypeError, r"'fc/kernel': expected a BlockSparseMatrix"),
    ("bsr_matmul/backend", lambda t: pk.bsr_matmul(jnp.ones((3, 8)), _bsr(), backend="cuda",
                                                   path="fc/kernel"),
     ValueError, r"'fc/kernel': unknown backend 'cuda'"),
    # ---- kernels: attention
    ("attention/q_rank", lambda t: _attn(q_shape=(64, 2, 32)), ValueError,
     r"q: expected \[batch, seq, heads, head_dim\]"),
    ("attention/kv_heads", lambda t: _attn(q_shape=(1, 64, 3, 32)), ValueError,
     r"k: 2 kv heads must divide the 3 query heads"),
    ("attention/dtypes", lambda t: _attn(dtype=jnp.bfloat16), TypeError, r"q, k, v: dtypes differ"),
    ("attention/block_mask", lambda t: _attn(mask=jnp.ones((2, 2), bool)), TypeError,
     r"block_mask: expected a BlockMask"),
    ("attention/head_dim", lambda t: _attn(k_shape=(1, 64, 2, 16)), ValueError,
     r"k: expected \[batch=1, kv_len, kv_heads, head_dim=32\]"),
]


def test_enough_cases():
  assert len(CASES) >= 40
  assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("fn, exc, pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(fn, exc, pattern, tmp_path):
  with pytest.raises(exc, match=pattern):
    fn(tmp_path)


def test_integers_print_as_integers():
  with pytest.raises(ValueError) as e:
    so.rigl(SGD, sparsity=0.5, update_every=0, end_step=10)
  assert "update_every=0 " in str(e.value) and "0.0" not in str(e.value)


# ------------------------------------------------------------------ accepted inputs


def test_nm_strings_accepted_like_nm():
  assert NM("2:4") == NM(2, 4) and NM("1:8", axis=0) == NM(1, 8, 0)
  p = {"w": jnp.arange(1.0, 33.0).reshape(8, 4)}
  np.testing.assert_array_equal(pruning.prune(p, None, None, pattern="2:4")[1]["w"],
                                pruning.prune(p, None, None, pattern=NM(2, 4))[1]["w"])
  s1 = so.ste(SGD, nm="2:4").init(p)
  s2 = so.ste(SGD, nm=NM(2, 4)).init(p)
  np.testing.assert_array_equal(so.get_masks(s1)["w"], so.get_masks(s2)["w"])


def test_none_param_leaves_accepted_at_init():
  # Finding 5 (the init-time half; tests/test_nonfinite.py runs every transformation on params
  # with a None leaf): ERK used to fail with "selection has a leaf 'b' that params do not have".
  p = {"w": jnp.ones((8, 8)), "b": None, "c": jnp.ones(8)}
  for tx in (so.static_sparse(SGD, sparsity=0.5), so.rigl(SGD, sparsity=0.5, end_step=1000)):
    m = so.get_masks(tx.init(p))
    assert m["b"] is None and m["c"] is None and int(m["w"].sum()) == 32


def test_checkpoint_force_overwrites_existing_step(tmp_path):
  with ckpt.checkpoint_manager(tmp_path / "f", async_save=False) as m:
    assert ckpt.save_checkpoint(m, 3, {"w": jnp.ones(2)})
    assert ckpt.save_checkpoint(m, 3, {"w": jnp.full(2, 7.0)}, force=True)
    got = ckpt.restore_checkpoint(m, {"w": jnp.ones(2)}, step=3).state["w"]
  np.testing.assert_array_equal(got, [7.0, 7.0])
