"""Mask DINO's two-stage query selection, on detr_core's proposal / top-k helpers.

``output_memory = enc_output_norm(enc_output(memory_masked))``; class logits come from the decoder's SAME
``class_embed`` and boxes from the shared ``bbox_embed`` added to the token's proposal (logit space); the top-k
tokens by max class logit give the content queries (detached by the caller) and the anchor boxes.

Deviation for padding-aware mode: padded tokens are excluded from the top-k (their memory is zeroed, so their
logit is a constant that could otherwise be picked and would make the result depend on the padding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from detr_core.query_selection import encoder_output_proposals, gather_tokens, select_top_k

__all__ = ["SelectedQueries", "select_queries"]


@dataclass
class SelectedQueries:
    """Top-k encoder tokens.

    Attributes:
        indices: ``(B, k)`` int64 token indices (sorted by decreasing score).
        content: ``(B, k, C)`` ``output_memory`` of the selected tokens (NOT detached).
        boxes_unsigmoid: ``(B, k, 4)`` ``bbox_embed(output_memory) + proposal`` (NOT detached).
    """

    indices: Tensor
    content: Tensor
    boxes_unsigmoid: Tensor


def select_queries(
    memory: Tensor,
    padding_mask: Tensor | None,
    spatial_shapes: Tensor | Sequence[tuple[int, int]],
    enc_output: nn.Module,
    enc_output_norm: nn.Module,
    class_embed: nn.Module,
    bbox_embed: nn.Module,
    k: int,
) -> SelectedQueries:
    """
    Args:
        memory: ``(B, S, C)`` decoder memory (levels in the decoder's order). padding_mask: ``(B, S)`` bool or None.
        spatial_shapes: ``(L, 2)`` ``(H, W)``; pass Python ints to keep the graph exportable. enc_output / enc_output_norm: Linear and LayerNorm.
        class_embed: ``C -> num_classes`` (the decoder's). bbox_embed: ``C -> 4`` (the shared box head).
        k: number of queries.
    """
    memory_masked, proposals = encoder_output_proposals(memory, padding_mask, spatial_shapes)
    output_memory = enc_output_norm(enc_output(memory_masked))
    scores = class_embed(output_memory).max(-1).values  # (B, S)
    if padding_mask is not None:
        scores = scores.masked_fill(padding_mask, float("-inf"))
    indices = select_top_k(scores, k)
    content = gather_tokens(output_memory, indices)
    # the box head only on the k selected tokens: bbox_embed is per token, so this equals gathering afterwards
    boxes = bbox_embed(content) + gather_tokens(proposals, indices)
    return SelectedQueries(indices=indices, content=content, boxes_unsigmoid=boxes)
