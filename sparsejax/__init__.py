"""sparsejax: neural-network sparsity for JAX, Flax and optax."""

__version__ = "0.1.0"
