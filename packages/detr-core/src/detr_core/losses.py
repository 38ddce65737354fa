"""Set-prediction losses: focal classification, box L1 + GIoU, point-sampled dice / BCE for masks, and a generic
``SetCriterion`` that applies pluggable loss functions to every decoder output (final, auxiliary, encoder
"interm" and denoising).

Normalisation follows DETR/DINO: every loss is a sum over matched pairs (or over queries) divided by
``num_boxes``, the number of targets in the batch averaged over ranks (``>= 1``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
import torchvision.ops as tvops
from torch import Tensor, nn

from .box_ops import box_cxcywh_to_xyxy
from .denoising import denoising_indices
from .distributed import reduce_num_boxes
from .outputs import DenoisingPredictions, DetectionOutputs, QueryPredictions

__all__ = [
    "BoxLoss",
    "CrossEntropyLabelLoss",
    "FocalLabelLoss",
    "LossFn",
    "PointMaskLoss",
    "SetCriterion",
    "box_l1_loss",
    "dice_loss",
    "expand_weight_dict",
    "giou_loss",
    "matched_predictions",
    "matched_targets",
    "point_sample",
    "sigmoid_ce_loss",
    "sigmoid_focal_loss",
    "uncertain_point_coords_with_randomness",
]

Indices = list[tuple[Tensor, Tensor]]
LossFn = Callable[[QueryPredictions, list[dict], Indices, float], dict[str, Tensor]]
"""``(predictions of ONE decoder level, targets, indices, num_boxes) -> {loss name: scalar}``."""


# ----------------------------------------------------------------------------- elementary losses


def sigmoid_focal_loss(
    logits: Tensor, labels_onehot: Tensor, num_boxes: float, alpha: float = 0.25, gamma: float = 2.0
) -> Tensor:
    """Focal loss (Lin et al.) over all queries and classes, normalised as DINO:
    ``focal.mean(1).sum() / num_boxes * Q`` = ``focal.sum() / num_boxes``.

    Args:
        logits: ``(B, Q, C)``. labels_onehot: ``(B, Q, C)`` in ``{0, 1}`` (all zero for unmatched queries).
        num_boxes: normaliser. alpha: weight of positives (negative: no weighting). gamma: focusing exponent.

    Returns:
        scalar.
    """
    loss = tvops.sigmoid_focal_loss(
        logits, labels_onehot.to(logits.dtype), alpha=alpha, gamma=gamma, reduction="none"
    )
    return loss.mean(1).sum() / num_boxes * logits.shape[1]


def box_l1_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: float) -> Tensor:
    """Sum of absolute differences of matched cxcywh boxes ``(K, 4)`` and ``(K, 4)`` / ``num_boxes`` -> scalar."""
    return F.l1_loss(src_boxes, target_boxes, reduction="sum") / num_boxes


def giou_loss(src_boxes: Tensor, target_boxes: Tensor, num_boxes: float, eps: float = 1e-7) -> Tensor:
    """``sum(1 - GIoU)`` of matched cxcywh boxes ``(K, 4)``, ``(K, 4)`` (element-wise pairs) / ``num_boxes``.

    GIoU = ``inter / (union + eps) - (hull - union) / (hull + eps)`` (torchvision's loss; its default
    ``eps`` 1e-7; Mask DINO uses 1e-6)."""
    if src_boxes.shape[0] == 0:
        return src_boxes.sum() * 0.0
    loss = tvops.generalized_box_iou_loss(
        box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes), reduction="sum", eps=eps
    )
    return loss / num_boxes


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """``sum_i [1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)] / num_masks`` with ``p = sigmoid(logits)``.

    Args:
        logits: ``(N, P)`` mask logits (at ``P`` points or pixels). targets: ``(N, P)`` in ``[0, 1]``.
    """
    p = logits.sigmoid().flatten(1)
    t = targets.flatten(1).to(p.dtype)
    numerator = 2 * (p * t).sum(-1)
    denominator = p.sum(-1) + t.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy with logits, mean over the ``P`` points, summed over the ``N`` masks, / ``num_masks``.

    Args:
        logits: ``(N, P)``. targets: ``(N, P)`` in ``[0, 1]``.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), reduction="none")
    return loss.flatten(1).mean(1).sum() / num_masks


# ----------------------------------------------------------------------------- point sampling (PointRend)


def point_sample(input: Tensor, point_coords: Tensor, **kwargs) -> Tensor:
    """Bilinear samples of ``input`` at normalised points (``F.grid_sample``, ``align_corners=False``).

    Args:
        input: ``(N, C, H, W)``.
        point_coords: ``(N, P, 2)`` ``(x, y)`` in ``[0, 1]`` (``(0, 0)`` = top-left corner of the image, not the
            centre of the top-left pixel), or ``(N, Hg, Wg, 2)``.
        kwargs: passed to ``F.grid_sample``.

    Returns:
        ``(N, C, P)`` (or ``(N, C, Hg, Wg)`` for grid-shaped coords), in the wider of the two dtypes: half-precision
        logits sampled at float32 points give float32 samples at full coordinate precision (what autocast does
        with ``grid_sample``), rather than rounding the points to half precision.
    """
    add_dim = point_coords.dim() == 3
    if add_dim:
        point_coords = point_coords.unsqueeze(2)
    kwargs.setdefault("align_corners", False)
    if point_coords.dtype != input.dtype:
        dtype = torch.promote_types(point_coords.dtype, input.dtype)
        input, point_coords = input.to(dtype), point_coords.to(dtype)
    out = F.grid_sample(input, 2.0 * point_coords - 1.0, **kwargs)
    return out.squeeze(3) if add_dim else out


def _uncertainty(logits: Tensor) -> Tensor:
    # the closer to the decision boundary, the more uncertain
    return -logits.abs()


def uncertain_point_coords_with_randomness(
    coarse_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    uncertainty_func: Callable[[Tensor], Tensor] = _uncertainty,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend training point selection.

    Draw ``int(num_points * oversample_ratio)`` uniform random points, keep the ``int(importance_sample_ratio *
    num_points)`` most uncertain (highest ``uncertainty_func`` of the sampled logits, default ``-|logit|``), and add
    uniform random points to reach ``num_points``.

    Args:
        coarse_logits: ``(N, 1, H, W)`` class-agnostic mask logits.

    Returns:
        ``(N, num_points, 2)`` ``(x, y)`` in ``[0, 1]``.
    """
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    n = coarse_logits.shape[0]
    device, dtype = coarse_logits.device, coarse_logits.dtype
    num_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, num_sampled, 2, device=device, dtype=dtype, generator=generator)
    uncertainties = uncertainty_func(point_sample(coarse_logits, coords))  # (N, 1, num_sampled)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainties[:, 0, :], k=num_uncertain, dim=1).indices  # (N, num_uncertain)
    coords = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = torch.rand(n, num_random, 2, device=device, dtype=dtype, generator=generator)
        coords = torch.cat([coords, extra], 1)
    return coords


