"""Benchmark coco_eval against plain pycocotools on generated COCO-sized data.

Instance part: N images (default 5,000, COCO val size) of 640x480 with ~7 GT objects each and 100
detections per image (boxes + polygon-derived RLE masks); times plain pycocotools COCOeval
(evaluate+accumulate+summarize), our default path (``backend="auto"``: faster-coco-eval corrected to
pycocotools' exact numbers; equality is checked) and uncorrected faster-coco-eval, and prints the ratios. Panoptic part: PQ over M generated PNG pairs (default 5,000, 320x240) with 1 and 2 processes.

    /work/venv/bin/python benchmarks/bench_coco_eval.py --images 1000 --pan-images 5000
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from coco_eval import evaluate_instances, pq_compute
from coco_eval._io import id2rgb
from coco_eval.instances import faster_available

H, W = 480, 640


def _octagon(x: float, y: float, w: float, h: float) -> list[float]:
    cy, k = y + h / 2, 0.3
    pts = [(x + k * w, y), (x + (1 - k) * w, y), (x + w, cy - (0.5 - k) * h), (x + w, cy + (0.5 - k) * h),
           (x + (1 - k) * w, y + h), (x + k * w, y + h), (x, cy + (0.5 - k) * h), (x, cy - (0.5 - k) * h)]  # fmt: skip
    return [float(v) for p in pts for v in p]


def _rle(poly: list[float]) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects([poly], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_instances(n_images: int, n_objects: int, n_dets: int, seed: int = 0) -> tuple[dict, list[dict]]:
    """COCO-like GT (polygons) and detections (boxes + RLE): 1/3 near-duplicates of GT, the rest clutter."""
    r = np.random.default_rng(seed)
    images = [{"id": i + 1, "height": H, "width": W, "file_name": f"{i:06d}.jpg"} for i in range(n_images)]
    cats = [{"id": c, "name": f"class{c}"} for c in range(1, 81)]
    anns, dets = [], []
    for img in images:
        k = max(1, int(r.poisson(n_objects)))
        gcats = r.integers(1, 81, k)
        for j in range(k):
            w, h = float(r.uniform(8, 300)), float(r.uniform(8, 300))
            x, y = float(r.uniform(0, W - w)), float(r.uniform(0, H - h))
            poly = _octagon(x, y, w, h)
            area = float(mask_util.area(mask_util.merge(mask_util.frPyObjects([poly], H, W))))
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(gcats[j]), "bbox": [x, y, w, h],
                         "segmentation": [poly], "area": area, "iscrowd": int(r.random() < 0.01)})  # fmt: skip
        for _ in range(n_dets):
            if r.random() < 0.33:
                g = anns[-int(r.integers(1, k + 1))]
                x, y, w, h = (v * float(r.uniform(0.85, 1.15)) for v in g["bbox"])
                w, h = min(w, W - x - 1), min(h, H - y - 1)
                cat = g["category_id"] if r.random() < 0.8 else int(r.integers(1, 81))
            else:
                w, h = float(r.uniform(4, 250)), float(r.uniform(4, 250))
                x, y = float(r.uniform(0, W - w)), float(r.uniform(0, H - h))
                cat = int(gcats[r.integers(0, k)]) if r.random() < 0.5 else int(r.integers(1, 81))
            dets.append({"image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "segmentation": _rle(_octagon(x, y, w, h)), "score": float(r.random())})  # fmt: skip
    return {"images": images, "categories": cats, "annotations": anns}, dets


def plain_pycocotools(gt: dict, dets: list[dict], iou_type: str) -> np.ndarray:
    """The reference: pycocotools as detectron2 drives it (bbox popped for segm)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        d = [dict(x) for x in dets]
        for x in d:
            x.pop("bbox" if iou_type == "segm" else "segmentation")
        ev = COCOeval(coco_gt, coco_gt.loadRes(d), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def bench_instances(args: argparse.Namespace) -> None:
    t = time.perf_counter()
    gt, dets = make_instances(args.images, args.objects, args.dets)
    print(f"generated {args.images} images, {len(gt['annotations'])} GT, {len(dets)} detections "
          f"in {time.perf_counter() - t:.1f} s")  # fmt: skip
    for iou_type in args.iou_types:
        t = time.perf_counter()
        ref = plain_pycocotools(gt, dets, iou_type)
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        ours = evaluate_instances(gt, dets, iou_type)
        t_ours = time.perf_counter() - t
        same = np.array_equal(np.array(list(ours.stats.values())), np.where(ref >= 0, ref * 100, np.nan), equal_nan=True)
        line = (f"{iou_type}: pycocotools {t_ref:.1f} s | ours default ({ours.backend}) {t_ours:.1f} s, "
                f"ratio {t_ref / t_ours:.2f}x, bit-identical={same}")  # fmt: skip
        if faster_available():
            # uncorrected faster-coco-eval: the cost of the exactness correction
            t = time.perf_counter()
            fast = evaluate_instances(gt, dets, iou_type, backend="faster-raw")
            t_fast = time.perf_counter() - t
            gap = np.nanmax(np.abs(np.array(list(fast.stats.values())) - np.array(list(ours.stats.values()))))
            line += f" | faster-raw {t_fast:.1f} s, ratio {t_ref / t_fast:.2f}x, max |diff| {gap:.1e} (AP %)"
        print(line + f" | AP {ours.stats['AP']:.3f}", flush=True)


def make_panoptic(root: str, n: int, h: int, w: int, seed: int = 0) -> None:
    """Blocky GT maps with ~10 segments and VOID, predictions as jittered copies."""
    r = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i <= 80)} for i in range(1, 134)]
    gt_anns, pred_anns = [], []
    for d in ("gt", "pred"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for i in range(n):
        gt = np.zeros((h, w), np.int64)
        for s in range(10):
            y, x = int(r.integers(0, h - 8)), int(r.integers(0, w - 8))
            gt[y : y + int(r.integers(8, h // 2)), x : x + int(r.integers(8, w // 2))] = 1000 + s * 7919
        ids = [int(v) for v in np.unique(gt) if v]
        gcat = {v: int(r.integers(1, 134)) for v in ids}
        pred = np.roll(gt, (int(r.integers(-6, 7)), int(r.integers(-6, 7))), axis=(0, 1))
        pred[r.random((h, w)) < 0.02] = 0
        pids = [int(v) for v in np.unique(pred) if v]
        name = f"{i:06d}.png"
        Image.fromarray(id2rgb(gt)).save(os.path.join(root, "gt", name))
        Image.fromarray(id2rgb(pred)).save(os.path.join(root, "pred", name))
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": [
            {"id": v, "category_id": gcat[v], "iscrowd": 0, "area": int((gt == v).sum())} for v in ids]})  # fmt: skip
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": [
            {"id": v, "category_id": gcat[v] if r.random() < 0.9 else int(r.integers(1, 134))} for v in pids]})  # fmt: skip
    for d, anns in (("gt", gt_anns), ("pred", pred_anns)):
        with open(os.path.join(root, f"{d}.json"), "w") as f:
            json.dump({"annotations": anns, "categories": cats}, f)


