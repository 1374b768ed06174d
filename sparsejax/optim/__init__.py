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
:func:`get_target_sparsity`, :func:`get_beta`, :func:`get_masked_nonzero`.

Rules that hold for every method:

* **Outermost.** The sparse transformation must produce the final updates:
  ``rigl(optax.chain(optax.adam(lr), optax.scale(0.5)))``, never
  ``optax.chain(rigl(optax.adam(lr)), optax.scale(0.5))`` (which rescales the
  ``-W`` updates that zero pruned weights). Only update-preserving wrappers
  (``MultiSteps``, ``apply_if_finite``, ``inject_hyperparams``,
  ``nnx.Optimizer``) may go around it. Hard methods count the violations
  (:func:`get_masked_nonzero`; eager updates raise, :func:`check_masked_zero`
  checks on the host).
* **Sparse from the start.** Params are dense until the first update (``k``
  micro-steps under ``MultiSteps``): call :func:`apply_state_masks` right after
  ``init`` (pass the NNX model after ``nnx.Optimizer(model, tx, wrt=nnx.Param)``).
* **Forward weights.** STE, SR-STE, MDGF and SDGF keep dense stored weights:
  the loss must run :func:`forward_params` (pytrees) or :func:`forward_model`
  (NNX); :func:`check_forward_params` detects a loss that forgot it.
* **Default layer-wise distributions** follow each method's paper: pruning
  during training (:func:`gradual_magnitude_pruning`,
  :func:`one_shot_pruning`) defaults to ``"uniform"`` (Zhu & Gupta 2017 prune
  every layer to the same sparsity), while sparse-from-scratch methods
  (:func:`static_sparse`, :func:`set_training`, :func:`rigl`) default to
  ``"erk"`` (Evci et al. 2020: ERK is what makes random sparse init train well;
  SET's Erdos-Renyi, Mocanu et al. 2018). Pass ``distribution=`` to choose.
"""

from sparsejax.optim.dst import dynamic_sparse, rigl, set_training
from sparsejax.optim.gradient_masking import (GradientMaskingState, gradient_masking,
                                              top_gradient_mask)
from sparsejax.optim.moments import reset_moments
from sparsejax.optim.nm import nm_training, srste, ste
from sparsejax.optim.pgf import mdgf, sdgf
from sparsejax.optim.pruning import gradual_magnitude_pruning, one_shot_pruning, static_sparse
from sparsejax.optim.state import (SparseState, apply_state_masks, check_forward_params,
                                   check_masked_zero, forward_model, forward_params, get_beta,
                                   get_masked_nonzero, get_masks, get_sparse_state, get_step,
                                   get_target_sparsity)
from sparsejax.optim.wrapper import MaskPolicy, sparse_wrapper

__all__ = [
    "GradientMaskingState",
    "MaskPolicy",
    "SparseState",
    "apply_state_masks",
    "check_forward_params",
    "check_masked_zero",
    "dynamic_sparse",
    "forward_model",
    "forward_params",
    "get_beta",
    "get_masked_nonzero",
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
