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


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight xyxy boxes of binary masks ``(N, H, W)`` -> ``(N, 4)`` float in pixel indices (torchvision convention:
    ``x1``/``y1`` are the last foreground column/row, no ``+1``). Empty masks give ``(0, 0, 0, 0)``."""
    if masks.numel() == 0:
        return torch.zeros((masks.shape[0], 4), device=masks.device, dtype=torch.float32)
    masks = masks.bool()
    n, h, w = masks.shape
    rows = masks.any(2)  # (N, H)
    cols = masks.any(1)  # (N, W)
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    # min/max over masked coordinates without a per-mask Python loop (unlike torchvision's)
    x0 = torch.where(cols, xs, big).amin(1)
    x1 = torch.where(cols, xs, -1.0).amax(1)
    y0 = torch.where(rows, ys, big).amin(1)
    y1 = torch.where(rows, ys, -1.0).amax(1)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    empty = ~rows.any(1)
    return boxes.masked_fill(empty[:, None], 0.0)


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
