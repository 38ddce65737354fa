"""Losses against straightforward reference computations; SetCriterion bookkeeping."""

import math

import pytest
import torch

from detr_core import box_ops
from detr_core.denoising import DenoisingMeta
from detr_core.losses import (
    BoxLoss,
    CrossEntropyLabelLoss,
    FocalLabelLoss,
    SetCriterion,
    box_l1_loss,
    dice_loss,
    expand_weight_dict,
    giou_loss,
    point_sample,
    sigmoid_ce_loss,
    sigmoid_focal_loss,
    uncertain_point_coords_with_randomness,
)
from detr_core.matcher import BoxL1Cost, FocalClassCost, HungarianMatcher
from detr_core.outputs import DenoisingPredictions, DetectionOutputs
from detr_core.outputs import QueryPredictions as P


def test_sigmoid_focal_loss_against_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4)
    onehot = torch.zeros(2, 3, 4)
    onehot[0, 1, 2] = 1
    onehot[1, 0, 0] = 1
    total = 0.0
    for x, t in zip(logits.flatten().tolist(), onehot.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
        p_t = p * t + (1 - p) * (1 - t)
        a_t = 0.25 * t + 0.75 * (1 - t)
        total += a_t * ce * (1 - p_t) ** 2
    out = sigmoid_focal_loss(logits, onehot, num_boxes=2.0)
    assert math.isclose(out.item(), total / 2.0, rel_tol=1e-5)


def test_dice_and_bce_against_formulas():
    torch.manual_seed(0)
    logits = torch.randn(3, 7)
    targets = (torch.rand(3, 7) > 0.5).float()
    d = 0.0
    b = 0.0
    for i in range(3):
        p = [1 / (1 + math.exp(-v)) for v in logits[i].tolist()]
        t = targets[i].tolist()
        d += 1 - (2 * sum(pi * ti for pi, ti in zip(p, t)) + 1) / (sum(p) + sum(t) + 1)
        b += sum(-(ti * math.log(pi) + (1 - ti) * math.log(1 - pi)) for pi, ti in zip(p, t)) / 7
    assert math.isclose(dice_loss(logits, targets, 2.0).item(), d / 2, rel_tol=1e-5)
    assert math.isclose(sigmoid_ce_loss(logits, targets, 2.0).item(), b / 2, rel_tol=1e-5)


def test_box_losses_against_loops():
    src = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])
    tgt = torch.tensor([[0.55, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.2]])
    assert math.isclose(box_l1_loss(src, tgt, 4.0).item(), (0.05 + 0.1) / 4, rel_tol=1e-5)
    g = sum(
        1
        - box_ops.generalized_box_iou(
            box_ops.box_cxcywh_to_xyxy(src[i : i + 1]), box_ops.box_cxcywh_to_xyxy(tgt[i : i + 1])
        ).item()
        for i in range(2)
    )
    assert math.isclose(giou_loss(src, tgt, 4.0).item(), g / 4, rel_tol=1e-5)
    assert giou_loss(torch.zeros(0, 4), torch.zeros(0, 4), 1.0).item() == 0.0


def test_point_sample_align_corners_false():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.5, 0.25]]])
    out = point_sample(x, coords)
    assert out.shape == (1, 1, 5)
    # pixel centres are at (i + 0.5) / 2; the image centre is the mean of the four pixels
    assert torch.allclose(out[0, 0], torch.tensor([1.0, 2.0, 3.0, 2.5, 1.5]))


def test_uncertain_points_prefer_boundary():
    logits = torch.full((2, 1, 8, 8), 10.0)
    logits[:, :, :, :4] = -10.0
    logits[:, :, :, 3:5] = 0.0  # the uncertain band, x in [3/8, 5/8]
    g = torch.Generator().manual_seed(0)
    pts = uncertain_point_coords_with_randomness(logits, 20, 3.0, 0.75, generator=g)
    assert pts.shape == (2, 20, 2)
    assert ((pts >= 0) & (pts <= 1)).all()
    important = pts[:, :15, 0]
    # the most uncertain sampled points all sit in (or bilinearly next to) the band
    assert ((important > 2.5 / 8) & (important < 5.5 / 8)).float().mean() > 0.9
    rnd = uncertain_point_coords_with_randomness(logits, 10, 2.0, 0.0)
    assert rnd.shape == (2, 10, 2)
    with pytest.raises(ValueError):
        uncertain_point_coords_with_randomness(logits, 10, 0.5, 0.5)


