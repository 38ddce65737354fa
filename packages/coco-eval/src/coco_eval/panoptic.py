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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval._io import PathLike, describe, load_json, require
from coco_eval.panoptic_io import read_panoptic_png
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


def _segment_index(ids: np.ndarray, seg_ids: np.ndarray, where: str) -> np.ndarray:
    """Each pixel's position in ``[VOID, *seg_ids]`` (0 for VOID): (H*W,) intp.

    Raises EvaluationError naming the ids that are in the PNG but not in ``segments_info``.
    """
    lookup = np.concatenate([[VOID], seg_ids]).astype(ids.dtype)  # seg_ids sorted, > 0
    if lookup.size <= 1:
        idx = np.zeros(ids.shape, np.intp)
        bad = ids != VOID
    else:
        idx = np.searchsorted(lookup, ids)
        np.minimum(idx, lookup.size - 1, out=idx)
        bad = lookup[idx] != ids
    if bad.any():
        missing = np.unique(ids[bad])[:10].tolist()
        raise EvaluationError(f"{where}: segment ids {missing} are in the PNG but not in segments_info")
    return idx


@dataclass
class ImageStats:
    """One image's PQ contributions: ``matches`` [(category id, IoU)] in (GT id, predicted id) order, the
    order in which panopticapi adds IoUs, and ``counts`` {category id: [TP, FP, FN]}."""

    matches: list[tuple[int, float]]
    counts: dict[int, list[int]]

    def add_to(self, stats: CategoryStats) -> CategoryStats:
        """Accumulate into {category id: [sum IoU, TP, FP, FN]} (in place) exactly as panopticapi does."""
        for cat, iou in self.matches:
            s = stats.get(cat)
            if s is None:
                s = stats[cat] = [0.0, 0, 0, 0]
            s[0] += iou
        for cat, (tp, fp, fn) in self.counts.items():
            s = stats.get(cat)
            if s is None:
                s = stats[cat] = [0.0, 0, 0, 0]
            s[1] += tp
            s[2] += fp
            s[3] += fn
        return stats


