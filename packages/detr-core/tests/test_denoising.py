"""Denoising queries: layout, attention mask element by element, noise bounds, indices, split."""

import torch
from torch import nn

from detr_core import box_ops
from detr_core.denoising import (
    build_denoising_attn_mask,
    build_denoising_queries,
    denoising_indices,
    split_denoising_outputs,
)


def _targets():
    return [
        {"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.2, 0.4]])},
        {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
    ]


def _official_loop_mask(pad_size, single_pad, scalar, num_queries):
    # the official DN-DETR / Mask DINO loop, transcribed as a reference
    tgt_size = pad_size + num_queries
    m = torch.zeros(tgt_size, tgt_size, dtype=torch.bool)
    m[pad_size:, :pad_size] = True
    for i in range(scalar):
        if i == 0:
            m[single_pad * i : single_pad * (i + 1), single_pad * (i + 1) : pad_size] = True
        if i == scalar - 1:
            m[single_pad * i : single_pad * (i + 1), : single_pad * i] = True
        else:
            m[single_pad * i : single_pad * (i + 1), single_pad * (i + 1) : pad_size] = True
            m[single_pad * i : single_pad * (i + 1), : single_pad * i] = True
    return m


def test_attention_mask_element_by_element():
    emb = nn.Embedding(3, 8)
    dn = build_denoising_queries(_targets(), emb, 3, num_matching_queries=3, dn_number=4)
    assert dn.meta.num_groups == 2 and dn.meta.single_pad == 2 and dn.meta.pad_size == 4
    T, F = True, False
    expected = torch.tensor(
        [
            # dn g0   dn g1   matching
            [F, F, T, T, F, F, F],
            [F, F, T, T, F, F, F],
            [T, T, F, F, F, F, F],
            [T, T, F, F, F, F, F],
            [T, T, T, T, F, F, F],
            [T, T, T, T, F, F, F],
            [T, T, T, T, F, F, F],
        ]
    )
    assert torch.equal(dn.attn_mask, expected)


def test_attention_mask_matches_official_loop():
    for groups in (1, 2, 3, 5):
        for single_pad in (1, 2, 3):
            pad = groups * single_pad
            ours = build_denoising_attn_mask(pad, single_pad, 4)
            assert torch.equal(ours, _official_loop_mask(pad, single_pad, groups, 4)), (groups, single_pad)


def test_noise_free_layout_and_unused_slots():
    emb = nn.Embedding(3, 8)
    t = _targets()
    dn = build_denoising_queries(t, emb, 3, 5, dn_number=5, label_noise_ratio=0.0, box_noise_scale=0.0)
    # max_gt 2 -> 2 groups of 2 slots
    assert dn.content.shape == (2, 4, 8) and dn.anchors_unsigmoid.shape == (2, 4, 4)
    assert dn.attn_mask.shape == (9, 9)
    for g in range(2):
        for j in range(2):
            s = g * 2 + j
            assert torch.allclose(dn.content[0, s], emb.weight[t[0]["labels"][j]])
            assert torch.allclose(dn.anchors_unsigmoid[0, s], box_ops.inverse_sigmoid(t[0]["boxes"][j]))
        assert torch.allclose(dn.content[1, g * 2], emb.weight[0])
        # image 1 has one target: its second slot in each group is unused -> zeros
        assert (dn.content[1, g * 2 + 1] == 0).all() and (dn.anchors_unsigmoid[1, g * 2 + 1] == 0).all()
        assert dn.labels[1, g * 2 + 1] == -1
    # gradients reach the label embedding
    dn.content.sum().backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0


def test_none_cases():
    emb = nn.Embedding(3, 4)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    assert build_denoising_queries(empty, emb, 3, 10) is None
    assert build_denoising_queries(_targets(), emb, 3, 10, dn_number=1) is None  # 1 // 2 == 0
    # batch where one image is empty still works
    t = [_targets()[0], empty[0]]
    dn = build_denoising_queries(t, emb, 3, 10, dn_number=4)
    assert dn is not None and (dn.content[1] == 0).all()
    idx = denoising_indices(t, dn.meta)
    assert idx[1][0].numel() == 0


def test_label_noise_rate_and_box_noise_bounds():
    g = torch.Generator().manual_seed(0)
    n = 50
    boxes = torch.rand(n, 4) * 0.4 + 0.3
    boxes[:, 2:] = torch.rand(n, 2) * 0.2 + 0.05
    t = [{"labels": torch.zeros(n, dtype=torch.long), "boxes": boxes}]
    emb = nn.Embedding(10, 4)
    dn = build_denoising_queries(
        t, emb, 10, 3, dn_number=2000, label_noise_ratio=0.5, box_noise_scale=0.4, generator=g
    )
    assert dn.meta.num_groups == 40
    labels = dn.labels[0]
    changed = (labels != 0).float().mean().item()
    assert abs(changed - 0.5 * 0.9) < 0.05  # flipped to a uniform class, which is 0 one time in ten
    noised = dn.boxes[0].view(40, n, 4)
    delta = (noised - boxes[None]).abs()
    wh = boxes[None, :, 2:]
    assert (delta[..., :2] <= wh / 2 * 0.4 + 1e-6).all()
    assert (delta[..., 2:] <= wh * 0.4 + 1e-6).all()
    assert delta.sum() > 0


def test_contrastive_layout_and_noise():
    g = torch.Generator().manual_seed(1)
    t = _targets()
    emb = nn.Embedding(3, 4)
    dn = build_denoising_queries(
        t, emb, 3, 6, dn_number=4, label_noise_ratio=0.0, box_noise_scale=0.4, contrastive=True, generator=g
    )
    m = dn.meta
    assert m.contrastive and m.num_groups == 2 and m.single_pad == 4 and m.pad_size == 8 and m.max_gt == 2
    assert dn.attn_mask.shape == (14, 14)
    assert torch.equal(dn.attn_mask, build_denoising_attn_mask(8, 4, 6))
    xyxy = box_ops.box_cxcywh_to_xyxy(t[0]["boxes"])
    for grp in range(2):
        for j in range(2):
            pos = box_ops.box_cxcywh_to_xyxy(dn.boxes[0, grp * 4 + j])
            neg = box_ops.box_cxcywh_to_xyxy(dn.boxes[0, grp * 4 + 2 + j])
            half = torch.cat([t[0]["boxes"][j, 2:], t[0]["boxes"][j, 2:]]) / 2 * 0.4
            assert ((pos - xyxy[j]).abs() <= half + 1e-6).all()
            # negatives move by at least lambda*wh/2 per corner unless clamped at the border
            moved = (neg - xyxy[j]).abs()
            clamped = (neg <= 1e-6) | (neg >= 1 - 1e-6)
            assert ((moved >= half - 1e-6) | clamped).all() and (moved <= 2 * half + 1e-6).all()
            assert dn.labels[0, grp * 4 + j] == t[0]["labels"][j] == dn.labels[0, grp * 4 + 2 + j]
    idx = denoising_indices(t, m)
    assert idx[0][0].tolist() == [0, 1, 4, 5] and idx[0][1].tolist() == [0, 1, 0, 1]
    # DINO keeps one group even when the budget is smaller than the number of targets
    assert build_denoising_queries(t, emb, 3, 6, dn_number=1, contrastive=True).meta.num_groups == 1


def test_indices_and_split():
    t = _targets()
    dn = build_denoising_queries(t, nn.Embedding(3, 4), 3, 5, dn_number=6)
    assert dn.meta.num_groups == 3
    idx = denoising_indices(t, dn.meta)
    assert idx[0][0].tolist() == [0, 1, 2, 3, 4, 5] and idx[0][1].tolist() == [0, 1, 0, 1, 0, 1]
    assert idx[1][0].tolist() == [0, 2, 4] and idx[1][1].tolist() == [0, 0, 0]
    x = torch.arange(2 * 11).view(2, 11)
    d, m = split_denoising_outputs(x, dn.meta)
    assert torch.equal(d, x[:, :6]) and torch.equal(m, x[:, 6:])
    assert split_denoising_outputs(x, None)[0] is None


def test_split_denoising_splits_every_level_and_keeps_none():
    from detr_core.denoising import DenoisingMeta
    from detr_core.outputs import QueryPredictions, split_denoising

    meta = DenoisingMeta(pad_size=4, num_groups=2, single_pad=2)
    levels = [QueryPredictions(torch.randn(2, 7, 3), torch.rand(2, 7, 4), None) for _ in range(3)]
    match, dn = split_denoising(levels, meta)
    assert len(match) == 3 and len(dn.aux) == 2 and dn.final.masks is None and match[0].masks is None
    assert torch.equal(dn.final.logits, levels[-1].logits[:, :4])
    assert torch.equal(dn.aux[0].boxes, levels[0].boxes[:, :4])
    assert torch.equal(match[-1].boxes, levels[-1].boxes[:, 4:])
    assert dn.meta is meta and list(dn.levels()) == [None, 0, 1]