# ----------------------------------------------------------------------------- helpers for loss functions


def matched_predictions(x: Tensor, indices: Indices) -> Tensor:
    """Predictions of the matched queries: ``x (B, Q, ...)`` -> ``(K, ...)``, images concatenated in order."""
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(x.device)
    src_idx = torch.cat([src for src, _ in indices]).to(x.device)
    return x[batch_idx, src_idx]


def matched_targets(targets: list[dict[str, Tensor]], indices: Indices, key: str) -> Tensor:
    """``targets[b][key][tgt_idx]`` concatenated over images -> ``(K, ...)``."""
    return torch.cat([t[key][j.to(t[key].device)] for t, (_, j) in zip(targets, indices)])


# ----------------------------------------------------------------------------- pluggable loss functions


def _need(x: Tensor | None, name: str, fn: object) -> Tensor:
    if x is None:
        raise ValueError(f"{type(fn).__name__} needs predicted {name}, which this output does not have")
    return x


class FocalLabelLoss:
    """Sigmoid focal classification over ``logits (B, Q, C)``; unmatched queries are background (all-zero
    one-hot). Produces ``{key: scalar}``."""

    def __init__(self, num_classes: int, alpha: float = 0.25, gamma: float = 2.0, key: str = "loss_ce"):
        self.num_classes, self.alpha, self.gamma, self.key = num_classes, alpha, gamma, key

    def __call__(
        self, pred: QueryPredictions, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        logits = pred.logits
        b, q, c = logits.shape
        target_classes = torch.full((b, q), c, dtype=torch.long, device=logits.device)
        batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([s for s, _ in indices]).to(logits.device)
        target_classes[batch_idx, src_idx] = matched_targets(targets, indices, "labels").to(logits.device)
        onehot = F.one_hot(target_classes, c + 1)[..., :c]
        return {self.key: sigmoid_focal_loss(logits, onehot, num_boxes, self.alpha, self.gamma)}


class CrossEntropyLabelLoss:
    """Softmax cross-entropy over ``C + 1`` classes (last = no object, weight ``eos_coef``), mean weighted by class
    weights as DETR. Produces ``{key: scalar}``."""

    def __init__(self, num_classes: int, eos_coef: float = 0.1, key: str = "loss_ce"):
        self.num_classes, self.eos_coef, self.key = num_classes, eos_coef, key

    def __call__(
        self, pred: QueryPredictions, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        logits = pred.logits  # (B, Q, C+1)
        b, q, _ = logits.shape
        weight = torch.ones(self.num_classes + 1, device=logits.device, dtype=logits.dtype)
        weight[-1] = self.eos_coef
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.long, device=logits.device)
        batch_idx = torch.cat([torch.full_like(s, i) for i, (s, _) in enumerate(indices)]).to(logits.device)
        src_idx = torch.cat([s for s, _ in indices]).to(logits.device)
        target_classes[batch_idx, src_idx] = matched_targets(targets, indices, "labels").to(logits.device)
        return {self.key: F.cross_entropy(logits.transpose(1, 2), target_classes, weight)}


class BoxLoss:
    """L1 and GIoU losses of matched ``boxes (B, Q, 4)`` vs target ``boxes`` (cxcywh, normalised).
    Produces ``{"loss_bbox": scalar, "loss_giou": scalar}``; ``giou_eps``: see :func:`giou_loss`."""

    def __init__(self, giou_eps: float = 1e-7):
        self.giou_eps = giou_eps

    def __call__(
        self, pred: QueryPredictions, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        src = matched_predictions(_need(pred.boxes, "boxes", self), indices)
        tgt = matched_targets(targets, indices, "boxes").to(src)
        return {
            "loss_bbox": box_l1_loss(src, tgt, num_boxes),
            "loss_giou": giou_loss(src, tgt, num_boxes, self.giou_eps),
        }


class PointMaskLoss:
    """Point-sampled mask losses of matched ``masks (B, Q, H, W)`` logits vs target ``masks (n, Ht, Wt)``
    (Mask2Former / Mask DINO): per matched pair, ``num_points`` points chosen by
    ``uncertain_point_coords_with_randomness`` on the prediction (no grad), then ``sigmoid_ce_loss`` and
    ``dice_loss`` / ``num_boxes``. Target masks must cover the same (padded) frame as the predictions; points are
    normalised, so resolutions may differ. Produces ``{"loss_mask", "loss_dice"}``.
    """

    def __init__(
        self,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        generator: torch.Generator | None = None,
    ):
        self.num_points, self.oversample_ratio = num_points, oversample_ratio
        self.importance_sample_ratio, self.generator = importance_sample_ratio, generator

    def __call__(
        self, pred: QueryPredictions, targets: list[dict], indices: Indices, num_boxes: float
    ) -> dict[str, Tensor]:
        masks = _need(pred.masks, "masks", self)
        src = matched_predictions(masks, indices)[:, None]  # (K, 1, H, W)
        if src.shape[0] == 0:
            zero = masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        with torch.no_grad():
            coords = uncertain_point_coords_with_randomness(
                src.float(),
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
                generator=self.generator,
            )
            labels, start = [], 0
            for t, (_, j) in zip(targets, indices):
                k = len(j)
                masks = t["masks"][j.to(t["masks"].device)].to(device=src.device, dtype=torch.float32)[
                    :, None
                ]
                labels.append(point_sample(masks, coords[start : start + k]).squeeze(1))
                start += k
            point_labels = torch.cat(labels)  # (K, P)
        # float32 points as the official code (torch.rand without dtype); point_sample keeps their precision
        point_logits = point_sample(src, coords).squeeze(1)  # (K, P)
        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_boxes),
            "loss_dice": dice_loss(point_logits, point_labels, num_boxes),
        }


