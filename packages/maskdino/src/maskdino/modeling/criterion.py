"""Mask DINO's losses on top of ``detr_core.losses.SetCriterion``.

Per decoder output (final, 9 auxiliary incl. the initial prediction, the encoder "interm" output and the
denoising outputs): classification (sigmoid focal, or softmax CE over C+1 with no-object weight 0.1 for the
semantic variant), box L1 + GIoU, and the mask BCE + dice on ``train_num_points`` points chosen by PointRend
importance sampling on the predicted masks (3x oversampling, 75% most uncertain). All are normalised by the
number of target masks in the batch averaged over ranks (``>= 1``); denoising losses by that number times the
number of denoising groups. The weights are the official ones: 105 weighted terms for the R50 instance preset.
"""

from __future__ import annotations

import re
from collections.abc import Collection

import torch
from torch import Tensor

from detr_core.losses import (
    BoxLoss,
    CrossEntropyLabelLoss,
    FocalLabelLoss,
    PointMaskLoss,
    SetCriterion,
    expand_weight_dict,
)
from detr_core.outputs import DetectionOutputs, QueryPredictions

from ..config.model import MaskDINOConfig
from .denoising import denoising_loss_names
from .matcher import GIOU_EPS, build_matcher

__all__ = ["MaskDINOCriterion", "PanopticBoxLoss", "build_criterion", "build_weight_dict"]

Indices = list[tuple[Tensor, Tensor]]


class PanopticBoxLoss(BoxLoss):
    """Box losses on "thing" targets only (official ``PANO_BOX_LOSS``), still normalised by all masks."""

    def __init__(self, thing_classes: Collection[int], giou_eps: float = GIOU_EPS):
        super().__init__(giou_eps)
        self.thing_classes = sorted(set(thing_classes))

    def __call__(
        self, pred: QueryPredictions, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        kept = []
        for t, (src, tgt) in zip(targets, indices):
            things = torch.isin(
                t["labels"][tgt], torch.as_tensor(self.thing_classes, device=t["labels"].device)
            )
            kept.append((src[things.to(src.device)], tgt[things]))
        return super().__call__(pred, targets, kept, num_boxes)


def build_weight_dict(cfg: MaskDINOConfig) -> dict[str, float]:
    """The weight of every loss key the criterion emits, with the official values: class / mask / dice / box / GIoU
    for the final output, each auxiliary level (``_{i}``), the encoder output (``_interm``) and the denoising
    outputs (``_dn``, ``_dn_{i}``)."""
    lc, dc = cfg.loss, cfg.decoder
    base = {"loss_ce": lc.class_weight, "loss_mask": lc.mask_weight, "loss_dice": lc.dice_weight}
    if lc.box_loss:
        base.update({"loss_bbox": lc.box_weight, "loss_giou": lc.giou_weight})
    return expand_weight_dict(
        base, num_aux=dc.dec_layers if lc.deep_supervision else 0, interm=dc.two_stage, dn=dc.dn == "seg"
    )


_DN_AUX = re.compile(r"_dn_(\d+)$")


class MaskDINOCriterion(SetCriterion):
    """``SetCriterion`` with Mask DINO's bookkeeping.

    Without an encoder output (no two-stage), the official code skips the denoising loss of the first auxiliary
    output (the initial prediction from learned queries); ``dn_aux_start`` reproduces that.
    ``forward`` returns UNweighted losses; ``weighted`` applies ``weight_dict``.
    """

    def __init__(self, *args, dn_aux_start: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.dn_aux_start = dn_aux_start

    def forward(self, outputs: DetectionOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        losses = super().forward(outputs, targets)
        if self.dn_aux_start:
            losses = {
                k: v
                for k, v in losses.items()
                if not ((m := _DN_AUX.search(k)) and int(m.group(1)) < self.dn_aux_start)
            }
        return losses


def build_criterion(cfg: MaskDINOConfig) -> MaskDINOCriterion:
    """Matcher, loss functions and weights of the official config."""
    lc, dc = cfg.loss, cfg.decoder
    losses: dict = {}
    if dc.semantic_ce_loss:
        losses["labels"] = CrossEntropyLabelLoss(cfg.num_classes, eos_coef=lc.no_object_weight)
    else:
        losses["labels"] = FocalLabelLoss(cfg.num_classes, alpha=lc.focal_alpha, gamma=lc.focal_gamma)
    losses["masks"] = PointMaskLoss(lc.train_num_points, lc.oversample_ratio, lc.importance_sample_ratio)
    if lc.box_loss:
        losses["boxes"] = (
            PanopticBoxLoss(cfg.inference.thing_classes) if lc.pano_box_loss else BoxLoss(giou_eps=GIOU_EPS)
        )
    return MaskDINOCriterion(
        build_matcher(lc),
        losses,
        build_weight_dict(cfg),
        dn_losses=denoising_loss_names(dc.dn, list(losses)),
        pad_missing_dn=dc.dn == "seg",
        dn_aux_start=0 if dc.two_stage else 1,
    )
