"""MaskSpec: a static, hashable recipe that builds a block mask for given sequence lengths.

Layers keep a spec (not arrays) and build the mask at call time, so one module
serves every sequence length and per-batch data (segment ids, prefix lengths).
"""

from __future__ import annotations

import dataclasses

from pallas_kernels.attention.block_mask import BlockMask
from pallas_kernels.attention.combinators import and_masks
from pallas_kernels.attention.constructors import (causal_mask, document_mask, full_mask,
                                                   prefix_lm_mask, sliding_window_mask)

__all__ = ["MaskSpec"]

KINDS = ("full", "causal", "sliding_window", "document", "prefix_lm")


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """Recipe for a block mask.

  Attributes:
    kind: ``"full"``, ``"causal"``, ``"sliding_window"``, ``"document"`` or ``"prefix_lm"``.
    q_block, kv_block: block sizes (``kv_block`` defaults to ``q_block``).
    window: window size for ``"sliding_window"``.
    causal: ``"sliding_window"``: one-sided window; ``"document"``: causal inside documents.
    q_offset: absolute position of query 0 (causal kinds).

  >>> MaskSpec("sliding_window", q_block=16, window=8).build(64).block_states()[0, 0, 2].tolist()
  [0, 1, 1, 0]
  """

  kind: str = "causal"
  q_block: int = 128
  kv_block: int | None = None
  window: int | None = None
  causal: bool = True
  q_offset: int = 0

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"MaskSpec/kind: expected one of {KINDS}, got {self.kind!r}")
    if self.kind == "sliding_window" and not (isinstance(self.window, int) and self.window > 0):
      raise ValueError(f"MaskSpec/window: 'sliding_window' needs a positive int window, got "
                       f"{self.window!r}")

  def build(self, q_len: int, kv_len: int | None = None, *, segment_ids=None,
            kv_segment_ids=None, prefix_len=None) -> BlockMask:
    """Builds the mask; ``segment_ids`` ([batch, len]) restrict any kind to documents.

    Args:
      q_len, kv_len: sequence lengths.
      segment_ids: optional query segment ids (required for ``"document"``); with
        another kind, the result is intersected with the document mask.
      kv_segment_ids: key segment ids (default ``segment_ids``).
      prefix_len: ``"prefix_lm"`` prefix length (int or ``[batch]``).
    """
    kv_len = q_len if kv_len is None else kv_len
    blocks = dict(q_block=self.q_block, kv_block=self.kv_block)
    if self.kind == "document":
      if segment_ids is None:
        raise ValueError("MaskSpec/document: pass segment_ids= to build a document mask")
      return document_mask(segment_ids, kv_segment_ids, causal=self.causal,
                           q_offset=self.q_offset, **blocks)
    if self.kind == "full":
      mask = full_mask(q_len, kv_len, **blocks)
    elif self.kind == "causal":
      mask = causal_mask(q_len, kv_len, q_offset=self.q_offset, **blocks)
    elif self.kind == "sliding_window":
      mask = sliding_window_mask(q_len, kv_len, window=self.window, causal=self.causal,
                                 q_offset=self.q_offset, **blocks)
    else:
      if prefix_len is None:
        raise ValueError("MaskSpec/prefix_lm: pass prefix_len= to build a prefix-LM mask")
      mask = prefix_lm_mask(q_len, kv_len, prefix_len=prefix_len, q_offset=self.q_offset,
                            **blocks)
    if segment_ids is not None:
      mask = and_masks(mask, document_mask(segment_ids, kv_segment_ids, **blocks))
    return mask
