"""Flax NNX layers that run on the block-sparse Pallas kernels."""

from sparsejax.nn.attention import BlockSparseMultiHeadAttention
from sparsejax.nn.block_sparse_dense import BlockSparseDense, BlockSparseIndex

__all__ = ["BlockSparseDense", "BlockSparseIndex", "BlockSparseMultiHeadAttention"]
