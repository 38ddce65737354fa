"""Hand-computed cases for box ops, sine embeddings, reference points and proposals."""

import math

import pytest
import torch
import torchvision

from detr_core import box_ops
from detr_core.encoder import DeformableEncoder, level_start_index
from detr_core.position_encoding import PositionEmbeddingSine, sine_embedding
from detr_core.query_selection import encoder_output_proposals, gather_tokens, select_top_k


def test_box_conversions_round_trip_and_values():
    cxcywh = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    assert torch.allclose(box_ops.box_cxcywh_to_xyxy(cxcywh), torch.tensor([[0.4, 0.3, 0.6, 0.7]]))
    assert torch.allclose(box_ops.box_xyxy_to_cxcywh(box_ops.box_cxcywh_to_xyxy(cxcywh)), cxcywh)
    # leading dims are kept
    assert box_ops.box_cxcywh_to_xyxy(torch.rand(2, 3, 4)).shape == (2, 3, 4)


def test_iou_and_giou_hand_values():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]])
    iou = box_ops.box_iou(a, b)
    assert torch.allclose(iou, torch.tensor([[1 / 7, 0.0]]))
    giou = box_ops.generalized_box_iou(a, b)
    # first: enclosing 3x3=9, union 7 -> 1/7 - 2/9; second: enclosing 5x2=10, union 5 -> 0 - 5/10
    assert torch.allclose(giou, torch.tensor([[1 / 7 - 2 / 9, -0.5]]))


