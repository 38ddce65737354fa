"""Hungarian matcher vs brute force, built-in cost terms vs loops, edge cases."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detr_core import box_ops
from detr_core.matcher import BoxL1Cost, FocalClassCost, GIoUCost, HungarianMatcher, SoftmaxClassCost
from detr_core.outputs import QueryPredictions as P


class MatrixCost:
    """Test cost term returning a fixed per-image matrix."""

    def __init__(self, matrices, weight=1.0):
        self.matrices, self.weight = matrices, weight
        self.calls = 0

    def __call__(self, outputs, target):
        c = self.matrices[int(target["image"])]
        self.calls += 1
        return c


def _brute_force(cost: torch.Tensor) -> float:
    q, n = cost.shape
    if n <= q:
        return min(sum(cost[p[j], j].item() for j in range(n)) for p in itertools.permutations(range(q), n))
    return min(sum(cost[i, p[i]].item() for i in range(q)) for p in itertools.permutations(range(n), q))


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5)), min_size=1, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_hungarian_matches_brute_force(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    q = max(s[0] for s in shapes)
    mats = [torch.randn(q, n, generator=g) for _, n in shapes]
    targets = [
        {"labels": torch.zeros(n, dtype=torch.long), "image": torch.tensor(i)}
        for i, (_, n) in enumerate(shapes)
    ]
    outputs = P(logits=torch.zeros(len(shapes), q, 2))
    matcher = HungarianMatcher([MatrixCost(mats, weight=1.0)])
    indices = matcher(outputs, targets)
    for (rows, cols), cost in zip(indices, mats):
        n = cost.shape[1]
        assert rows.dtype == torch.long and cols.dtype == torch.long
        assert len(rows) == len(cols) == min(q, n)
        assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
        if n:
            assert math.isclose(cost[rows, cols].sum().item(), _brute_force(cost), rel_tol=1e-5, abs_tol=1e-5)


def test_weights_combine_terms():
    c1 = [torch.tensor([[0.0, 1.0], [1.0, 0.0]])]
    c2 = [torch.tensor([[10.0, 0.0], [0.0, 10.0]])]
    targets = [{"labels": torch.zeros(2, dtype=torch.long), "image": torch.tensor(0)}]
    out = P(logits=torch.zeros(1, 2, 1))
    rows, cols = HungarianMatcher([MatrixCost(c1, 1.0), MatrixCost(c2, 0.01)])(out, targets)[0]
    assert cols[rows.argsort()].tolist() == [0, 1]
    rows, cols = HungarianMatcher([MatrixCost(c1, 1.0), MatrixCost(c2, 1.0)])(out, targets)[0]
    assert cols[rows.argsort()].tolist() == [1, 0]
    # weight 0 terms are not even evaluated
    zero = MatrixCost(c2, 0.0)
    HungarianMatcher([MatrixCost(c1), zero])(out, targets)
    assert zero.calls == 0


def test_focal_cost_against_loop():
    logits = torch.randn(4, 3)
    labels = torch.tensor([2, 0])
    cost = FocalClassCost(1.0)(P(logits=logits), {"labels": labels})
    assert cost.shape == (4, 2)
    for i in range(4):
        for j in range(2):
            p = torch.sigmoid(logits[i, labels[j]]).item()
            pos = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8)
            neg = 0.75 * p**2 * -math.log(1 - p + 1e-8)
            assert math.isclose(cost[i, j].item(), pos - neg, rel_tol=1e-5, abs_tol=1e-6)


def test_softmax_l1_giou_costs_against_loops():
    logits = torch.randn(3, 4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.4, 0.1, 0.3], [0.7, 0.2, 0.3, 0.1]])
    tgt = {
        "labels": torch.tensor([1, 3]),
        "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.2], [0.2, 0.6, 0.2, 0.2]]),
    }
    out = P(logits=logits, boxes=boxes)
    sm = SoftmaxClassCost(1.0)(out, tgt)
    l1 = BoxL1Cost(1.0)(out, tgt)
    gi = GIoUCost(1.0)(out, tgt)
    for i in range(3):
        for j in range(2):
            assert math.isclose(sm[i, j].item(), -logits[i].softmax(0)[tgt["labels"][j]].item(), rel_tol=1e-5)
            assert math.isclose(
                l1[i, j].item(), (boxes[i] - tgt["boxes"][j]).abs().sum().item(), rel_tol=1e-5
            )
            a = box_ops.box_cxcywh_to_xyxy(boxes[i : i + 1])
            b = box_ops.box_cxcywh_to_xyxy(tgt["boxes"][j : j + 1])
            assert math.isclose(gi[i, j].item(), -box_ops.generalized_box_iou(a, b).item(), rel_tol=1e-5)


def test_builtin_terms_match_gt_boxes():
    # predictions are a permutation of the targets plus a distractor: the matcher must recover it
    tgt_boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.2, 0.3, 0.1]])
    pred_boxes = torch.stack([tgt_boxes[2], torch.tensor([0.9, 0.1, 0.05, 0.05]), tgt_boxes[0], tgt_boxes[1]])
    labels = torch.tensor([0, 1, 1])
    logits = torch.full((4, 2), -5.0)
    logits[[0, 2, 3], labels[[2, 0, 1]]] = 5.0
    matcher = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0), GIoUCost(2.0)])
    rows, cols = matcher(
        P(logits=logits[None], boxes=pred_boxes[None]),
        [{"labels": labels, "boxes": tgt_boxes}],
    )[0]
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 2, 2: 0, 3: 1}


def test_empty_targets_and_nonfinite_error():
    matcher = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0), GIoUCost(2.0)])
    out = P(logits=torch.randn(2, 3, 2), boxes=torch.rand(2, 3, 4) * 0.5 + 0.25)
    targets = [
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
        {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])},
    ]
    idx = matcher(out, targets)
    assert idx[0][0].numel() == 0 and idx[0][1].numel() == 0 and idx[0][0].dtype == torch.long
    assert len(idx[1][0]) == 1
    out.boxes[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="BoxL1Cost"):
        matcher(out, targets)
    with pytest.raises(ValueError):
        HungarianMatcher([])


def test_point_mask_cost_draws_its_points_for_an_image_without_targets():
    # the official matcher draws the points of every image, targets or not: the same random stream here
    from detr_core.matcher import PointMaskCost

    g = torch.Generator().manual_seed(7)
    matcher = HungarianMatcher([PointMaskCost(5.0, 5.0, num_points=20, generator=g), FocalClassCost(2.0)])
    out = P(logits=torch.randn(3, 4, 2), masks=torch.randn(3, 4, 8, 8))
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    full = {"labels": torch.tensor([0, 1]), "masks": torch.rand(2, 8, 8) > 0.5}
    matcher(out, [empty, full, empty])
    ref = torch.Generator().manual_seed(7)
    for _ in range(3):
        torch.rand(1, 20, 2, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_point_mask_cost_against_pairwise_losses():
    from detr_core.losses import dice_loss, point_sample, sigmoid_ce_loss
    from detr_core.matcher import PointMaskCost

    torch.manual_seed(0)
    pred = torch.randn(3, 8, 8)
    tgt = torch.rand(2, 16, 16) > 0.5
    cost = PointMaskCost(5.0, 5.0, num_points=50, generator=torch.Generator().manual_seed(3))
    c = cost(P(logits=torch.zeros(3, 1), masks=pred), {"masks": tgt})
    coords = torch.rand(1, 50, 2, generator=torch.Generator().manual_seed(3))
    for i in range(3):
        for j in range(2):
            p = point_sample(pred[i][None, None], coords).view(1, 50)
            t = point_sample(tgt[j].float()[None, None], coords).view(1, 50)
            expected = 5 * sigmoid_ce_loss(p, t, 1.0) + 5 * dice_loss(p, t, 1.0)
            assert math.isclose(c[i, j].item(), expected.item(), rel_tol=1e-4)


def test_point_mask_cost_is_float32_under_autocast_and_skipped_at_zero_weight():
    from detr_core.matcher import PointMaskCost

    torch.manual_seed(0)
    pred = torch.randn(3, 8, 8)
    tgt = torch.rand(2, 16, 16) > 0.5
    ref = PointMaskCost(2.0, 3.0, num_points=64, generator=torch.Generator().manual_seed(1))(
        P(logits=torch.zeros(3, 1), masks=pred.bfloat16().float()), {"masks": tgt}
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = PointMaskCost(2.0, 3.0, num_points=64, generator=torch.Generator().manual_seed(1))(
            P(logits=torch.zeros(3, 1), masks=pred.bfloat16()), {"masks": tgt}
        )
    assert c.dtype == torch.float32 and torch.equal(c, ref)
    # both weights 0: weight 0, so HungarianMatcher skips the term (and draws no random points)
    assert PointMaskCost(0.0, 0.0).weight == 0.0 and PointMaskCost(0.0, 1.0).weight == 1.0
    matcher = HungarianMatcher([PointMaskCost(0.0, 0.0), BoxL1Cost(1.0)])
    out = P(logits=torch.zeros(1, 3, 2), boxes=torch.rand(1, 3, 4), masks=pred[None])
    target = {"labels": torch.tensor([0, 1]), "boxes": torch.rand(2, 4), "masks": tgt}
    state = torch.get_rng_state()
    matcher(out, [target])
    assert torch.equal(torch.get_rng_state(), state)


def test_missing_prediction_field_is_named():
    matcher = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0)])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    with pytest.raises(ValueError, match="BoxL1Cost needs predicted boxes"):
        matcher(P(logits=torch.zeros(1, 3, 2)), [target])