def pq_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    categories: Mapping[int, dict],
    where: str = "image",
) -> ImageStats:
    """PQ contributions of one image, panopticapi's per-image algorithm with the pixel work vectorised.

    One ``bincount`` over combined (GT segment, predicted segment) indices gives every overlap, the segment
    areas and the VOID overlaps; matching (IoU > 0.5), false negatives and the VOID/crowd rule for false
    positives are then array operations on the (G, P) overlap matrix.

    Args:
        gt_ids: (H, W) integer GT segment ids (0 = VOID).
        gt_segments: GT ``segments_info`` (``id``, ``category_id``, ``iscrowd``, optional ``area``: as in
            panopticapi the GT area is the json ``area``; the PNG count when absent).
        pred_ids: (H, W) integer predicted segment ids (0 = VOID), same size as ``gt_ids``.
        pred_segments: predicted ``segments_info`` (``id``, ``category_id``).
        categories: {category id: category dict}.
        where: text naming the image in error messages.
    Raises:
        EvaluationError: size mismatch, ids in the PNG missing from segments_info or the reverse, duplicate or
            reserved (0) ids, unknown categories, ids outside [0, 2^24).
    """
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape:
        raise EvaluationError(f"{where}: prediction size {pred_ids.shape} differs from ground truth {gt_ids.shape}")
    for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
        if ids.dtype.kind not in "iu":
            raise EvaluationError(f"{where}: {name} segment ids must be integers, got dtype {ids.dtype}")
        if ids.dtype.kind == "i" or ids.dtype.itemsize > 4:
            if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
                raise EvaluationError(f"{where}: {name} segment ids must lie in [0, 2^24)")
    gt_segms = _segments_by_id(gt_segments, f"{where} (ground truth)")
    pred_segms = _segments_by_id(pred_segments, f"{where} (prediction)")
    for label, segms in (("ground truth", gt_segms), ("prediction", pred_segms)):
        for seg in segms.values():
            if seg["category_id"] not in categories:
                raise EvaluationError(f"{where} ({label}): segment {seg['id']} has unknown category_id {seg['category_id']}")

    g_ids = np.array(sorted(gt_segms), np.int64)
    p_ids = np.array(sorted(pred_segms), np.int64)
    gi = _segment_index(gt_ids.ravel(), g_ids, f"{where} (ground truth)")
    pi = _segment_index(pred_ids.ravel(), p_ids, f"{where} (prediction)")
    n_g, n_p = g_ids.size, p_ids.size
    overlap = np.bincount(gi * (n_p + 1) + pi, minlength=(n_g + 1) * (n_p + 1)).reshape(n_g + 1, n_p + 1)
    gt_png_area = overlap[1:].sum(axis=1)
    pred_area = overlap[:, 1:].sum(axis=0)
    for label, ids_, area in (("prediction", p_ids, pred_area), ("ground truth", g_ids, gt_png_area)):
        absent = ids_[area == 0]
        if absent.size:
            raise EvaluationError(f"{where} ({label}): segment ids {absent[:10].tolist()} are in segments_info but "
                                  "not in the PNG")  # fmt: skip

    g_info = [gt_segms[int(g)] for g in g_ids]
    p_info = [pred_segms[int(p)] for p in p_ids]
    # panopticapi takes the GT area from the json; the PNG count when the json has none
    gt_area = np.array([seg.get("area", a) for seg, a in zip(g_info, gt_png_area.tolist())], np.float64)
    g_cat = np.array([seg["category_id"] for seg in g_info], np.int64)
    g_crowd = np.array([seg.get("iscrowd", 0) == 1 for seg in g_info], bool)
    p_cat = np.array([seg["category_id"] for seg in p_info], np.int64)
    inter = overlap[1:, 1:]
    void = overlap[0, 1:]

    # matching: same category, GT not crowd, IoU > 0.5; np.nonzero walks (GT id, pred id) in ascending order
    gg, pp = np.nonzero((inter > 0) & (g_cat[:, None] == p_cat[None, :]) & ~g_crowd[:, None])
    # the same float operations in the same order as panopticapi: pred + gt - intersection - void
    union = ((pred_area[pp] + gt_area[gg]) - inter[gg, pp]) - void[pp]
    iou = inter[gg, pp] / union
    ok = iou > 0.5
    gg, pp, iou = gg[ok], pp[ok], iou[ok]
    matched_g = np.zeros(n_g, bool)
    matched_g[gg] = True
    matched_p = np.zeros(n_p, bool)
    matched_p[pp] = True

    counts: dict[int, list[int]] = {}

    def count(cat: int, k: int) -> None:
        c = counts.get(cat)
        if c is None:
            c = counts[cat] = [0, 0, 0]
        c[k] += 1

    matches = [(int(g_cat[g]), float(v)) for g, v in zip(gg.tolist(), iou.tolist())]
    for cat, _ in matches:
        count(cat, 0)
    crowd_by_cat: dict[int, int] = {}  # category -> row of its last crowd segment in segments_info order
    for seg in gt_segments:
        j = int(np.searchsorted(g_ids, int(seg["id"])))
        if matched_g[j]:
            continue
        if g_crowd[j]:
            crowd_by_cat[int(g_cat[j])] = j
            continue
        count(int(g_cat[j]), 2)
    unmatched = np.flatnonzero(~matched_p)
    if unmatched.size:
        ignored = void[unmatched].astype(np.int64)
        if crowd_by_cat:
            rows = np.array([crowd_by_cat.get(int(c), -1) for c in p_cat[unmatched]], np.int64)
            has = rows >= 0
            ignored[has] += inter[rows[has], unmatched[has]]
        fp = (ignored / pred_area[unmatched]) <= 0.5
        for p in unmatched[fp].tolist():
            count(int(p_cat[p]), 1)
    return ImageStats(matches, counts)


def pq_single_image(
    gt_ids: np.ndarray,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    categories: Mapping[int, dict],
    where: str = "image",
    stats: CategoryStats | None = None,
) -> CategoryStats:
    """Accumulate one image's PQ statistics (see :func:`pq_image` for the arguments).

    Returns:
        ``stats`` (created when None): {category id: [sum IoU, TP, FP, FN]}.
    """
    stats = {} if stats is None else stats
    return pq_image(gt_ids, gt_segments, pred_ids, pred_segments, categories, where).add_to(stats)


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


