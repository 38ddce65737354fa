"""Panoptic quality (PQ/SQ/RQ) following the published algorithm of cocodataset/panopticapi ``pq_compute``.

Per image (Kirillov et al., "Panoptic Segmentation", and panopticapi's evaluation.py):
- PNG colours are segment ids, ``id = R + 256 G + 256^2 B``; id 0 is VOID.
- A GT segment and a predicted segment of the same category match when IoU > 0.5 (strictly). The union
  leaves out the predicted pixels that fall on VOID: ``union = area_pred + area_gt - inter - |pred & VOID|``.
  GT areas come from the GT json ``area`` field (as panopticapi does), predicted areas from the PNG.
  Crowd GT segments never match.
- Unmatched non-crowd GT segments are false negatives. Unmatched predicted segments are false positives
  unless more than half of their pixels lie on VOID plus the crowd region of their category (the last
  crowd segment of that category in ``segments_info``, as in panopticapi).
- Per category: PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP, RQ = TP / (TP + FP/2 + FN/2);
  averages run over categories with TP + FP + FN > 0. Values are fractions (0-1) like panopticapi's.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval._io import PathLike, describe, load_json, read_panoptic_png, require
from coco_eval.errors import EvaluationError

OFFSET = 256 * 256 * 256  # ids fit in 24 bits (RGB), so gt * OFFSET + pred is a unique pair key
VOID = 0

#: per-category accumulators: [sum IoU of matches, TP, FP, FN]
CategoryStats = dict[int, list]


def _segments_by_id(segments_info: Any, where: str) -> dict[int, dict]:
    if not isinstance(segments_info, list):
        raise EvaluationError(f"{where}: 'segments_info' must be a list")
    out: dict[int, dict] = {}
    for j, seg in enumerate(segments_info):
        sid = require(seg, "id", f"{where}: segments_info[{j}]")
        require(seg, "category_id", f"{where}: segments_info[{j}]")
        if sid in out:
            raise EvaluationError(f"{where}: duplicate segment id {sid} in segments_info")
        if sid == VOID:
            raise EvaluationError(f"{where}: segment id 0 is reserved for VOID")
        out[int(sid)] = seg
    return out


def pq_single_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    categories: Mapping[int, dict],
    where: str = "image",
    stats: CategoryStats | None = None,
) -> CategoryStats:
    """Accumulate one image's PQ statistics.

    Args:
        gt_ids: (H, W) integer GT segment ids (0 = VOID).
        gt_segments: GT ``segments_info`` (``id``, ``category_id``, ``iscrowd``, optional ``area``).
        pred_ids: (H, W) integer predicted segment ids (0 = VOID), same size as ``gt_ids``.
        pred_segments: predicted ``segments_info`` (``id``, ``category_id``).
        categories: {category id: category dict with ``isthing``}.
        where: text naming the image in error messages.
        stats: accumulator to add into (created when None).
    Returns:
        ``stats``: {category id: [sum IoU, TP, FP, FN]}.
    Raises:
        EvaluationError: size mismatch, ids in the PNG missing from segments_info or the reverse,
            duplicate ids, unknown categories.
    """
    stats = {} if stats is None else stats
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise EvaluationError(f"{where}: prediction size {pred_ids.shape} differs from ground truth {gt_ids.shape}")
    for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
            raise EvaluationError(f"{where}: {name} segment ids must lie in [0, 2^24)")
    gt_segms = _segments_by_id(gt_segments, f"{where} (ground truth)")
    pred_segms = _segments_by_id(pred_segments, f"{where} (prediction)")
    for seg in gt_segms.values():
        if seg["category_id"] not in categories:
            raise EvaluationError(f"{where} (ground truth): segment {seg['id']} has unknown category_id {seg['category_id']}")
    for seg in pred_segms.values():
        if seg["category_id"] not in categories:
            raise EvaluationError(f"{where} (prediction): segment {seg['id']} has unknown category_id {seg['category_id']}")

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
        raise EvaluationError(f"{where} (prediction): segment ids {missing[:10]} are in the PNG but not in segments_info")
    absent = sorted(set(pred_segms) - set(pred_area))
    if absent:
        raise EvaluationError(f"{where} (prediction): segment ids {absent[:10]} are in segments_info but not in the PNG")
    missing = sorted(gt_present - set(gt_segms) - {VOID})
    if missing:
        raise EvaluationError(f"{where} (ground truth): segment ids {missing[:10]} are in the PNG but not in segments_info")
    absent = sorted(set(gt_segms) - gt_present)
    if absent:
        raise EvaluationError(f"{where} (ground truth): segment ids {absent[:10]} are in segments_info but not in the PNG")

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


def merge_stats(parts: Sequence[CategoryStats]) -> CategoryStats:
    """Sum per-category statistics in order (the same float order as panopticapi's per-core merge)."""
    total: CategoryStats = {}
    for part in parts:
        for cat, (iou, tp, fp, fn) in part.items():
            s = total.setdefault(cat, [0.0, 0, 0, 0])
            s[0] += iou
            s[1] += tp
            s[2] += fp
            s[3] += fn
    return total


def pq_average(stats: CategoryStats, categories: Mapping[int, dict]) -> dict:
    """PQ/SQ/RQ (fractions) for All / Things / Stuff and per category, from accumulated statistics.

    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {cat id: {"pq", "sq", "rq"}}}``.
        A group with no category seen gives 0.0 with n = 0 (panopticapi divides by zero there).
    """
    results: dict[str, Any] = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
        pq = sq = rq = 0.0
        n = 0
        per_class = {}
        for cat_id, cat in categories.items():
            if isthing is not None and (cat.get("isthing", 0) == 1) != isthing:
                continue
            iou, tp, fp, fn = stats.get(cat_id, (0.0, 0, 0, 0))
            if tp + fp + fn == 0:
                per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
                continue
            n += 1
            denom = tp + 0.5 * fp + 0.5 * fn
            pq_c, sq_c, rq_c = iou / denom, (iou / tp if tp else 0.0), tp / denom
            per_class[cat_id] = {"pq": pq_c, "sq": sq_c, "rq": rq_c}
            pq += pq_c
            sq += sq_c
            rq += rq_c
        results[name] = {"pq": pq / n if n else 0.0, "sq": sq / n if n else 0.0, "rq": rq / n if n else 0.0, "n": n}
        if name == "All":
            results["per_class"] = per_class
    return results


def _evaluate_chunk(args: tuple) -> CategoryStats:
    pairs, gt_dir, pred_dir, categories = args
    stats: CategoryStats = {}
    for gt_ann, pred_ann in pairs:
        where = f"image {gt_ann['image_id']}"
        gt = read_panoptic_png(os.path.join(gt_dir, gt_ann["file_name"]))
        pred_path = os.path.join(pred_dir, pred_ann["file_name"])
        pred = read_panoptic_png(pred_path)
        if gt.shape != pred.shape:
            raise EvaluationError(f"{where}: predicted PNG {pred_path!r} has size {pred.shape[::-1]} (W, H) but the "
                                  f"ground truth has {gt.shape[::-1]}")  # fmt: skip
        pq_single_image(gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], categories,
                        f"{where} ({pred_ann['file_name']})", stats)  # fmt: skip
    return stats


