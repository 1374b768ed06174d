"""Block-sparse flash attention: block masks, the differentiable op and its kernels.

Block masks (:class:`BlockMask`) say which kv-blocks every (batch, head,
q-block) visits, which of them are full and which partial, plus the transposed
lists for dK/dV. Build them with the constructors, combine them with
``and_masks``/``or_masks``, and run :func:`block_sparse_attention` on any
backend (Mosaic GPU, Triton, TPU, interpreter, XLA reference).
"""

from pallas_kernels.attention.block_mask import EMPTY, FULL, PARTIAL, BlockMask, index_lists
from pallas_kernels.attention.combinators import and_masks, or_masks
from pallas_kernels.attention.constructors import (block_mask_from_blocks, causal_mask,
                                                   classify_blocks, document_mask, full_mask,
                                                   mask_from_fn, mask_from_mod, prefix_lm_mask,
                                                   segment_ids_from_lengths,
                                                   sliding_window_mask)
from pallas_kernels.attention.mask_fns import (AndFn, CausalFn, MaskMod, OrFn, PrefixLMFn,
                                               SegmentFn, SlidingWindowFn, UserFn)
from pallas_kernels.attention.op import block_sparse_attention
from pallas_kernels.attention.spec import MaskSpec
from pallas_kernels.attention.reference import (attention_dense_reference,
                                                blockwise_attention_bwd,
                                                blockwise_attention_fwd)
from pallas_kernels.attention.topk import (block_attention_targets, pool_blocks,
                                           pooled_block_scores, topk_block_mask)

__all__ = [
    "AndFn", "BlockMask", "CausalFn", "EMPTY", "FULL", "MaskMod", "MaskSpec", "OrFn", "PARTIAL",
    "PrefixLMFn", "SegmentFn", "SlidingWindowFn", "UserFn", "and_masks",
    "attention_dense_reference", "block_attention_targets", "block_mask_from_blocks",
    "block_sparse_attention", "blockwise_attention_bwd", "blockwise_attention_fwd",
    "causal_mask", "classify_blocks", "document_mask", "full_mask", "index_lists",
    "mask_from_fn", "mask_from_mod", "or_masks", "pool_blocks", "pooled_block_scores",
    "prefix_lm_mask", "segment_ids_from_lengths", "sliding_window_mask", "topk_block_mask",
]
