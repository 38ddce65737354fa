"""Shared test helpers: a hypothesis strategy for COCO instance sets full of edge cases, and plain
pycocotools driven directly (the reference every backend is compared against)."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from hypothesis import strategies as st
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# maxDets variants: the default, small caps that truncate, and one without 100 (pycocotools then reports
# -1 for the stats that ask for maxDets=100)
MAX_DETS = [(1, 10, 100), (1, 2, 3), (2, 4, 100), (1, 10, 50)]
# GT areas on and next to the small/medium/large boundaries (pycocotools' ranges are closed at both ends)
BOUNDARY_AREAS = [0.0, 1.0, 1023.5, 1024.0, 1024.5, 9216.0, 9215.75, 9216.25, 1e10]


def _rle_str(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE (``counts`` as a list, column-major runs starting with 0s)."""
    flat = mask.astype(np.uint8).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        runs = [0, *runs]
    return {"size": list(mask.shape), "counts": runs}


@st.composite
def instance_sets(draw, max_images: int = 4, max_side: int = 40):
    """(gt dict, detections, params) with crowds, ignore flags, boundary areas, ties, duplicates, empty images,
    GT-less categories, polygon / RLE / uncompressed-RLE GT and detection masks as compressed RLE.

    Detections carry both ``bbox`` and ``segmentation`` (string RLE) plus ``mask`` (the (H, W) array) so that
    one set serves bbox and segm; :func:`pycocotools_eval` strips what an IoU type does not use.
    """
    rnd = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_img = draw(st.integers(1, max_images))
    image_ids = draw(st.lists(st.integers(0, 10**6), min_size=n_img, max_size=n_img, unique=True))
    n_cat = draw(st.integers(1, 4))
    cat_ids = draw(st.lists(st.integers(1, 1000), min_size=n_cat, max_size=n_cat, unique=True))
    images, anns, dets = [], [], []
    for image_id in image_ids:
        h, w = int(rnd.integers(4, max_side)), int(rnd.integers(4, max_side))
        images.append({"id": image_id, "height": h, "width": w})
        objects = []

        def shape(h=h, w=w):
            x0, y0 = int(rnd.integers(0, w - 1)), int(rnd.integers(0, h - 1))
            x1, y1 = int(rnd.integers(x0 + 1, w + 1)), int(rnd.integers(y0 + 1, h + 1))
            if rnd.random() < 0.3:  # half-pixel boxes: IoUs land exactly on thresholds less often
                box = [x0 + 0.5, y0 + 0.5, max(x1 - x0 - 0.5, 0.5), max(y1 - y0 - 0.5, 0.5)]
            else:
                box = [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]
            m = np.zeros((h, w), np.uint8)
            m[y0:y1, x0:x1] = 1
            if rnd.random() < 0.4:
                m &= (rnd.random((h, w)) > 0.3).astype(np.uint8)
            return box, m

        n_gt = int(rnd.choice([0, 0, 1, 2, 3, 5]))
        for _ in range(n_gt):
            box, m = shape()
            cat = int(rnd.choice(cat_ids[: max(1, n_cat - 1)]))  # the last category often has no GT
            kind = rnd.integers(0, 3)
            if kind == 0:  # polygon: the box outline (pycocotools rasterises it)
                x, y, bw, bh = box
                seg = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
            elif kind == 1:
                seg = _rle_str(m)
            else:
                seg = _uncompressed(m)
            area = float(rnd.choice(BOUNDARY_AREAS)) if rnd.random() < 0.3 else float(m.sum())
            ann = {"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                   "segmentation": seg, "area": area, "iscrowd": int(rnd.random() < 0.2)}  # fmt: skip
            if rnd.random() < 0.15:
                ann["ignore"] = int(rnd.integers(0, 2))  # pycocotools overwrites it with iscrowd
            if rnd.random() < 0.1:
                del ann["iscrowd"]  # COCO files omit it; pycocotools treats it as 0
            anns.append(ann)
            objects.append((box, m, cat))
        n_dt = int(rnd.choice([0, 1, 3, 6, 12]))
        scores = rnd.choice([0.1, 0.5, 0.5, 0.9, 1.0], size=n_dt) if rnd.random() < 0.5 else rnd.random(n_dt)
        for k in range(n_dt):
            r = rnd.random()
            if objects and r < 0.45:  # a true positive, possibly perturbed
                box, m, cat = objects[int(rnd.integers(0, len(objects)))]
                if rnd.random() < 0.3:
                    box = [box[0], box[1], box[2] + 1.0, box[3]]
                    m = m.copy()
                    m[:, min(int(box[0] + box[2]) - 1, w - 1)] = 1
            elif dets and r < 0.55:  # an exact duplicate of an earlier detection
                d = dets[int(rnd.integers(0, len(dets)))]
                if d["image_id"] == image_id:
                    dets.append(dict(d, score=float(scores[k])))
                    continue
                box, m = shape()
                cat = int(rnd.choice(cat_ids))
            else:
                box, m = shape()
                cat = int(rnd.choice(cat_ids))
                if (
                    rnd.random() < 0.1
                ):  # a degenerate box (x2 < x1 from a broken model): pycocotools scores it
                    box = [box[0] + box[2], box[1], -box[2], box[3]]
            dets.append({"image_id": image_id, "category_id": cat, "bbox": list(box), "score": float(scores[k]),
                         "segmentation": _rle_str(m), "mask": m})  # fmt: skip
    gt = {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in cat_ids], "annotations": anns}
    params = {"max_dets": draw(st.sampled_from(MAX_DETS)), "use_cats": draw(st.booleans())}
    if draw(st.integers(0, 3)) == 0:  # evaluate a subset of the images (detectron2's partial runs)
        params["img_ids"] = sorted(draw(st.sets(st.sampled_from(image_ids), min_size=1)))
    return gt, dets, params


def detections_for(dets: list[dict], iou_type: str) -> list[dict]:
    """Result records as detectron2 hands them to pycocotools: the box alone for bbox, the RLE alone for segm."""
    drop = ("segmentation", "mask") if iou_type == "bbox" else ("bbox", "mask")
    return [{k: v for k, v in d.items() if k not in drop} for d in dets]


def pycocotools_eval(
    gt: dict, dets: list[dict], iou_type: str, max_dets=(1, 10, 100), use_cats=True, img_ids=None
):
    """Plain pycocotools ``COCOeval``: (stats (12,), eval dict) with precision (T,R,K,A,M) and recall (T,K,A,M)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        for ann in coco_gt.dataset["annotations"]:
            ann.setdefault("iscrowd", 0)  # pycocotools' computeIoU raises KeyError without it
        coco_gt.createIndex()
        records = copy.deepcopy(detections_for(dets, iou_type))
        if records:
            coco_dt = coco_gt.loadRes(records)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": copy.deepcopy(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                               "annotations": []}  # fmt: skip
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.params.maxDets = list(max_dets)
        ev.params.useCats = int(use_cats)
        if img_ids is not None:
            ev.params.imgIds = list(img_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64), ev.eval