def _load_panoptic_json(source: PathLike | dict, what: str) -> tuple[dict, str]:
    if isinstance(source, dict):
        return source, f"{what} dict"
    name = f"{what} {describe(source, '?')}"
    data = load_json(source, what)
    if not isinstance(data, dict):
        raise EvaluationError(f"{name}: expected a JSON object with 'annotations'")
    return data, name


def pq_compute(
    gt_json: PathLike | dict,
    gt_dir: PathLike,
    pred_json: PathLike | dict,
    pred_dir: PathLike,
    workers: int = 1,
) -> dict:
    """Panoptic quality of a prediction folder against COCO panoptic ground truth.

    Args:
        gt_json: GT panoptic json (path or dict) with ``annotations`` (``image_id``, ``file_name``,
            ``segments_info``) and ``categories`` (``id``, ``isthing``).
        gt_dir: folder of GT PNGs.
        pred_json: prediction json (path or dict) with ``annotations`` in the same format
            (``categories`` are taken from the GT).
        pred_dir: folder of predicted PNGs.
        workers: processes reading and scoring images (contiguous chunks, merged in order).
    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {cat id: {...}}}`` (fractions).
    """
    gt, gt_name = _load_panoptic_json(gt_json, "ground-truth panoptic json")
    pred, pred_name = _load_panoptic_json(pred_json, "prediction panoptic json")
    categories = {}
    for i, cat in enumerate(require(gt, "categories", gt_name)):
        categories[require(cat, "id", f"{gt_name}: categories[{i}]")] = cat
    for d in (gt_dir, pred_dir):
        if not Path(d).is_dir():
            raise EvaluationError(f"panoptic PNG folder {str(d)!r} does not exist")

    pred_by_image: dict[Any, dict] = {}
    for i, ann in enumerate(require(pred, "annotations", pred_name)):
        where = f"{pred_name}: annotations[{i}]"
        image_id = require(ann, "image_id", where)
        require(ann, "file_name", where)
        require(ann, "segments_info", where)
        if image_id in pred_by_image:
            raise EvaluationError(f"{where}: second prediction for image_id {image_id!r}")
        pred_by_image[image_id] = ann
    pairs = []
    gt_images = set()
    for i, ann in enumerate(require(gt, "annotations", gt_name)):
        where = f"{gt_name}: annotations[{i}]"
        image_id = require(ann, "image_id", where)
        require(ann, "file_name", where)
        require(ann, "segments_info", where)
        gt_images.add(image_id)
        if image_id not in pred_by_image:
            raise EvaluationError(f"{pred_name}: no prediction for image_id {image_id!r}")
        pairs.append((ann, pred_by_image[image_id]))
    unknown = [i for i in pred_by_image if i not in gt_images]
    if unknown:
        raise EvaluationError(f"{pred_name}: predictions for image ids {unknown[:5]} that are not in the ground truth")

    workers = max(1, min(int(workers), len(pairs)))
    if workers == 1:
        return pq_average(merge_stats([_evaluate_chunk((pairs, str(gt_dir), str(pred_dir), categories))]), categories)
    bounds = np.linspace(0, len(pairs), workers + 1).astype(int)
    chunks = [(pairs[a:b], str(gt_dir), str(pred_dir), categories) for a, b in zip(bounds[:-1], bounds[1:])]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        parts = list(pool.map(_evaluate_chunk, chunks))
    return pq_average(merge_stats(parts), categories)


def format_pq_table(results: dict) -> str:
    """The panopticapi summary table (values in percent)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)
