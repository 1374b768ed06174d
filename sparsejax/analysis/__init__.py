"""Measuring sparsity phenomena: activation, update and essential sparsity, mask dynamics.

Pure functions over pytrees and activations (jit-able where noted), plus plot helpers that take
an optional matplotlib ``Axes`` (matplotlib is imported only when a plot helper is called).
"""

# Activation sparsity (Lazy Neuron): capture hidden activations, nonzero statistics, top-k activation.
from sparsejax.analysis.activations import (ActivationStats, activation_sparsity,  # noqa: F401
                                            capture_activations, dead_neurons, nonzero_fraction,
                                            nonzero_per_neuron, nonzero_per_token, topk_activation)
# CETT thresholds, activation ratio and the PPL-p% sweep (Sparsing Law).
from sparsejax.analysis.cett import (CETTCurve, activation_ratio, cett, cett_sweep,  # noqa: F401
                                     cett_threshold, neuron_contributions, ppl_p_point,
                                     truncate_activations)
# Essential sparsity: one-shot magnitude sweeps (unstructured, N:M) and their knee.
from sparsejax.analysis.essential import EssentialCurve, knee, magnitude_sweep, nm_sweep  # noqa: F401
# Mask dynamics of dynamic sparse training (distance, IoU, in-time over-parameterisation).
from sparsejax.analysis.mask_dynamics import (ever_active, hamming_distance, itop_rate,  # noqa: F401
                                              mask_iou, regrown_count, regrown_survival)
# Plot helpers (matplotlib imported lazily).
from sparsejax.analysis.plotting import (plot_cett_curve, plot_essential_curve,  # noqa: F401
                                         plot_history, plot_per_layer)
# Update sparsity between two checkpoints (unchanged fraction, rank, support overlap).
from sparsejax.analysis.updates import (SupportOverlap, UpdateFractions, changed_support,  # noqa: F401
                                        support_overlap, unchanged_fraction, update_rank)
