"""Hungarian matching of predictions to targets from a weighted sum of pluggable cost terms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from .losses import point_sample
from .outputs import QueryPredictions

__all__ = [
    "BoxL1Cost",
    "CostTerm",
    "FocalClassCost",
    "GIoUCost",
    "HungarianMatcher",
    "NonFiniteCostError",
    "PointMaskCost",
    "SoftmaxClassCost",
]


class NonFiniteCostError(ValueError, FloatingPointError):
    """A matching cost is NaN/inf: the predictions (or targets) are not finite, e.g. after training diverged."""


@runtime_checkable
class CostTerm(Protocol):
    """One term of the matching cost. ``weight`` multiplies the ``(Q, n)`` matrix it returns for one image.

    ``pred`` holds the predictions of ONE image (``logits (Q, C)``, ``boxes (Q, 4)``, ``masks (Q, H, W)``),
    ``target`` that image's target dict (``labels (n,)``, ``boxes (n, 4)`` cxcywh, ...). Lower cost = better match.

    An image without targets is not matched; a term may define ``on_empty_target(pred)``, which the matcher then
    calls instead (a term that draws random numbers draws them there too, so that the random stream stays that of
    implementations that build the empty ``(Q, 0)`` matrix).
    """

    weight: float

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor: ...


class FocalClassCost:
    """Focal classification cost at the target labels:
    ``alpha (1-p)^gamma (-log(p+1e-8)) - (1-alpha) p^gamma (-log(1-p+1e-8))`` with ``p = sigmoid(logit)``."""

    def __init__(self, weight: float, alpha: float = 0.25, gamma: float = 2.0):
        self.weight, self.alpha, self.gamma = weight, alpha, gamma

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        prob = pred.logits.float().sigmoid()[:, target["labels"]]  # (Q, n)
        neg = (1 - self.alpha) * prob.pow(self.gamma) * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob).pow(self.gamma) * -(prob + 1e-8).log()
        return pos - neg


class SoftmaxClassCost:
    """``-softmax(logits)[:, label]`` (DETR; the logits may carry a trailing no-object class)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        return -pred.logits.float().softmax(-1)[:, target["labels"]]


