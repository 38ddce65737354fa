"""Mask-enhanced anchor box initialisation (Mask DINO, Sec. 3.3).

The masks predicted from the selected encoder tokens (the "initial prediction") are turned into boxes that
replace the selected proposals' boxes as the decoder's first anchors. ``INITIALIZE_BOX_TYPE``:

* ``no``: keep the proposals refined by the encoder box head;
* ``bitmask``: detectron2 ``BitMasks.get_bounding_boxes``: ``[x0, y0, x1 + 1, y1 + 1]`` of the foreground
  pixels, an empty mask gives ``(0, 0, 0, 0)``;
* ``mask2box``: Mask DINO's ``masks_to_boxes``: ``[xmin, ymin, xmax, ymax]`` (no ``+1``), an empty mask gives
  ``xmin = ymin = 1e8, xmax = ymax = 0``.

The boxes (pixels of the 1/4 map) are converted to cxcywh, divided by the map's ``(w, h)`` (the valid size
of each image when padding is known) and mapped to logit space with ``inverse_sigmoid``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from detr_core.box_ops import box_xyxy_to_cxcywh, inverse_sigmoid

__all__ = ["BOX_INIT_TYPES", "bitmask_boxes", "mask2box_boxes", "mask_enhanced_anchors"]

BOX_INIT_TYPES = ("no", "bitmask", "mask2box")


def _extents(masks: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """First/last foreground column and row of ``(N, H, W)`` bool masks, and whether each mask is non-empty."""
    n, h, w = masks.shape
    cols = masks.any(1)  # (N, W)
    rows = masks.any(2)  # (N, H)
    # argmax returns the first maximal index: on the flipped map that is the last foreground position
    x0 = cols.to(torch.uint8).argmax(1)
    x1 = (w - 1) - cols.flip(1).to(torch.uint8).argmax(1)
    y0 = rows.to(torch.uint8).argmax(1)
    y1 = (h - 1) - rows.flip(1).to(torch.uint8).argmax(1)
    return x0.float(), y0.float(), x1.float(), y1.float(), cols.any(1)


def bitmask_boxes(masks: Tensor) -> Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` xyxy ``[x0, y0, x1 + 1, y1 + 1]``; empty -> zeros (detectron2 BitMasks)."""
    x0, y0, x1, y1, nonempty = _extents(masks)
    boxes = torch.stack([x0, y0, x1 + 1, y1 + 1], -1)
    return torch.where(nonempty[:, None], boxes, torch.zeros_like(boxes))


def mask2box_boxes(masks: Tensor) -> Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` xyxy ``[xmin, ymin, xmax, ymax]``; empty -> ``(1e8, 1e8, 0, 0)``."""
    x0, y0, x1, y1, nonempty = _extents(masks)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    empty_box = boxes.new_tensor([1e8, 1e8, 0.0, 0.0]).expand_as(boxes)
    return torch.where(nonempty[:, None], boxes, empty_box)


def mask_enhanced_anchors(mask_logits: Tensor, box_type: str, mask_pad: Tensor | None = None) -> Tensor:
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
    fg = mask_logits.detach() > 0
    if mask_pad is not None:
        fg = fg & ~mask_pad[:, None]
    flat = fg.flatten(0, 1)
    if box_type == "bitmask":
        boxes = bitmask_boxes(flat)
    elif box_type == "mask2box":
        boxes = mask2box_boxes(flat)
    else:
        raise ValueError(f"unknown box init type {box_type!r}; expected 'bitmask' or 'mask2box'")
    boxes = box_xyxy_to_cxcywh(boxes).view(b, q, 4)
    if mask_pad is None:
        scale = boxes.new_tensor([w, h, w, h]).view(1, 1, 4)
    else:
        valid_h = (~mask_pad[:, :, 0]).sum(1).float()
        valid_w = (~mask_pad[:, 0, :]).sum(1).float()
        scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]
    return inverse_sigmoid(boxes / scale)
