"""Every backend against plain pycocotools, bit for bit, on generated sets full of edge cases.

hypothesis draws ground truth and detections with crowds, ``ignore`` flags, GT areas on the small/medium/large
boundaries, tied and duplicate detections, images without GT or without detections, categories without GT,
polygon / compressed / uncompressed RLE ground truth, maxDets variants (caps that truncate, no 100) and
``useCats`` on and off. For each example the 12 stats and the full precision and recall arrays must be
equal to pycocotools' (NaN == NaN), for bbox and segm, and detection masks given as (H, W) arrays must give
the same result as the same masks given as RLE.
"""

import numpy as np
import pytest
from coco_eval_testlib import detections_for, instance_sets, pycocotools_eval
from hypothesis import HealthCheck, given, settings
from pycocotools import mask as mask_util

from coco_eval import evaluate_instances
from coco_eval.instances import available_backends

EXACT = [b for b in ("pycocotools", "hotcoco", "ultrafast", "faster") if available_backends()[b]]


def _assert_same(res, ref_stats, ref_eval):
    np.testing.assert_array_equal(res.raw_stats, ref_stats)
    assert res.precision.shape == ref_eval["precision"].shape
    np.testing.assert_array_equal(res.precision, ref_eval["precision"])
    np.testing.assert_array_equal(res.recall, ref_eval["recall"])
    expected = np.where(ref_stats >= 0, ref_stats * 100, np.nan)
    np.testing.assert_array_equal(np.array(list(res.stats.values())), expected)


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=instance_sets())
def test_every_backend_matches_pycocotools(case):
    gt, dets, params = case
    for iou_type in ("bbox", "segm"):
        ref_stats, ref_eval = pycocotools_eval(gt, dets, iou_type, **params)
        records = detections_for(dets, iou_type)
        for backend in EXACT:
            res = evaluate_instances(gt, records, iou_type, backend=backend, **params)
            assert res.backend == backend
            _assert_same(res, ref_stats, ref_eval)
        if iou_type == "segm" and dets:
            # the same masks as (H, W) arrays, and the full records (box + mask) as detectron2 writes them
            as_arrays = [dict(r, segmentation=d["mask"]) for r, d in zip(records, dets)]
            _assert_same(evaluate_instances(gt, as_arrays, "segm", **params), ref_stats, ref_eval)
            full = [{k: v for k, v in d.items() if k != "mask"} for d in dets]
            _assert_same(evaluate_instances(gt, full, "segm", **params), ref_stats, ref_eval)


@pytest.mark.parametrize("backend", EXACT)
def test_hundred_detection_cap_per_image(backend):
    # 130 detections of one category in one image (scores tied in blocks): the default cap keeps 100
    r = np.random.default_rng(3)
    gt = {"images": [{"id": 1, "height": 100, "width": 100}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [float(x), float(y), 8.0, 8.0],
                           "area": 64.0, "iscrowd": 0} for i, (x, y) in enumerate(r.integers(0, 90, (40, 2)))]}  # fmt: skip
    dets = [{"image_id": 1, "category_id": 1, "score": float(k // 10) / 13,
             "bbox": [float(x), float(y), 8.0, 8.0]} for k, (x, y) in enumerate(r.integers(0, 90, (130, 2)))]  # fmt: skip
    ref_stats, ref_eval = pycocotools_eval(gt, dets, "bbox")
    res = evaluate_instances(gt, dets, "bbox", backend=backend)
    _assert_same(res, ref_stats, ref_eval)
    capped = evaluate_instances(gt, dets, "bbox", backend=backend, max_dets=(1, 10, 130))
    assert not np.array_equal(capped.recall, res.recall)  # the 30 lowest-scored detections matter uncapped


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_real_coco_sample_every_backend(sample_dir, iou_type):
    # the real annotations (RLE masks, crowd regions, ids from 0) with detections derived from them: shifted
    # masks and boxes, wrong classes, duplicates and score ties; every backend against plain pycocotools
    import json

    gt = json.loads((sample_dir / "panoptic_coco_detection_format.json").read_text())
    for i, ann in enumerate(gt["annotations"]):
        ann["id"] = i + 1  # plain pycocotools cannot match a GT whose id is 0 (this file starts at 0)
    r = np.random.default_rng(0)
    cats = [c["id"] for c in gt["categories"]]
    dets = []
    for ann in gt["annotations"]:
        h, w = ann["segmentation"]["size"]
        m = mask_util.decode(ann["segmentation"])
        for k in range(3):
            shifted = np.roll(m, (int(r.integers(-6, 7)), int(r.integers(-6, 7))), axis=(0, 1)) if k else m
            rle = mask_util.encode(np.asfortranarray(shifted))
            rle["counts"] = rle["counts"].decode("ascii")
            x, y, bw, bh = ann["bbox"]
            box = [
                x + float(r.uniform(-5, 5)),
                y + float(r.uniform(-5, 5)),
                bw * float(r.uniform(0.8, 1.2)),
                bh,
            ]
            cat = ann["category_id"] if r.random() < 0.8 else int(r.choice(cats))
            dets.append({"image_id": ann["image_id"], "category_id": cat, "bbox": box, "segmentation": rle,
                         "score": float(np.round(r.random(), 1))})  # fmt: skip
    records = detections_for(dets, iou_type)
    ref_stats, ref_eval = pycocotools_eval(gt, records, iou_type)
    assert 0 < ref_stats[0] < 1
    for backend in EXACT:
        _assert_same(evaluate_instances(gt, records, iou_type, backend=backend), ref_stats, ref_eval)