class BoxL1Cost:
    """L1 distance between cxcywh boxes, ``(Q, n)``."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        return torch.cdist(_need(pred.boxes, "boxes", self).float(), target["boxes"].float(), p=1)


class GIoUCost:
    """``-GIoU`` between cxcywh boxes, ``(Q, n)``; ``eps`` as in :func:`~detr_core.box_ops.generalized_box_iou`."""

    def __init__(self, weight: float, eps: float = 0.0):
        self.weight = weight
        self.eps = eps

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        return -generalized_box_iou(
            box_cxcywh_to_xyxy(_need(pred.boxes, "boxes", self).float()),
            box_cxcywh_to_xyxy(target["boxes"].float()),
            eps=self.eps,
        )


class PointMaskCost:
    """Mask BCE + dice cost on ``num_points`` uniform random points shared by all pairs of one image
    (Mask2Former / Mask DINO matcher), computed in float32 with autocast disabled.

    ``cost = weight_ce * mean_p BCE(pred_q(p), tgt_t(p)) + weight_dice * (1 - (2 sum p*t + 1) / (sum p + sum t + 1))``.
    The two weights live inside because both costs must use the same points; the term's own ``weight`` is 1, or 0
    when both weights are 0 (the matcher then skips the term and draws no points).

    Needs ``pred.masks (Q, H, W)`` logits and ``target["masks"] (n, Ht, Wt)`` covering the same (padded)
    frame; points are in normalised coordinates, so the resolutions may differ.
    """

    def __init__(
        self,
        weight_ce: float,
        weight_dice: float,
        num_points: int = 12544,
        generator: torch.Generator | None = None,
    ):
        self.weight = 1.0 if (weight_ce or weight_dice) else 0.0
        self.weight_ce, self.weight_dice, self.num_points, self.generator = (
            weight_ce,
            weight_dice,
            num_points,
            generator,
        )

    def _points(self, device: torch.device) -> Tensor:
        return torch.rand(1, self.num_points, 2, device=device, generator=self.generator)

    def on_empty_target(self, pred: QueryPredictions) -> None:
        """Draw (and drop) the points of an image without targets, as the official matcher does."""
        self._points(_need(pred.masks, "masks", self).device)

    def __call__(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        masks = _need(pred.masks, "masks", self).float()
        tgt = target["masks"].to(device=masks.device, dtype=torch.float32)
        coords = self._points(masks.device)
        # float32 throughout: under autocast the (Q, P) x (P, n) products would otherwise run in half precision
        with torch.autocast(device_type=masks.device.type, enabled=False):
            p = point_sample(masks[:, None], coords.expand(masks.shape[0], -1, -1)).squeeze(1)  # (Q, P)
            t = point_sample(tgt[:, None], coords.expand(tgt.shape[0], -1, -1)).squeeze(1)  # (n, P)
            pos = F.binary_cross_entropy_with_logits(p, torch.ones_like(p), reduction="none")
            neg = F.binary_cross_entropy_with_logits(p, torch.zeros_like(p), reduction="none")
            cost_ce = (pos @ t.T + neg @ (1 - t).T) / p.shape[1]
            prob = p.sigmoid()
            numerator = 2 * prob @ t.T
            denominator = prob.sum(-1)[:, None] + t.sum(-1)[None, :]
            cost_dice = 1 - (numerator + 1) / (denominator + 1)
            return self.weight_ce * cost_ce + self.weight_dice * cost_dice


def _need(x: Tensor | None, name: str, term: object) -> Tensor:
    if x is None:
        raise ValueError(
            f"matching cost {_term_name(term)} needs predicted {name}, which this output does not have"
        )
    return x


def _term_name(term: object) -> str:
    return getattr(term, "name", None) or type(term).__name__


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to targets per image.

    ``cost = sum_t term.weight * term(pred_b, target_b)`` (``(Q, n)``), solved with
    ``scipy.optimize.linear_sum_assignment``. Terms with weight 0 are skipped.
    """

    def __init__(self, cost_terms: Sequence[CostTerm]):
        super().__init__()
        if not cost_terms:
            raise ValueError("HungarianMatcher needs at least one cost term")
        self.cost_terms = list(cost_terms)

    def cost_matrix(self, pred: QueryPredictions, target: dict[str, Tensor]) -> Tensor:
        """Weighted total cost ``(Q, n)`` float32 for one image; raises ValueError naming a non-finite term."""
        total = None
        for term in self.cost_terms:
            if term.weight == 0:
                continue
            c = term(pred, target).float()
            if not torch.isfinite(c).all():
                bad = (~torch.isfinite(c)).sum().item()
                raise NonFiniteCostError(
                    f"matching cost term {_term_name(term)} produced {bad} non-finite value(s) "
                    f"(nan/inf) in its {tuple(c.shape)} cost matrix; check the predictions and targets"
                )
            c = term.weight * c
            total = c if total is None else total + c
        if total is None:
            raise ValueError("every cost term has weight 0")
        return total

    @torch.no_grad()
    def forward(
        self, pred: QueryPredictions, targets: list[dict[str, Tensor]]
    ) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            pred: batched predictions ``logits (B, Q, C)`` (+ ``boxes``, ``masks`` as the terms need); each image's
                slice is handed to the cost terms.
            targets: ``B`` dicts with ``labels (n,)`` and ``boxes (n, 4)`` (and whatever the terms need).

        Returns:
            per image ``(pred_idx (k,), tgt_idx (k,))`` int64 on the predictions' device, ``k = min(Q, n)``,
            sorted by ``pred_idx``.
        """
        device = pred.logits.device
        indices = []
        for b, target in enumerate(targets):
            n = int(target["labels"].shape[0])
            pred_b = pred.image(b)
            if n == 0:
                for term in self.cost_terms:
                    if term.weight != 0 and hasattr(term, "on_empty_target"):
                        term.on_empty_target(pred_b)
                empty = torch.zeros(0, dtype=torch.long, device=device)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(pred_b, target)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (
                    torch.as_tensor(rows.astype(np.int64), device=device),
                    torch.as_tensor(cols.astype(np.int64), device=device),
                )
            )
        return indices

    def extra_repr(self) -> str:
        return ", ".join(f"{_term_name(t)}(weight={t.weight})" for t in self.cost_terms)
