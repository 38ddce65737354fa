"""Box geometry shared by the DETR family.

Conventions: ``cxcywh`` boxes are ``(cx, cy, w, h)``, ``xyxy`` boxes are ``(x0, y0, x1, y1)``. "Normalised" boxes are
divided by the (padded) image size, so they lie in ``[0, 1]``. Every function works on any leading shape ``(..., 4)``
unless it says "pairwise".
"""

from __future__ import annotations

import torch
import torchvision.ops as tvops
from torch import Tensor

__all__ = [
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "denormalize_boxes",
    "generalized_box_iou",
    "inverse_sigmoid",
    "mask_extents",
    "masks_to_boxes",
    "normalize_boxes",
    "valid_ratios",
]


def box_cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh -> ``(..., 4)`` xyxy."""
    return tvops.box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> ``(..., 4)`` cxcywh."""
    return tvops.box_convert(boxes, "xyxy", "cxcywh")


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise IoU of xyxy boxes ``(N, 4)`` and ``(M, 4)`` -> ``(N, M)``."""
    return tvops.box_iou(boxes1, boxes2)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 0.0) -> Tensor:
    """Pairwise generalised IoU (Rezatofighi et al.) of xyxy boxes ``(N, 4)``, ``(M, 4)`` -> ``(N, M)`` in ``[-1, 1]``.

    ``eps`` > 0 gives ``inter / (union + eps) - (hull - union) / (hull + eps)``, the form some detectors use (Mask
    DINO: 1e-6, which visibly changes the cost of boxes of a few pixels); 0 is torchvision's exact GIoU.
    """
    if eps == 0.0:
        return tvops.generalized_box_iou(boxes1, boxes2)
    # torchvision has no epsilon variant of the pairwise GIoU
    area1, area2 = tvops.box_area(boxes1), tvops.box_area(boxes2)
    lt = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    rb = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = area1[:, None] + area2[None, :] - inter
    hull_lt = torch.min(boxes1[:, None, :2], boxes2[None, :, :2])
    hull_rb = torch.max(boxes1[:, None, 2:], boxes2[None, :, 2:])
    hull_area = (hull_rb - hull_lt).clamp(min=0).prod(-1)
    return inter / (union + eps) - (hull_area - union) / (hull_area + eps)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[0, 1]`` and both ``x`` and ``1 - x`` clamped to ``>= eps``,
    so that boxes touching the image border stay finite. Any shape."""
    x = x.clamp(min=0.0, max=1.0)
    return torch.log(x.clamp(min=eps) / (1.0 - x).clamp(min=eps))


def mask_extents(rows: Tensor, cols: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes from the projections of binary masks.

    Args:
        rows: ``(N, H)`` bool, True where a row of mask ``n`` has a foreground pixel. cols: ``(N, W)`` likewise.

    Returns:
        ``(boxes (N, 4) float32 xyxy, nonempty (N,) bool)``: ``x0``/``y0`` the first and ``x1``/``y1`` the last
        foreground column/row (pixel indices); the box of an empty mask is undefined (zeros).
    """
    h, w = rows.shape[1], cols.shape[1]
    # argmax returns the first maximal index: on the flipped projection that is the last foreground position
    x0 = cols.to(torch.uint8).argmax(1)
    x1 = (w - 1) - cols.flip(1).to(torch.uint8).argmax(1)
    y0 = rows.to(torch.uint8).argmax(1)
    y1 = (h - 1) - rows.flip(1).to(torch.uint8).argmax(1)
    nonempty = cols.any(1)
    boxes = torch.stack([x0, y0, x1, y1], -1).float()
    return boxes.masked_fill(~nonempty[:, None], 0.0), nonempty


def masks_to_boxes(masks: Tensor, pixel_edges: bool = False) -> Tensor:
    """Tight xyxy boxes of binary masks ``(N, H, W)`` -> ``(N, 4)`` float32; empty masks give ``(0, 0, 0, 0)``.

    ``pixel_edges=False`` (torchvision's convention): ``x1``/``y1`` are the last foreground column/row, so a single
    pixel at ``(x, y)`` gives ``[x, y, x, y]``. ``pixel_edges=True`` (detectron2's ``BitMasks``, box annotations):
    the box runs to the far edge of that pixel, ``[x, y, x + 1, y + 1]``.
    """
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device, dtype=torch.float32)
    masks = masks.bool()
    boxes, nonempty = mask_extents(masks.any(2), masks.any(1))
    if pixel_edges:
        boxes = boxes + (boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) * nonempty[:, None])
    return boxes


def normalize_boxes(boxes_xyxy: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Absolute xyxy pixels ``(..., 4)`` -> cxcywh normalised by ``image_size = (h, w)`` ``(..., 4)``."""
    h, w = image_size
    scale = boxes_xyxy.new_tensor([w, h, w, h])
    return box_xyxy_to_cxcywh(boxes_xyxy) / scale


def denormalize_boxes(boxes_cxcywh: Tensor, image_size: tuple[int, int]) -> Tensor:
    """Normalised cxcywh ``(..., 4)`` -> absolute xyxy pixels for ``image_size = (h, w)`` ``(..., 4)``."""
    h, w = image_size
    scale = boxes_cxcywh.new_tensor([w, h, w, h])
    return box_cxcywh_to_xyxy(boxes_cxcywh) * scale


def valid_ratios(padding_mask: Tensor) -> Tensor:
    """Fraction of each padded feature map that holds image content.

    Args:
        padding_mask: ``(B, H, W)`` bool, True at padded pixels (padding is at the bottom/right).

    Returns:
        ``(B, 2)`` float ``(w_ratio, h_ratio)`` = (valid columns / W, valid rows / H).
    """
    _, h, w = padding_mask.shape
    not_pad = ~padding_mask
    valid_h = not_pad[:, :, 0].sum(1).float()
    valid_w = not_pad[:, 0, :].sum(1).float()
    return torch.stack([valid_w / w, valid_h / h], -1)
