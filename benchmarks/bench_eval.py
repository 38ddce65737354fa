"""One benchmark for all of coco-eval: COCO instance AP (bbox, segm) against pycocotools, faster-coco-eval,
hotcoco and ultrafast-pycocotools, and panoptic PQ against coco-eval 0.1.0's implementation of the
panopticapi algorithm (and hotcoco's PQ), all measured in one process run.

Data (generated, cached in a temp folder keyed by the parameters, so the 5,000-image set is built once):
- instances: N images of 640x480 (default 1,500 and 5,000: COCO val size), Poisson(7) GT objects per image
  (octagon polygons, sizes log-uniform so small / medium / large all occur, 1% crowd given as RLE), 80
  categories, 100 detections per image (a third jittered copies of GT objects, the rest clutter), each with a
  box and a mask (RLE from the box's octagon), scores uniform.
- panoptic: M image pairs of 640x480 (default 500) with ~15 segments (things and stuff, VOID, crowd), the
  prediction a shifted, noisy copy with some relabelled segments.

Every candidate gets the same inputs a detectron2-style user passes (result records with the box alone for
bbox, the mask alone for segm, prepared outside the timing) and runs load -> evaluate -> accumulate ->
summarize. Candidates alternate in rounds; each line is the median time, the ratio pycocotools / candidate,
and whether the 12 stats and the full precision array equal pycocotools' bit for bit. hotcoco and
ultrafast-pycocotools are multi-threaded (rayon): ``RAYON_NUM_THREADS`` is set to ``--threads`` before they are
imported, so they and coco-eval's compiled RLE check run at the same thread count; pycocotools and the
panoptic baseline run in one thread; faster-coco-eval exposes no thread setting (CPU time per wall time is
printed for each line).

    python benchmarks/bench_eval.py                          # 1,500 and 5,000 images, panoptic 500
    python benchmarks/bench_eval.py --images 1500 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import io
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval.errors import EvaluationError
from coco_eval.panoptic import OFFSET, VOID, CategoryStats, _segments_by_id

H, W = 480, 640
CACHE = Path(tempfile.gettempdir()) / "coco_eval_bench"


def cpu_info() -> dict:
    """CPU model and flags (lscpu), for the record."""
    info = {"machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Flags"):
                info[key.strip().lower().replace(" ", "_")] = value.strip()
    except OSError:
        pass
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    return info


def _loadavg() -> float | None:
    """1-minute load average (other jobs on the machine distort timings: rerun when it is high)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cached(name: str, params: dict, build: Callable[[], Any]) -> Any:
    """``build()``, pickled under CACHE keyed by ``name`` and ``params``."""
    key = hashlib.sha1(json.dumps([name, params], sort_keys=True).encode()).hexdigest()[:16]
    path = CACHE / f"{name}-{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            return pickle.load(f)
    t = time.perf_counter()
    value = build()
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(path)
    print(f"  generated {name} {params} in {time.perf_counter() - t:.1f} s (cached in {path})", flush=True)
    return value


# ---------------------------------------------------------------------------------------------------------
# Instance data
# ---------------------------------------------------------------------------------------------------------


def _octagon(x: float, y: float, w: float, h: float) -> list[float]:
    cy, k = y + h / 2, 0.3
    pts = [(x + k * w, y), (x + (1 - k) * w, y), (x + w, cy - (0.5 - k) * h), (x + w, cy + (0.5 - k) * h),
           (x + (1 - k) * w, y + h), (x + k * w, y + h), (x, cy + (0.5 - k) * h), (x, cy - (0.5 - k) * h)]  # fmt: skip
    return [float(v) for p in pts for v in p]


def _random_box(r: np.random.Generator) -> list[float]:
    w, h = (float(np.exp(r.uniform(np.log(6), np.log(400)))) for _ in range(2))
    w, h = min(w, W - 2.0), min(h, H - 2.0)
    return [float(r.uniform(0, W - w - 1)), float(r.uniform(0, H - h - 1)), w, h]


