"""Pairing the instances of both sides and measuring them: by ``(query, label)`` where the queries correspond (same
weights, official mode), by mask IoU where they do not (padding-aware mode selects other encoder tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["InstanceMetrics", "instance_metrics", "mask_iou", "pairs_by_iou", "pairs_by_query"]


def mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """``(Ka, Kb)`` IoU of bool masks ``a (Ka, H, W)`` and ``b (Kb, H, W)`` (two empty masks: IoU 1)."""
    fa, fb = a.flatten(1).float(), b.flatten(1).float()
    inter = fa @ fb.T
    union = fa.sum(1)[:, None] + fb.sum(1)[None] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def pairs_by_query(
    off_keys: list[tuple[int, int]], our_keys: list[tuple[int, int]]
) -> tuple[Tensor, Tensor, int, int]:
    """Indices ``(official, ours)`` of the instances with the same ``(query, label)`` (queries in the official order),
    and the numbers of official-only and ours-only instances."""
    pos = {k: i for i, k in enumerate(our_keys)}
    common = [k for k in off_keys if k in pos]
    io = torch.tensor([off_keys.index(k) for k in common], dtype=torch.long)
    iu = torch.tensor([pos[k] for k in common], dtype=torch.long)
    return io, iu, len(off_keys) - len(common), len(our_keys) - len(common)


def pairs_by_iou(
    off_masks: Tensor, off_labels: Tensor, our_masks: Tensor, our_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """One-to-one pairs of instances with the same label maximising the summed mask IoU (Hungarian)."""
    iou = mask_iou(off_masks.cpu(), our_masks.cpu()).double()
    same = off_labels.cpu()[:, None] == our_labels.cpu()[None]
    cost = torch.where(same, 1 - iou, torch.full_like(iou, 10.0)).numpy()
    rows, cols = linear_sum_assignment(cost)
    keep = same.numpy()[rows, cols]
    return torch.as_tensor(rows[keep], dtype=torch.long), torch.as_tensor(cols[keep], dtype=torch.long)


@dataclass
class InstanceMetrics:
    """Differences over paired instances: labels equal, ``max|score diff|``, ``max|box diff|`` (px), mask IoU."""

    pairs: int
    labels_equal: bool
    max_score_diff: float
    max_box_diff: float
    min_iou: float
    mean_iou: float

    def describe(self) -> str:
        return (
            f"{self.pairs} pairs: labels {'equal' if self.labels_equal else 'DIFFER'}, max|score diff| "
            f"{self.max_score_diff:.2e}, max|box diff| {self.max_box_diff:.2e} px, mask IoU min "
            f"{self.min_iou:.4f} mean {self.mean_iou:.4f}"
        )


def instance_metrics(
    off: tuple[Tensor, Tensor, Tensor, Tensor],
    ours: tuple[Tensor, Tensor, Tensor, Tensor],
    io: Tensor,
    iu: Tensor,
) -> InstanceMetrics:
    """Metrics of the pairs ``io`` / ``iu`` of ``(boxes, scores, labels, masks)`` of both sides."""
    if io.numel() == 0:
        return InstanceMetrics(0, True, 0.0, 0.0, 1.0, 1.0)
    ob, os_, ol, om = (t.cpu()[io] for t in off)
    ub, us, ul, um = (t.cpu()[iu] for t in ours)
    ious = mask_iou(om.bool(), um.bool()).diagonal()
    return InstanceMetrics(
        pairs=int(io.numel()),
        labels_equal=bool(torch.equal(ol.long(), ul.long())),
        max_score_diff=float((os_.double() - us.double()).abs().max()),
        max_box_diff=float((ob.double() - ub.double()).abs().max()),
        min_iou=float(ious.min()),
        mean_iou=float(ious.mean()),
    )
