"""The compiled step of a hard sparse method copies none of its donated masks and kernels.

Masks, params and optimizer state are donated (updated in place). On XLA:CPU a
donated buffer that a later op overwrites in place, while something the data
flow does not order before that op still reads it, is copied at the start of
every step. ``sparse_wrapper`` orders the masked-nonzero count and the mask
reads of drop-and-grow before the in-place mask update, and the count and the
backward pass (its conditional reads every gradient) before the in-place param
updates; this checks the copies of ENTRY parameters in the compiled program,
so a regression shows up without a timing.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import optax
import pytest

import sparsejax.optim as so

_SHAPE = (64, 64)


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"fc0": {"kernel": jax.random.normal(k1, _SHAPE), "bias": jnp.zeros(64)},
          "fc1": {"kernel": jax.random.normal(k2, _SHAPE), "bias": jnp.zeros(64)}}


def _loss(params, x):
  h = jax.nn.relu(x @ params["fc0"]["kernel"] + params["fc0"]["bias"])
  return jnp.mean((h @ params["fc1"]["kernel"] + params["fc1"]["bias"]) ** 2)


def _entry_copies(tx) -> list[str]:
  """Shapes copied from an ENTRY parameter of the compiled, donated step."""
  params = _params()
  state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, x):
    u, state = tx.update(jax.grad(_loss)(params, x), state, params)
    return optax.apply_updates(params, u), state

  text = step.lower(params, state, jnp.ones((8, 64))).compile().as_text()
  entry = text[text.index("\nENTRY"):]
  entry = entry[:entry.index("\n}\n")]
  names = dict(re.findall(r"(%\S+) = \S+ parameter\((\d+)\)", entry))
  return [shape for shape, src in re.findall(r"= (\S+) copy\((%[^)\s,]+)\)", entry)
          if src in names]


_METHODS = {
    "gmp": lambda o: so.gradual_magnitude_pruning(o, sparsity=0.5, end_step=100, frequency=10),
    "set": lambda o: so.set_training(o, sparsity=0.5, update_every=10, end_step=100),
    "rigl": lambda o: so.rigl(o, sparsity=0.5, update_every=10, end_step=100),
    "rigl_skip": lambda o: so.rigl(o, sparsity=0.5, update_every=10, end_step=100,
                                   skip_gradient_on_update=True),
    "static": lambda o: so.static_sparse(o, sparsity=0.5),
}


@pytest.mark.parametrize("method", sorted(_METHODS))
def test_donated_masks_and_params_are_not_copied(method):
  copies = _entry_copies(_METHODS[method](optax.adam(1e-3)))
  assert not [c for c in copies if c.startswith(("pred[", "f32[64,64]"))], copies


def test_plain_adam_copies_a_kernel():
  """The reference case: XLA copies the kernel plain Adam's backward pass reads
  (fc1's, for the gradient of fc0), as nothing orders that read before the
  in-place update of fc1; the sparse steps above wait for every gradient."""
  assert "f32[64,64]{1,0}" in _entry_copies(optax.adam(1e-3))
