"""sparsejax: neural-network sparsity for JAX, Flax and optax."""

__version__ = "0.1.0"

# Scores, layer-wise distributions, prune / regrow / drop-and-grow, IMP and sparse soups.
from sparsejax.core.distributions import (erdos_renyi, global_magnitude,  # noqa: E402,F401
                                          global_normalized_magnitude, uniform)
from sparsejax.core.imp import imp_density, imp_prune, rewind  # noqa: E402,F401
from sparsejax.core.pruning import drop_and_grow, prune, prune_global, regrow  # noqa: E402,F401
from sparsejax.core.scores import (gradient_magnitude, grasp, magnitude,  # noqa: E402,F401
                                   movement_update, random_scores, saliency, synflow_densities,
                                   synflow_masks, synflow_scores)
from sparsejax.core.soup import greedy_soup, sparse_soup  # noqa: E402,F401

# Device meshes and shardings (sparsejax.sharding).
from sparsejax.sharding import (collective_shapes, make_mesh,  # noqa: E402,F401
                                match_param_shardings, opt_state_shardings, param_shardings)

# Checkpointing with orbax (sparsejax.checkpoint), imported on first use: orbax adds ~0.6 s.
_CHECKPOINT_NAMES = frozenset({
    "CheckpointCorruptedError", "CheckpointError", "CheckpointMismatchError",
    "CheckpointNotFoundError", "Restored", "abstract_state", "checkpoint_manager",
    "restore_checkpoint", "restore_metadata", "save_checkpoint",
})


def __getattr__(name):  # PEP 562 lazy attributes.
  if name in _CHECKPOINT_NAMES:
    from sparsejax import checkpoint  # pylint: disable=import-outside-toplevel
    return getattr(checkpoint, name)
  raise AttributeError(f"module 'sparsejax' has no attribute {name!r}")
