"""Typed per-image outputs of Mask DINO inference.

All tensors describe ONE image at its output (original) resolution ``(H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class Instances:
    """Instance predictions of one image.

    Attributes:
        boxes: ``(K, 4)`` float, ``(x0, y0, x1, y1)`` absolute pixels of the output size (not clipped,
            as the official post-processing).
        scores: ``(K,)`` float, class probability times mean mask probability inside the mask.
        labels: ``(K,)`` int64 contiguous class ids ``0..C-1``.
        masks: ``(K, H, W)`` bool.
    """

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    masks: Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> Instances:
        """A copy with every tensor on ``device``."""
        return Instances(
            boxes=self.boxes.to(device),
            scores=self.scores.to(device),
            labels=self.labels.to(device),
            masks=self.masks.to(device),
        )

    def select(self, keep: Tensor) -> Instances:
        """The subset picked by a bool mask or an index tensor ``keep`` over the K instances."""
        return Instances(
            boxes=self.boxes[keep], scores=self.scores[keep], labels=self.labels[keep], masks=self.masks[keep]
        )


@dataclass
class PanopticSegmentation:
    """Panoptic prediction of one image.

    Attributes:
        segments: ``(H, W)`` int32 segment ids; 0 = void (no segment), segments numbered from 1.
        segments_info: one dict per segment id: ``id`` (int), ``category_id`` (contiguous class id),
            ``isthing`` (bool), ``score`` (float, the sharpened class score of the query that made it).
    """

    segments: Tensor
    segments_info: list[dict[str, Any]] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PanopticSegmentation:
        return PanopticSegmentation(self.segments.to(device), [dict(s) for s in self.segments_info])


@dataclass
class Prediction:
    """Everything the model predicted for one image; a task that did not run is ``None``.

    Attributes:
        instances: :class:`Instances` or ``None``.
        panoptic: :class:`PanopticSegmentation` or ``None``.
        semantic: ``(C, H, W)`` float per-class probabilities (not normalised over classes) or ``None``.
    """

    instances: Instances | None = None
    panoptic: PanopticSegmentation | None = None
    semantic: Tensor | None = None
