"""Unified denoising (Mask DINO, Sec. 3.4): noised ground-truth boxes and labels are fed to the decoder as extra
queries, which must reconstruct the boxes, the labels AND the masks of their objects ("DN: seg").

Everything of it is here, on detr-core's generic DN-DETR query builder:

* :func:`prepare_denoising`: ``scalar = dn_num // max_gt`` groups (no DN when 0 or no target), each ground truth
  repeated once per group, positives only (no contrastive negatives). Labels flip to a random class with probability
  ``noise_scale / 2``, boxes move by ``U(-1, 1) * (w/2, h/2, w, h) * noise_scale`` in cxcywh (clamped to [0, 1]).
  Content = ``label_enc(label)``, anchor = ``inverse_sigmoid(box)``.
* :func:`with_denoising_queries`: the DN queries come BEFORE the matching queries, with a self-attention mask
  (matching queries cannot see DN queries, DN groups cannot see each other).
* the mask part: the DN queries go through the same class / box / MASK heads as the matching queries
  (:meth:`MaskDINOPredictor.forward` predicts masks for every query in training), :func:`split_predictions` separates
  them per decoder level, and :func:`denoising_loss_names` makes the criterion apply the mask BCE + dice losses to them
  too (fixed query-target pairs, no matching), next to the label and box losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from detr_core.denoising import DenoisingQueries, build_denoising_queries
from detr_core.outputs import DenoisingPredictions, QueryPredictions, split_denoising

__all__ = [
    "DenoisingMode",
    "denoising_loss_names",
    "prepare_denoising",
    "split_predictions",
    "with_denoising_queries",
]

#: ``no``: no denoising; ``seg``: labels, boxes and masks of the DN queries are supervised.
DenoisingMode = Literal["no", "seg"]


def prepare_denoising(
    targets: Sequence[dict[str, Tensor]],
    label_enc: nn.Module,
    num_classes: int,
    num_queries: int,
    dn_num: int = 100,
    noise_scale: float = 0.4,
) -> DenoisingQueries | None:
    """Noised GT queries for one batch (``targets``: ``labels (n,)``, ``boxes (n, 4)`` cxcywh in [0, 1]).

    Returns None when the batch has no target or ``dn_num // max_gt == 0`` (the step then trains without DN).
    """
    return build_denoising_queries(
        list(targets),
        label_enc,
        num_classes,
        num_queries,
        dn_number=dn_num,
        label_noise_ratio=noise_scale * 0.5,
        box_noise_scale=noise_scale,
        contrastive=False,
    )


def with_denoising_queries(
    content: Tensor, anchors_unsigmoid: Tensor, dn: DenoisingQueries | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Prepend the DN queries: ``(content (B, P+Q, C), anchors (B, P+Q, 4), self-attention mask (P+Q, P+Q) or
    None)``; the inputs unchanged (and no mask) without denoising."""
    if dn is None:
        return content, anchors_unsigmoid, None
    return (
        torch.cat([dn.content, content], 1),
        torch.cat([dn.anchors_unsigmoid, anchors_unsigmoid], 1),
        dn.attn_mask,
    )


def split_predictions(
    levels: list[QueryPredictions], dn: DenoisingQueries | None
) -> tuple[list[QueryPredictions], DenoisingPredictions | None]:
    """Each decoder level's predictions without the DN queries, and the DN queries' own (class, box AND mask)
    predictions; ``(levels, None)`` without denoising."""
    if dn is None:
        return levels, None
    return split_denoising(levels, dn.meta)


def denoising_loss_names(mode: DenoisingMode, losses: Sequence[str]) -> list[str]:
    """The criterion's losses that also supervise the DN queries: all of them (labels, boxes and masks) for
    ``seg``, none for ``no``."""
    return list(losses) if mode == "seg" else []
