"""Mask DINO's denoising training ("DN: seg") on detr_core's generic DN-DETR query builder.

``scalar = dn_num // max_gt`` groups (no DN when 0 or no target), each ground truth repeated once per group,
positives only (no contrastive negatives). Labels flip to a random class with probability ``noise_scale / 2``,
boxes move by ``U(-1, 1) * (w/2, h/2, w, h) * noise_scale`` in cxcywh (clamped to [0, 1]). Content =
``label_enc(label)``, anchor = ``inverse_sigmoid(box)``; DN queries come BEFORE the matching queries with a
self-attention mask (matching queries cannot see DN queries, DN groups cannot see each other).

Mask DINO's own part ("seg"): DN queries go through the same heads as the matching queries, so they also
predict masks, and their mask/dice losses (mask reconstruction) are added to the label and box losses.
"""

from __future__ import annotations

from torch import Tensor, nn

from detr_core.denoising import DenoisingQueries, build_denoising_queries

__all__ = ["prepare_denoising"]


def prepare_denoising(
    targets: list[dict[str, Tensor]],
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
        targets,
        label_enc,
        num_classes,
        num_queries,
        dn_number=dn_num,
        label_noise_ratio=noise_scale * 0.5,
        box_noise_scale=noise_scale,
        contrastive=False,
    )
