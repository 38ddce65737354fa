"""Post-processing on hand-built logits, checked against hand computations and a literal loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from maskdino.modeling.postprocess import (
    boxes_to_output_size,
    instance_inference,
    panoptic_inference,
    postprocess_image,
    resize_mask_logits,
    semantic_inference,
)
from maskdino.structures import Instances, PanopticSegmentation, Prediction

BIG = 20.0  # a logit whose sigmoid is 1 to float precision


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# ---------------------------------------------------------------------------------------------- resize


def test_resize_mask_logits_hand_example():
    # 2x2 -> 4x4 bilinear (align_corners=False) along one axis maps [a, b] to [a, .75a+.25b, .25a+.75b, b].
    x = torch.tensor([[[0.0, 4.0], [8.0, 12.0]]])
    out = resize_mask_logits(x, padded_size=(4, 4), image_size=(3, 2), output_size=(3, 2))
    expected = torch.tensor([[[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]])
    torch.testing.assert_close(out, expected)


def test_resize_mask_logits_crop_then_resize():
    # The padded region (values 100) must be cropped away BEFORE the final resize.
    x = torch.full((1, 4, 4), 100.0)
    x[:, :2, :2] = 1.0
    out = resize_mask_logits(x, padded_size=(4, 4), image_size=(2, 2), output_size=(5, 7))
    assert out.shape == (1, 5, 7)
    torch.testing.assert_close(out, torch.ones(1, 5, 7))
    # Low-resolution input: upsampled to the padded size first, then cropped, so the padding leaks only
    # through the first interpolation (half a low-res pixel), exactly as detectron2 does.
    low = torch.tensor([[[1.0, 100.0]]])  # (1, 1, 2): padded width 4, image width 2
    out = resize_mask_logits(low, padded_size=(1, 4), image_size=(1, 2), output_size=(1, 2))
    torch.testing.assert_close(out, torch.tensor([[[1.0, 0.75 * 1.0 + 0.25 * 100.0]]]))


def test_empty_selections_do_not_crash():
    # no query passes the panoptic threshold and no instance survives the thing filter
    cls = torch.full((5, 3), -BIG)
    low = torch.randn(5, 8, 10)
    pred = postprocess_image(
        cls,
        low,
        torch.rand(5, 4),
        (32, 40),
        (30, 37),
        (15, 20),
        panoptic_on=True,
        semantic_on=True,
        thing_classes=set(),
        top_k=4,
    )
    assert pred.instances.masks.shape == (0, 15, 20) and len(pred.instances) == 0
    assert pred.panoptic.segments.shape == (15, 20) and pred.panoptic.segments_info == []
    assert pred.semantic.shape == (3, 15, 20)
    assert resize_mask_logits(torch.zeros(0, 4, 4), (16, 16), (10, 12), (5, 6)).shape == (0, 5, 6)


def test_resize_mask_logits_rejects_bad_sizes():
    with pytest.raises(ValueError):
        resize_mask_logits(torch.zeros(1, 2, 2), (4, 4), (5, 4), (5, 4))


def test_boxes_to_output_size():
    # Padded 64x96, image 48x80 inside, original 24x40: scale = padded/image*output = 32 (h), 48 (w).
    boxes = torch.tensor([[0.5, 0.25, 0.5, 0.5]])
    out = boxes_to_output_size(boxes, (64, 96), (48, 80), (24, 40))
    sh, sw = 64 / 48 * 24, 96 / 80 * 40
    expected = torch.tensor([[0.25 * sw, 0.0 * sh, 0.75 * sw, 0.5 * sh]])
    torch.testing.assert_close(out, expected)


# -------------------------------------------------------------------------------------------- instance


def test_instance_topk_query_can_appear_twice_and_score_formula():
    q, c, h, w = 3, 4, 2, 3
    cls = torch.full((q, c), -BIG)
    cls[0, 1] = logit(0.9)
    cls[0, 3] = logit(0.8)  # query 0 is picked for two classes
    cls[2, 0] = logit(0.7)
    cls[1, 2] = logit(0.1)
    masks = torch.full((q, h, w), -5.0)
    masks[0, 0, :2] = torch.tensor([logit(0.6), logit(0.9)])  # 2 pixels inside, mean prob 0.75
    masks[2] = logit(0.8)  # all inside
    # query 1 has an empty mask
    boxes = torch.arange(q * 4, dtype=torch.float32).view(q, 4)
    inst = instance_inference(cls, masks, boxes, top_k=4)
    assert isinstance(inst, Instances) and len(inst) == 4
    assert inst.labels.tolist() == [1, 3, 0, 2]
    torch.testing.assert_close(inst.boxes, boxes[[0, 0, 2, 1]])
    assert inst.masks.dtype == torch.bool and inst.masks.shape == (4, h, w)
    assert inst.masks[0].sum() == 2 and inst.masks[3].sum() == 0
    expected = torch.tensor([0.9 * 0.75, 0.8 * 0.75, 0.7 * 0.8, 0.0])
    torch.testing.assert_close(inst.scores, expected, atol=1e-5, rtol=1e-5)
    assert inst.labels.dtype == torch.int64


@pytest.mark.parametrize("seed", range(4))
def test_instance_inference_equals_official_formula_with_many_repeated_queries(seed):
    # the official code: top-k over (query, class), masks = logits > 0 of each pair's query, score = prob x mean
    # sigmoid inside; here most queries are picked for several classes, across chunk boundaries
    g = torch.Generator().manual_seed(seed)
    q, c, k = 7, 5, 23
    cls = torch.randn(q, c, generator=g) * 3
    masks = torch.randn(q, 9, 11, generator=g) * 2
    masks[3] = -1.0  # an empty mask
    boxes = torch.rand(q, 4, generator=g)
    inst = instance_inference(cls, masks, boxes, top_k=k)
    probs, flat = cls.sigmoid().flatten().topk(k)
    qi = flat // c
    binary = masks[qi] > 0
    quality = (masks[qi].sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    assert len(set(qi.tolist())) < k  # repeats really happen
    assert torch.equal(inst.masks, binary)
    assert torch.equal(inst.labels, flat % c)
    torch.testing.assert_close(inst.boxes, boxes[qi])
    torch.testing.assert_close(inst.scores, probs * quality, atol=1e-6, rtol=1e-6)


def test_instance_topk_larger_than_pairs_and_thing_filter():
    cls = torch.tensor([[2.0, -1.0], [0.0, 1.0]])
    masks = torch.ones(2, 2, 2)
    boxes = torch.zeros(2, 4)
    inst = instance_inference(cls, masks, boxes, top_k=100)
    assert len(inst) == 4  # only Q*C pairs exist
    inst = instance_inference(cls, masks, boxes, top_k=100, thing_classes={1})
    assert inst.labels.tolist() == [1, 1]


def test_instance_softmax_ce_variant_drops_no_object():
    cls = torch.tensor([[0.0, 0.0, 10.0], [3.0, 0.0, 0.0]])  # query 0 = no object
    probs = cls.softmax(-1)[:, :2]
    inst = instance_inference(cls, torch.full((2, 1, 1), BIG), torch.zeros(2, 4), top_k=1, focal=False)
    assert inst.labels.tolist() == [0]
    torch.testing.assert_close(inst.scores, probs[1, :1])


# -------------------------------------------------------------------------------------------- panoptic


def reference_panoptic(cls, masks, things, thr=0.25, overlap=0.8, temp=0.06):
    """Literal per-query loop of the published algorithm (focal model)."""
    probs = cls.sigmoid()
    scores, labels = probs.max(-1)
    keep = scores > thr
    scores, labels = (probs / temp).softmax(-1).max(-1)
    s, lab, m = scores[keep], labels[keep], masks[keep].sigmoid()
    seg = torch.zeros(masks.shape[-2:], dtype=torch.int32)
    info, stuff, cur = [], {}, 0
    if m.shape[0] == 0:
        return seg, info
    ids = (s.view(-1, 1, 1) * m).argmax(0)
    for k in range(m.shape[0]):
        c = int(lab[k])
        area = int((ids == k).sum())
        orig = int((m[k] >= 0.5).sum())
        mk = (ids == k) & (m[k] >= 0.5)
        if area > 0 and orig > 0 and int(mk.sum()) > 0:
            if area / orig < overlap:
                continue
            if c not in things:
                if c in stuff:
                    seg[mk] = stuff[c]
                    continue
                stuff[c] = cur + 1
            cur += 1
            seg[mk] = cur
            info.append({"id": cur, "category_id": c, "isthing": c in things})
    return seg, info


def test_panoptic_overlap_rule_drops_segment_losing_over_20_percent():
    h, w = 4, 5
    cls = torch.full((2, 3), -BIG)
    cls[0, 0] = logit(0.9)  # thing, stronger
    cls[1, 0] = logit(0.6)  # thing, weaker: its mask is covered by query 0 on 2 of 5 pixels
    masks = torch.full((2, h, w), -BIG)
    masks[0, 0, :] = BIG  # row 0 (5 px)
    masks[1, 0, 3:] = BIG  # 2 px shared with query 0
    masks[1, 1, :3] = BIG  # 3 px its own
    out = panoptic_inference(cls, masks, thing_classes={0})
    assert isinstance(out, PanopticSegmentation)
    # query 1 keeps 3/5 = 60% < 80%: dropped, its own pixels become void
    assert out.segments.dtype == torch.int32
    assert [s["id"] for s in out.segments_info] == [1]
    assert (out.segments[0] == 1).all() and (out.segments[1:] == 0).all()
    # 4 own px + 1 shared: it keeps 4/5 = 80%, not < 0.8, so kept
    masks[1] = -BIG
    masks[1, 0, 4] = BIG
    masks[1, 1, :4] = BIG
    out = panoptic_inference(cls, masks, thing_classes={0})
    assert [s["id"] for s in out.segments_info] == [1, 2]
    assert out.segments_info[1]["isthing"] is True
    assert (out.segments[1, :4] == 2).all() and out.segments[0, 4] == 1 and out.segments[1, 4] == 0


def test_panoptic_stuff_merging_threshold_and_scores():
    h, w = 3, 4
    cls = torch.full((4, 3), -BIG)
    cls[0, 2] = logit(0.7)  # stuff class 2
    cls[1, 1] = logit(0.8)  # thing class 1
    cls[2, 2] = logit(0.5)  # stuff class 2 again: merged into segment of query 0
    cls[3, 1] = logit(0.2)  # below the 0.25 threshold: ignored although its mask is strong
    masks = torch.full((4, h, w), -BIG)
    masks[0, 0] = BIG
    masks[1, 1] = BIG
    masks[2, 2, :2] = BIG
    masks[3, 2, 2:] = BIG
    out = panoptic_inference(cls, masks, thing_classes={0, 1})
    ids = [s["id"] for s in out.segments_info]
    assert ids == [1, 2]
    assert [(s["category_id"], s["isthing"]) for s in out.segments_info] == [(2, False), (1, True)]
    assert (out.segments[0] == 1).all() and (out.segments[1] == 2).all()
    assert out.segments[2].tolist() == [1, 1, 0, 0]
    # scores are the temperature-sharpened softmax of the sigmoid probabilities
    p = cls[0].sigmoid()
    assert out.segments_info[0]["score"] == pytest.approx(float((p / 0.06).softmax(-1).max()), rel=1e-5)
    # nothing above the threshold -> all void
    empty = panoptic_inference(torch.full((2, 3), -BIG), masks[:2], thing_classes={0})
    assert empty.segments_info == [] and (empty.segments == 0).all()


def test_panoptic_matches_loop_reference_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        q, c, h, w = 12, 6, 9, 11
        cls = torch.randn(q, c, generator=g) * 2
        masks = torch.randn(q, h, w, generator=g) * 3
        things = {0, 1, 2}
        out = panoptic_inference(cls, masks, thing_classes=things, overlap_threshold=0.5 + 0.1 * trial)
        seg, info = reference_panoptic(cls, masks, things, overlap=0.5 + 0.1 * trial)
        assert torch.equal(out.segments, seg)
        assert [{k: s[k] for k in ("id", "category_id", "isthing")} for s in out.segments_info] == info


def test_panoptic_softmax_ce_variant():
    cls = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]])  # query 1 predicts no-object
    masks = torch.full((2, 2, 2), BIG)
    out = panoptic_inference(cls, masks, thing_classes={0}, focal=False)
    assert [s["category_id"] for s in out.segments_info] == [0]
    assert (out.segments == 1).all()


# -------------------------------------------------------------------------------------------- semantic


def test_semantic_inference_einsum_and_argmax():
    cls = torch.tensor([[BIG, -BIG], [-BIG, BIG]])
    masks = torch.full((2, 2, 3), -BIG)
    masks[0, :, :2] = BIG
    masks[1, :, 2] = BIG
    sem = semantic_inference(cls, masks, focal=True, temperature=None)
    assert sem.shape == (2, 2, 3)
    assert sem.argmax(0).tolist() == [[0, 0, 1], [0, 0, 1]]
    # generic check of the formula against an explicit sum over queries
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(5, 3, generator=g)
    masks = torch.randn(5, 4, 4, generator=g)
    p = (cls.sigmoid() / 0.06).softmax(-1)
    expected = sum(p[i][:, None, None] * masks[i].sigmoid()[None] for i in range(5))
    torch.testing.assert_close(semantic_inference(cls, masks), expected)
    cls_ce = torch.randn(5, 4, generator=g)
    p = cls_ce.softmax(-1)[:, :3]
    expected = sum(p[i][:, None, None] * masks[i].sigmoid()[None] for i in range(5))
    torch.testing.assert_close(semantic_inference(cls_ce, masks, focal=False), expected)


# ------------------------------------------------------------------------------------ postprocess_image


def test_postprocess_image_equals_full_resize_path():
    g = torch.Generator().manual_seed(2)
    q, c = 20, 5
    cls = torch.randn(q, c, generator=g) * 2
    low = torch.randn(q, 8, 10, generator=g) * 3
    boxes = torch.rand(q, 4, generator=g) * 0.5 + 0.25
    padded, image, output = (32, 40), (28, 37), (21, 30)
    pred = postprocess_image(
        cls,
        low,
        boxes,
        padded,
        image,
        output,
        instance_on=True,
        panoptic_on=True,
        semantic_on=True,
        thing_classes={0, 1, 2},
        top_k=15,
    )
    assert isinstance(pred, Prediction)
    full = resize_mask_logits(low, padded, image, output)
    abs_boxes = boxes_to_output_size(boxes, padded, image, output)
    inst = instance_inference(cls, full, abs_boxes, top_k=15, thing_classes={0, 1, 2})
    torch.testing.assert_close(pred.instances.scores, inst.scores)
    assert torch.equal(pred.instances.masks, inst.masks)
    assert torch.equal(pred.instances.labels, inst.labels)
    pan = panoptic_inference(cls, full, {0, 1, 2})
    assert torch.equal(pred.panoptic.segments, pan.segments)
    assert pred.panoptic.segments_info == pan.segments_info
    torch.testing.assert_close(pred.semantic, semantic_inference(cls, full))
    # semantic-only: computed at padded size then resized, as the official semantic-only path
    sem_only = postprocess_image(cls, low, None, padded, image, output, instance_on=False, semantic_on=True)
    assert sem_only.instances is None and sem_only.panoptic is None
    at_padded = torch.nn.functional.interpolate(low[None], size=padded, mode="bilinear", align_corners=False)[
        0
    ]
    expected = resize_mask_logits(semantic_inference(cls, at_padded), padded, image, output)
    torch.testing.assert_close(sem_only.semantic, expected)
    # chunking the query sum changes nothing but the summation order
    chunked = postprocess_image(
        cls,
        low,
        boxes,
        padded,
        image,
        output,
        instance_on=False,
        semantic_on=True,
        semantic_resize_first=True,
        semantic_chunk=3,
    )
    torch.testing.assert_close(chunked.semantic, semantic_inference(cls, full))
