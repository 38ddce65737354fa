"""Instance AP: hand-computed values, bit-exact agreement with pycocotools, errors, the real COCO sample."""

import contextlib
import copy
import io
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coco_eval import EvaluationError, evaluate_instances, instances_to_coco_json
from coco_eval.instances import faster_available, resolve_backend


def _box_gt():
    # one image, one category, two 50x50 boxes (area 2500: "medium")
    return {
        "images": [{"id": 1, "width": 200, "height": 200}],
        "categories": [{"id": 3, "name": "cat"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 3,
                "bbox": [0, 0, 50, 50],
                "area": 2500,
                "iscrowd": 0,
                "segmentation": [[0, 0, 50, 0, 50, 50, 0, 50]],
            },
            {
                "id": 2,
                "image_id": 1,
                "category_id": 3,
                "bbox": [100, 100, 50, 50],
                "area": 2500,
                "iscrowd": 0,
                "segmentation": [[100, 100, 150, 100, 150, 150, 100, 150]],
            },
        ],
    }


def test_hand_computed_ap():
    # detections in score order: TP (exact), FP (no overlap), TP (exact)
    # P/R points: (1, .5), (.5, .5), (2/3, 1). Interpolated precision: 1 for the 51 recall thresholds <= .5,
    # 2/3 for the 50 above, at every IoU threshold -> AP = (51 + 50 * 2/3) / 101.
    dets = [
        {"image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9},
        {"image_id": 1, "category_id": 3, "bbox": [60, 0, 20, 20], "score": 0.8},
        {"image_id": 1, "category_id": 3, "bbox": [100, 100, 50, 50], "score": 0.7},
    ]
    expected = 100 * (51 + 50 * 2 / 3) / 101
    res = evaluate_instances(_box_gt(), dets, "bbox")
    s = res.stats
    for key in ("AP", "AP50", "AP75"):
        assert s[key] == pytest.approx(expected, rel=1e-12)
    # the FP is 20x20 (small): unmatched detections outside the area range are ignored, so APm is perfect
    assert s["APm"] == pytest.approx(100.0, rel=1e-12)
    assert math.isnan(s["APs"]) and math.isnan(s["APl"])  # no GT in those ranges (pycocotools -1)
    assert s["AR1"] == pytest.approx(50.0)  # only the top detection counts
    assert s["AR10"] == pytest.approx(100.0) and s["AR100"] == pytest.approx(100.0)
    assert res.per_category == {"cat": pytest.approx(expected, rel=1e-12)}
    assert res.backend == resolve_backend("auto")


def test_inputs_not_mutated_and_empty_detections():
    gt, dets = _box_gt(), [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9}]
    gt0, dets0 = copy.deepcopy(gt), copy.deepcopy(dets)
    evaluate_instances(gt, dets, "bbox")
    assert gt == gt0 and dets == dets0
    empty = evaluate_instances(gt, [], "bbox")
    assert empty.stats["AP"] == 0.0 and empty.stats["AR100"] == 0.0


def _random_set(seed: int, n_img: int = 6, h: int = 40, w: int = 48):
    """Random GT + detections with crowds, score ties, integer boxes (IoU exactly on thresholds) and masks."""
    r = np.random.default_rng(seed)
    images = [{"id": i + 10, "height": h, "width": w} for i in range(n_img)]
    cats = [{"id": c, "name": f"c{c}"} for c in (1, 2, 5)]
    anns, dets = [], []

    def shape():
        x0, y0 = int(r.integers(0, w - 2)), int(r.integers(0, h - 2))
        x1, y1 = int(r.integers(x0 + 1, w)), int(r.integers(y0 + 1, h))
        m = np.zeros((h, w), np.uint8)
        m[y0:y1, x0:x1] = 1
        if r.random() < 0.5:
            m &= (r.random((h, w)) > 0.3).astype(np.uint8)
            m[y0, x0] = 1
        rle = mask_util.encode(np.asfortranarray(m))
        box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
        rle["counts"] = rle["counts"].decode()
        return box, rle

    for img in images:
        for _ in range(int(r.integers(0, 5))):
            box, rle = shape()
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(r.choice([1, 2, 5])),
                         "bbox": box, "segmentation": rle, "area": float(mask_util.area(rle)),
                         "iscrowd": int(r.random() < 0.15)})  # fmt: skip
        own = [a for a in anns if a["image_id"] == img["id"]]
        for _ in range(int(r.integers(0, 9))):
            score = float(np.round(r.random(), 1))  # ties on purpose
            if own and r.random() < 0.5:  # a copy of a GT object: true positives (exercise the faster fix)
                g = own[int(r.integers(0, len(own)))]
                dets.append({"image_id": img["id"], "category_id": g["category_id"], "bbox": g["bbox"],
                             "segmentation": g["segmentation"], "score": score})  # fmt: skip
                continue
            box, rle = shape()
            dets.append({"image_id": img["id"], "category_id": int(r.choice([1, 2, 5])), "bbox": box,
                         "segmentation": rle, "score": score})  # fmt: skip
    return {"images": images, "categories": cats, "annotations": anns}, dets


