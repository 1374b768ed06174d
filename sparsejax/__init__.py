"""sparsejax: neural-network sparsity for JAX, Flax and optax."""

import importlib

__version__ = "0.1.0"

# Leaf paths and selection, mask trees, mask patterns, exact global top-k (sparsejax.core).
from sparsejax.core.masks import (apply_masks, export_masks, global_sparsity,  # noqa: E402,F401
                                  import_masks, init_masks, leaf_sparsity, map_masked, mask_and,
                                  mask_or, nnz, summary, validate_masks)
from sparsejax.core.paths import leaf_paths, path_str, select  # noqa: E402,F401
from sparsejax.core.patterns import (NM, Block, Channel, Unstructured, block_mask,  # noqa: E402,F401
                                     channel_mask, nm_mask, topk_mask)
from sparsejax.core.selection import (global_threshold, global_topk_masks,  # noqa: E402,F401
                                      num_to_keep, ordered_keys)

# Scores, layer-wise distributions, prune / regrow / drop-and-grow, IMP and sparse soups.
from sparsejax.core.distributions import (erdos_renyi, global_magnitude,  # noqa: E402,F401
                                          global_normalized_magnitude, uniform)
from sparsejax.core.imp import imp_density, imp_prune, rewind  # noqa: E402,F401
from sparsejax.core.pruning import drop_and_grow, prune, prune_global, regrow  # noqa: E402,F401
from sparsejax.core.scores import (gradient_magnitude, grasp, magnitude,  # noqa: E402,F401
                                   movement_update, random_scores, saliency, synflow_densities,
                                   synflow_masks, synflow_scores)
from sparsejax.core.soup import greedy_soup, sparse_soup  # noqa: E402,F401

# Sparsity schedules and optax transformations for sparse training (sparsejax.optim).
from sparsejax import optim, schedules  # noqa: E402,F401
from sparsejax.optim import (MaskPolicy, SparseState, apply_state_masks,  # noqa: E402,F401
                             dynamic_sparse, forward_params, get_beta, get_masks,
                             get_sparse_state, get_step, get_target_sparsity, gradient_masking,
                             gradual_magnitude_pruning, mdgf, nm_training, one_shot_pruning,
                             reset_moments, rigl, sdgf, set_training, sparse_wrapper, srste,
                             static_sparse, ste)
from sparsejax import analysis  # noqa

# Device meshes and shardings (sparsejax.sharding).
from sparsejax.sharding import (collective_shapes, make_mesh,  # noqa: E402,F401
                                match_param_shardings, opt_state_shardings, param_shardings)

# Checkpointing with orbax (sparsejax.checkpoint), imported on first use: orbax adds ~0.6 s.
_CHECKPOINT_NAMES = frozenset({
    "CheckpointCorruptedError", "CheckpointError", "CheckpointMismatchError",
    "CheckpointNotFoundError", "Restored", "abstract_state", "checkpoint_manager",
    "restore_checkpoint", "restore_metadata", "save_checkpoint",
})


# Submodules imported on first attribute access (``sj.export.to_block_sparse(...)`` works
# without ``import sparsejax.export``): export and nn import Flax NNX and the kernels package,
# checkpoint imports orbax.
_LAZY_SUBMODULES = frozenset({"checkpoint", "export", "nn"})


def __getattr__(name):  # PEP 562 lazy attributes.
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"sparsejax.{name}")
  if name in _CHECKPOINT_NAMES:
    return getattr(importlib.import_module("sparsejax.checkpoint"), name)
  raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | _LAZY_SUBMODULES | _CHECKPOINT_NAMES)