def test_giou_with_epsilon_hand_values_and_default_is_torchvision():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [4.0, 0.0, 5.0, 1.0]], dtype=torch.float64)
    eps = 0.5  # large, so that the hand values differ visibly from plain GIoU
    got = box_ops.generalized_box_iou(a, b, eps=eps)
    # inter / (union + eps) - (hull - union) / (hull + eps): (1, 7, 9) and (0, 5, 10)
    expected = torch.tensor([[1 / 7.5 - 2 / 9.5, 0.0 - 5 / 10.5]], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(20, 2, generator=g)
    boxes1 = torch.cat([xy, xy + torch.rand(20, 2, generator=g) * 0.02], 1)  # 0-2% boxes: eps matters
    boxes2 = boxes1[torch.randperm(20, generator=g)[:7]] + 0.001
    torch.testing.assert_close(
        box_ops.generalized_box_iou(boxes1, boxes2), torchvision.ops.generalized_box_iou(boxes1, boxes2)
    )
    # the element-wise loss with the same eps is 1 - the diagonal of the pairwise form
    e = 1e-6
    pair = box_ops.generalized_box_iou(boxes1[:7], boxes2, eps=e).diagonal()
    loss = torchvision.ops.generalized_box_iou_loss(boxes1[:7], boxes2, eps=e)
    torch.testing.assert_close(loss, 1 - pair, atol=1e-6, rtol=0)
    assert (
        box_ops.generalized_box_iou(boxes1, boxes2, eps=e) - box_ops.generalized_box_iou(boxes1, boxes2)
    ).abs().max() > 1e-4


def test_inverse_sigmoid_values_and_clamping():
    x = torch.tensor([0.5, 0.8, 0.0, 1.0, -0.3, 1.7])
    out = box_ops.inverse_sigmoid(x)
    big = math.log(1 / 1e-5)
    expected = torch.tensor([0.0, math.log(4.0), -big, big, -big, big])
    assert torch.allclose(out, expected, atol=1e-4)
    assert torch.isfinite(out).all()
    assert torch.allclose(
        box_ops.inverse_sigmoid(torch.tensor([0.0]), eps=1e-3), torch.tensor([math.log(1e-3)])
    )
    y = torch.rand(100) * 0.98 + 0.01
    assert torch.allclose(box_ops.inverse_sigmoid(y).sigmoid(), y, atol=1e-5)


def test_normalize_denormalize():
    xyxy = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    norm = box_ops.normalize_boxes(xyxy, (100, 50))  # (h, w)
    assert torch.allclose(norm, torch.tensor([[0.4, 0.4, 0.4, 0.4]]))
    assert torch.allclose(box_ops.denormalize_boxes(norm, (100, 50)), xyxy)


def test_masks_to_boxes_matches_torchvision_and_handles_empty():
    masks = torch.zeros(3, 6, 7, dtype=torch.bool)
    masks[0, 1:3, 3:5] = True
    masks[2, 5, 0] = True
    out = box_ops.masks_to_boxes(masks)
    assert out[0].tolist() == [3.0, 1.0, 4.0, 2.0]
    assert out[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    ref = torchvision.ops.masks_to_boxes(masks[[0, 2]])
    assert torch.equal(out[[0, 2]], ref)
    assert box_ops.masks_to_boxes(torch.zeros(0, 4, 4)).shape == (0, 4)


def test_valid_ratios():
    mask = torch.ones(2, 4, 5, dtype=torch.bool)
    mask[0, :3, :4] = False  # 3 of 4 rows, 4 of 5 columns
    mask[1] = False
    assert torch.allclose(box_ops.valid_ratios(mask), torch.tensor([[0.8, 0.75], [1.0, 1.0]]))


def _sine_ref(v: float, k: int, f: int, t: float = 10000.0) -> float:
    # feature k of a coordinate v (already scaled): sin on even k, cos on odd k
    arg = v / t ** (2 * (k // 2) / f)
    return math.sin(arg) if k % 2 == 0 else math.cos(arg)


def test_position_embedding_sine_hand_values():
    f = 4
    pe = PositionEmbeddingSine(num_pos_feats=f)
    x = torch.zeros(1, 3, 2, 3)
    out = pe(x)
    assert out.shape == (1, 2 * f, 2, 3)
    for i in range(2):
        for j in range(3):
            y_v = (i + 1) / (2 + 1e-6) * 2 * math.pi
            x_v = (j + 1) / (3 + 1e-6) * 2 * math.pi
            expected = [_sine_ref(y_v, k, f) for k in range(f)] + [_sine_ref(x_v, k, f) for k in range(f)]
            assert torch.allclose(out[0, :, i, j], torch.tensor(expected), atol=1e-5)


def test_position_embedding_sine_with_padding_and_offset():
    f = 2
    mask = torch.zeros(1, 2, 4, dtype=torch.bool)
    mask[0, :, 2:] = True  # 2 valid columns
    out = PositionEmbeddingSine(num_pos_feats=f, offset=-0.5)(torch.zeros(1, 1, 2, 4), mask)
    # column 1 (valid): x = (2 - 0.5) / 2 * 2pi; row 0: y = (1 - 0.5) / 2 * 2pi
    x_v = 1.5 / (2 + 1e-6) * 2 * math.pi
    y_v = 0.5 / (2 + 1e-6) * 2 * math.pi
    expected = torch.tensor([math.sin(y_v), math.cos(y_v), math.sin(x_v), math.cos(x_v)])
    assert torch.allclose(out[0, :, 0, 1], expected, atol=1e-5)
    # padded columns keep the last cumulative column count (pos_x part)
    assert torch.allclose(out[0, 2:, 0, 3], out[0, 2:, 0, 1])


def test_sine_embedding_points_and_boxes_hand_values():
    pt = torch.tensor([[0.25, 0.5]])  # (x, y)
    out = sine_embedding(pt, num_pos_feats=2)
    # order (y, x); F=2 -> dim_t = [1, 1]
    assert torch.allclose(out, torch.tensor([[0.0, -1.0, 1.0, 0.0]]), atol=1e-6)
    box = torch.tensor([0.25, 0.5, 0.125, 1.0])
    out = sine_embedding(box, num_pos_feats=2)
    s = math.sqrt(0.5)
    assert torch.allclose(out, torch.tensor([0.0, -1.0, 1.0, 0.0, s, s, 0.0, 1.0]), atol=1e-6)


def test_sine_embedding_matches_loop_reference():
    f = 8
    boxes = torch.rand(2, 3, 4)
    out = sine_embedding(boxes, num_pos_feats=f)
    assert out.shape == (2, 3, 4 * f)
    b, q = 1, 2
    order = [1, 0, 2, 3]
    expected = [_sine_ref(boxes[b, q, c].item() * 2 * math.pi, k, f) for c in order for k in range(f)]
    assert torch.allclose(out[b, q], torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError):
        sine_embedding(torch.rand(3, 3))


def test_level_start_index():
    shapes = torch.tensor([[2, 3], [4, 1], [1, 1]])
    assert level_start_index(shapes).tolist() == [0, 6, 10]


def test_encoder_reference_points_hand_values():
    shapes = torch.tensor([[2, 2], [1, 2]])
    ratios = torch.ones(1, 2, 2)
    ref = DeformableEncoder.get_reference_points(shapes, ratios)
    assert ref.shape == (1, 6, 2, 2)
    expected = torch.tensor(
        [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.25, 0.5], [0.75, 0.5]]
    )
    assert torch.allclose(ref[0, :, 0], expected)
    assert torch.allclose(ref[0, :, 1], expected)

    ratios = torch.tensor(
        [[[0.5, 1.0], [1.0, 0.5]]]
    )  # level 0: half the width valid; level 1: half the height
    ref = DeformableEncoder.get_reference_points(shapes, ratios)
    # token (0, 0) of level 0: x = 0.5 / (0.5 * 2) = 0.5, y = 0.5 / 2 = 0.25; into level 1: * (1.0, 0.5)
    assert torch.allclose(ref[0, 0, 0], torch.tensor([0.25, 0.25]))
    assert torch.allclose(ref[0, 0, 1], torch.tensor([0.5, 0.125]))
    # token 1 of level 1 (1x2): x = 1.5 / (1 * 2) = 0.75, y = 0.5 / (0.5 * 1) = 1.0; into level 0: * (0.5, 1)
    assert torch.allclose(ref[0, 5, 0], torch.tensor([0.375, 1.0]))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def test_encoder_output_proposals_hand_values():
    memory = torch.randn(1, 5, 3)
    proposals_mem, props = encoder_output_proposals(memory, None, torch.tensor([[2, 2], [1, 1]]))
    expected = [
        [0.25, 0.25, 0.05, 0.05],
        [0.75, 0.25, 0.05, 0.05],
        [0.25, 0.75, 0.05, 0.05],
        [0.75, 0.75, 0.05, 0.05],
        [0.5, 0.5, 0.1, 0.1],
    ]
    assert torch.allclose(props[0], torch.tensor([[_logit(v) for v in row] for row in expected]), atol=1e-5)
    assert torch.equal(proposals_mem, memory)


def test_encoder_output_proposals_invalid_and_padding():
    # base 0.5: level 0 wh 0.5 (valid), level 1 wh 1.0 (not < 0.99 -> invalid)
    memory = torch.ones(2, 3, 4)
    pad = torch.zeros(2, 3, dtype=torch.bool)
    pad[1, 1] = True  # image 1: level 0 (1x2) second column padded
    mem, props = encoder_output_proposals(memory, pad, torch.tensor([[1, 2], [1, 1]]), base_scale=0.5)
    # image 0 level 0: centres (0.25, 0.5) and (0.75, 0.5), wh 0.5
    assert torch.allclose(props[0, 0], torch.tensor([_logit(0.25), 0.0, 0.0, 0.0]), atol=1e-5)
    assert torch.allclose(props[0, 1], torch.tensor([_logit(0.75), 0.0, 0.0, 0.0]), atol=1e-5)
    # image 1: one valid column -> centre x = 0.5 / 1
    assert torch.allclose(props[1, 0], torch.tensor([0.0, 0.0, 0.0, 0.0]), atol=1e-5)
    for b, s in [(0, 2), (1, 1), (1, 2)]:
        assert torch.isinf(props[b, s]).all() and (props[b, s] > 0).all()
        assert (mem[b, s] == 0).all()
    assert (mem[0, :2] == 1).all() and (mem[1, 0] == 1).all()


def test_select_and_gather():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [3.0, 2.0, 1.0, 0.0]])
    idx = select_top_k(scores, 2)
    assert idx.tolist() == [[1, 3], [0, 1]]
    x = torch.arange(2 * 4 * 3).view(2, 4, 3)
    assert gather_tokens(x, idx).tolist() == [
        [x[0, 1].tolist(), x[0, 3].tolist()],
        [x[1, 0].tolist(), x[1, 1].tolist()],
    ]
    y = torch.arange(8).view(2, 4)
    assert gather_tokens(y, idx).tolist() == [[1, 3], [4, 5]]
    with pytest.raises(ValueError):
        select_top_k(scores, 5)