def make_instances(n_images: int, objects: float = 7, dets: int = 100, crowd: float = 0.01, seed: int = 0):
    """(COCO ground-truth dict, result records with "bbox" and "segmentation") -- see the module docstring."""
    from pycocotools import mask as mask_util

    r = np.random.default_rng(seed)
    images = [{"id": i + 1, "height": H, "width": W, "file_name": f"{i:06d}.jpg"} for i in range(n_images)]
    cats = [{"id": c, "name": f"class{c}", "supercategory": "x"} for c in range(1, 81)]
    anns, results = [], []
    for img in images:
        k = max(1, int(r.poisson(objects)))
        boxes = [_random_box(r) for _ in range(k)]
        rles = mask_util.frPyObjects([_octagon(*b) for b in boxes], H, W)
        areas = mask_util.area(rles)
        gcats = r.integers(1, 81, k)
        for j, b in enumerate(boxes):
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": int(gcats[j]), "bbox": b,
                   "area": float(areas[j]), "iscrowd": 0, "segmentation": [_octagon(*b)]}  # fmt: skip
            if r.random() < crowd:  # crowd regions come as RLE in COCO
                ann["iscrowd"] = 1
                ann["segmentation"] = {"size": [H, W], "counts": rles[j]["counts"].decode("ascii")}
            anns.append(ann)
        det_boxes, det_cats = [], []
        for _ in range(dets):
            if r.random() < 0.33:
                j = int(r.integers(0, k))
                x, y, w, h = boxes[j]
                w, h = w * float(r.uniform(0.85, 1.15)), h * float(r.uniform(0.85, 1.15))
                x = min(max(0.0, x + float(r.uniform(-0.1, 0.1)) * w), W - w - 1) if w < W - 1 else 0.0
                y = min(max(0.0, y + float(r.uniform(-0.1, 0.1)) * h), H - h - 1) if h < H - 1 else 0.0
                box = [x, y, min(w, W - 1.0), min(h, H - 1.0)]
                cat = int(gcats[j]) if r.random() < 0.8 else int(r.integers(1, 81))
            else:
                box = _random_box(r)
                cat = int(gcats[int(r.integers(0, k))]) if r.random() < 0.5 else int(r.integers(1, 81))
            det_boxes.append(box)
            det_cats.append(cat)
        det_rles = mask_util.frPyObjects([_octagon(*b) for b in det_boxes], H, W)
        scores = r.random(dets)
        for box, cat, rle, score in zip(det_boxes, det_cats, det_rles, scores.tolist()):
            results.append({"image_id": img["id"], "category_id": cat, "bbox": box, "score": score,
                            "segmentation": {"size": [H, W], "counts": rle["counts"].decode("ascii")}})  # fmt: skip
    return {"images": images, "categories": cats, "annotations": anns}, results


# ---------------------------------------------------------------------------------------------------------
# Instance candidates: each (gt dict, records) -> (stats (12,), precision (T, R, K, A, M))
# ---------------------------------------------------------------------------------------------------------


def run_pycocotools(gt: dict, records: list[dict], iou_type: str):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(records), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), ev.eval["precision"]


def run_faster(gt: dict, records: list[dict], iou_type: str):
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = COCO(gt, print_function=quiet)
    ev = COCOeval_faster(coco_gt, coco_gt.loadRes(records), iou_type, print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats[:12]), np.asarray(ev.eval["precision"])


def run_hotcoco(gt: dict, records: list[dict], iou_type: str):
    import hotcoco

    coco_gt = hotcoco.COCO(gt)
    ev = hotcoco.COCOeval(coco_gt, coco_gt.loadRes(records), iou_type)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats), np.asarray(ev.eval["precision"])


def run_ultrafast(gt: dict, records: list[dict], iou_type: str):
    import ultrafast_pycocotools as uf

    quiet = lambda *a, **k: None  # noqa: E731
    coco_gt = uf.COCO(gt, verbose=False)
    ev = uf.COCOeval(coco_gt, coco_gt.loadRes(records), iou_type, print_function=quiet)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats), np.asarray(ev.eval["precision"])


def run_ours(gt: dict, records: list[dict], iou_type: str):
    from coco_eval import evaluate_instances

    res = evaluate_instances(gt, records, iou_type)
    return res.raw_stats, res.precision


