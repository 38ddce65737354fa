"""Panoptic quality: hand-worked cases (VOID, crowd, unmatched, IoU exactly 0.5), a brute-force reference,
file round trips with 1 and 2 workers, input errors, and the real COCO sample."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from coco_eval import COCOPanopticEvaluator, EvaluationError, pq_compute, pq_single_image
from coco_eval._io import id2rgb
from coco_eval.panoptic import pq_average

CATS = {1: {"id": 1, "name": "thing", "isthing": 1}, 2: {"id": 2, "name": "stuff", "isthing": 0},
        3: {"id": 3, "name": "other", "isthing": 1}}  # fmt: skip


def seg(i, cat, crowd=0):
    return {"id": i, "category_id": cat, "iscrowd": crowd}


def test_hand_computed_pq():
    gt = np.zeros((10, 10), np.int64)
    gt[:5] = 1  # thing, 50 px
    gt[5:] = 2  # stuff, 50 px
    pred = np.zeros((10, 10), np.int64)
    pred[:4] = 5  # 40 px inside GT 1: IoU 40/50 = 0.8
    pred[4:] = 6  # 60 px covering GT 2: IoU 50/60
    stats = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(5, 1), seg(6, 2)], CATS)
    res = pq_average(stats, CATS)
    assert res["per_class"][1] == pytest.approx({"pq": 0.8, "sq": 0.8, "rq": 1.0})
    assert res["per_class"][2]["pq"] == pytest.approx(50 / 60)
    assert res["All"]["pq"] == pytest.approx((0.8 + 50 / 60) / 2)
    assert res["All"]["n"] == 2 and res["Things"]["n"] == 1 and res["Stuff"]["n"] == 1
    assert res["Things"]["pq"] == pytest.approx(0.8) and res["Stuff"]["sq"] == pytest.approx(50 / 60)
    assert res["per_class"][3] == {"pq": 0.0, "sq": 0.0, "rq": 0.0}  # unseen category: not in n


@pytest.mark.parametrize(("pred_len", "matched"), [(20, False), (19, True)])
def test_iou_exactly_half_does_not_match(pred_len, matched):
    gt = np.full((4, 30), 2, np.int64)  # stuff everywhere (no VOID, which would leave the union)
    gt[0, :10] = 1  # 10 px thing
    pred = np.zeros((4, 30), np.int64)
    pred[0, :pred_len] = 7  # contains the GT: IoU = 10 / pred_len (0.5 exactly, or 10/19 > 0.5)
    stats = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(7, 1)], CATS)
    iou, tp, fp, fn = stats[1]
    if matched:
        assert (tp, fp, fn) == (1, 0, 0) and iou == pytest.approx(10 / 19)
    else:
        assert (tp, fp, fn) == (0, 1, 1) and iou == 0.0
        assert pq_average(stats, CATS)["Things"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 1}


def test_void_is_left_out_of_union_and_mostly_void_predictions_are_ignored():
    gt = np.zeros((10, 10), np.int64)
    gt[0, :] = 1  # 10 px thing; everything else VOID
    pred = np.zeros((10, 10), np.int64)
    pred[0:3, :] = 4  # 10 px on the GT + 20 on VOID: union = 30 + 10 - 10 - 20 = 10 -> IoU 1
    pred[5:7, :] = 8  # 20 px, all VOID, unmatched: ignored (not FP)
    pred[8, :5] = 9  # category 3, 5 px all on VOID: ignored
    stats = pq_single_image(gt, [seg(1, 1)], pred, [seg(4, 1), seg(8, 1), seg(9, 3)], CATS)
    assert stats[1] == [1.0, 1, 0, 0]
    assert 3 not in stats


def test_half_void_prediction_is_a_false_positive():
    gt = np.zeros((3, 10), np.int64)
    gt[1, :] = 1  # stuff segment 1 (10 px); rows 0 and 2 are VOID
    pred = np.zeros((3, 10), np.int64)
    pred[0, :] = 5  # stuff pred: 10 px on VOID ...
    pred[1, :5] = 5  # ... + 5 on the GT: union = 15 + 10 - 5 - 10 = 10, IoU 0.5 exactly -> no match
    pred[1, 5:] = 6  # thing pred: 5 px on the GT stuff ...
    pred[2, :5] = 6  # ... + 5 on VOID: exactly half VOID is not "more than half" -> FP
    stats = pq_single_image(gt, [seg(1, 2)], pred, [seg(5, 2), seg(6, 1)], CATS)
    assert stats[2] == [0.0, 0, 0, 1]  # GT unmatched; pred 5 is 10/15 VOID -> ignored
    assert stats[1] == [0.0, 0, 1, 0]


def test_crowd_regions():
    gt = np.zeros((10, 10), np.int64)
    gt[:4] = 1  # crowd of category 1 (40 px)
    gt[4:] = 2  # stuff 60 px
    pred = np.zeros((10, 10), np.int64)
    pred[:4, :6] = 3  # category 1 on the crowd, 24 px: never matches, 100% crowd -> ignored
    pred[:4, 6:] = 4  # category 3 on the crowd of category 1 (16 px): crowd of another class -> FP
    pred[4:] = 5  # stuff exact -> TP IoU 1
    stats = pq_single_image(
        gt, [seg(1, 1, crowd=1), seg(2, 2)], pred, [seg(3, 1), seg(4, 3), seg(5, 2)], CATS
    )
    assert stats.get(1, [0.0, 0, 0, 0]) == [0.0, 0, 0, 0]  # crowd: no FN, covered pred: no FP
    assert stats[3] == [0.0, 0, 1, 0]
    assert stats[2] == [1.0, 1, 0, 0]


def test_unmatched_segments():
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1
    gt[2:] = 2
    pred = np.zeros((4, 4), np.int64)
    pred[:2] = 3  # wrong category on GT 1 -> GT 1 FN, pred FP
    stats = pq_single_image(gt, [seg(1, 1), seg(2, 2)], pred, [seg(3, 3)], CATS)
    assert stats[1] == [0.0, 0, 0, 1] and stats[2] == [0.0, 0, 0, 1] and stats[3] == [0.0, 0, 1, 0]
    res = pq_average(stats, CATS)
    assert res["All"] == {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 3}


def _reference_pq(gt, gt_info, pred, pred_info, cats):
    """Brute force from boolean masks, written straight from the paper's definition + panopticapi rules."""
    out = {}
    void = gt == 0
    crowd = {s["category_id"]: gt == s["id"] for s in gt_info if s["iscrowd"]}
    matched_gt, matched_pred = set(), set()
    for g in gt_info:
        for p in pred_info:
            if g["iscrowd"] or g["category_id"] != p["category_id"]:
                continue
            gm, pm = gt == g["id"], pred == p["id"]
            inter = np.sum(gm & pm)
            union = np.sum(gm | pm) - np.sum(pm & void)
            if inter and inter / union > 0.5:
                s = out.setdefault(g["category_id"], [0.0, 0, 0, 0])
                s[0] += inter / union
                s[1] += 1
                matched_gt.add(g["id"])
                matched_pred.add(p["id"])
    for g in gt_info:
        if g["id"] not in matched_gt and not g["iscrowd"]:
            out.setdefault(g["category_id"], [0.0, 0, 0, 0])[3] += 1
    for p in pred_info:
        if p["id"] in matched_pred:
            continue
        pm = pred == p["id"]
        ignore = np.sum(pm & void)
        if p["category_id"] in crowd:
            ignore += np.sum(pm & crowd[p["category_id"]])
        if ignore / np.sum(pm) <= 0.5:
            out.setdefault(p["category_id"], [0.0, 0, 0, 0])[2] += 1
    return out


