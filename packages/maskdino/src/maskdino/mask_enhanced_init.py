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


def _extents(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """First/last foreground column and row, and whether each mask is non-empty, from ``rows (N, H)`` and
    ``cols (N, W)``: bool, True where the row / column has a foreground pixel."""
    h, w = rows.shape[1], cols.shape[1]
    # argmax returns the first maximal index: on the flipped map that is the last foreground position
    x0 = cols.to(torch.uint8).argmax(1)
    x1 = (w - 1) - cols.flip(1).to(torch.uint8).argmax(1)
    y0 = rows.to(torch.uint8).argmax(1)
    y1 = (h - 1) - rows.flip(1).to(torch.uint8).argmax(1)
    return x0.float(), y0.float(), x1.float(), y1.float(), cols.any(1)


def _bitmask_boxes(rows: Tensor, cols: Tensor) -> Tensor:
    x0, y0, x1, y1, nonempty = _extents(rows, cols)
    boxes = torch.stack([x0, y0, x1 + 1, y1 + 1], -1)
    return torch.where(nonempty[:, None], boxes, torch.zeros_like(boxes))


def _mask2box_boxes(rows: Tensor, cols: Tensor) -> Tensor:
    x0, y0, x1, y1, nonempty = _extents(rows, cols)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    empty_box = boxes.new_tensor([1e8, 1e8, 0.0, 0.0]).expand_as(boxes)
    return torch.where(nonempty[:, None], boxes, empty_box)


def bitmask_boxes(masks: Tensor) -> Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` xyxy ``[x0, y0, x1 + 1, y1 + 1]``; empty -> zeros (detectron2 BitMasks)."""
    return _bitmask_boxes(masks.any(2), masks.any(1))


def mask2box_boxes(masks: Tensor) -> Tensor:
    """``(N, H, W)`` bool -> ``(N, 4)`` xyxy ``[xmin, ymin, xmax, ymax]``; empty -> ``(1e8, 1e8, 0, 0)``."""
    return _mask2box_boxes(masks.any(2), masks.any(1))


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
    boxes = _bitmask_boxes(rows, cols) if box_type == "bitmask" else _mask2box_boxes(rows, cols)
    boxes = box_xyxy_to_cxcywh(boxes).view(b, q, 4)
    if mask_pad is None:
        scale = boxes.new_tensor([w, h, w, h]).view(1, 1, 4)
    else:
        valid_h = (~mask_pad[:, :, 0]).sum(1).float()
        valid_w = (~mask_pad[:, 0, :]).sum(1).float()
        scale = torch.stack([valid_w, valid_h, valid_w, valid_h], -1)[:, None]
    return inverse_sigmoid(boxes / scale)