# ----------------------------------------------------------------------------- criterion


class SetCriterion(nn.Module):
    """Applies every ``LossFn`` to every decoder output, with Hungarian matching (or fixed denoising pairs).

    Keys of the returned losses (``x`` = each loss function's own names, e.g. ``loss_ce``):

    - ``outputs.final`` -> ``loss_x``; ``outputs.aux[i]`` -> ``loss_x_{i}``; ``outputs.interm`` -> ``loss_x_interm``;
    - ``outputs.denoising`` (no matching: ``denoising_indices`` pairs, normaliser ``num_boxes * num_groups``):
      its ``final`` -> ``loss_x_dn``, ``aux[i]`` -> ``loss_x_dn_{i}``.

    Args:
        matcher: ``(predictions, targets) -> indices`` (e.g. ``HungarianMatcher``).
        losses: name -> ``LossFn``; applied in order, their dicts merged.
        weight_dict: loss key -> weight, used by ``weighted`` (``forward`` returns UNweighted losses, as DETR).
        dn_losses: names of ``losses`` to apply to the denoising outputs (default: all).
        pad_missing_dn: when a batch has no denoising outputs, still emit the ``_dn`` keys as zeros (connected to
            the graph), so every step has the same keys (needed with DDP / logging).
    """

    def __init__(
        self,
        matcher: Callable[[QueryPredictions, list[dict]], Indices],
        losses: Mapping[str, LossFn],
        weight_dict: Mapping[str, float],
        dn_losses: Sequence[str] | None = None,
        pad_missing_dn: bool = False,
    ):
        super().__init__()
        self.matcher = matcher
        self.losses = dict(losses)
        self.weight_dict = dict(weight_dict)
        self.dn_losses = list(self.losses) if dn_losses is None else list(dn_losses)
        unknown = [n for n in self.dn_losses if n not in self.losses]
        if unknown:
            raise ValueError(f"dn_losses {unknown} are not in losses {list(self.losses)}")
        self.pad_missing_dn = pad_missing_dn

    def _compute_losses(
        self,
        names: Sequence[str],
        pred: QueryPredictions,
        targets: list[dict],
        indices: Indices,
        num_boxes: float,
        suffix: str,
    ) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        for name in names:
            for k, v in self.losses[name](pred, targets, indices, num_boxes).items():
                out[k + suffix] = v
        return out

    def forward(self, outputs: DetectionOutputs, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: the head's :class:`~detr_core.outputs.DetectionOutputs`.
            targets: per image ``labels (n,)`` int64, ``boxes (n, 4)`` cxcywh in ``[0, 1]`` (+ what losses need).

        Returns:
            unweighted losses, scalar tensors keyed as in the class docstring.
        """
        main = outputs.final
        device = main.logits.device
        num_boxes = reduce_num_boxes(sum(int(t["labels"].shape[0]) for t in targets), device)
        names = list(self.losses)
        aux_levels = list(outputs.aux)

        # The denoising level that goes with each matched level: None = the final one, i = aux[i].
        dn = outputs.denoising
        dn_levels: dict[int | None, QueryPredictions] = {}
        dn_indices: Indices = []
        dn_norm, dn_scale = num_boxes, 1.0
        if dn is not None:
            dn_indices = denoising_indices(targets, dn.meta)
            dn_norm = num_boxes * dn.meta.num_groups
            dn_levels = dn.levels()
        elif self.pad_missing_dn and self.dn_losses:
            # zeros connected to the graph, so that every step has the same keys
            empty = torch.zeros(0, dtype=torch.long, device=device)
            dn_indices = [(empty, empty.clone()) for _ in targets]
            dn_levels[None] = main
            dn_levels.update(enumerate(aux_levels))
            dn_scale = 0.0

        def denoising(level: int | None) -> dict[str, Tensor]:
            if level not in dn_levels or not self.dn_losses:
                return {}
            out = self._denoising_level_losses(level, dn_levels.pop(level), targets, dn_indices, dn_norm)
            return out if dn_scale == 1.0 else {k: v * dn_scale for k, v in out.items()}

        # DINO / Mask DINO order: final (matched, then denoising), each aux level (matched, then its denoising),
        # then the encoder proposals. The point-sampled mask losses draw random numbers, so the order is what
        # makes a seeded run reproduce the official losses.
        losses = self._compute_losses(names, main, targets, self.matcher(main, targets), num_boxes, "")
        losses.update(denoising(None))
        for i, aux in enumerate(aux_levels):
            losses.update(
                self._compute_losses(names, aux, targets, self.matcher(aux, targets), num_boxes, f"_{i}")
            )
            losses.update(denoising(i))
        for level in sorted(k for k in dn_levels if k is not None):  # denoising levels without a matched twin
            losses.update(denoising(level))
        if outputs.interm is not None:
            interm = outputs.interm
            losses.update(
                self._compute_losses(
                    names, interm, targets, self.matcher(interm, targets), num_boxes, "_interm"
                )
            )
        return losses

    def denoising_losses(
        self, dn: DenoisingPredictions, targets: list[dict[str, Tensor]], num_boxes: float
    ) -> dict[str, Tensor]:
        """Losses of the denoising part alone (keys ``_dn`` and ``_dn_{i}``), fixed pairs, normaliser
        ``num_boxes * dn.meta.num_groups``."""
        indices = denoising_indices(targets, dn.meta)
        nb = num_boxes * dn.meta.num_groups
        losses: dict[str, Tensor] = {}
        for level, pred in dn.levels().items():
            losses.update(self._denoising_level_losses(level, pred, targets, indices, nb))
        return losses

    def _denoising_level_losses(
        self,
        level: int | None,
        pred: QueryPredictions,
        targets: list[dict],
        indices: Indices,
        num_boxes: float,
    ) -> dict[str, Tensor]:
        """``dn_losses`` of one denoising level, keyed ``_dn`` (final) or ``_dn_{level}``."""
        suffix = "_dn" if level is None else f"_dn_{level}"
        return self._compute_losses(self.dn_losses, pred, targets, indices, num_boxes, suffix)

    def weighted(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``{k: losses[k] * weight_dict[k]}`` for keys with a weight (others, e.g. logging-only, are dropped)."""
        return {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}


def expand_weight_dict(
    base: Mapping[str, float],
    num_aux: int,
    interm: bool = True,
    dn: bool = True,
    dn_keys: Sequence[str] | None = None,
) -> dict[str, float]:
    """Weights for every key ``SetCriterion`` emits: ``base`` plus ``_{i}`` for ``i < num_aux``, ``_interm``, and
    (for ``dn_keys``, default all of ``base``) ``_dn`` and ``_dn_{i}``."""
    out = dict(base)
    for i in range(num_aux):
        out.update({f"{k}_{i}": w for k, w in base.items()})
    if interm:
        out.update({f"{k}_interm": w for k, w in base.items()})
    if dn:
        keys = list(base) if dn_keys is None else list(dn_keys)
        out.update({f"{k}_dn": base[k] for k in keys})
        for i in range(num_aux):
            out.update({f"{k}_dn_{i}": base[k] for k in keys})
    return out
