"""Denoising queries: DN-DETR (positives only; what Mask DINO uses) and DINO contrastive denoising.

Layout of the ``P = pad_size`` denoising slots, which come BEFORE the ``Q`` matching queries:

- DN-DETR form (``contrastive=False``): ``num_groups`` groups of ``single_pad = max_gt`` slots; slot
  ``g * single_pad + j`` holds a noised copy of image-target ``j`` (``j < n_b``); slots ``j >= n_b`` are unused.
- DINO form (``contrastive=True``): ``num_groups`` groups of ``single_pad = 2 * max_gt`` slots; the first ``max_gt``
  of a group are positives (small noise), the next ``max_gt`` negatives (large noise) of the same targets.

In both forms ``denoising_indices`` pairs slot ``g * single_pad + j`` with target ``j`` (positives only).
Unused slots have zero content and zero anchor logits (box ``(0.5, 0.5, 0.5, 0.5)``), as the official code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .box_ops import inverse_sigmoid

__all__ = [
    "DenoisingMeta",
    "DenoisingQueries",
    "build_denoising_attn_mask",
    "build_denoising_queries",
    "denoising_indices",
    "split_denoising_outputs",
]


@dataclass(frozen=True)
class DenoisingMeta:
    """How the denoising part of a query sequence is laid out.

    Attributes:
        pad_size: ``P``, the number of denoising slots.
        num_groups: number of denoising groups.
        single_pad: slots per group (``max_gt``, or ``2 * max_gt`` when contrastive).
        contrastive: DINO form (positive + negative halves per group).
        max_gt: most targets in one image of the batch.
        num_matching_queries: ``Q``.
    """

    pad_size: int
    num_groups: int
    single_pad: int
    contrastive: bool = False
    max_gt: int = 0
    num_matching_queries: int = 0


@dataclass
class DenoisingQueries:
    """Inputs for the decoder's denoising part.

    Attributes:
        content: ``(B, P, C)`` label embeddings of the (noised) labels; zero in unused slots.
        anchors_unsigmoid: ``(B, P, 4)`` ``inverse_sigmoid`` of the noised cxcywh boxes; zero in unused slots.
        attn_mask: ``(P + Q, P + Q)`` bool, True = query (row) may NOT attend to key (column).
        meta: layout, for ``split_denoising_outputs`` and ``denoising_indices``.
        labels: ``(B, P)`` int64 noised labels (-1 in unused slots), for inspection and tests.
        boxes: ``(B, P, 4)`` noised cxcywh boxes (0 in unused slots).
    """

    content: Tensor
    anchors_unsigmoid: Tensor
    attn_mask: Tensor
    meta: DenoisingMeta
    labels: Tensor
    boxes: Tensor


def build_denoising_attn_mask(
    pad_size: int, single_pad: int, num_matching_queries: int, device: torch.device | None = None
) -> Tensor:
    """``(P + Q, P + Q)`` bool self-attention mask, True = blocked.

    Matching queries cannot see any denoising slot (they would read the answers); a denoising slot sees its own group
    and all matching queries, never another group.
    """
    size = pad_size + num_matching_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    if pad_size > 0:
        group = torch.arange(pad_size, device=device) // single_pad
        mask[:pad_size, :pad_size] = group[:, None] != group[None, :]
    return mask


def build_denoising_queries(
    targets: list[dict[str, Tensor]],
    label_embedding: nn.Module,
    num_classes: int,
    num_matching_queries: int,
    dn_number: int = 100,
    label_noise_ratio: float = 0.2,
    box_noise_scale: float = 0.4,
    contrastive: bool = False,
    generator: torch.Generator | None = None,
    inverse_sigmoid_eps: float = 1e-5,
    label_draws: Literal["all", "flipped"] = "all",
) -> DenoisingQueries | None:
    """Noised ground-truth queries for a batch.

    Args:
        targets: per image ``labels (n,)`` int64 and ``boxes (n, 4)`` cxcywh in ``[0, 1]``; ``n`` may differ and be 0.
        label_embedding: maps labels ``(...,)`` to content ``(..., C)`` (e.g. ``nn.Embedding(num_classes, C)``).
        num_classes: labels are flipped to a uniform random class in ``[0, num_classes)``.
        num_matching_queries: ``Q`` (size of the attention mask).
        dn_number: budget of denoising queries; ``num_groups = dn_number // max_gt``.
        label_noise_ratio: probability that a label is replaced by a random class (Mask DINO: 0.2 = noise_scale/2;
            DINO's ``label_noise_ratio=0.5`` corresponds to 0.25 here because DINO halves it).
        box_noise_scale: ``lambda``. DN-DETR form: ``box += U(-1, 1) * (w/2, h/2, w, h) * lambda`` in cxcywh.
            DINO form: corners move by ``U(0, 1) * (w/2, h/2) * lambda`` (positives) or ``U(1, 2) * ...``
            (negatives), random sign. Boxes are clamped to ``[0, 1]``.
        contrastive: DINO contrastive form (positive and negative halves per group). As DINO, it keeps at least one
            group when ``dn_number < max_gt``.
        generator: optional RNG for reproducible noise (None: the global RNG).
        inverse_sigmoid_eps: clamp of the anchors' ``inverse_sigmoid`` (Mask DINO 1e-5, DINO 1e-3).
        label_draws: which labels get a random class drawn. ``"all"``: one ``randint`` for every label, used where
            the flip is chosen. ``"flipped"``: ``randint`` only for the flipped ones, as the official DN-DETR / DINO
            code draws them; with the same seed that gives its exact noise (the values of a draw are the same,
            the number of draws differs, so every later draw shifts).

    Returns:
        ``DenoisingQueries`` or None when the batch has no target, or (DN-DETR form) ``dn_number // max_gt == 0``.
    """
    weight = next(iter(label_embedding.parameters()), None)
    device = weight.device if weight is not None else targets[0]["labels"].device
    batch_size = len(targets)
    known_num = [int(t["labels"].shape[0]) for t in targets]
    max_gt = max(known_num, default=0)
    if max_gt == 0 or dn_number <= 0:
        return None
    num_groups = dn_number // max_gt
    if contrastive:
        num_groups = max(num_groups, 1)
    if num_groups == 0:
        return None
    copies = 2 * num_groups if contrastive else num_groups
    single_pad = 2 * max_gt if contrastive else max_gt
    pad_size = num_groups * single_pad

    labels = torch.cat([t["labels"].to(device=device, dtype=torch.long) for t in targets])  # (N,)
    boxes = torch.cat([t["boxes"].to(device=device, dtype=torch.float32) for t in targets])  # (N, 4)
    batch_idx = torch.cat(
        [torch.full((n,), i, dtype=torch.long, device=device) for i, n in enumerate(known_num)]
    )
    within = torch.cat([torch.arange(n, device=device) for n in known_num])  # index j inside its image
    n_total = labels.shape[0]

    # copy c of all targets; in the contrastive form copy 2g is the positive and 2g+1 the negative half of group g
    known_labels = labels.repeat(copies)
    known_boxes = boxes.repeat(copies, 1)
    known_bid = batch_idx.repeat(copies)
    copy_id = torch.arange(copies, device=device).repeat_interleave(n_total)
    slot = within.repeat(copies) + copy_id * max_gt

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, device=device, generator=generator)

    if label_draws not in ("all", "flipped"):
        raise ValueError(f"label_draws must be 'all' or 'flipped', got {label_draws!r}")
    if label_noise_ratio > 0:
        flip = rand(known_labels.shape[0]) < label_noise_ratio
        if label_draws == "flipped":
            chosen = flip.nonzero().view(-1)
            new = torch.randint(
                0, num_classes, chosen.shape, device=device, generator=generator, dtype=torch.long
            )
            known_labels = known_labels.scatter(0, chosen, new)
        else:
            random_labels = torch.randint(
                0, num_classes, known_labels.shape, device=device, generator=generator, dtype=torch.long
            )
            known_labels = torch.where(flip, random_labels, known_labels)

    if box_noise_scale > 0:
        if contrastive:
            xy, wh = known_boxes[:, :2], known_boxes[:, 2:]
            corners = torch.cat([xy - wh / 2, xy + wh / 2], -1)
            diff = torch.cat([wh / 2, wh / 2], -1)
            sign = (
                torch.randint(0, 2, known_boxes.shape, device=device, generator=generator).float() * 2.0 - 1.0
            )
            magnitude = rand(*known_boxes.shape)
            magnitude = magnitude + (copy_id % 2 == 1).float()[:, None]  # negatives: noise in [1, 2)
            corners = (corners + sign * magnitude * diff * box_noise_scale).clamp(0.0, 1.0)
            known_boxes = torch.cat(
                [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], -1
            )
        else:
            diff = torch.cat([known_boxes[:, 2:] / 2, known_boxes[:, 2:]], -1)
            noise = (rand(*known_boxes.shape) * 2.0 - 1.0) * diff * box_noise_scale
            known_boxes = (known_boxes + noise).clamp(0.0, 1.0)

    label_embed = label_embedding(known_labels)  # (copies*N, C)
    content = label_embed.new_zeros(batch_size, pad_size, label_embed.shape[-1])
    content[known_bid, slot] = label_embed
    anchors = known_boxes.new_zeros(batch_size, pad_size, 4)
    anchors[known_bid, slot] = inverse_sigmoid(known_boxes, inverse_sigmoid_eps)
    out_labels = torch.full((batch_size, pad_size), -1, dtype=torch.long, device=device)
    out_labels[known_bid, slot] = known_labels
    out_boxes = known_boxes.new_zeros(batch_size, pad_size, 4)
    out_boxes[known_bid, slot] = known_boxes

    meta = DenoisingMeta(
        pad_size=pad_size,
        num_groups=num_groups,
        single_pad=single_pad,
        contrastive=contrastive,
        max_gt=max_gt,
        num_matching_queries=num_matching_queries,
    )
    attn_mask = build_denoising_attn_mask(pad_size, single_pad, num_matching_queries, device)
    return DenoisingQueries(content, anchors, attn_mask, meta, out_labels, out_boxes)


def split_denoising_outputs(x: Tensor, meta: DenoisingMeta | None) -> tuple[Tensor | None, Tensor]:
    """``x (B, P + Q, ...)`` -> ``(dn (B, P, ...), matching (B, Q, ...))``; ``(None, x)`` when ``meta`` is None."""
    if meta is None:
        return None, x
    return x[:, : meta.pad_size], x[:, meta.pad_size :]


def denoising_indices(targets: list[dict[str, Tensor]], meta: DenoisingMeta) -> list[tuple[Tensor, Tensor]]:
    """Fixed (query, target) pairs for the denoising loss: slot ``g * single_pad + j`` <-> target ``j`` for every
    group ``g`` (positives only).

    Returns:
        per image ``(query_idx (num_groups * n,), target_idx (num_groups * n,))`` int64, group-major.
    """
    out = []
    for t in targets:
        device = t["labels"].device
        n = int(t["labels"].shape[0])
        j = torch.arange(n, dtype=torch.long, device=device)
        offsets = torch.arange(meta.num_groups, dtype=torch.long, device=device) * meta.single_pad
        out.append(((offsets[:, None] + j[None]).flatten(), j.repeat(meta.num_groups)))
    return out
