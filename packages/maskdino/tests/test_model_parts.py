"""The parts of the model against independent references: masked GroupNorm, edge replication, mask-to-box
conversions, ResNet padding exactness, pixel-decoder level order, decoder memory order, matcher costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from detr_core.backbone import ResNetBackbone
from detr_core.box_ops import inverse_sigmoid
from detr_core.matcher import PointMaskCost
from detr_core.outputs import QueryPredictions
from detr_core.padding import PaddedBatch, padding_mask, replicate_outside
from maskdino.config import PixelDecoderConfig, get_preset
from maskdino.modeling.criterion import build_weight_dict
from maskdino.modeling.model import build_model
from maskdino.modeling.pixel_decoder import MaskDINOPixelDecoder, masked_group_norm
from maskdino.modeling.query_selection import mask_boxes, mask_enhanced_anchors

pytestmark = pytest.mark.usefixtures("one_thread")


def test_masked_group_norm_equals_group_norm_of_the_crop():
    torch.manual_seed(0)
    gn = nn.GroupNorm(4, 8)
    nn.init.normal_(gn.weight)
    nn.init.normal_(gn.bias)
    x = torch.randn(2, 8, 6, 7)
    pad = padding_mask(torch.tensor([[6, 7], [4, 5]]), (6, 7), 1)
    y = masked_group_norm(x, gn, pad)
    torch.testing.assert_close(y[0], gn(x[:1])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[1, :, :4, :5], gn(x[1:, :, :4, :5])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_group_norm(x, gn, None), gn(x))


def test_replicate_outside_equals_replicate_padding():
    x = torch.randn(2, 3, 5, 6)
    y = replicate_outside(x, torch.tensor([[5, 6], [3, 2]]))
    torch.testing.assert_close(y[0], x[0])
    ref = F.pad(x[1:, :, :3, :2], (0, 4, 0, 2), mode="replicate")[0]
    torch.testing.assert_close(y[1], ref)


def _loop_boxes(masks, plus_one, empty):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        if len(xs) == 0:
            out.append(empty)
        else:
            e = 1.0 if plus_one else 0.0
            out.append([xs.min().item(), ys.min().item(), xs.max().item() + e, ys.max().item() + e])
    return torch.tensor(out, dtype=torch.float32)


def test_mask_to_box_conversions():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 9, 11, generator=g) > 0.8
    masks[2] = False
    masks[3] = False
    masks[3, 4, 7] = True
    rows, cols = masks.any(2), masks.any(1)
    torch.testing.assert_close(
        mask_boxes(rows, cols, "bitmask"), _loop_boxes(masks, True, [0.0, 0.0, 0.0, 0.0])
    )
    torch.testing.assert_close(
        mask_boxes(rows, cols, "mask2box"), _loop_boxes(masks, False, [1e8, 1e8, 0.0, 0.0])
    )


@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 2),
    q=st.integers(1, 4),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    box_type=st.sampled_from(["bitmask", "mask2box"]),
    seed=st.integers(0, 2**16),
)
def test_mask_enhanced_anchors_match_the_masks_boxes(b, q, h, w, density, box_type, seed):
    # the unpadded path (max-reductions of the logits) and the padded path (bool map) against a per-mask loop
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(b, q, h, w, generator=g) < density, 1.0, -1.0)
    logits = sign * torch.rand(b, q, h, w, generator=g)
    plus_one, empty = (True, [0.0, 0.0, 0.0, 0.0]) if box_type == "bitmask" else (False, [1e8, 1e8, 0.0, 0.0])
    boxes = _loop_boxes((logits > 0).flatten(0, 1), plus_one, empty)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h
    bw, bh = (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h
    expected = inverse_sigmoid(torch.stack([cx, cy, bw, bh], -1)).view(b, q, 4)
    no_pad = mask_enhanced_anchors(logits, box_type, None)
    all_valid = mask_enhanced_anchors(logits, box_type, torch.zeros(b, h, w, dtype=torch.bool))
    torch.testing.assert_close(no_pad, all_valid, atol=0, rtol=0)
    torch.testing.assert_close(no_pad, expected, atol=1e-4, rtol=0)


def test_mask_enhanced_anchors_normalise_by_valid_size():
    logits = torch.full((1, 1, 8, 10), -1.0)
    logits[0, 0, 2:4, 1:5] = 1.0  # rows 2-3, cols 1-4
    logits[0, 0, 7, 9] = 1.0  # inside the padding: ignored when the padding is known
    pad = padding_mask(torch.tensor([[6, 8]]), (8, 10), 1)
    a = mask_enhanced_anchors(logits, "bitmask", pad).sigmoid()
    # bitmask box [1, 2, 5, 4] -> cxcywh (3, 3, 4, 2) / (w=8, h=6)
    torch.testing.assert_close(a[0, 0], torch.tensor([3 / 8, 3 / 6, 4 / 8, 2 / 6]), atol=1e-5, rtol=0)
    b = mask_enhanced_anchors(logits, "mask2box", None).sigmoid()
    # official: no padding info; box [1, 2, 9, 7] -> (5, 4.5, 8, 5) / (10, 8)
    torch.testing.assert_close(b[0, 0], torch.tensor([0.5, 4.5 / 8, 0.8, 5 / 8]), atol=1e-5, rtol=0)


def test_resnet_padding_exact():
    torch.manual_seed(0)
    net = ResNetBackbone(depth=18).eval()
    alone = torch.randn(1, 3, 64, 96)
    padded = torch.zeros(1, 3, 128, 128)
    padded[:, :, :64, :96] = alone
    with torch.no_grad():
        a = net(PaddedBatch(alone, torch.tensor([[64, 96]]), masked=True))
        b = net(PaddedBatch(padded, torch.tensor([[64, 96]]), masked=True))
        c = net(PaddedBatch(alone, torch.tensor([[64, 96]]), masked=False))
    for name, stride in [("res2", 4), ("res3", 8), ("res4", 16), ("res5", 32)]:
        h, w = 64 // stride, 96 // stride
        torch.testing.assert_close(a[name], b[name][:, :, :h, :w], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a[name], c[name], atol=1e-5, rtol=1e-5)  # no padding: the plain network
        assert (b[name][:, :, h:] == 0).all() and (b[name][:, :, :, w:] == 0).all()


@pytest.mark.parametrize("depth", [18, 50])
def test_resnet_inference_fold_matches_module_graph(depth):
    # without autograd the frozen norms are folded into the convolutions (and run channels-last on CPU); the
    # features must equal the plain module graph's, padded batches (the padding-aware path) included
    torch.manual_seed(0)
    net = ResNetBackbone(depth=depth).eval()
    for m in net.modules():  # non-trivial frozen statistics, so that the fold is really exercised
        if type(m).__name__ == "FrozenBatchNorm2d":
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 96)
    sizes = torch.tensor([[64, 96], [40, 70]])
    for masked in (False, True):
        batch = PaddedBatch(x, sizes, masked=masked)
        with torch.enable_grad():
            assert not net._can_fold()
            expected = net(batch)
        with torch.no_grad():
            assert net._can_fold()
            got = net(batch)
        for name in expected:
            # CPU inference hands the maps on channels-last (the pixel decoder's convolutions want that layout)
            assert got[name].is_contiguous(memory_format=torch.channels_last)
            scale = expected[name].abs().max()
            torch.testing.assert_close(got[name] / scale, expected[name].detach() / scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "in_features, total, order, strides",
    [
        (["res3", "res4", "res5"], 4, "low2high", [8, 16, 32, 64]),
        (["res3", "res4", "res5"], 3, "high2low", [32, 16, 8]),
        (["res3", "res4", "res5"], 4, "high2low", [64, 32, 16, 8]),
        (["res2", "res3", "res4", "res5"], 4, "low2high", [4, 8, 16, 32]),
        (["res2", "res3", "res4", "res5"], 5, "low2high", [4, 8, 16, 32, 64]),
    ],
)
def test_pixel_decoder_level_order(in_features, total, order, strides):
    backbone = ResNetBackbone(depth=18)
    cfg = PixelDecoderConfig(
        conv_dim=32,
        mask_dim=16,
        num_encoder_layers=1,
        dim_feedforward=32,
        nheads=2,
        n_points=1,
        transformer_in_features=in_features,
        total_num_feature_levels=total,
        feature_order=order,
    )
    pd = MaskDINOPixelDecoder.from_config(backbone.output_shape(), cfg)
    assert pd.output_strides() == strides
    # input_proj[0] reads the first listed encoder input: res3 (512 ch... here 128) or res5 for high2low
    first = pd.input_proj[0][0].in_channels
    expected_first = {"res2": 64, "res3": 128, "res5": 512}[pd.transformer_in_features[0]]
    assert first == expected_first
    batch = PaddedBatch.from_tensor(torch.randn(1, 3, 128, 128), [(128, 128)])
    assert not batch.masked
    with torch.no_grad():
        out = pd(backbone(batch), batch)
    assert [f.shape[-1] for f in out.multi_scale_features] == [128 // s for s in strides]
    assert out.strides == strides and out.mask_stride == 4
    assert out.mask_features.shape == (1, 16, 32, 32)


def test_decoder_memory_is_in_reverse_level_order():
    torch.manual_seed(0)
    cfg = get_preset("tiny")
    cfg.num_classes = 3
    m = build_model(cfg).eval()
    seen = {}

    def hook(module, args):
        seen["spatial_shapes"] = args[3].tolist()

    handle = m.predictor.decoder.register_forward_pre_hook(hook)
    with torch.no_grad():
        m.network(m.preprocess([torch.rand(3, 64, 128) * 255]))
    handle.remove()
    # encoder levels (low2high) are 1/8, 1/16, 1/32; the decoder memory starts with the lowest resolution
    assert seen["spatial_shapes"] == [[2, 4], [4, 8], [8, 16]]


def test_point_mask_cost_matches_per_pair_reference():
    torch.manual_seed(0)
    pred = torch.randn(4, 8, 8)
    tgt = torch.rand(3, 32, 32) > 0.5
    cost = PointMaskCost(5.0, 5.0, num_points=64)
    torch.manual_seed(7)
    c = cost(QueryPredictions(logits=torch.zeros(4, 1), masks=pred), {"masks": tgt})
    torch.manual_seed(7)
    pts = torch.rand(1, 64, 2)
    grid = (2 * pts - 1)[:, :, None]  # (1, P, 1, 2)
    ps = F.grid_sample(pred[:, None], grid.expand(4, -1, -1, -1), align_corners=False)[:, 0, :, 0]
    ts = F.grid_sample(tgt[:, None].float(), grid.expand(3, -1, -1, -1), align_corners=False)[:, 0, :, 0]
    ref = torch.zeros(4, 3)
    for i in range(4):
        for j in range(3):
            bce = F.binary_cross_entropy_with_logits(ps[i], ts[j])
            p = ps[i].sigmoid()
            dice = 1 - (2 * (p * ts[j]).sum() + 1) / (p.sum() + ts[j].sum() + 1)
            ref[i, j] = 5 * bce + 5 * dice
    torch.testing.assert_close(c, ref, atol=1e-5, rtol=1e-5)


def test_weight_dict_covers_the_official_105_terms():
    weights = build_weight_dict(get_preset("coco-instance-r50-3s-d1-2048"))
    base = ["loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou"]
    emitted = {
        f"{k}{s}"
        for k in base
        for s in ["", "_interm", "_dn"] + [f"_{i}" for i in range(9)] + [f"_dn_{i}" for i in range(9)]
    }
    assert len(emitted) == 105 and emitted == set(weights)
    assert (
        weights["loss_mask_dn_8"] == 5.0
        and weights["loss_giou_interm"] == 2.0
        and weights["loss_ce_0"] == 4.0
    )
    # ADE20K: no encoder output and no box weights in its yaml (defaults 5 / 2 are used, as the official code)
    ade = build_weight_dict(get_preset("ade20k-semantic-r50"))
    assert len(ade) == 100 and ade["loss_bbox_dn_3"] == 5.0