def _outputs(b=2, q=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return P(
        logits=torch.randn(b, q, c, generator=g, requires_grad=True),
        boxes=(torch.rand(b, q, 4, generator=g) * 0.4 + 0.3).requires_grad_(),
    )


def _targets():
    return [
        {"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.4, 0.2, 0.2], [0.6, 0.5, 0.3, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]


def test_focal_label_loss_uses_matches():
    out = _outputs()
    indices = [(torch.tensor([3, 1]), torch.tensor([0, 1])), (torch.zeros(0, dtype=torch.long),) * 2]
    loss = FocalLabelLoss(3)(out, _targets(), indices, 2.0)["loss_ce"]
    onehot = torch.zeros(2, 5, 3)
    onehot[0, 3, 0] = 1
    onehot[0, 1, 2] = 1
    assert torch.allclose(loss, sigmoid_focal_loss(out.logits, onehot, 2.0))
    ce = CrossEntropyLabelLoss(2)(
        P(logits=out.logits),
        _targets(),
        [(torch.tensor([0]), torch.tensor([0])), indices[1]],
        1.0,
    )["loss_ce"]
    assert torch.isfinite(ce)


class CountingMatcher:
    def __init__(self):
        self.inner = HungarianMatcher([FocalClassCost(2.0), BoxL1Cost(5.0)])
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return self.inner(outputs, targets)


def _criterion(**kw):
    m = CountingMatcher()
    base = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    weights = expand_weight_dict(base, num_aux=2)
    return m, SetCriterion(m, {"labels": FocalLabelLoss(3), "boxes": BoxLoss()}, weights, **kw)


def test_set_criterion_keys_matching_and_dn_normaliser():
    m, crit = _criterion()
    meta = DenoisingMeta(pad_size=4, num_groups=2, single_pad=2)
    dn = DenoisingPredictions(_outputs(q=4, seed=4), [_outputs(q=4, seed=5), _outputs(q=4, seed=6)], meta)
    out = DetectionOutputs(
        final=_outputs(), aux=[_outputs(seed=1), _outputs(seed=2)], interm=_outputs(seed=3), denoising=dn
    )
    losses = crit(out, _targets())
    assert m.calls == 4  # final + 2 aux + interm; denoising is never matched
    base = ["loss_ce", "loss_bbox", "loss_giou"]
    suffixes = ["", "_0", "_1", "_interm", "_dn", "_dn_0", "_dn_1"]
    assert set(losses) == {k + s for k in base for s in suffixes}
    # denoising: slot g*2+j <-> target j, normaliser num_boxes (2) * num_groups (2)
    src = dn.final.boxes[0, [0, 1, 2, 3]]
    tgt = _targets()[0]["boxes"][[0, 1, 0, 1]]
    assert torch.allclose(losses["loss_bbox_dn"], (src - tgt).abs().sum() / 4)
    # the denoising part alone gives the same _dn losses
    dn_only = crit.denoising_losses(dn, _targets(), 2.0)
    assert set(dn_only) == {k for k in losses if "_dn" in k}
    for k, v in dn_only.items():
        torch.testing.assert_close(v, losses[k])
    weighted = crit.weighted(losses)
    assert set(weighted) == set(losses)
    assert torch.allclose(weighted["loss_bbox_dn_1"], losses["loss_bbox_dn_1"] * 5.0)
    sum(weighted.values()).backward()
    assert out.final.boxes.grad is not None and dn.final.boxes.grad is not None


def test_set_criterion_order_is_dino_order():
    # DINO / Mask DINO evaluate each matched level followed by its denoising twin, the encoder level last; random
    # draws (point sampling) therefore happen in that order, which a seeded comparison with them relies on
    calls = []

    class Recording:
        def __call__(self, pred, targets, indices, num_boxes):
            calls.append(tags[id(pred)])
            return {"loss_x": pred.boxes.sum() * 0.0}

    tags = {}

    def level(tag, q=3):
        d = _outputs(q=q)
        tags[id(d)] = tag
        return d

    meta = DenoisingMeta(pad_size=4, num_groups=2, single_pad=2)
    dn = DenoisingPredictions(level("final_dn", q=4), [level("aux0_dn", q=4), level("aux1_dn", q=4)], meta)
    out = DetectionOutputs(
        final=level("final"), aux=[level("aux0"), level("aux1")], interm=level("interm"), denoising=dn
    )
    crit = SetCriterion(CountingMatcher(), {"x": Recording()}, {})
    losses = crit(out, _targets())
    assert calls == ["final", "final_dn", "aux0", "aux0_dn", "aux1", "aux1_dn", "interm"]
    assert list(losses) == [
        "loss_x",
        "loss_x_dn",
        "loss_x_0",
        "loss_x_dn_0",
        "loss_x_1",
        "loss_x_dn_1",
        "loss_x_interm",
    ]


def test_set_criterion_without_dn_and_padding():
    _, crit = _criterion()
    losses = crit(DetectionOutputs(_outputs()), _targets())
    assert set(losses) == {"loss_ce", "loss_bbox", "loss_giou"}
    _, crit = _criterion(pad_missing_dn=True, dn_losses=["boxes"])
    out = DetectionOutputs(_outputs(), aux=[_outputs(seed=1)])
    losses = crit(out, _targets())
    assert {"loss_bbox_dn", "loss_giou_dn", "loss_bbox_dn_0"} <= set(losses) and "loss_ce_dn" not in losses
    assert losses["loss_bbox_dn"].item() == 0.0 and losses["loss_bbox_dn"].requires_grad
    with pytest.raises(ValueError):
        SetCriterion(CountingMatcher(), {"labels": FocalLabelLoss(3)}, {}, dn_losses=["masks"])


def test_set_criterion_all_images_empty():
    _, crit = _criterion()
    t = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    losses = crit(DetectionOutputs(_outputs()), t)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_giou"].item() == 0.0
    assert losses["loss_ce"].item() > 0  # all queries are pushed to background, normaliser clamped to 1


def test_point_mask_loss_matches_manual_sampling():
    from detr_core.losses import PointMaskLoss

    torch.manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    targets = [{"masks": torch.rand(3, 16, 16) > 0.5}, {"masks": torch.rand(1, 12, 12) > 0.5}]
    indices = [(torch.tensor([2, 0]), torch.tensor([1, 2])), (torch.tensor([3]), torch.tensor([0]))]
    loss = PointMaskLoss(
        num_points=40,
        oversample_ratio=1.0,
        importance_sample_ratio=0.0,
        generator=torch.Generator().manual_seed(5),
    )(P(logits=torch.zeros(2, 4, 1), masks=pred), targets, indices, 2.0)
    srcs = [pred[0, 2], pred[0, 0], pred[1, 3]]
    tgts = [targets[0]["masks"][1], targets[0]["masks"][2], targets[1]["masks"][0]]
    ce = dice = 0.0
    # rebuild the exact draws: the oversampled candidates (none kept: importance ratio 0), then the uniform points
    g = torch.Generator().manual_seed(5)
    torch.rand(3, 40, 2, generator=g)
    coords = torch.rand(3, 40, 2, generator=g)
    for k in range(3):
        p = point_sample(srcs[k][None, None], coords[k : k + 1]).view(1, 40)
        t = point_sample(tgts[k].float()[None, None], coords[k : k + 1]).view(1, 40)
        ce += sigmoid_ce_loss(p, t, 2.0)
        dice += dice_loss(p, t, 2.0)
    assert torch.allclose(loss["loss_mask"], ce, atol=1e-5)
    assert torch.allclose(loss["loss_dice"], dice, atol=1e-5)
    loss["loss_mask"].backward()
    assert pred.grad[0, 1].abs().sum() == 0 and pred.grad[0, 2].abs().sum() > 0
    empty = PointMaskLoss(num_points=8)(
        P(logits=torch.zeros(2, 4, 1), masks=pred),
        targets,
        [(torch.zeros(0, dtype=torch.long),) * 2] * 2,
        1.0,
    )
    assert empty["loss_mask"].item() == 0.0


def test_point_sample_keeps_float32_points_with_half_logits():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 32, 32).bfloat16()
    coords = torch.rand(2, 50, 2)
    out = point_sample(logits, coords)
    # sampled at the float32 points, not at points rounded to bfloat16
    assert out.dtype == torch.float32
    assert torch.equal(out, point_sample(logits.float(), coords))
    assert not torch.equal(out, point_sample(logits.float(), coords.bfloat16().float()))


def test_point_mask_loss_half_predictions_match_float32():
    from detr_core.losses import PointMaskLoss

    torch.manual_seed(0)
    pred = torch.randn(1, 3, 16, 16).bfloat16()
    targets = [{"masks": torch.rand(2, 32, 32) > 0.5}]
    indices = [(torch.tensor([2, 0]), torch.tensor([0, 1]))]

    def run(p):
        fn = PointMaskLoss(num_points=64, generator=torch.Generator().manual_seed(2))
        return fn(P(logits=torch.zeros(1, 3, 1), masks=p), targets, indices, 2.0)

    half, full = run(pred), run(pred.float())
    for k in ("loss_mask", "loss_dice"):
        assert half[k].dtype == torch.float32 and torch.equal(half[k], full[k])


def test_set_criterion_moves_with_the_model():
    """`SetCriterion` must not shadow ``nn.Module._apply``: ``.to()``/``.double()`` of a model holding it must work."""
    from detr_core.losses import BoxLoss, SetCriterion
    from detr_core.matcher import BoxL1Cost, HungarianMatcher

    criterion = SetCriterion(HungarianMatcher([BoxL1Cost(1.0)]), {"boxes": BoxLoss()}, {"loss_bbox": 1.0})
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.criterion = criterion
    model.to(torch.float64)
    assert model[0].weight.dtype == torch.float64