def _random_image(r, h=24, w=32):
    """Random blocky panoptic maps: GT with VOID and crowd, prediction as a perturbed GT."""
    gt = np.zeros((h, w), np.int64)
    gt_info = []
    for i in range(int(r.integers(1, 7))):
        y, x = int(r.integers(0, h - 2)), int(r.integers(0, w - 2))
        gt[y : y + int(r.integers(2, 14)), x : x + int(r.integers(2, 18))] = 10 + i
    for sid in np.unique(gt):
        if sid:
            gt_info.append(
                {"id": int(sid), "category_id": int(r.integers(1, 4)), "iscrowd": int(r.random() < 0.2)}
            )
    pred = gt.copy()
    pred[r.random((h, w)) < 0.15] = 0
    shift = np.roll(pred, int(r.integers(-3, 4)), axis=int(r.integers(0, 2)))
    pred = np.where(r.random((h, w)) < 0.5, shift, pred) * 3 + 1
    pred[pred == 1] = 0
    cats = {s["id"] * 3 + 1: s["category_id"] for s in gt_info}
    pred_info = [{"id": int(p), "category_id": cats[int(p)] if r.random() < 0.8 else int(r.integers(1, 4))}
                 for p in np.unique(pred) if p]  # fmt: skip
    return gt, gt_info, pred, pred_info