def _evaluate_pair(args: tuple) -> ImageStats:
    gt_ann, pred_ann, gt_dir, pred_dir, categories = args
    where = f"image {gt_ann['image_id']}"
    gt = read_panoptic_png(os.path.join(gt_dir, gt_ann["file_name"]))
    pred_path = os.path.join(pred_dir, pred_ann["file_name"])
    pred = read_panoptic_png(pred_path)
    if gt.shape != pred.shape:
        raise EvaluationError(f"{where}: predicted PNG {pred_path!r} has size {pred.shape[::-1]} (W, H) but the "
                              f"ground truth has {gt.shape[::-1]}")  # fmt: skip
    return pq_image(gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], categories,
                    f"{where} ({pred_ann['file_name']})")  # fmt: skip


_CONTEXT: tuple | None = None  # (gt_dir, pred_dir, categories) inherited by forked workers


def _evaluate_chunk(pairs: list[tuple[dict, dict]]) -> list[ImageStats]:
    gt_dir, pred_dir, categories = _CONTEXT  # type: ignore[misc]
    return [_evaluate_pair((g, p, gt_dir, pred_dir, categories)) for g, p in pairs]


def check_workers(workers: Any, what: str = "workers") -> int:
    """Validate a worker count: an int >= 1, or 0 for one per CPU this process may use. Returns the count."""
    if isinstance(workers, bool) or not isinstance(workers, int | np.integer) or workers < 0:
        raise EvaluationError(f"{what} must be an integer >= 1 (or 0 for one per CPU), got {workers!r}")
    if workers == 0:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:
            return max(1, os.cpu_count() or 1)
    return int(workers)


def map_images(fn: Any, items: Sequence, workers: int, progress: bool = False, desc: str = "images",
               context: tuple | None = None) -> list:
    """``[fn(chunk) for chunk in chunks(items)]`` flattened, in order, over ``workers`` processes.

    ``fn`` takes a list of items and returns a list of results. Chunks of 16 items keep the progress bar
    moving and the workers busy. ``context`` is made available to forked workers (and the serial path) as
    the module global ``_CONTEXT``.
    """
    global _CONTEXT
    chunk = 16
    chunks = [list(items[i : i + chunk]) for i in range(0, len(items), chunk)]
    bar = _progress(len(items), desc) if progress else None
    out: list = []
    _CONTEXT = context
    try:
        if workers <= 1 or len(chunks) <= 1:
            for c in chunks:
                out.extend(fn(c))
                if bar is not None:
                    bar.update(len(c))
            return out
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx) as pool:
            for c, res in zip(chunks, pool.map(fn, chunks)):
                out.extend(res)
                if bar is not None:
                    bar.update(len(c))
        return out
    finally:
        _CONTEXT = None
        if bar is not None:
            bar.close()


def _progress(total: int, desc: str) -> Any:
    """A tqdm bar when tqdm is installed, else None (progress is optional)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


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
    progress: bool = False,
) -> dict:
    """Panoptic quality of a prediction folder against COCO panoptic ground truth.

    Args:
        gt_json: GT panoptic json (path or dict) with ``annotations`` (``image_id``, ``file_name``,
            ``segments_info``) and ``categories`` (``id``, ``isthing``).
        gt_dir: folder of GT PNGs.
        pred_json: prediction json (path or dict) with ``annotations`` in the same format
            (``categories`` are taken from the GT).
        pred_dir: folder of predicted PNGs.
        workers: processes reading and scoring images (>= 1; 0 = one per CPU). Images are accumulated in
            json order whatever the count, so the result does not depend on it (it equals panopticapi's
            ``pq_compute`` run in one process, bit for bit).
        progress: show a tqdm progress bar (when tqdm is installed).
    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {cat id: {...}}}`` (fractions).
    """
    workers = check_workers(workers)
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

    per_image = map_images(_evaluate_chunk, pairs, workers, progress, "panoptic",
                           (str(gt_dir), str(pred_dir), categories))  # fmt: skip
    stats: CategoryStats = {}
    for image in per_image:
        image.add_to(stats)
    return pq_average(stats, categories)


def format_pq_table(results: dict) -> str:
    """The panopticapi summary table (values in percent)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}")
    return "\n".join(lines)
