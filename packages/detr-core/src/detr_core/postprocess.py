"""Detection post-processing of sigmoid (focal-loss) DETR-family heads: the top-k (query, class) pairs.

Deformable DETR, DINO and Mask DINO do not take each query's best class: they rank all ``Q x C`` (query, class)
probabilities of an image together and keep the top ``k``, so one query may give several detections with
different labels. A detection's box is its query's box scaled to the output image; boxes are not clipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.ops as tvops
from torch import Tensor

from .box_ops import box_cxcywh_to_xyxy

__all__ = ["Detections", "topk_detections", "topk_query_class"]


@dataclass
class Detections:
    """The detections of one image, by decreasing score.

    Attributes:
        scores: ``(k,)`` probabilities. labels: ``(k,)`` int64 class indices (the head's class axis).
        boxes: ``(k, 4)`` absolute ``(x0, y0, x1, y1)`` in output pixels.
        queries: ``(k,)`` int64 index of the query each detection comes from.
    """

    scores: Tensor
    labels: Tensor
    boxes: Tensor
    queries: Tensor


def topk_query_class(probs: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` highest (query, class) probabilities.

    Args:
        probs: ``(..., Q, C)`` per-class probabilities (e.g. ``sigmoid(logits)``).
        k: number to keep (at most ``Q * C``).

    Returns:
        ``(scores, labels, queries)``, each ``(..., k)``, sorted by decreasing score; ``labels = idx % C``,
        ``queries = idx // C`` of the flattened index ``idx = q * C + c``.
    """
    num_classes = probs.shape[-1]
    if k > probs.shape[-2] * num_classes:
        raise ValueError(f"cannot keep {k} of {probs.shape[-2]} x {num_classes} (query, class) pairs")
    scores, flat_idx = probs.flatten(-2).topk(k, dim=-1, sorted=True)
    labels = flat_idx % num_classes
    queries = torch.div(flat_idx, num_classes, rounding_mode="floor")
    return scores, labels, queries


def topk_detections(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Tensor | Sequence[tuple[int, int]],
    num_select: int = 300,
    nms_iou_threshold: float | None = None,
) -> list[Detections]:
    """Top ``num_select`` (query, class) pairs of every image (Deformable DETR / DINO ``PostProcess``).

    Args:
        logits: ``(B, Q, C)`` class logits of a sigmoid head.
        boxes: ``(B, Q, 4)`` cxcywh boxes normalised to each image (``[0, 1]``).
        image_sizes: ``(B, 2)`` ``(h, w)`` of the output images the boxes are scaled to.
        num_select: detections per image before NMS.
        nms_iou_threshold: if set (> 0), class-agnostic NMS (torchvision) at that IoU on each image's detections
            (DINO's option; off in its configs).

    Returns:
        ``B`` :class:`Detections`.
    """
    b = logits.shape[0]
    if boxes.shape[:2] != logits.shape[:2] or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must be (B, Q, 4) = {(*logits.shape[:2], 4)}, got {tuple(boxes.shape)}")
    sizes = torch.as_tensor(image_sizes, dtype=torch.float32, device=boxes.device).reshape(-1, 2)
    if sizes.shape[0] != b:
        raise ValueError(f"image_sizes must hold {b} (h, w) pairs, got {sizes.shape[0]}")
    scores, labels, queries = topk_query_class(logits.sigmoid(), num_select)
    xyxy = box_cxcywh_to_xyxy(boxes)
    picked = torch.gather(xyxy, 1, queries[..., None].expand(-1, -1, 4))
    h, w = sizes.unbind(-1)
    picked = picked * torch.stack([w, h, w, h], -1)[:, None, :].to(picked.dtype)
    out = []
    for i in range(b):
        det = Detections(scores[i], labels[i], picked[i], queries[i])
        if nms_iou_threshold is not None and nms_iou_threshold > 0:
            keep = tvops.nms(det.boxes, det.scores, nms_iou_threshold)
            det = Detections(det.scores[keep], det.labels[keep], det.boxes[keep], det.queries[keep])
        out.append(det)
    return out