def test_matches_brute_force_reference_on_random_images():
    r = np.random.default_rng(0)
    for _ in range(150):
        gt, gt_info, pred, pred_info = _random_image(r)
        ours = pq_single_image(gt, gt_info, pred, pred_info, CATS)
        ref = _reference_pq(gt, gt_info, pred, pred_info, CATS)
        assert ours.keys() == ref.keys()
        for k in ref:
            assert ours[k][1:] == ref[k][1:]
            assert ours[k][0] == pytest.approx(ref[k][0], abs=1e-12)


def _write_set(root, images, prefix):
    (root / prefix).mkdir(parents=True, exist_ok=True)
    anns = []
    for image_id, (ids, info) in enumerate(images):
        name = f"{image_id:04d}.png"
        Image.fromarray(id2rgb(ids)).save(root / prefix / name)
        anns.append({"image_id": image_id, "file_name": name, "segments_info": info})
    data = {"annotations": anns, "categories": list(CATS.values()),
            "images": [{"id": i, "file_name": f"{i:04d}.jpg"} for i in range(len(images))]}  # fmt: skip
    (root / f"{prefix}.json").write_text(json.dumps(data))
    return root / f"{prefix}.json", root / prefix


def test_files_and_workers_match_in_memory(tmp_path):
    r = np.random.default_rng(1)
    images = [_random_image(r) for _ in range(12)]
    gt_json, gt_dir = _write_set(tmp_path, [(g, gi) for g, gi, _, _ in images], "gt")
    pred_json, pred_dir = _write_set(tmp_path, [(p, pi) for _, _, p, pi in images], "pred")
    expected = {}
    for g, gi, p, pi in images:
        pq_single_image(g, gi, p, pi, CATS, stats=expected)
    expected = pq_average(expected, CATS)
    one = pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=1)
    two = pq_compute(gt_json, gt_dir, pred_json, pred_dir, workers=2)
    for name in ("All", "Things", "Stuff"):
        for k in ("pq", "sq", "rq"):
            assert one[name][k] == pytest.approx(expected[name][k], abs=1e-12)
            assert two[name][k] == pytest.approx(one[name][k], abs=1e-12)
        assert one[name]["n"] == two[name]["n"] == expected[name]["n"]
    # streaming evaluator on the same data, no PNGs written for predictions
    ev = COCOPanopticEvaluator(gt_json, gt_dir)
    for i, (_, _, p, pi) in enumerate(images):
        ev.process([{"image_id": i, "file_name": f"{i:04d}.png"}], [{"panoptic_seg": p, "segments_info": pi}])
    res = ev.evaluate()
    assert res["panoptic/PQ"] == pytest.approx(100 * one["All"]["pq"], abs=1e-10)
    assert res["panoptic/RQ_st"] == pytest.approx(100 * one["Stuff"]["rq"], abs=1e-10)
    ev.reset()
    assert ev.stats == {}


