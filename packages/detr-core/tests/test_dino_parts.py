"""The parts DINO needs beyond Mask DINO's: inverse-sigmoid clamp, DETR padding masks, input projections, top-k
detections, query-selection pinning, DINO's denoising draw order, foreign-checkpoint loading."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detr_core import box_ops
from detr_core.backbone import ShapeSpec
from detr_core.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    ForeignLayoutError,
    KeyMap,
    KeyMapError,
    extract_state_dict,
    load_foreign_checkpoint,
    strip_prefix,
)
from detr_core.decoder import DeformableDecoder, look_forward_twice
from detr_core.denoising import build_denoising_queries
from detr_core.neck import InputProjection, masked_group_norm
from detr_core.padding import PaddedBatch
from detr_core.postprocess import topk_detections, topk_query_class
from detr_core.query_selection import select_queries

# ----------------------------------------------------------------------------- inverse_sigmoid eps


class _Zero(nn.Module):
    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], 4)


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_decoder_and_look_forward_twice_use_the_given_clamp(eps):
    torch.manual_seed(0)
    dec = DeformableDecoder(
        num_layers=2,
        d_model=16,
        d_ffn=32,
        dropout=0.0,
        n_levels=1,
        n_heads=2,
        n_points=2,
        inverse_sigmoid_eps=eps,
    )
    dec.bbox_embed = _Zero()  # delta 0: each refinement is sigmoid(inverse_sigmoid(ref))
    memory = torch.randn(1, 12, 16)
    shapes = torch.tensor([[3, 4]])
    # box coordinate logits +inf (a selected invalid proposal): reference 1.0 exactly
    refs = torch.tensor([[[0.0, float("inf"), -1.0, 2.0]]])
    _, references = dec(torch.randn(1, 1, 16), memory, refs, shapes, torch.tensor([0]), torch.ones(1, 1, 2))
    # hand values: sigmoid(log(1 / eps)) = 1 / (1 + eps); then 1 - ref = eps / (1 + eps) < eps is clamped to eps:
    # sigmoid(log(ref / eps)) = 1 / (1 + eps (1 + eps))
    first = 1 / (1 + eps)
    second = 1 / (1 + eps * (1 + eps))
    assert references[1][0, 0, 1].item() == pytest.approx(first, rel=1e-6)
    assert references[2][0, 0, 1].item() == pytest.approx(second, rel=1e-6)
    boxes = look_forward_twice([torch.zeros(1, 1, 16)], [torch.ones(1, 1, 4)], _Zero(), eps=eps)
    assert boxes[0][0, 0].tolist() == pytest.approx([1 / (1 + eps)] * 4, rel=1e-6)


def test_denoising_anchors_use_the_given_clamp():
    t = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 1.0, 0.0, 0.5]])}]
    for eps in (1e-5, 1e-3):
        dn = build_denoising_queries(
            t,
            nn.Embedding(3, 4),
            3,
            2,
            dn_number=1,
            label_noise_ratio=0.0,
            box_noise_scale=0.0,
            inverse_sigmoid_eps=eps,
        )
        expected = [0.0, math.log(1 / eps), math.log(eps), 0.0]
        assert dn.anchors_unsigmoid[0, 0].tolist() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- DINO draw order


def _dino_noise_reference(labels, boxes, copies, ratio, num_classes, scale):
    """The official DINO ``prepare_for_cdn`` draws, transcribed from its description (global RNG): rand over all
    copies, randint only for the flipped ones, then a float sign and a magnitude per coordinate."""
    n = labels.shape[0]
    known_labels = labels.repeat(copies)
    known_boxes = boxes.repeat(copies, 1)
    p = torch.rand(known_labels.shape[0])
    chosen = torch.nonzero(p < ratio).view(-1)
    known_labels = known_labels.clone()
    known_labels[chosen] = torch.randint(0, num_classes, chosen.shape)
    sign = torch.randint(0, 2, known_boxes.shape).float() * 2 - 1
    part = torch.rand(known_boxes.shape)
    neg = torch.cat([torch.arange(n) + n * (2 * g + 1) for g in range(copies // 2)])
    part[neg] += 1.0
    xy, wh = known_boxes[:, :2], known_boxes[:, 2:]
    corners = torch.cat([xy - wh / 2, xy + wh / 2], 1) + part * sign * torch.cat([wh / 2, wh / 2], 1) * scale
    corners = corners.clamp(0, 1)
    return known_labels, torch.cat(
        [(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], 1
    )


def test_flipped_label_draws_reproduce_dino_noise_with_the_same_seed():
    t = [
        {
            "labels": torch.tensor([1, 2, 3]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.2, 0.4], [0.5, 0.5, 0.9, 0.9]]),
        },
    ]
    emb = nn.Embedding(6, 4)
    torch.manual_seed(7)
    dn = build_denoising_queries(
        t,
        emb,
        5,
        4,
        dn_number=6,
        label_noise_ratio=0.25,
        box_noise_scale=0.4,
        contrastive=True,
        label_draws="flipped",
    )
    torch.manual_seed(7)
    labels, boxes = _dino_noise_reference(t[0]["labels"], t[0]["boxes"], 2 * dn.meta.num_groups, 0.25, 5, 0.4)
    slot = torch.cat([torch.arange(3) + 3 * c for c in range(2 * dn.meta.num_groups)])
    assert torch.equal(dn.labels[0, slot], labels)
    torch.testing.assert_close(dn.boxes[0, slot], boxes, rtol=0, atol=1e-7)
    assert (labels != t[0]["labels"].repeat(4)).any()  # some labels were flipped: the test sees the draws
    with pytest.raises(ValueError, match="label_draws"):
        build_denoising_queries(t, nn.Embedding(6, 4), 5, 4, label_draws="some")


# ----------------------------------------------------------------------------- DETR padding masks


def _batch(sizes, padded, rule):
    return PaddedBatch(torch.zeros(len(sizes), 3, *padded), torch.tensor(sizes), True, rule)


def test_nearest_rule_hand_values_of_an_undivisible_batch():
    # a 700 x 1100 image in an 803 x 1216 batch: ResNet maps 101 x 152 (s8), 51 x 76, 26 x 38, extra 13 x 19.
    # nearest: row i is padding iff floor(i * 803 / H) >= 700 -> 89 / 45 / 23 / 12 valid rows; ceil: 88 / 44 / 22 / 11
    b = _batch([(700, 1100), (803, 1216)], (803, 1216), "nearest")
    ceil = _batch([(700, 1100), (803, 1216)], (803, 1216), "ceil")
    for (h, w), stride, rows, rows_ceil in zip(
        [(101, 152), (51, 76), (26, 38), (13, 19)], [8, 16, 32, 64], [89, 45, 23, 12], [88, 44, 22, 11]
    ):
        m = b.padding_mask((h, w), stride)
        assert int((~m[0, :, 0]).sum()) == rows
        assert int((~ceil.padding_mask((h, w), stride)[0, :, 0]).sum()) == rows_ceil
        assert not m[1].any()
    assert b.unmasked().padding_mask((13, 19), 64) is None and b.with_tensor(b.tensor).mask_rule == "nearest"
    built = PaddedBatch.from_images(
        [torch.zeros(3, 700, 1100), torch.zeros(3, 803, 1216)], mask_rule="nearest"
    )
    assert built.padded_size == (803, 1216) and torch.equal(
        built.padding_mask((101, 152), 8), b.padding_mask((101, 152), 8)
    )
    with pytest.raises(ValueError, match="mask_rule"):
        PaddedBatch(torch.zeros(1, 3, 4, 4), torch.tensor([[4, 4]]), True, "floor")


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 6), st.integers(1, 6), st.integers(1, 48), st.integers(1, 48), st.sampled_from([2, 4, 8])
)
def test_nearest_rule_equals_ceil_rule_when_the_padded_size_is_a_multiple_of_the_stride(mh, mw, h, w, stride):
    # padded size = k * stride exactly: the nearest source row of map row i is i * stride (an exact product), so
    # it is padding iff i * stride >= h iff i >= ceil(h / stride)
    hp, wp = max(mh * stride, h), max(mw * stride, w)
    hp, wp = -(-hp // stride) * stride, -(-wp // stride) * stride
    sizes = [(h, w), (hp, wp)]
    near = _batch(sizes, (hp, wp), "nearest").padding_mask((hp // stride, wp // stride), stride)
    ceil = _batch(sizes, (hp, wp), "ceil").padding_mask((hp // stride, wp // stride), stride)
    assert torch.equal(near, ceil)


def test_nearest_rule_replicates_with_its_own_extent():
    b = _batch([(5, 7), (8, 8)], (8, 8), "nearest")
    x = torch.arange(2 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    m = b.padding_mask((3, 3), 3)  # rows floor(i * 8 / 3) = 0, 2, 5 -> valid < 5: 2 rows; cols 0, 2, 5 < 7: 3
    assert (~m[0, :, 0]).sum() == 2 and (~m[0, 0, :]).sum() == 3
    y = b.replicate_padding(x, 3)
    assert torch.equal(y[0, 0, 2], x[0, 0, 1]) and torch.equal(y[1], x[1])


# ----------------------------------------------------------------------------- input projections


def _shapes():
    # listed high -> low resolution except that the middle one has the largest stride
    return [ShapeSpec(8, 8), ShapeSpec(12, 32), ShapeSpec(10, 16)]


def test_input_projection_layout_keys_init_and_values():
    torch.manual_seed(0)
    proj = InputProjection(_shapes(), d_model=16, num_extra_levels=2, num_groups=4)
    keys = sorted(proj.state_dict())
    assert keys == sorted(f"{i}.{j}.{p}" for i in range(5) for j in (0, 1) for p in ("weight", "bias"))
    assert proj.strides == [8, 32, 16, 64, 128] and proj.lowest_input == 1
    assert proj.conv(3).in_channels == 12 and proj.conv(4).in_channels == 16  # raw lowest map, then chained
    assert all(not proj.conv(i).bias.detach().any() for i in range(5))
    maps = [torch.randn(2, 8, 16, 12), torch.randn(2, 12, 4, 3), torch.randn(2, 10, 8, 6)]
    out = proj(maps)
    ref = [
        F.group_norm(
            F.conv2d(m, proj.conv(i).weight, proj.conv(i).bias), 4, proj.norm(i).weight, proj.norm(i).bias
        )
        for i, m in enumerate(maps)
    ]
    x = maps[1]
    for i in (3, 4):
        c = proj.conv(i)
        x = F.group_norm(
            F.conv2d(x, c.weight, c.bias, stride=2, padding=1), 4, proj.norm(i).weight, proj.norm(i).bias
        )
        ref.append(x)
    assert [tuple(o.shape) for o in out] == [
        (2, 16, 16, 12),
        (2, 16, 4, 3),
        (2, 16, 8, 6),
        (2, 16, 2, 2),
        (2, 16, 1, 1),
    ]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="expects 3 maps"):
        proj(maps[:2])


def test_input_projection_padding_aware_equals_the_image_alone():
    torch.manual_seed(1)
    proj = InputProjection([ShapeSpec(4, 4), ShapeSpec(6, 8)], d_model=8, num_extra_levels=1, num_groups=2)
    alone = [torch.randn(1, 4, 6, 5), torch.randn(1, 6, 3, 3)]  # a 24 x 20 image: ceil sizes (6, 5), (3, 3)
    padded = [F.pad(alone[0], (0, 3, 0, 2), value=7.0), F.pad(alone[1], (0, 1, 0, 1), value=-3.0)]
    batch = PaddedBatch(torch.zeros(1, 3, 32, 32), torch.tensor([[24, 20]]), True)
    a = proj(alone)
    b = proj(padded, batch)
    for x, y in zip(a, b):
        h, w = x.shape[-2:]
        torch.testing.assert_close(y[..., :h, :w], x, rtol=1e-5, atol=1e-5)


def test_masked_group_norm_uses_valid_positions_only():
    gn = nn.GroupNorm(2, 4)
    x = torch.randn(1, 4, 5, 6)
    pad = torch.zeros(1, 5, 6, dtype=torch.bool)
    pad[:, 3:] = True
    torch.testing.assert_close(masked_group_norm(x, gn, pad)[..., :3, :], gn(x[..., :3, :]))


def _masked_group_norm_float64(x, gn, pad):
    """Per image and group, the statistics of the valid positions, in float64 (the reference)."""
    x = x.double()
    b, c = x.shape[:2]
    g, cg = gn.num_groups, x.shape[1] // gn.num_groups
    y = torch.empty_like(x)
    for i in range(b):
        valid = ~pad[i]
        for k in range(g):
            xs = x[i, k * cg : (k + 1) * cg]
            vals = xs[:, valid]
            mean, var = vals.mean(), vals.var(unbiased=False)
            y[i, k * cg : (k + 1) * cg] = (xs - mean) / torch.sqrt(var + gn.eps)
    if gn.affine:
        y = y * gn.weight.double()[None, :, None, None] + gn.bias.double()[None, :, None, None]
    return y


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_masked_group_norm_against_float64_on_any_mask(channels_last, affine, dtype):
    # any mask (not only a bottom-right padding rectangle), every memory layout and input dtype: float32 output
    g = torch.Generator().manual_seed(0)
    gn = nn.GroupNorm(4, 12, affine=affine)
    if affine:
        with torch.no_grad():
            gn.weight.normal_(generator=g)
            gn.bias.normal_(generator=g)
    x = (torch.randn(3, 12, 7, 9, generator=g) * 3 + 5).to(dtype)
    pad = torch.rand(3, 7, 9, generator=g) < 0.4
    pad[1, :, 5:] = True  # a padding rectangle
    pad[2] = False  # nothing padded
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = masked_group_norm(x, gn, pad)
    assert y.dtype == torch.float32 and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    ref = _masked_group_norm_float64(x.float(), gn, pad)
    torch.testing.assert_close(y.double(), ref, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- top-k detections


def test_topk_detections_against_a_sorted_list():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 3, generator=g)
    boxes = torch.rand(2, 5, 4, generator=g) * 0.5 + 0.1
    sizes = [(40, 60), (30, 20)]
    dets = topk_detections(logits, boxes, sizes, num_select=7)
    for b, det in enumerate(dets):
        pairs = sorted(
            ((float(logits[b, q, c].sigmoid()), q, c) for q in range(5) for c in range(3)), reverse=True
        )
        assert det.queries.tolist() == [q for _, q, _ in pairs[:7]]
        assert det.labels.tolist() == [c for _, _, c in pairs[:7]]
        assert det.scores.tolist() == pytest.approx([s for s, _, _ in pairs[:7]])
        h, w = sizes[b]
        cx, cy, bw, bh = boxes[b, det.queries].unbind(-1)
        expected = torch.stack(
            [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1
        )
        torch.testing.assert_close(det.boxes, expected)
    kept = topk_detections(logits, boxes, sizes, num_select=7, nms_iou_threshold=0.5)[0]
    ref = torchvision.ops.nms(dets[0].boxes, dets[0].scores, 0.5)
    assert kept.queries.tolist() == dets[0].queries[ref].tolist()
    with pytest.raises(ValueError, match="cannot keep 16"):
        topk_query_class(logits[0].sigmoid(), 16)
    with pytest.raises(ValueError, match="image_sizes"):
        topk_detections(logits, boxes, [(4, 4)], num_select=2)


# ----------------------------------------------------------------------------- pinned query selection


def test_select_queries_with_given_indices():
    torch.manual_seed(0)
    memory = torch.randn(2, 4 * 4 + 2 * 2, 8)
    shapes = [(4, 4), (2, 2)]
    head = nn.Linear(8, 3)
    box = nn.Linear(8, 4)
    top = select_queries(memory, None, shapes, nn.Identity(), head, box, k=5)
    assert torch.equal(top.token_scores.gather(1, top.indices), top.scores)
    idx = torch.tensor([[19, 0, 3, 3, 7], [1, 2, 3, 4, 5]])
    pinned = select_queries(memory, None, shapes, nn.Identity(), head, box, k=5, indices=idx)
    assert torch.equal(pinned.indices, idx)
    torch.testing.assert_close(pinned.scores, top.token_scores.gather(1, idx))
    torch.testing.assert_close(pinned.logits[1, 2], head(memory[1, 3]))
    with pytest.raises(ValueError, match="indices must be int64 of shape"):
        select_queries(memory, None, shapes, nn.Identity(), head, box, k=4, indices=idx)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 20\)"):
        select_queries(memory, None, shapes, nn.Identity(), head, box, k=5, indices=idx + 1)


# ----------------------------------------------------------------------------- foreign checkpoints

_MAP = KeyMap(
    [(r"^backbone\.0\.body\.", "backbone."), (r"^(dec\.)?head\.\d+\.", "head.")],
    name="toy DINO",
    signature=[r"^backbone\.0\.body\.", r"^head\.\d+\."],
)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 3)
        self.head = nn.Linear(3, 1)


def _official_sd(model):
    sd = {"backbone.0.body.weight": model.backbone.weight, "backbone.0.body.bias": model.backbone.bias}
    for prefix in ("head", "dec.head"):
        for i in range(2):
            sd[f"{prefix}.{i}.weight"] = model.head.weight
            sd[f"{prefix}.{i}.bias"] = model.head.bias
    return {k: v.detach().clone() for k, v in sd.items()}


def test_foreign_checkpoint_like_dino_main_py(tmp_path):
    src = _Toy()
    official = _official_sd(src)
    path = tmp_path / "checkpoint.pth"
    ema = {k: v + 1 for k, v in official.items()}
    torch.save(
        {
            "model": {"module." + k: v for k, v in official.items()},
            "ema_model": ema,
            "epoch": 3,
            "args": argparse.Namespace(lr=1e-4),
        },
        path,
    )
    dst = _Toy()
    sd = load_foreign_checkpoint(path, _MAP, dst)
    assert sorted(sd) == ["backbone.bias", "backbone.weight", "head.bias", "head.weight"]
    assert torch.equal(dst.head.weight, src.head.weight) and torch.equal(dst.backbone.bias, src.backbone.bias)
    load_foreign_checkpoint(path, _MAP, dst, key="ema_model")
    assert torch.equal(dst.head.weight, src.head.weight + 1)
    with pytest.raises(CheckpointError, match="has no 'best' weights"):
        load_foreign_checkpoint(path, _MAP, dst, key="best")
    # round trip ours -> official names -> ours
    back = _MAP.convert(_MAP.to_source(dict(dst.state_dict()), official))
    assert sorted(back) == sorted(dst.state_dict()) and all(
        back[k] is dst.state_dict()[k] or torch.equal(back[k], dst.state_dict()[k]) for k in back
    )
    with pytest.raises(KeyMapError, match="which the state dict does not have"):
        _MAP.to_source({"backbone.weight": torch.ones(1)}, official)


def test_foreign_checkpoint_errors_name_the_problem(tmp_path):
    src = _Toy()
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.ones(2), "decoder.bias": torch.ones(1)}}, path)
    with pytest.raises(ForeignLayoutError, match=r"other\.pth is not a toy DINO checkpoint: no key matches"):
        load_foreign_checkpoint(path, _MAP, _Toy())
    bad = _official_sd(src)
    bad["dec.head.1.weight"] = bad["dec.head.1.weight"] + 1
    torch.save({"model": bad}, path)
    with pytest.raises(KeyMapError, match="not tied"):
        load_foreign_checkpoint(path, _MAP, _Toy())
    short = _official_sd(src)
    short["backbone.0.body.weight"] = torch.zeros(4, 2)
    torch.save(short, path)
    with pytest.raises(
        CheckpointMismatchError, match=r"shape mismatch: backbone\.weight: \(4, 2\) vs \(3, 2\)"
    ):
        load_foreign_checkpoint(path, _MAP, _Toy())
    assert strip_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}
    assert extract_state_dict({"ema_model": {"w": torch.ones(1)}}, key="ema_model")["w"].item() == 1.0


def test_box_ops_inverse_sigmoid_default_is_unchanged():
    x = torch.tensor([0.0, 1.0])
    assert box_ops.inverse_sigmoid(x).tolist() == pytest.approx([math.log(1e-5), math.log(1 / 1e-5)])


# ----------------------------------------------------------------------------- backbone norm folding


def test_resnet_fold_norms_switch_keeps_the_reference_operation_order():
    from detr_core.backbone import ResNetBackbone

    torch.manual_seed(0)
    net = ResNetBackbone(18, ("res3", "res5")).eval()
    for m in net.modules():  # non-trivial frozen statistics
        if isinstance(m, torchvision.ops.FrozenBatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
            m.weight.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 64, 96)
    batch = PaddedBatch.from_tensor(x, [(64, 96)])
    with torch.no_grad():
        folded = net(batch)
        net.fold_norms = False
        plain = net(batch)
        ref = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        ref = net.layer2(net.layer1(ref))
        res3 = ref
        ref = net.layer4(net.layer3(ref))
    # without folding: torchvision's modules one after another, the same operations
    assert torch.equal(plain["res3"], res3) and torch.equal(plain["res5"], ref)
    torch.testing.assert_close(folded["res5"], ref, rtol=1e-4, atol=1e-4)
