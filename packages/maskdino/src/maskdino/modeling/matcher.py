"""Mask DINO's hybrid matcher: class + box + mask costs in one Hungarian assignment.

``C = 5 mask_bce + 4 focal_class + 5 dice + 5 box_l1 + 2 giou`` per image (official ``HungarianMatcher``,
``cost=["cls", "box", "mask"]``). The two mask terms are evaluated on ``num_points`` (12544) UNIFORM random points
drawn once per image and matcher call and shared by the predicted and target masks of that image, in float32:
``detr_core.matcher.PointMaskCost``, next to the generic class and box terms.
"""

from __future__ import annotations

from detr_core.matcher import BoxL1Cost, FocalClassCost, GIoUCost, HungarianMatcher, PointMaskCost

from ..config.model import LossConfig

__all__ = ["GIOU_EPS", "build_matcher"]

#: The official GIoU (``maskdino/utils/box_ops.py``, cost and loss): ``inter / (union + 1e-6) - (hull - union) /
#: (hull + 1e-6)``. Plain GIoU differs by ~1e-3 for 20-pixel boxes and ~0.3 for 1-pixel ones.
GIOU_EPS = 1e-6


def build_matcher(cfg: LossConfig, use_boxes: bool = True) -> HungarianMatcher:
    """The official cost: point mask costs, focal class cost, box L1 and GIoU."""
    terms: list = [PointMaskCost(cfg.cost_mask_weight, cfg.cost_dice_weight, cfg.train_num_points)]
    # the official matcher keeps the focal cost with SEMANTIC_CE_LOSS too (sigmoid of the C+1 logits at the labels)
    terms.append(FocalClassCost(cfg.cost_class_weight, cfg.focal_alpha, cfg.focal_gamma))
    if use_boxes:
        terms += [BoxL1Cost(cfg.cost_box_weight), GIoUCost(cfg.cost_giou_weight, eps=GIOU_EPS)]
    return HungarianMatcher(terms)