def test_errors(tmp_path):
    gt = np.zeros((4, 4), np.int64)
    gt[:2] = 1
    info = [seg(1, 1)]
    with pytest.raises(EvaluationError, match="not in segments_info"):
        pq_single_image(gt, info, gt * 2, info, CATS)  # PNG id 2 unknown
    with pytest.raises(EvaluationError, match="in segments_info but not in the PNG"):
        pq_single_image(gt, info, gt, [seg(1, 1), seg(5, 1)], CATS)
    with pytest.raises(EvaluationError, match="duplicate segment id 1"):
        pq_single_image(gt, info, gt, [seg(1, 1), seg(1, 2)], CATS)
    with pytest.raises(EvaluationError, match="unknown category_id 9"):
        pq_single_image(gt, info, gt, [seg(1, 9)], CATS)
    with pytest.raises(EvaluationError, match="size"):
        pq_single_image(gt, info, gt[:3], info, CATS)

    gt_json, gt_dir = _write_set(tmp_path, [(gt, info)], "gt")
    pred_json, pred_dir = _write_set(tmp_path, [(gt[:3], info)], "pred")
    with pytest.raises(EvaluationError, match=r"0000\.png.*size"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    pred = json.loads(pred_json.read_text())
    pred["annotations"][0]["image_id"] = 5
    pred_json.write_text(json.dumps(pred))
    with pytest.raises(EvaluationError, match="no prediction for image_id 0"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    pred["annotations"].append(dict(pred["annotations"][0], image_id=0))
    pred_json.write_text(json.dumps(pred))
    with pytest.raises(EvaluationError, match=r"image ids \[5\]"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    pred_json.write_text("{not json")
    with pytest.raises(EvaluationError, match="pred.json"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)
    pred_json.write_text(json.dumps({"annotations": [{"image_id": 0, "file_name": "0000.png"}]}))
    with pytest.raises(EvaluationError, match="segments_info"):
        pq_compute(gt_json, gt_dir, pred_json, pred_dir)


def test_real_coco_sample_against_itself(sample_dir, tmp_path):
    gt_json = sample_dir / "panoptic_examples.json"
    gt_dir = sample_dir / "panoptic_examples"
    data = json.loads(gt_json.read_text())
    data["categories"] = json.loads((sample_dir / "panoptic_coco_categories.json").read_text())
    full = tmp_path / "gt.json"
    full.write_text(json.dumps(data))
    res = pq_compute(full, gt_dir, full, gt_dir, workers=2)
    assert res["All"]["pq"] == pytest.approx(1.0) and res["All"]["rq"] == 1.0
    assert res["Things"]["n"] > 0 and res["Stuff"]["n"] > 0
    # a damaged copy: drop one predicted segment (its pixels become VOID) -> exactly one FN more
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_dir, pred_dir)
    ann = data["annotations"][0]
    victim = next(s for s in ann["segments_info"] if not s["iscrowd"])
    from coco_eval._io import read_panoptic_png

    ids = read_panoptic_png(pred_dir / ann["file_name"])
    ids[ids == victim["id"]] = 0
    Image.fromarray(id2rgb(ids)).save(pred_dir / ann["file_name"])
    pred = json.loads(full.read_text())
    pred["annotations"][0]["segments_info"] = [s for s in ann["segments_info"] if s["id"] != victim["id"]]
    (tmp_path / "pred.json").write_text(json.dumps(pred))
    res2 = pq_compute(full, gt_dir, tmp_path / "pred.json", pred_dir)
    cat = victim["category_id"]
    assert res2["per_class"][cat]["rq"] < 1.0
    assert res2["All"]["pq"] < 1.0


def test_rgb_to_id():
    from coco_eval._io import rgb2id

    rgb = np.array([[[1, 2, 3], [0, 0, 0]]], np.uint8)
    assert rgb2id(rgb).tolist() == [[1 + 256 * 2 + 256**2 * 3, 0]]
    ids = np.array([[0, 5, 70000, 2**24 - 1]])
    np.testing.assert_array_equal(rgb2id(id2rgb(ids)), ids)
