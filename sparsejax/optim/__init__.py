"""optax transformations for sparse training.

Every method is ``method(inner_optimizer, **options)`` returning an
``optax.GradientTransformationExtraArgs`` that owns ``inner_optimizer`` and
lands pruned weights on exact zeros with plain ``optax.apply_updates``:

* pruning: :func:`gradual_magnitude_pruning`, :func:`one_shot_pruning`;
* static masks: :func:`static_sparse` (random / ERK / magnitude / SNIP);
* dynamic sparse training: :func:`set_training`, :func:`rigl`
  (:func:`dynamic_sparse`);
* N:M with straight-through estimators: :func:`ste`, :func:`srste`
  (:func:`nm_training`), progressive gradient flow :func:`mdgf`, :func:`sdgf`;
  these need :func:`forward_params` in the forward pass;
* :func:`gradient_masking` (SparCL-style top-fraction gradients), composable
  with all of the above.

All share one mechanism, :func:`sparse_wrapper` + a :class:`MaskPolicy`. The
state (:class:`SparseState`) is read with :func:`get_masks`, :func:`get_step`,
:func:`get_target_sparsity`, :func:`get_beta`.
"""

from sparsejax.optim.dst import dynamic_sparse, rigl, set_training
from sparsejax.optim.gradient_masking import (GradientMaskingState, gradient_masking,
                                              top_gradient_mask)
from sparsejax.optim.moments import reset_moments
from sparsejax.optim.nm import nm_training, srste, ste
from sparsejax.optim.pgf import mdgf, sdgf
from sparsejax.optim.pruning import gradual_magnitude_pruning, one_shot_pruning, static_sparse
from sparsejax.optim.state import (SparseState, apply_state_masks, forward_params, get_beta,
                                   get_masks, get_sparse_state, get_step, get_target_sparsity)
from sparsejax.optim.wrapper import MaskPolicy, sparse_wrapper

__all__ = [
    "GradientMaskingState",
    "MaskPolicy",
    "SparseState",
    "apply_state_masks",
    "dynamic_sparse",
    "forward_params",
    "get_beta",
    "get_masks",
    "get_sparse_state",
    "get_step",
    "get_target_sparsity",
    "gradient_masking",
    "gradual_magnitude_pruning",
    "mdgf",
    "nm_training",
    "one_shot_pruning",
    "reset_moments",
    "rigl",
    "sdgf",
    "set_training",
    "sparse_wrapper",
    "srste",
    "static_sparse",
    "ste",
    "top_gradient_mask",
]