def _pycocotools_stats(gt, dets, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = copy.deepcopy(dets)
        if iou_type == "segm":
            for d in dets:
                d.pop("bbox")  # as detectron2: the mask alone defines a segm detection
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.where(ev.stats >= 0, ev.stats * 100, np.nan), ev.eval["precision"]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), iou_type=st.sampled_from(["bbox", "segm"]))
def test_agrees_with_pycocotools_exactly(seed, iou_type):
    gt, dets = _random_set(seed)
    if not dets:
        return
    ref_stats, ref_prec = _pycocotools_stats(gt, dets, iou_type)
    ours = evaluate_instances(gt, dets, iou_type, backend="pycocotools")
    np.testing.assert_array_equal(np.array(list(ours.stats.values())), ref_stats)  # bit-exact (NaN == NaN)
    np.testing.assert_array_equal(ours.precision, ref_prec)
    auto = evaluate_instances(gt, dets, iou_type)
    np.testing.assert_array_equal(np.array(list(auto.stats.values())), ref_stats)


@pytest.mark.skipif(not faster_available(), reason="faster-coco-eval not installed")
@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), iou_type=st.sampled_from(["bbox", "segm"]), n_img=st.integers(1, 6))
def test_faster_backend_is_bit_exact(seed, iou_type, n_img):
    gt, dets = _random_set(seed, n_img=n_img)
    if not dets:
        return
    ref_stats, ref_prec = _pycocotools_stats(gt, dets, iou_type)
    ours = evaluate_instances(gt, dets, iou_type, backend="faster")
    assert ours.backend == "faster"
    np.testing.assert_array_equal(np.array(list(ours.stats.values())), ref_stats)
    np.testing.assert_array_equal(ours.precision, ref_prec)
    raw = evaluate_instances(gt, dets, iou_type, backend="faster-raw")  # uncorrected: equal up to rounding
    np.testing.assert_allclose(raw.precision, ref_prec, rtol=0, atol=1e-15)


@pytest.mark.skipif(not faster_available(), reason="faster-coco-eval not installed")
@pytest.mark.parametrize("second_is_tp", [False, True])
def test_faster_unit_precision_correction(second_is_tp):
    # top detection TP then FP: pycocotools' interpolated precision there is 1/(1+eps) = 0.9999999999999998;
    # with two leading TPs it is exactly 1.0. faster-coco-eval alone gives 1.0 in both cases.
    gt = _box_gt()
    second = [100, 100, 50, 50] if second_is_tp else [60, 60, 20, 20]
    dets = [{"image_id": 1, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9},
            {"image_id": 1, "category_id": 3, "bbox": second, "score": 0.8}]  # fmt: skip
    ref = evaluate_instances(gt, dets, "bbox", backend="pycocotools")
    fast = evaluate_instances(gt, dets, "bbox", backend="faster")
    raw = evaluate_instances(gt, dets, "bbox", backend="faster-raw")
    expected = 1.0 if second_is_tp else 1 / (1 + np.spacing(1))
    assert ref.precision[0, 0, 0, 0, 2] == expected
    assert fast.precision[0, 0, 0, 0, 2] == expected
    assert raw.precision[0, 0, 0, 0, 2] == 1.0
    np.testing.assert_array_equal(list(fast.stats.values()), list(ref.stats.values()))  # NaN == NaN


