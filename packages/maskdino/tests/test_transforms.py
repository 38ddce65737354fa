"""LSJ and test-time resize keep image, boxes, masks and semantic maps consistent."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision import tv_tensors

from maskdino.data.coco import finalize_sample
from maskdino.data.transforms import (
    IMAGE_PAD_VALUE,
    LargeScaleJitter,
    RandomHorizontalFlip,
    ResizeShortestEdge,
    apply_seeded,
    masks_to_boxes,
)


def _sample(h: int, w: int, rects: list[tuple[int, int, int, int]]) -> dict:
    masks = torch.zeros(len(rects), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(rects):
        masks[i, y0:y1, x0:x1] = True
    img = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    sem = torch.zeros(h, w, dtype=torch.uint8)
    return {
        "image": tv_tensors.Image(img),
        "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks),
        "labels": torch.arange(len(rects)),
        "sem_seg": tv_tensors.Mask(sem),
    }


def test_masks_to_boxes_edges():
    m = torch.zeros(3, 5, 7, dtype=torch.bool)
    m[0, 2, 3] = True
    m[1, 1:4, 0:7] = True
    assert masks_to_boxes(m).tolist() == [[3, 2, 4, 3], [0, 1, 7, 4], [0, 0, 0, 0]]


@st.composite
def _cases(draw):
    h = draw(st.integers(24, 80))
    w = draw(st.integers(24, 80))
    n = draw(st.integers(1, 4))
    rects = []
    for _ in range(n):
        x0 = draw(st.integers(0, w - 8))
        y0 = draw(st.integers(0, h - 8))
        rects.append((x0, y0, draw(st.integers(x0 + 6, w)), draw(st.integers(y0 + 6, h))))
    return h, w, rects, draw(st.integers(0, 2**31 - 1)), draw(st.sampled_from([32, 48, 64]))


@settings(max_examples=30, deadline=None)
@given(_cases())
def test_lsj_boxes_follow_masks(case):
    """The v2-transformed annotation box of every surviving instance equals the box of its transformed mask
    within 1 px (nearest-neighbour mask resizing vs exact box scaling), for random scales, crops and flips."""
    h, w, rects, seed, size = case
    tf = LargeScaleJitter(size, 0.1, 2.0, 0.5)
    out = apply_seeded(tf, _sample(h, w, rects), seed)
    assert out["image"].shape == (3, size, size)
    assert out["masks"].shape[-2:] == (size, size) and out["sem_seg"].shape == (size, size)
    assert out["masks"].dtype == torch.bool
    boxes = out["boxes"].as_subclass(torch.Tensor)
    mboxes = masks_to_boxes(out["masks"].as_subclass(torch.Tensor))
    nonempty = out["masks"].flatten(1).any(1)
    for i in range(len(rects)):
        if nonempty[i]:
            assert torch.allclose(boxes[i], mboxes[i], atol=1.0), (boxes[i], mboxes[i])
    # finalize drops instances cropped away entirely and keeps masks/boxes/labels aligned
    rec = {"image_id": 0, "height": h, "width": w, "file_name": "x"}
    fin = finalize_sample(out, rec)
    k = int(nonempty.sum())
    assert (
        fin["instances"]["masks"].shape[0]
        == k
        == len(fin["instances"]["labels"])
        == len(fin["instances"]["boxes"])
    )
    assert fin["instances"]["masks"].flatten(1).any(1).all()
    # padding: image 128, semantic 255, masks 0
    sem = out["sem_seg"].as_subclass(torch.Tensor)
    padded = sem == 255
    if padded.any():
        assert (out["image"][:, padded] == IMAGE_PAD_VALUE).all()
        assert not out["masks"][:, padded].any()


def test_lsj_is_deterministic_per_seed_and_varies_across_seeds():
    s = _sample(50, 70, [(5, 5, 30, 40), (40, 10, 69, 49)])
    tf = LargeScaleJitter(64)
    a = apply_seeded(tf, s, 7)
    b = apply_seeded(tf, s, 7)
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masks"], b["masks"])
    outs = {apply_seeded(tf, s, k)["image"].float().sum().item() for k in range(6)}
    assert len(outs) > 3
    # seeding does not disturb the global RNG
    torch.manual_seed(0)
    x = torch.rand(3)
    torch.manual_seed(0)
    apply_seeded(tf, s, 123)
    assert torch.equal(torch.rand(3), x)


def test_flip_moves_everything():
    s = _sample(10, 20, [(0, 0, 5, 10)])
    out = RandomHorizontalFlip(p=1.0)(s)
    assert out["masks"][0, :, 15:].all() and not out["masks"][0, :, :15].any()
    assert out["boxes"].as_subclass(torch.Tensor)[0].tolist() == [15, 0, 20, 10]
    assert torch.equal(out["image"], s["image"].flip(-1))


def test_lsj_scale_one_keeps_content():
    """min_scale = max_scale = 1, no flip, square input of the output size: identity."""
    s = _sample(32, 32, [(3, 4, 20, 30)])
    out = LargeScaleJitter(32, 1.0, 1.0, 0.0)(s)
    assert torch.equal(out["image"], s["image"]) and torch.equal(out["masks"], s["masks"])


def test_resize_shortest_edge_sizes():
    assert ResizeShortestEdge.output_size(480, 640, 800, 1333) == (800, 1067)
    assert ResizeShortestEdge.output_size(100, 1000, 800, 1333) == (133, 1333)
    s = _sample(40, 60, [(10, 10, 30, 30)])
    out = ResizeShortestEdge(80, 1000)(s)
    assert out["image"].shape == (3, 80, 120) and out["masks"].shape == (1, 80, 120)
    assert torch.allclose(out["boxes"].as_subclass(torch.Tensor)[0], torch.tensor([20.0, 20, 60, 60]))