INSTANCE_CANDIDATES: dict[str, tuple[Callable, str]] = {
    # name: (runner, import name)
    "pycocotools": (run_pycocotools, "pycocotools"),
    "faster-coco-eval": (run_faster, "faster_coco_eval"),
    "hotcoco": (run_hotcoco, "hotcoco"),
    "ultrafast-pycocotools": (run_ultrafast, "ultrafast_pycocotools"),
    "coco-eval": (run_ours, "coco_eval"),
}


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if module == "coco_eval":  # the source tree on PYTHONPATH, not what pip recorded
        import coco_eval

        return coco_eval.__version__

    dist = {"faster_coco_eval": "faster-coco-eval", "ultrafast_pycocotools": "ultrafast-pycocotools",
            "coco_eval": "coco-eval"}.get(module, module)  # fmt: skip
    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def _timed(fn: Callable, *args) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0, out


def bench_instances(n_images: int, args: argparse.Namespace, report: dict) -> None:
    params = {"images": n_images, "objects": args.objects, "dets": args.dets, "crowd": args.crowd, "seed": 0}
    gt, records = cached(
        "instances", params, lambda: make_instances(n_images, args.objects, args.dets, args.crowd)
    )
    print(f"\n{n_images} images: {len(gt['annotations'])} GT objects "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(records)} detections", flush=True)  # fmt: skip
    names = [n for n in args.candidates if n in INSTANCE_CANDIDATES]
    for iou_type in args.iou_types:
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        base = [{k: v for k, v in r.items() if k != drop} for r in records]
        times: dict[str, list[float]] = {n: [] for n in names}
        cpu: dict[str, list[float]] = {n: [] for n in names}
        outputs: dict[str, Any] = {}
        for rnd in range(args.rounds):
            for name in names:
                if name == "pycocotools" and rnd >= args.ref_rounds:
                    continue
                fn, module = INSTANCE_CANDIDATES[name]
                try:
                    __import__(module)
                except ImportError:
                    continue
                g = copy.deepcopy(
                    gt
                )  # pycocotools rewrites GT polygons as RLE in place; copies outside the timing
                recs = [dict(r) for r in base]
                wall, cpu_s, out = _timed(fn, g, recs, iou_type)
                times[name].append(wall)
                cpu[name].append(cpu_s)
                outputs[name] = out
                del g, recs
        ref_stats, ref_prec = outputs["pycocotools"]
        t_ref = statistics.median(times["pycocotools"])
        rows = []
        for name in names:
            if not times[name]:
                continue
            stats, prec = outputs[name]
            t = statistics.median(times[name])
            row = {
                "candidate": name,
                "version": _version(INSTANCE_CANDIDATES[name][1]),
                "seconds": t,
                "all_seconds": times[name],
                "cpu_per_wall": statistics.median(c / w for c, w in zip(cpu[name], times[name])),
                "ratio_vs_pycocotools": t_ref / t,
                "stats_identical": bool(np.array_equal(np.asarray(stats)[:12], ref_stats[:12])),
                "precision_identical": bool(
                    np.shape(prec) == np.shape(ref_prec) and np.array_equal(prec, ref_prec)
                ),
            }
            if name == "coco-eval":
                from coco_eval import evaluate_instances

                row["backend"] = evaluate_instances(gt, base[:1], iou_type).backend
            rows.append(row)
            extra = f" [{row['backend']} backend]" if "backend" in row else ""
            print(f"  {iou_type:4s} {name + ' ' + row['version']:30s} {t:8.3f} s  {row['ratio_vs_pycocotools']:6.1f}x  "
                  f"cpu/wall {row['cpu_per_wall']:.2f}  stats identical: {row['stats_identical']}  "
                  f"precision identical: {row['precision_identical']}{extra}", flush=True)  # fmt: skip
        fastest_lib = min((r for r in rows if r["candidate"] not in ("coco-eval", "pycocotools")),
                          key=lambda r: r["seconds"], default=None)  # fmt: skip
        ours = next((r for r in rows if r["candidate"] == "coco-eval"), None)
        if fastest_lib and ours:
            print(f"  {iou_type:4s} coco-eval vs fastest library ({fastest_lib['candidate']}): "
                  f"{fastest_lib['seconds'] / ours['seconds']:.2f}x", flush=True)  # fmt: skip
        report["instances"].append({"images": n_images, "iou_type": iou_type, "detections": len(records),
                                    "gt_objects": len(gt["annotations"]), "rounds": args.rounds,
                                    "ref_rounds": args.ref_rounds, "rows": rows})  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Panoptic
