"""Block-sparse Pallas kernels (matmul and attention) for GPU, TPU and CPU, with autodiff."""

from pallas_kernels._platform import BACKENDS, default_backend, resolve_backend
from pallas_kernels.matmul import BlockSparseMatrix, bsr_from_dense, bsr_matmul, bsr_to_dense

__all__ = ["BACKENDS", "default_backend", "resolve_backend"]
__all__ += ["BlockSparseMatrix", "bsr_from_dense", "bsr_matmul", "bsr_to_dense"]

from pallas_kernels.attention import (BlockMask, MaskMod, MaskSpec, and_masks,
                                      block_mask_from_blocks, block_sparse_attention, causal_mask,
                                      document_mask, full_mask, mask_from_fn, or_masks,
                                      pooled_block_scores, prefix_lm_mask,
                                      segment_ids_from_lengths, sliding_window_mask,
                                      topk_block_mask)

__all__ += ["BlockMask", "MaskMod", "MaskSpec", "and_masks", "block_mask_from_blocks",
            "block_sparse_attention", "causal_mask", "document_mask", "full_mask", "mask_from_fn",
            "or_masks", "pooled_block_scores", "prefix_lm_mask", "segment_ids_from_lengths",
            "sliding_window_mask", "topk_block_mask"]