def test_results_json_from_arrays():
    masks = np.zeros((2, 20, 30), bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 10:20, 0:30] = True
    recs = instances_to_coco_json(7, np.array([[3, 2, 9, 5], [0, 10, 30, 20]]), np.array([0.5, 0.25]),
                                  np.array([1, 5]), masks)  # fmt: skip
    assert recs[0]["bbox"] == [3.0, 2.0, 6.0, 3.0] and recs[1]["category_id"] == 5
    json.dumps(recs)  # RLE counts are str
    back = mask_util.decode([{"size": r["segmentation"]["size"], "counts": r["segmentation"]["counts"].encode()}
                             for r in recs])  # fmt: skip
    np.testing.assert_array_equal(back.transpose(2, 0, 1).astype(bool), masks)


@pytest.mark.parametrize(
    ("dets", "message"),
    [
        ([{"image_id": 99, "category_id": 3, "bbox": [0, 0, 1, 1], "score": 1}], "image_id 99"),
        ([{"image_id": 1, "category_id": 4, "bbox": [0, 0, 1, 1], "score": 1}], "category_id 4"),
        ([{"image_id": 1, "category_id": 3, "score": 1}], "'bbox'"),
        ([{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1], "score": 1}], "bbox"),
        ([{"image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}], "'score'"),
    ],
)
def test_bad_detections(dets, message):
    with pytest.raises(EvaluationError, match=message):
        evaluate_instances(_box_gt(), dets, "bbox")


def test_bad_files(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text("[{")
    with pytest.raises(EvaluationError, match="broken.json"):
        evaluate_instances(bad, [], "bbox")
    good = tmp_path / "gt.json"
    good.write_text(json.dumps(_box_gt()))
    with pytest.raises(EvaluationError, match="broken.json"):
        evaluate_instances(good, bad, "bbox")
    with pytest.raises(EvaluationError, match="missing.json"):
        evaluate_instances(good, tmp_path / "missing.json", "bbox")
    gt = _box_gt()
    del gt["annotations"][0]["area"]
    with pytest.raises(EvaluationError, match=r"annotations\[0\].*'area'"):
        evaluate_instances(gt, [], "bbox")
    with pytest.raises(EvaluationError, match="iou_type"):
        evaluate_instances(good, [], "keypoints")
    seg = {"size": [10, 10], "counts": "0"}
    with pytest.raises(EvaluationError, match="size"):
        evaluate_instances(good, [{"image_id": 1, "category_id": 3, "segmentation": seg, "score": 1}], "segm")


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
@pytest.mark.parametrize("backend", ["pycocotools", "faster"])
def test_real_coco_sample_against_itself(sample_dir, iou_type, backend):
    # this file numbers its annotations from 0; pycocotools alone would never match GT id 0 (AP 99.04)
    if backend == "faster" and not faster_available():
        pytest.skip("faster-coco-eval not installed")
    gt_path = sample_dir / "panoptic_coco_detection_format.json"
    gt = json.loads(gt_path.read_text())
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
             "segmentation": a["segmentation"], "score": 1.0} for a in gt["annotations"]]  # fmt: skip
    res = evaluate_instances(gt_path, dets, iou_type, backend=backend)
    assert res.stats["AP"] == pytest.approx(100.0, abs=1e-9)
    assert res.stats["AP50"] == pytest.approx(100.0, abs=1e-9)
    assert res.stats["AR100"] == pytest.approx(100.0, abs=1e-9)
    present = {a["category_id"] for a in gt["annotations"] if not a.get("iscrowd", 0)}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert all(res.per_category[names[c]] == pytest.approx(100.0, abs=1e-9) for c in present)


@pytest.mark.skipif(not faster_available(), reason="faster-coco-eval not installed")
def test_correction_is_exercised_on_random_sets():
    # uncorrected faster-coco-eval must differ somewhere on these sets, the corrected one nowhere
    raw_differs = 0
    for seed in range(25):
        gt, dets = _random_set(seed, n_img=2)
        if not dets:
            continue
        _, ref_prec = _pycocotools_stats(gt, dets, "bbox")
        np.testing.assert_array_equal(
            evaluate_instances(gt, dets, "bbox", backend="faster").precision, ref_prec
        )
        raw_differs += not np.array_equal(
            evaluate_instances(gt, dets, "bbox", backend="faster-raw").precision, ref_prec
        )
    assert raw_differs > 0
