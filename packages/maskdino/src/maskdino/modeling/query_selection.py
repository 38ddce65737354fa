"""Unified query selection (Mask DINO, Sec. 3.2-3.3): the top-k encoder tokens become the decoder's queries, and
the masks they predict give the decoder's first anchor boxes ("mask-enhanced anchor box initialisation").

1. Top-k selection, on detr-core's :func:`~detr_core.query_selection.select_queries`:
   ``output_memory = enc_output_norm(enc_output(memory_masked))``; class logits come from the decoder's SAME
   ``class_embed`` and boxes from the shared ``bbox_embed`` added to the token's proposal (logit space); the top-k
   tokens by max class logit give the content queries (detached by the caller) and the anchor boxes.
   Deviation for padding-aware mode: padded tokens are excluded from the top-k (their memory is zeroed, so their
   logit is a constant that could otherwise be picked and would make the result depend on the padding).
2. Mask-enhanced anchors (``INITIALIZE_BOX_TYPE``): the masks predicted from the selected queries (the "initial
   prediction") are turned into boxes that replace the selected proposals' boxes:

   * ``no``: keep the proposals refined by the encoder box head;
   * ``bitmask``: detectron2 ``BitMasks.get_bounding_boxes``: ``[x0, y0, x1 + 1, y1 + 1]`` of the foreground
     pixels, an empty mask gives ``(0, 0, 0, 0)``;
   * ``mask2box``: Mask DINO's ``masks_to_boxes``: ``[xmin, ymin, xmax, ymax]`` (no ``+1``), an empty mask gives
     ``xmin = ymin = 1e8, xmax = ymax = 0``.

   The boxes (pixels of the 1/4 map) are converted to cxcywh, divided by the map's ``(w, h)`` (the valid size of each
   image when padding is masked) and mapped to logit space with ``inverse_sigmoid``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from detr_core.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid, mask_extents
from detr_core.query_selection import QuerySelection, select_queries

__all__ = ["BOX_INIT_TYPES", "QuerySelection", "mask_boxes", "mask_enhanced_anchors", "select_top_queries"]

BOX_INIT_TYPES = ("no", "bitmask", "mask2box")


def select_top_queries(
    memory: Tensor,
    padding_mask: Tensor | None,
    spatial_shapes: Sequence[tuple[int, int]],
    enc_output: nn.Module,
    enc_output_norm: nn.Module,
    class_embed: nn.Module,
    bbox_embed: nn.Module,
    k: int,
) -> QuerySelection:
    """Mask DINO's top-k selection (see the module docstring).

    Args:
        memory: ``(B, S, C)`` decoder memory (levels in the decoder's order). padding_mask: ``(B, S)`` bool or None.
        spatial_shapes: ``(H, W)`` per level as Python ints (static under ``torch.export``).
        enc_output / enc_output_norm: Linear and LayerNorm. class_embed: ``C -> num_classes`` (the decoder's).
        bbox_embed: ``C -> 4`` (the shared box head). k: number of queries.
    """
    return select_queries(
        memory,
        padding_mask,
        spatial_shapes,
        lambda m: enc_output_norm(enc_output(m)),
        class_embed,
        bbox_embed,
        k,
        exclude_padding=True,
    )


def mask_boxes(rows: Tensor, cols: Tensor, box_type: Literal["bitmask", "mask2box"]) -> Tensor:
    """xyxy boxes (pixels) of masks given by their projections ``rows (N, H)`` / ``cols (N, W)`` (bool, True where
    the row/column has a foreground pixel), in the convention of ``box_type`` (see the module docstring)."""
    boxes, nonempty = mask_extents(rows, cols)
    if box_type == "bitmask":
        return torch.where(nonempty[:, None], boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]), boxes)
    empty_box = boxes.new_tensor([1e8, 1e8, 0.0, 0.0]).expand_as(boxes)
    return torch.where(nonempty[:, None], boxes, empty_box)


def mask_enhanced_anchors(
    mask_logits: Tensor, box_type: Literal["bitmask", "mask2box"], mask_pad: Tensor | None = None
) -> Tensor:
    """Anchor boxes (logit space) from predicted masks.

    Args:
        mask_logits: ``(B, Q, h, w)`` mask logits at 1/4 resolution (detached inside).
        box_type: ``bitmask`` or ``mask2box``.
        mask_pad: ``(B, h, w)`` bool True=padding, or None. With it, padded pixels never count as foreground
            and boxes are normalised by each image's valid size instead of the map size.

    Returns:
        ``(B, Q, 4)`` ``inverse_sigmoid`` of normalised cxcywh boxes.
    """
    b, q, h, w = mask_logits.shape
    if box_type not in ("bitmask", "mask2box"):
        raise ValueError(f"unknown box init type {box_type!r}; expected 'bitmask' or 'mask2box'")
    logits = mask_logits.detach()
    if mask_pad is None:
        # a row / column has a foreground pixel iff its largest logit is > 0: two max-reductions over the
        # float logits instead of a (B, Q, h, w) bool map and two any() passes over it (~3x less time)
        rows = logits.amax(3).flatten(0, 1) > 0
        cols = logits.amax(2).flatten(0, 1) > 0
    else:
        fg = (logits > 0) & ~mask_pad[:, None]
        rows, cols = fg.any(3).flatten(0, 1), fg.any(2).flatten(0, 1)
    boxes = box_xyxy_to_cxcywh(mask_boxes(rows, cols, box_type)).view(b, q, 4)
    if mask_pad is None:
        scale = boxes.new_tensor([w, h, w, h]).view(1, 1, 4)
    else:
        valid_h = (~mask_pad[:, :, 0]).sum(1).float()
        valid_w = (~mask_pad[:, 0, :]).sum(1).float()
        scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]
    return inverse_sigmoid(boxes / scale)