def bench_panoptic(args: argparse.Namespace) -> None:
    h, w = args.pan_size
    with tempfile.TemporaryDirectory() as root:
        t = time.perf_counter()
        make_panoptic(root, args.pan_images, h, w)
        print(f"generated {args.pan_images} panoptic PNG pairs of {w}x{h} in {time.perf_counter() - t:.1f} s")
        times = {}
        for workers in (1, 2):
            t = time.perf_counter()
            res = pq_compute(os.path.join(root, "gt.json"), os.path.join(root, "gt"), os.path.join(root, "pred.json"),
                             os.path.join(root, "pred"), workers=workers)  # fmt: skip
            times[workers] = time.perf_counter() - t
            print(f"panoptic PQ, {workers} process(es): {times[workers]:.1f} s "
                  f"({1000 * times[workers] / args.pan_images:.2f} ms/image), PQ {100 * res['All']['pq']:.3f}", flush=True)  # fmt: skip
        print(f"panoptic speed-up 2 vs 1 processes: {times[1] / times[2]:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--objects", type=int, default=7)
    p.add_argument("--dets", type=int, default=100)
    p.add_argument("--iou-types", nargs="+", default=["bbox", "segm"])
    p.add_argument("--pan-images", type=int, default=5000)
    p.add_argument("--pan-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    p.add_argument("--skip-instances", action="store_true")
    p.add_argument("--skip-panoptic", action="store_true")
    args = p.parse_args()
    if not args.skip_instances:
        bench_instances(args)
    if not args.skip_panoptic:
        bench_panoptic(args)


if __name__ == "__main__":
    main()
