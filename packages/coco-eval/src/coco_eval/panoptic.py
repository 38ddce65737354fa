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
import struct
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from coco_eval._io import PathLike, describe, load_json, require
from coco_eval.errors import EvaluationError

try:
    from coco_eval import _speedups
except ImportError:  # built without a compiler: PNGs are read through PIL
    _speedups = None  # type: ignore[assignment]
from coco_eval.panoptic_io import read_panoptic_png

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

    One counting pass over combined ``gt * 2^24 + pred`` keys (numpy's ``unique``; from files, the compiled
    PNG path counts while decoding) gives every overlap, the segment
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
        raise EvaluationError(
            f"{where}: prediction size {pred_ids.shape} differs from ground truth {gt_ids.shape}"
        )
    for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
        if ids.dtype.kind not in "iu":
            raise EvaluationError(f"{where}: {name} segment ids must be integers, got dtype {ids.dtype}")
        if ids.dtype.kind == "i" or ids.dtype.itemsize > 4:
            if ids.size and (ids.min() < 0 or ids.max() >= OFFSET):
                raise EvaluationError(f"{where}: {name} segment ids must lie in [0, 2^24)")
    gt_segms, pred_segms = _checked_segments(gt_segments, pred_segments, categories, where)
    g_ids = np.array(sorted(gt_segms), np.int64)
    p_ids = np.array(sorted(pred_segms), np.int64)
    # one sort-based pass over combined keys gives every (gt id, pred id) overlap (numpy's unique is the
    # fastest counter here); the few hundred pairs are then mapped to segment indices
    joint = gt_ids.astype(np.uint64).ravel() * np.uint64(OFFSET) + pred_ids.astype(np.uint64).ravel()
    keys, cnt = np.unique(joint, return_counts=True)
    pair_g = (keys // np.uint64(OFFSET)).astype(np.int64)
    pair_p = (keys % np.uint64(OFFSET)).astype(np.int64)
    gi = _index_of(pair_g, g_ids, f"{where} (ground truth)")
    pi = _index_of(pair_p, p_ids, f"{where} (prediction)")
    overlap = np.zeros((g_ids.size + 1, p_ids.size + 1), np.int64)
    overlap[gi, pi] = cnt  # (gi, pi) pairs are unique
    return _score_overlap(overlap, g_ids, p_ids, gt_segms, pred_segms, gt_segments, where)


def _checked_segments(
    gt_segments: Any, pred_segments: Any, categories: Mapping, where: str
) -> tuple[dict, dict]:
    gt_segms = _segments_by_id(gt_segments, f"{where} (ground truth)")
    pred_segms = _segments_by_id(pred_segments, f"{where} (prediction)")
    for label, segms in (("ground truth", gt_segms), ("prediction", pred_segms)):
        for seg in segms.values():
            if seg["category_id"] not in categories:
                raise EvaluationError(
                    f"{where} ({label}): segment {seg['id']} has unknown category_id {seg['category_id']}"
                )
    return gt_segms, pred_segms


def _index_of(ids: np.ndarray, seg_ids: np.ndarray, where: str) -> np.ndarray:
    """Position of each id in ``[VOID, *seg_ids]`` (seg_ids sorted); EvaluationError for ids not listed."""
    lookup = np.concatenate([[VOID], seg_ids])
    idx = np.minimum(np.searchsorted(lookup, ids), lookup.size - 1)
    bad = lookup[idx] != ids
    if bad.any():
        _unknown_ids(np.unique(ids[bad]).tolist(), where)
    return idx


def _unknown_ids(ids: list, where: str) -> None:
    raise EvaluationError(f"{where}: segment ids {sorted(ids)[:10]} are in the PNG but not in segments_info")


def _score_overlap(
    overlap: np.ndarray,
    g_ids: np.ndarray,
    p_ids: np.ndarray,
    gt_segms: dict,
    pred_segms: dict,
    gt_segments: Sequence[dict],
    where: str,
) -> ImageStats:
    """panopticapi's matching and counting on the (G + 1, P + 1) overlap matrix (row / column 0 = VOID)."""
    n_g, n_p = g_ids.size, p_ids.size
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
        results[name] = {
            "pq": pq / n if n else 0.0,
            "sq": sq / n if n else 0.0,
            "rq": rq / n if n else 0.0,
            "n": n,
        }
        if name == "All":
            results["per_class"] = per_class
    return results


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_scanlines(path: str) -> tuple[bytes, int, int, int] | None:
    """(inflated scanlines, width, height, channels) of an 8-bit RGB / RGBA non-interlaced PNG, else None
    (anything unusual or broken goes through PIL, which reads or names it)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    if data[:8] != _PNG_SIGNATURE:
        return None
    pos, idat, header = 8, [], None
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR" and length == 13:
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        return None
    width, height, depth, color, compression, filtering, interlace = header
    if depth != 8 or color not in (2, 6) or compression or filtering or interlace:
        return None
    channels = 3 if color == 2 else 4
    try:  # the exact output size up front: no buffer regrowth
        raw = zlib.decompress(b"".join(idat), bufsize=height * (width * channels + 1))
    except zlib.error:
        return None
    return raw, width, height, channels


def pq_image_from_png(
    gt_path: str,
    gt_segments: Sequence[dict],
    pred_ids: np.ndarray,
    pred_segments: Sequence[dict],
    categories: Mapping[int, dict],
    where: str = "image",
) -> ImageStats:
    """:func:`pq_image` with the ground truth given as its PNG file (the streaming evaluator's case).

    With coco_eval._speedups the GT PNG is inflated and counted against the predicted ids directly (no GT id
    image is built); otherwise it is read through PIL.
    """
    pred_ids = np.asarray(pred_ids)
    gt_png = _png_scanlines(gt_path) if _speedups is not None else None
    if gt_png is not None and pred_ids.shape == (gt_png[2], gt_png[1]) and pred_ids.dtype.kind in "iu":
        if pred_ids.size and (pred_ids.min() < 0 or pred_ids.max() >= OFFSET):
            raise EvaluationError(f"{where}: prediction segment ids must lie in [0, 2^24)")
        gt_segms, pred_segms = _checked_segments(gt_segments, pred_segments, categories, where)
        g_ids = np.array(sorted(gt_segms), np.int64)
        p_ids = np.array(sorted(pred_segms), np.int64)
        flat = np.ascontiguousarray(pred_ids, dtype=np.uint32)
        try:
            counts, unknown_g, unknown_p, error = _speedups.png_overlap(
                gt_png[0], gt_png[3], flat, 0, gt_png[1], gt_png[2], g_ids, p_ids
            )
        except ValueError:
            error = "unreadable"
        if error is None:
            if unknown_g:
                _unknown_ids(unknown_g, f"{where} (ground truth)")
            if unknown_p:
                _unknown_ids(unknown_p, f"{where} (prediction)")
            overlap = np.frombuffer(counts, np.int64).reshape(g_ids.size + 1, p_ids.size + 1)
            return _score_overlap(overlap, g_ids, p_ids, gt_segms, pred_segms, gt_segments, where)
    return pq_image(read_panoptic_png(gt_path), gt_segments, pred_ids, pred_segments, categories, where)


def _evaluate_pair(args: tuple) -> ImageStats:
    gt_ann, pred_ann, gt_dir, pred_dir, categories = args
    where = f"image {gt_ann['image_id']}"
    gt_path = os.path.join(gt_dir, gt_ann["file_name"])
    pred_path = os.path.join(pred_dir, pred_ann["file_name"])
    if _speedups is not None:
        stats = _evaluate_pair_compiled(gt_path, gt_ann, pred_path, pred_ann, categories, where)
        if stats is not None:
            return stats
    gt = read_panoptic_png(gt_path)
    pred = read_panoptic_png(pred_path)
    if gt.shape != pred.shape:
        raise EvaluationError(f"{where}: predicted PNG {pred_path!r} has size {pred.shape[::-1]} (W, H) but the "
                              f"ground truth has {gt.shape[::-1]}")  # fmt: skip
    return pq_image(gt, gt_ann["segments_info"], pred, pred_ann["segments_info"], categories,
                    f"{where} ({pred_ann['file_name']})")  # fmt: skip


def _evaluate_pair_compiled(
    gt_path: str, gt_ann: dict, pred_path: str, pred_ann: dict, categories: Mapping, where: str
) -> ImageStats | None:
    """The PNG pair decoded straight into the overlap matrix (coco_eval._speedups); None when a PNG is not
    plain 8-bit RGB(A) or the sizes differ (the PIL path then reads it or names the problem)."""
    gt_png, pred_png = _png_scanlines(gt_path), _png_scanlines(pred_path)
    if gt_png is None or pred_png is None or gt_png[1:3] != pred_png[1:3]:
        return None
    where = f"{where} ({pred_ann['file_name']})"
    gt_segms, pred_segms = _checked_segments(
        gt_ann["segments_info"], pred_ann["segments_info"], categories, where
    )
    g_ids = np.array(sorted(gt_segms), np.int64)
    p_ids = np.array(sorted(pred_segms), np.int64)
    try:
        counts, unknown_g, unknown_p, error = _speedups.png_overlap(
            gt_png[0], gt_png[3], pred_png[0], pred_png[3], gt_png[1], gt_png[2], g_ids, p_ids
        )
    except ValueError:
        return None
    if error is not None:
        return None
    if unknown_g:
        _unknown_ids(unknown_g, f"{where} (ground truth)")
    if unknown_p:
        _unknown_ids(unknown_p, f"{where} (prediction)")
    overlap = np.frombuffer(counts, np.int64).reshape(g_ids.size + 1, p_ids.size + 1)
    return _score_overlap(overlap, g_ids, p_ids, gt_segms, pred_segms, gt_ann["segments_info"], where)


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


def map_images(
    fn: Any,
    items: Sequence,
    workers: int,
    progress: bool = False,
    desc: str = "images",
    context: tuple | None = None,
    threads: bool = False,
) -> list:
    """``[fn(chunk) for chunk in chunks(items)]`` flattened, in order, over ``workers`` threads or processes.

    ``fn`` takes a list of items and returns a list of results. Chunks of 8 items keep the progress bar
    moving and the workers busy. ``context`` is available to ``fn`` (in forked processes too) as the module
    global ``_CONTEXT``. ``threads``: for work that releases the GIL (the compiled PNG path: zlib and
    ``_speedups.png_overlap`` both do), threads avoid the process start-up and the pickling of results.
    """
    global _CONTEXT
    chunk = 8
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
        if threads:
            pool: Any = ThreadPoolExecutor(max_workers=min(workers, len(chunks)))
        else:
            ctx = multiprocessing.get_context(
                "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            )
            pool = ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=ctx)
        with pool:
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
    backend: str = "auto",
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
        progress: show a tqdm progress bar (when tqdm is installed; not with the hotcoco backend).
        backend: "auto" / "coco-eval" (this package: compiled PNG decoding into the overlap matrix when
            ``coco_eval._speedups`` is built, PIL + numpy otherwise; panopticapi's numbers bit for bit) or
            "hotcoco" (hotcoco's Rust PQ, multi-threaded through ``RAYON_NUM_THREADS``, ``workers`` does not
            apply). hotcoco adds the per-category IoUs in another order, so its PQ can differ from
            panopticapi's in the last bits, and it ignores GT PNG ids missing from ``segments_info`` (as
            panopticapi does; "coco-eval" raises). When hotcoco rejects an input, the "coco-eval" path runs
            and names the file and the problem.
    Returns:
        ``{"All": {"pq", "sq", "rq", "n"}, "Things": ..., "Stuff": ..., "per_class": {cat id: {...}},
        "backend": the backend that ran}`` (fractions).
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
        raise EvaluationError(
            f"{pred_name}: predictions for image ids {unknown[:5]} that are not in the ground truth"
        )

    for ann, pred_ann in pairs:  # json-level checks for every backend (cheap: no PNG is read)
        _checked_segments(require(ann, "segments_info", gt_name), pred_ann["segments_info"], categories,
                          f"image {ann['image_id']} ({pred_ann['file_name']})")  # fmt: skip
    chosen = resolve_pq_backend(backend)
    if chosen == "hotcoco":
        hot = _hotcoco_stats(gt, pairs, str(gt_dir), str(pred_dir), categories)
        if hot is not None:
            return dict(pq_average(hot, categories), backend="hotcoco")
        chosen = "coco-eval"  # hotcoco rejected the input: this package's path names the file and the problem
    per_image = map_images(_evaluate_chunk, pairs, workers, progress, "panoptic",
                           (str(gt_dir), str(pred_dir), categories), threads=_speedups is not None)  # fmt: skip
    stats: CategoryStats = {}
    for image in per_image:
        image.add_to(stats)
    return dict(pq_average(stats, categories), backend=chosen)


PQ_BACKENDS = ("auto", "coco-eval", "hotcoco")


def resolve_pq_backend(backend: str) -> str:
    """Map "auto" to "coco-eval" (the exact one); validate explicit names."""
    if backend not in PQ_BACKENDS:
        raise EvaluationError(f"backend must be one of {PQ_BACKENDS}, got {backend!r}")
    if backend in ("auto", "coco-eval"):
        return "coco-eval"
    try:
        import hotcoco.panoptic  # noqa: F401
    except ImportError:
        raise EvaluationError("backend='hotcoco' is not installed: pip install hotcoco") from None
    return "hotcoco"


def _hotcoco_stats(
    gt: dict, pairs: list, gt_dir: str, pred_dir: str, categories: Mapping
) -> CategoryStats | None:
    """Per-category [sum IoU, TP, FP, FN] from hotcoco's PanopticEval; None when hotcoco rejects the input
    (the caller then runs this package's path, whose errors name the file and the problem)."""
    import contextlib
    import io

    import hotcoco.panoptic

    gt_data = {"images": gt.get("images") or [{"id": a["image_id"], "file_name": a["file_name"]} for a, _ in pairs],
               "categories": list(categories.values()), "annotations": [a for a, _ in pairs]}  # fmt: skip
    pred_data = {
        "images": gt_data["images"],
        "categories": gt_data["categories"],
        "annotations": [p for _, p in pairs],
    }
    try:
        ev = hotcoco.panoptic.PanopticEval(gt_data, pred_data, gt_folder=gt_dir, pred_folder=pred_dir)
        with contextlib.redirect_stdout(io.StringIO()):
            ev.evaluate()
        per_class = ev.results()["per_class"]
    except (ValueError, OSError, KeyError, TypeError):
        return None
    stats: CategoryStats = {}
    for cat, r in per_class.items():
        if r["tp"] or r["fp"] or r["fn"]:
            stats[int(cat)] = [float(r["iou"]), int(r["tp"]), int(r["fp"]), int(r["fn"])]
    return stats


def format_pq_table(results: dict) -> str:
    """The panopticapi summary table (values in percent)."""
    lines = [f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}", "-" * 38]
    for name in ("All", "Things", "Stuff"):
        r = results[name]
        lines.append(
            f"{name:10s}| {100 * r['pq']:5.1f}  {100 * r['sq']:5.1f}  {100 * r['rq']:5.1f} {r['n']:5d}"
        )
    return "\n".join(lines)