# ---------------------------------------------------------------------------------------------------------


def make_panoptic(root: Path, n: int, h: int, w: int, seed: int = 0) -> None:
    """GT maps: ~5 stuff regions tiling the image, ~10 thing blobs on top, VOID borders, some crowd;
    predictions: shifted, noisy copies with relabelled and merged segments. PNGs + jsons under ``root``."""
    from coco_eval.panoptic_io import write_panoptic_png

    r = np.random.default_rng(seed)
    cats = [{"id": i, "name": f"c{i}", "isthing": int(i <= 80)} for i in range(1, 134)]
    gt_anns, pred_anns = [], []
    for d in ("gt", "pred"):
        (root / d).mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        gt = np.zeros((h, w), np.int64)
        n_stuff = int(r.integers(3, 7))
        cx, cy = r.uniform(0, w, n_stuff), r.uniform(0, h, n_stuff)
        nearest = np.argmin((xx[..., None] - cx) ** 2 + (yy[..., None] - cy) ** 2, axis=-1)
        gt[:] = 1 + nearest
        for s in range(int(r.integers(6, 15))):
            bw, bh = int(r.integers(8, w // 3)), int(r.integers(8, h // 3))
            x, y = int(r.integers(0, w - bw)), int(r.integers(0, h - bh))
            blob = ((xx[y : y + bh, x : x + bw] - x - bw / 2) / (bw / 2)) ** 2 + (
                (yy[y : y + bh, x : x + bw] - y - bh / 2) / (bh / 2)
            ) ** 2 <= 1
            gt[y : y + bh, x : x + bw][blob] = 100 + s
        gt[r.random((h, w)) < 0.01] = 0
        gt[:, : int(r.integers(0, 6))] = 0
        ids = np.unique(gt)
        ids = ids[ids > 0]
        remap = {int(v): int(r.integers(1, 2**24 - 1)) for v in ids}  # COCO ids are large RGB codes
        lut = np.zeros(int(ids.max()) + 1, np.int64)
        for a, b in remap.items():
            lut[a] = b
        gt = lut[gt]
        pred = np.roll(gt, (int(r.integers(-8, 9)), int(r.integers(-8, 9))), axis=(0, 1))
        pred[r.random((h, w)) < 0.02] = 0
        gt_info = []
        cat_of = {}
        for a, b in remap.items():
            thing = a >= 100
            cat_of[b] = int(r.integers(1, 81)) if thing else int(r.integers(81, 134))
            gt_info.append({"id": b, "category_id": cat_of[b], "iscrowd": int(thing and r.random() < 0.05),
                            "area": int((gt == b).sum()), "bbox": [0, 0, 1, 1]})  # fmt: skip
        pids = np.unique(pred)
        pids = pids[pids > 0]
        pred_info = [{"id": int(p), "category_id": cat_of[int(p)] if r.random() < 0.85 else int(r.integers(1, 134))}
                     for p in pids]  # fmt: skip
        name = f"{i:06d}.png"
        write_panoptic_png(root / "gt" / name, gt)
        write_panoptic_png(root / "pred" / name, pred)
        gt_anns.append({"image_id": i, "file_name": name, "segments_info": gt_info})
        pred_anns.append({"image_id": i, "file_name": name, "segments_info": pred_info})
    images = [{"id": i, "file_name": f"{i:06d}.jpg", "height": h, "width": w} for i in range(n)]
    for d, anns in (("gt", gt_anns), ("pred", pred_anns)):
        (root / f"{d}.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )


# ---------------------------------------------------------------------------------------------------------
# coco-eval 0.1.0's per-image PQ (the implementation this package replaced), kept as the panoptic baseline
# ---------------------------------------------------------------------------------------------------------


def baseline_pq_single_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    categories: Mapping[int, dict],
    where: str = "image",
    stats: CategoryStats | None = None,
) -> CategoryStats:
    """coco-eval 0.1.0's per-image PQ (np.unique over uint64 (gt, pred) keys, Python loops over pairs)."""
    stats = {} if stats is None else stats
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise EvaluationError(
            f"{where}: prediction size {pred_ids.shape} differs from ground truth {gt_ids.shape}"
        )
    for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
            raise EvaluationError(f"{where}: {name} segment ids must lie in [0, 2^24)")
    gt_segms = _segments_by_id(gt_segments, f"{where} (ground truth)")
    pred_segms = _segments_by_id(pred_segments, f"{where} (prediction)")
    for seg in gt_segms.values():
        if seg["category_id"] not in categories:
            raise EvaluationError(
                f"{where} (ground truth): segment {seg['id']} has unknown category_id {seg['category_id']}"
            )
    for seg in pred_segms.values():
        if seg["category_id"] not in categories:
            raise EvaluationError(
                f"{where} (prediction): segment {seg['id']} has unknown category_id {seg['category_id']}"
            )

    # One sort gives every (gt, pred) overlap; per-segment areas are sums over it.
    joint = gt_ids.astype(np.uint64).ravel() * np.uint64(OFFSET) + pred_ids.astype(np.uint64).ravel()
    keys, counts = np.unique(joint, return_counts=True)
    pair_gt = (keys // OFFSET).astype(np.int64)
    pair_pred = (keys % OFFSET).astype(np.int64)

    pred_present, pred_inv = np.unique(pair_pred, return_inverse=True)
    pred_area_arr = np.bincount(pred_inv, weights=counts).astype(np.int64)
    pred_area = {int(p): int(a) for p, a in zip(pred_present, pred_area_arr)}
    gt_unique, gt_inv = np.unique(pair_gt, return_inverse=True)
    gt_area_png = np.bincount(gt_inv, weights=counts).astype(np.int64)
    gt_present = set(gt_unique.tolist())

    missing = sorted(set(pred_area) - set(pred_segms) - {VOID})
    if missing:
        raise EvaluationError(
            f"{where} (prediction): segment ids {missing[:10]} are in the PNG but not in segments_info"
        )
    absent = sorted(set(pred_segms) - set(pred_area))
    if absent:
        raise EvaluationError(
            f"{where} (prediction): segment ids {absent[:10]} are in segments_info but not in the PNG"
        )
    missing = sorted(gt_present - set(gt_segms) - {VOID})
    if missing:
        raise EvaluationError(
            f"{where} (ground truth): segment ids {missing[:10]} are in the PNG but not in segments_info"
        )
    absent = sorted(set(gt_segms) - gt_present)
    if absent:
        raise EvaluationError(
            f"{where} (ground truth): segment ids {absent[:10]} are in segments_info but not in the PNG"
        )

    gt_area: dict[int, int] = {}
    for g, a in zip(gt_unique.tolist(), gt_area_png.tolist()):
        if g in gt_segms:
            # panopticapi takes the GT area from the json; fall back to the PNG when the json has none
            gt_area[g] = gt_segms[g].get("area", a)

    void_overlap: dict[int, int] = {}
    pairs: list[tuple[int, int, int]] = []
    for g, p, c in zip(pair_gt.tolist(), pair_pred.tolist(), counts.tolist()):
        if g == VOID:
            void_overlap[p] = c
        pairs.append((g, p, c))

    def cat_stats(cat: int) -> list:
        s = stats.get(cat)
        if s is None:
            s = stats[cat] = [0.0, 0, 0, 0]
        return s

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for g, p, inter in pairs:  # sorted by (gt, pred) id, the order panopticapi adds IoUs in
        gseg = gt_segms.get(g)
        pseg = pred_segms.get(p)
        if gseg is None or pseg is None or gseg.get("iscrowd", 0) == 1:
            continue
        if gseg["category_id"] != pseg["category_id"]:
            continue
        union = pred_area[p] + gt_area[g] - inter - void_overlap.get(p, 0)
        iou = inter / union
        if iou > 0.5:
            s = cat_stats(gseg["category_id"])
            s[1] += 1
            s[0] += iou
            gt_matched.add(g)
            pred_matched.add(p)

    crowd_by_cat: dict[int, int] = {}
    for g, gseg in gt_segms.items():
        if g in gt_matched:
            continue
        if gseg.get("iscrowd", 0) == 1:
            crowd_by_cat[gseg["category_id"]] = g  # last one wins, as in panopticapi
            continue
        cat_stats(gseg["category_id"])[3] += 1

    overlap_lookup = {(g, p): c for g, p, c in pairs} if crowd_by_cat else {}
    for p, pseg in pred_segms.items():
        if p in pred_matched:
            continue
        ignored = void_overlap.get(p, 0)
        crowd = crowd_by_cat.get(pseg["category_id"])
        if crowd is not None:
            ignored += overlap_lookup.get((crowd, p), 0)
        if ignored / pred_area[p] > 0.5:
            continue
        cat_stats(pseg["category_id"])[2] += 1
    return stats


def baseline_pq_compute(gt_json: Path, gt_dir: Path, pred_json: Path, pred_dir: Path, workers: int) -> dict:
    """coco-eval 0.1.0's pq_compute: PNGs read per image, the per-image function above, contiguous chunks over
    ``workers`` processes merged in order."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from coco_eval.panoptic import merge_stats, pq_average

    gt, pred = json.loads(gt_json.read_text()), json.loads(pred_json.read_text())
    categories = {c["id"]: c for c in gt["categories"]}
    by_image = {a["image_id"]: a for a in pred["annotations"]}
    pairs = [(a, by_image[a["image_id"]]) for a in gt["annotations"]]
    if workers == 1:
        return pq_average(_baseline_chunk((pairs, str(gt_dir), str(pred_dir), categories)), categories)
    bounds = np.linspace(0, len(pairs), workers + 1).astype(int)
    chunks = [(pairs[a:b], str(gt_dir), str(pred_dir), categories) for a, b in zip(bounds[:-1], bounds[1:])]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return pq_average(merge_stats(list(pool.map(_baseline_chunk, chunks))), categories)


def _baseline_chunk(args: tuple) -> dict:
    from coco_eval.panoptic_io import read_panoptic_png

    pairs, gt_dir, pred_dir, categories = args
    stats: dict = {}
    for g, p in pairs:
        baseline_pq_single_image(read_panoptic_png(os.path.join(gt_dir, g["file_name"])), g["segments_info"],
                                 read_panoptic_png(os.path.join(pred_dir, p["file_name"])), p["segments_info"],
                                 categories, f"image {g['image_id']}", stats)  # fmt: skip
    return stats


def _pq_key(res: Mapping) -> list:
    out = []
    for group in ("All", "Things", "Stuff"):
        out += [float(res[group][k]) for k in ("pq", "sq", "rq")] + [int(res[group]["n"])]
    return out


def bench_panoptic(args: argparse.Namespace, report: dict) -> None:
    from coco_eval import pq_compute

    h, w = args.pan_size
    params = {"images": args.pan_images, "h": h, "w": w, "seed": 0, "v": 1}
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    root = CACHE / f"panoptic-{key}"
    if not (root / "pred.json").exists():
        t = time.perf_counter()
        make_panoptic(root, args.pan_images, h, w)
        print(f"  generated {args.pan_images} panoptic PNG pairs of {w}x{h} in {time.perf_counter() - t:.1f} s "
              f"(cached in {root})", flush=True)  # fmt: skip
    files = (root / "gt.json", root / "gt", root / "pred.json", root / "pred")
    n_seg = sum(len(a["segments_info"]) for a in json.loads(files[0].read_text())["annotations"])
    print(f"\npanoptic: {args.pan_images} image pairs of {w}x{h}, {n_seg / args.pan_images:.1f} GT segments per image",
          flush=True)  # fmt: skip
    workers = args.workers
    candidates: dict[str, Callable[[], dict]] = {
        "coco-eval 0.1.0, 1 process": lambda: baseline_pq_compute(*files, workers=1),
        f"coco-eval 0.1.0, {workers} processes": lambda: baseline_pq_compute(*files, workers=workers),
        "coco-eval, 1 worker": lambda: pq_compute(*files, workers=1),
        f"coco-eval, {workers} worker threads": lambda: pq_compute(*files, workers=workers),
    }
    try:
        import hotcoco.panoptic

        def run_hotcoco_pq() -> dict:
            with contextlib.redirect_stdout(io.StringIO()):
                return hotcoco.panoptic.pq_compute(str(files[0]), str(files[2]), str(files[1]), str(files[3]))

        candidates[f"hotcoco {_version('hotcoco')} ({args.threads} threads)"] = run_hotcoco_pq
    except ImportError:
        pass
    times: dict[str, list[float]] = {k: [] for k in candidates}
    results: dict[str, dict] = {}
    for _ in range(args.pan_rounds):
        for name, fn in candidates.items():
            wall, _, results[name] = _timed(fn)
            times[name].append(wall)
    base_name = "coco-eval 0.1.0, 1 process"
    t_base = statistics.median(times[base_name])
    ref = _pq_key(results[base_name])
    rows = []
    for name in candidates:
        t = statistics.median(times[name])
        identical = _pq_key(results[name]) == ref
        rows.append({"candidate": name, "seconds": t, "all_seconds": times[name], "ratio_vs_baseline": t_base / t,
                     "identical_to_baseline": identical, "PQ": 100 * results[name]["All"]["pq"]})  # fmt: skip
        print(f"  {name:36s} {t:8.3f} s  {t_base / t:6.2f}x  PQ {100 * results[name]['All']['pq']:.4f}  "
              f"identical (All/Things/Stuff PQ, SQ, RQ, n): {identical}", flush=True)  # fmt: skip
    report["panoptic"] = {"images": args.pan_images, "size": [h, w], "rounds": args.pan_rounds, "rows": rows}


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[1500, 5000], help="instance set sizes")
    p.add_argument("--objects", type=float, default=7.0, help="mean GT objects per image")
    p.add_argument("--dets", type=int, default=100, help="detections per image")
    p.add_argument("--crowd", type=float, default=0.01, help="fraction of crowd GT objects")
    p.add_argument("--iou-types", nargs="+", default=["bbox", "segm"], choices=["bbox", "segm"])
    p.add_argument(
        "--candidates", nargs="+", default=list(INSTANCE_CANDIDATES), choices=list(INSTANCE_CANDIDATES)
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of the fast candidates (median reported)")
    p.add_argument(
        "--ref-rounds", type=int, default=1, help="rounds of pycocotools (slow; first rounds only)"
    )
    p.add_argument("--pan-images", type=int, default=500)
    p.add_argument("--pan-size", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    p.add_argument("--pan-rounds", type=int, default=3)
    p.add_argument(
        "--threads", type=int, default=None, help="RAYON_NUM_THREADS (default: the CPUs available)"
    )
    p.add_argument("--workers", type=int, default=None, help="panoptic processes (default: --threads)")
    p.add_argument("--skip-instances", action="store_true")
    p.add_argument("--skip-panoptic", action="store_true")
    p.add_argument("--json", metavar="PATH", help="write the results (and the CPU model and flags) here")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        )
    if args.workers is None:
        args.workers = args.threads
    if args.rounds < 1 or args.ref_rounds < 1 or args.pan_rounds < 1 or args.threads < 1 or args.workers < 1:
        p.error("--rounds, --ref-rounds, --pan-rounds, --threads and --workers must be >= 1")
    if "hotcoco" in sys.modules or "ultrafast_pycocotools" in sys.modules:
        print("warning: rayon libraries imported before RAYON_NUM_THREADS was set", file=sys.stderr)
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    from coco_eval import _rle

    load_before = _loadavg()
    report: dict[str, Any] = {
        "cpu": cpu_info(),
        "threads": {
            "RAYON_NUM_THREADS (hotcoco, ultrafast-pycocotools, coco-eval RLE check)": args.threads,
            "pycocotools": 1,
            "panoptic processes": args.workers,
        },  # fmt: skip
        "coco_eval_speedups_built": _rle.speedups_available(),
        "instances": [],
    }
    cpu = report["cpu"]
    print(f"CPU: {cpu.get('model_name', '?')} ({cpu.get('affinity', cpu['cpus'])} usable), Python {cpu['python']}; "
          f"threads: RAYON_NUM_THREADS={args.threads}, pycocotools 1, panoptic processes {args.workers}; "
          f"coco_eval._speedups built: {report['coco_eval_speedups_built']}", flush=True)  # fmt: skip
    if not args.skip_instances:
        for n in args.images:
            bench_instances(n, args, report)
    if not args.skip_panoptic:
        bench_panoptic(args, report)
    report["loadavg_before_after"] = [load_before, _loadavg()]
    print(f"1-minute load average before / after: {load_before} / {report['loadavg_before_after'][1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
