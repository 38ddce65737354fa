"""COCO box and mask AP/AR, numerically identical to pycocotools' ``COCOeval``.

Every backend returns pycocotools' ``precision`` (T, R, K, A, M) and ``recall`` (T, K, A, M) arrays; the 12
summary numbers are then computed here with pycocotools' own ``summarize`` arithmetic (:func:`summarize`),
so a library whose summary deviates for non-default ``maxDets`` (hotcoco 1.3, faster-coco-eval 1.8) still
gives pycocotools' stats. Backends (``backend=``):

- ``pycocotools``: the reference (and the fallback: always installed).
- ``hotcoco``: hotcoco (Rust, multi-threaded through rayon: ``RAYON_NUM_THREADS``). Bit-identical precision
  and recall arrays to pycocotools on every case the property tests generate. Its one documented difference
  (it scores detections on image ids absent from the ground truth) cannot arise: such detections are an
  :class:`~coco_eval.EvaluationError` here before any backend runs.
- ``ultrafast``: ultrafast-pycocotools (Rust, multi-threaded through rayon). Bit-identical arrays likewise.
- ``faster``: faster-coco-eval's C++ evaluate/accumulate plus the correction of its one difference
  (:func:`_unit_precision_fix`), bit-identical; ``faster-raw``: uncorrected (differs in the 16th digit).

``backend="auto"`` takes the first installed of hotcoco, ultrafast, faster, pycocotools (fastest first, as
measured by ``benchmarks/bench_eval.py``). Inputs are validated once, before any backend runs, and every
backend receives the same normalised copy (GT ids renumbered, ``iscrowd`` defaulted, detection masks as
compressed RLE, detection boxes dropped for ``segm``), so the choice of backend never changes a number.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from coco_eval import _rle
from coco_eval._io import PathLike, describe, load_json, require, to_numpy
from coco_eval.errors import EvaluationError

#: Names of pycocotools' 12 summary numbers, in ``COCOeval.stats`` order.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "pycocotools", "hotcoco", "ultrafast", "faster", "faster-raw")
#: the order "auto" tries (fastest exact backend first)
AUTO_ORDER = ("hotcoco", "ultrafast", "faster", "pycocotools")
DEFAULT_MAX_DETS = (1, 10, 100)
# pycocotools' default parameters (cocoeval.Params.setDetParams)
IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
AREA_RNG = [[0**2, 1e5**2], [0**2, 32**2], [32**2, 96**2], [96**2, 1e5**2]]
AREA_LBL = ["all", "small", "medium", "large"]


@dataclass
class InstanceResult:
    """Result of one COCO instance evaluation.

    Attributes:
        iou_type: "bbox" or "segm".
        backend: the backend that ran ("pycocotools", "hotcoco", "ultrafast", "faster" or "faster-raw").
        stats: the 12 summary numbers (:data:`STAT_NAMES`) in percent (0-100); NaN where pycocotools gives -1
            (no ground truth in that area range), as detectron2 reports them.
        per_category: {category name: AP in percent}, NaN for categories without ground truth (empty when
            ``use_cats=False``).
        precision: pycocotools' ``eval["precision"]``, (T=10 IoUs, R=101 recalls, K cats, A=4 areas, M maxDets).
        summary: the 12-line text table pycocotools prints.
        recall: pycocotools' ``eval["recall"]``, (T, K, A, M).
        raw_stats: the 12 numbers exactly as pycocotools' ``COCOeval.stats`` (fractions, -1 for undefined).
    """

    iou_type: str
    backend: str
    stats: dict[str, float]
    per_category: dict[str, float]
    precision: np.ndarray | None = field(default=None, repr=False)
    summary: str = field(default="", repr=False)
    recall: np.ndarray | None = field(default=None, repr=False)
    raw_stats: np.ndarray | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------------------------
# Backend discovery
# ---------------------------------------------------------------------------------------------------------


def faster_available() -> bool:
    """True when a faster-coco-eval with the pieces the exact correction uses (1.8 API) can be imported."""
    try:
        import inspect

        import faster_coco_eval.faster_eval_api_cpp as _C
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return False
    return (
        hasattr(_C, "COCOevalAccumulate") and "separate_eval" in inspect.signature(COCOeval_faster).parameters
    )


def _hotcoco_available() -> bool:
    try:
        import hotcoco
    except ImportError:
        return False
    return hasattr(hotcoco, "COCOeval") and hasattr(hotcoco.COCO, "load_res")


def _ultrafast_available() -> bool:
    try:
        import ultrafast_pycocotools
    except ImportError:
        return False
    return hasattr(ultrafast_pycocotools, "COCOeval")


def available_backends() -> dict[str, bool]:
    """{backend name: importable} for every explicit backend."""
    return {
        "pycocotools": True,
        "hotcoco": _hotcoco_available(),
        "ultrafast": _ultrafast_available(),
        "faster": faster_available(),
        "faster-raw": faster_available(),
    }


_INSTALL_HINT = {
    "hotcoco": "pip install hotcoco",
    "ultrafast": "pip install ultrafast-pycocotools",
    "faster": "pip install 'faster-coco-eval>=1.8'",
    "faster-raw": "pip install 'faster-coco-eval>=1.8'",
}


def resolve_backend(backend: str) -> str:
    """Map "auto" to the fastest installed backend that is bit-exact with pycocotools; validate explicit names."""
    if backend not in BACKENDS:
        raise EvaluationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    available = available_backends()
    if backend == "auto":
        return next(b for b in AUTO_ORDER if available[b])
    if not available[backend]:
        raise EvaluationError(f"backend={backend!r} is not installed: {_INSTALL_HINT[backend]}")
    return backend


# ---------------------------------------------------------------------------------------------------------
# Ground truth: loading and validation
# ---------------------------------------------------------------------------------------------------------


def load_ground_truth(gt: PathLike | dict | Any) -> tuple[dict, str]:
    """Ground truth as a COCO dataset dict plus a name for error messages.

    Accepts a path to a COCO json, the loaded dict, or a pycocotools / faster-coco-eval ``COCO`` object.
    """
    if isinstance(gt, dict):
        data, name = gt, "ground-truth dict"
    elif hasattr(gt, "dataset") and isinstance(gt.dataset, dict):
        data, name = gt.dataset, "ground-truth COCO object"
    else:
        name = f"ground-truth file {describe(gt, '?')}"
        data = load_json(gt, "ground-truth file")
    if not isinstance(data, dict):
        raise EvaluationError(f"{name}: expected a JSON object with 'images', 'annotations', 'categories'")
    for key in ("images", "categories"):
        if not isinstance(require(data, key, name), list):
            raise EvaluationError(f"{name}: field {key!r} must be a list")
    if not isinstance(data.get("annotations", []), list):
        raise EvaluationError(f"{name}: field 'annotations' must be a list")
    return data, name


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _check_number(value: Any, where: str, key: str) -> None:
    if not _is_number(value):
        raise EvaluationError(f"{where}: field {key!r} must be a finite number, got {value!r}")


def _box_problem(box: Any) -> str | None:
    if not isinstance(box, list | tuple) or len(box) != 4:
        return f"field 'bbox' must be [x, y, w, h], got {box!r}"
    if not all(_is_number(v) for v in box):
        return f"field 'bbox' must hold 4 finite numbers, got {box!r}"
    return None  # a negative width or height is kept: pycocotools scores such a box (it overlaps nothing)


def _gt_segmentation_problem(seg: Any, size: list[int], checks: list) -> str | None:
    """Structural problems of a GT segmentation; compressed strings are queued in ``checks`` (batched C check)."""
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            return "RLE 'segmentation' needs 'size' and 'counts'"
        problem = _rle.size_problem(seg["size"], size)
        if problem:
            return problem
        counts = seg["counts"]
        if isinstance(counts, str | bytes):
            checks.append(counts)
            return None
        return _rle.uncompressed_problem(counts, size[0] * size[1])
    return _rle.polygon_problem(seg)


def _all_finite_numbers(values: list) -> bool:
    """Every value an int or float (not bool, not str) and finite, checked in bulk."""
    if not values:
        return True
    if not set(map(type, values)) <= {float, int}:
        return False
    return bool(np.isfinite(np.asarray(values, np.float64)).all())


def _annotation_problem(
    ann: Any,
    where: str,
    iou_type: str,
    sizes: dict,
    cat_ids: set,
    compressed: list,
    compressed_owner: list,
    index: int,
) -> None:
    """Raise the EvaluationError that names what is wrong with one GT annotation (the slow path); a valid
    annotation that only missed the fast path returns (queueing its compressed RLE, if any)."""
    image_id = require(ann, "image_id", where)
    try:
        known = image_id in sizes
    except TypeError:
        known = False
    if not known:
        raise EvaluationError(f"{where}: image_id {image_id!r} is not in 'images'")
    try:
        known = require(ann, "category_id", where) in cat_ids
    except TypeError:
        known = False
    if not known:
        raise EvaluationError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
    _check_number(require(ann, "area", where), where, "area")
    crowd = ann.get("iscrowd", 0)
    if isinstance(crowd, float) or crowd not in (0, 1):
        raise EvaluationError(f"{where}: field 'iscrowd' must be 0 or 1, got {crowd!r}")
    if iou_type == "bbox":
        problem = _box_problem(require(ann, "bbox", where))
    else:
        before = len(compressed)
        problem = _gt_segmentation_problem(require(ann, "segmentation", where), sizes[image_id], compressed)
        if len(compressed) > before:
            compressed_owner.append(index)
    if problem:
        raise EvaluationError(f"{where} (id {ann.get('id')!r}, image_id {image_id!r}): {problem}")


def prepare_ground_truth(data: dict, name: str, iou_type: str) -> dict:
    """Validated shallow copy of a COCO GT dict (see :func:`_prepared_ground_truth`)."""
    return _prepared_ground_truth(data, name, iou_type)


def _prepared_ground_truth(data: dict, name: str, iou_type: str) -> dict:
    """Validated shallow copy of a COCO GT dict (backends mutate annotation dicts in place)."""
    sizes: dict[Any, list[int]] = {}
    for i, img in enumerate(data["images"]):
        where = f"{name}: images[{i}]"
        image_id = require(img, "id", where)
        try:
            hash(image_id)
        except TypeError:
            raise EvaluationError(f"{where}: 'id' must be an integer, got {image_id!r}") from None
        if image_id in sizes:
            raise EvaluationError(f"{where}: duplicate image id {image_id!r}")
        if iou_type == "segm":  # masks are rasterised at the image size
            h, w = require(img, "height", where), require(img, "width", where)
            if not (isinstance(h, int) and isinstance(w, int)) or h < 0 or w < 0:
                raise EvaluationError(
                    f"{where}: 'height' and 'width' must be non-negative integers, got {h!r}, {w!r}"
                )
            sizes[image_id] = [h, w]
        else:
            sizes[image_id] = []
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        cat_id = require(cat, "id", f"{name}: categories[{i}]")
        if cat_id in cat_ids:
            raise EvaluationError(f"{name}: categories[{i}]: duplicate category id {cat_id!r}")
        cat_ids.add(cat_id)
    anns = []
    compressed: list[Any] = []
    compressed_owner: list[int] = []
    coords: list[Any] = []  # polygon coordinates and boxes: type- and finiteness-checked in bulk below
    numbers: list[Any] = []  # areas, likewise
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    is_box = iou_type == "bbox"
    for i, ann in enumerate(data.get("annotations", [])):
        try:  # fast path; any irregularity goes to _annotation_problem, which names it
            image_id, geom, crowd = ann["image_id"], ann[geometry], ann.get("iscrowd", 0)
            ok = image_id in sizes and ann["category_id"] in cat_ids and (crowd == 0 or crowd == 1)
            numbers.append(ann["area"])
        except (KeyError, TypeError, AttributeError):
            ok = False
        if ok:
            if is_box:
                ok = type(geom) is list and len(geom) == 4
                coords.extend(geom)
            elif type(geom) is list:
                ok = all(type(p) is list and len(p) >= 6 and not len(p) % 2 for p in geom) and len(geom) > 0
                if ok:
                    for poly in geom:
                        coords.extend(poly)
            elif (
                type(geom) is dict and type(geom.get("counts")) is str and geom.get("size") == sizes[image_id]
            ):
                compressed.append(geom["counts"])
                compressed_owner.append(i)
            else:
                ok = False
        if not ok:
            _annotation_problem(ann, f"{name}: annotations[{i}]", iou_type, sizes, cat_ids, compressed,
                                compressed_owner, i)  # fmt: skip
            crowd = ann.get("iscrowd", 0)
        ann = dict(ann)
        ann["iscrowd"] = int(crowd)  # pycocotools raises KeyError without it; COCO files omit it when 0
        ann.pop("ignore", None)  # pycocotools overwrites it with iscrowd; dropped so no backend reads it
        # pycocotools stores the matched GT *id* and tests it for truth, so a GT with id 0 can never be
        # matched (and duplicate ids collide in its index). Ids play no other role in the metric (GT order
        # comes from the file order), so 1-based renumbering keeps every other result bit-identical.
        ann["id"] = i + 1
        anns.append(ann)
    if not _all_finite_numbers(numbers) or not _all_finite_numbers(coords):
        for i, ann in enumerate(data["annotations"]):  # name the first bad one
            _annotation_problem(ann, f"{name}: annotations[{i}]", iou_type, sizes, cat_ids, [], [], i)
    if compressed:
        totals = []
        for i in compressed_owner:
            h, w = sizes[data["annotations"][i]["image_id"]]
            totals.append(h * w)
        codes = _rle.check_compressed(compressed, totals)
        bad = np.flatnonzero(codes < 0)
        if bad.size:
            i = compressed_owner[int(bad[0])]
            ann = data["annotations"][i]
            raise EvaluationError(
                f"{name}: annotations[{i}] (id {ann.get('id')!r}, image_id {ann['image_id']!r}): "
                f"{_rle.PROBLEMS[int(codes[bad[0]])]} ({totals[int(bad[0])]} for size {ann['segmentation']['size']})"
            )
    out = dict(data)
    out["annotations"] = anns
    return out


# ---------------------------------------------------------------------------------------------------------
# Detections: loading, validation, normalisation to columns
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Detections:
    """Validated detections as columns (N records, in input order).

    ``boxes`` (N, 4) xywh float64 for bbox; ``rles`` N compressed RLEs ``{"size", "counts": str}`` and
    ``areas`` (N,) their pixel counts for segm.
    """

    image_ids: list | np.ndarray
    category_ids: list | np.ndarray
    scores: np.ndarray
    boxes: np.ndarray | None = None
    rles: list[dict] | None = None
    areas: np.ndarray | None = None
    mask_boxes: np.ndarray | None = None  # (N, 4) pycocotools' toBbox of each mask (from the C path only)
    # the mask check still running in a background thread (no GIL): returns the areas or raises the
    # EvaluationError that names the first bad mask; resolve() waits for it
    pending: Any = None

    def __len__(self) -> int:
        return len(self.scores)

    def resolve(self) -> Detections:
        """Wait for a background mask check (raising its EvaluationError); returns self."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.areas = pending()
        return self

    def records(self, iou_type: str) -> list[dict]:
        """COCO result dicts holding only what ``iou_type`` uses (the box alone, or the mask alone)."""
        image_ids, cat_ids = _as_list(self.image_ids), _as_list(self.category_ids)
        if iou_type == "bbox":
            assert self.boxes is not None, "bbox records need boxes"
            boxes = self.boxes.tolist()
            return [{"image_id": i, "category_id": c, "score": s, "bbox": b}
                    for i, c, s, b in zip(image_ids, cat_ids, self.scores.tolist(), boxes)]  # fmt: skip
        return [{"image_id": i, "category_id": c, "score": s, "segmentation": r}
                for i, c, s, r in zip(image_ids, cat_ids, self.scores.tolist(), self.rles or [])]  # fmt: skip


def _as_list(x: list | np.ndarray) -> list:
    return x.tolist() if isinstance(x, np.ndarray) else x


_INT_TYPES = {int, np.int64, np.int32, np.uint32, np.uint64, np.int16, np.uint16, np.int8, np.uint8}
_NUM_TYPES = _INT_TYPES | {float, np.float64, np.float32}


def _load_records(detections: PathLike | Sequence[dict]) -> tuple[Sequence[dict], str]:
    if isinstance(detections, list | tuple):
        return detections, "detections"
    name = f"detection file {describe(detections, '?')}"
    records = load_json(detections, "detection file")  # type: ignore[arg-type]  # a path here
    if not isinstance(records, list):
        raise EvaluationError(f"{name}: expected a JSON list of result objects")
    return records, name


def _diagnose(records: Sequence[dict], name: str, key: str, images: dict, cat_ids: set) -> None:
    """Find and raise the first bad record (the slow path, taken only when the fast checks failed)."""
    for i, det in enumerate(records):
        where = f"{name}: [{i}]"
        for field_name in ("image_id", "category_id", "score", key):
            require(det, field_name, where)
        for field_name in ("image_id", "category_id"):
            try:
                hash(det[field_name])
            except TypeError:
                raise EvaluationError(
                    f"{where}: {field_name} must be an integer, got {det[field_name]!r}"
                ) from None
        if det["image_id"] not in images:
            raise EvaluationError(
                f"{where}: image_id {det['image_id']!r} is not an image of the ground truth"
            )
        if det["category_id"] not in cat_ids:
            raise EvaluationError(
                f"{where}: category_id {det['category_id']!r} is not a ground-truth category"
            )
        _check_number(det["score"], where, "score")
        if key == "bbox":
            problem = _box_problem(det["bbox"])
            if problem:
                raise EvaluationError(f"{where}: {problem}")


def _mask_to_rle(seg: Any, size: list[int], where: str) -> dict:
    """A detection's mask in any COCO form (compressed / uncompressed RLE, polygons, (H, W) array) ->
    compressed RLE with str counts, validated against the image size."""
    from pycocotools import mask as mask_util

    h, w = size
    if isinstance(seg, dict):
        if "counts" not in seg or "size" not in seg:
            raise EvaluationError(f"{where}: RLE 'segmentation' needs 'size' and 'counts'")
        problem = _rle.size_problem(seg["size"], size)
        if problem:
            raise EvaluationError(f"{where}: {problem}")
        counts = seg["counts"]
        if isinstance(counts, str | bytes):
            return {"size": [h, w], "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        problem = _rle.uncompressed_problem(counts, h * w)
        if problem:
            raise EvaluationError(f"{where}: {problem}")
        rle = mask_util.frPyObjects({"size": [h, w], "counts": [int(c) for c in counts]}, h, w)
    elif isinstance(seg, list | tuple):
        problem = _rle.polygon_problem(seg)
        if problem:
            raise EvaluationError(f"{where}: {problem}")
        rle = mask_util.merge(mask_util.frPyObjects([[float(v) for v in p] for p in seg], h, w))
    else:
        m = to_numpy(seg)
        if m.ndim != 2 or m.dtype.kind not in "biu":
            raise EvaluationError(f"{where}: 'segmentation' must be an RLE dict, polygons or an (H, W) bool/int "
                                  f"mask, got {type(seg).__name__} of shape {getattr(m, 'shape', None)}")  # fmt: skip
        if list(m.shape) != size:
            raise EvaluationError(f"{where}: mask shape {list(m.shape)} differs from the image size {size}")
        rle = mask_util.encode(np.asfortranarray(m != 0, dtype=np.uint8))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def prepare_detections(
    records: Sequence[dict], gt: dict, iou_type: str, name: str = "detections", compiled: bool = True
) -> Detections:
    """Validate COCO result records against the ground truth and return them as :class:`Detections`.

    Fast path (``compiled`` and coco_eval._speedups built): the records are read into columns in C and, for
    segm, the masks are checked in a background thread (:meth:`Detections.resolve` joins it); without it,
    one list comprehension per field and numpy checks. A failure re-scans record by record to name the
    first bad one (index, field, value).

    Raises:
        EvaluationError: a missing field, an image or category id unknown to the ground truth, a score that
            is not a finite number, a malformed box (not 4 finite numbers), a mask of the wrong
            size or a malformed RLE / polygon.
    """
    images = {img["id"]: img for img in gt["images"]}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    key = "bbox" if iou_type == "bbox" else "segmentation"
    n = len(records)
    fast = _prepare_detections_c(records, gt, iou_type, name) if compiled else None
    if fast is not None:
        return fast
    try:
        image_ids = [d["image_id"] for d in records]
        category_ids = [d["category_id"] for d in records]
        scores = [d["score"] for d in records]
        geoms = [d[key] for d in records]
    except (KeyError, TypeError):
        _diagnose(records, name, key, images, cat_ids)
        raise  # not reached: _diagnose raises for the same record
    ok = set(map(type, scores)) <= _NUM_TYPES
    score_arr = np.asarray(scores, dtype=np.float64) if ok else np.zeros(0)
    ok = ok and bool(np.isfinite(score_arr).all())
    try:
        ok = ok and all(i in images for i in set(image_ids)) and all(c in cat_ids for c in set(category_ids))
    except TypeError:  # an unhashable id
        ok = False
    if not ok:
        _diagnose(records, name, key, images, cat_ids)
        score_arr = np.asarray([float(v) for v in scores], dtype=np.float64)  # valid, but of unusual types
    if iou_type == "bbox":
        boxes = None
        if set(map(type, geoms)) <= {list, tuple} and set(map(len, geoms)) <= {4}:
            flat = [v for g in geoms for v in g]
            if set(map(type, flat)) <= _NUM_TYPES:
                boxes = np.asarray(flat, dtype=np.float64).reshape(n, 4)
                if not np.isfinite(boxes).all():
                    boxes = None
        if boxes is None:
            _diagnose(records, name, key, images, cat_ids)
            boxes = np.asarray([[float(v) for v in g] for g in geoms], dtype=np.float64).reshape(n, 4)
        return Detections(image_ids, category_ids, score_arr, boxes=boxes)

    sizes = {i: [img.get("height"), img.get("width")] for i, img in images.items()}
    rles: list[dict] = []
    for i, (image_id, seg) in enumerate(zip(image_ids, geoms)):
        counts = seg.get("counts") if type(seg) is dict else None
        size = sizes[image_id]
        if type(counts) is str and seg.get("size") == size:  # the common case: a compressed RLE from json
            rles.append(seg)
        else:
            rles.append(_mask_to_rle(seg, size, f"{name}: [{i}] (image_id {image_id!r})"))
    totals = [sizes[i][0] * sizes[i][1] for i in image_ids]
    areas = _rle.check_compressed([r["counts"] for r in rles], totals)
    bad = np.flatnonzero(areas < 0)
    if bad.size:
        i = int(bad[0])
        raise EvaluationError(f"{name}: [{i}] (image_id {image_ids[i]!r}): {_rle.PROBLEMS[int(areas[i])]} "
                              f"({totals[i]} for size {sizes[image_ids[i]]})")  # fmt: skip
    return Detections(image_ids, category_ids, score_arr, rles=rles, areas=areas.astype(np.float64))


def _prepare_detections_c(records: Sequence[dict], gt: dict, iou_type: str, name: str) -> Detections | None:
    """The compiled fast path of :func:`prepare_detections`: None when it does not apply (no compiled
    module, non-integer GT ids) or when a record needs the Python path (unusual types or an error to name)."""
    if _rle._speedups is None or not isinstance(records, list):
        return None
    gt_ids = [img["id"] for img in gt["images"]]
    gt_cats = [cat["id"] for cat in gt["categories"]]
    if not all(type(i) is int for i in gt_ids) or not all(type(c) is int for c in gt_cats):
        return None
    bad, img_b, cat_b, score_b, geo, size_b, counts = _rle._speedups.extract(records, iou_type == "bbox")
    if bad >= 0:
        return None
    n = len(records)
    image_ids = np.frombuffer(img_b, np.int64)
    category_ids = np.frombuffer(cat_b, np.int64)
    scores = np.frombuffer(score_b, np.float64)
    ids = np.asarray(gt_ids, np.int64)
    order = np.argsort(ids, kind="stable")
    pos = np.clip(np.searchsorted(ids[order], image_ids), 0, max(len(ids) - 1, 0))
    if not len(ids) or not (ids[order][pos] == image_ids).all() or not np.isin(category_ids, gt_cats).all():
        return None
    if iou_type == "bbox":
        return Detections(image_ids, category_ids, scores, boxes=np.frombuffer(geo, np.float64).reshape(n, 4))
    img_index = order[pos]  # each detection's row in gt["images"]
    image_hw = np.asarray([[img["height"], img["width"]] for img in gt["images"]], np.int64).reshape(-1, 2)
    hw = image_hw[img_index]
    assert size_b is not None and counts is not None  # always returned for segm
    if not np.array_equal(np.frombuffer(size_b, np.int64).reshape(n, 2), hw):
        return None  # a size mismatch: the Python path names it
    # The RLE check runs in one background thread (the C code releases the GIL) on the core that hotcoco's
    # single-threaded load_res leaves idle; Detections.resolve() joins it before the areas are used.
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    future = pool.submit(_rle.area_and_bbox, counts, hw, False, 1)
    pool.shutdown(wait=False)

    def areas() -> np.ndarray:
        codes, _ = future.result()
        if (codes < 0).any():  # name the first bad mask (the Python path does)
            prepare_detections(records, gt, iou_type, name, compiled=False)
        return codes.astype(np.float64)

    return Detections(image_ids, category_ids, scores, rles=geo, pending=areas)


# ---------------------------------------------------------------------------------------------------------
# Summary (pycocotools' COCOeval.summarize arithmetic, on any backend's arrays)
# ---------------------------------------------------------------------------------------------------------


def summarize(precision: np.ndarray, recall: np.ndarray, max_dets: Sequence[int]) -> tuple[np.ndarray, str]:
    """pycocotools' 12 detection stats and text table from ``precision`` / ``recall``.

    The same indexing and ``np.mean`` over the entries > -1 as ``COCOeval.summarize``, hence the same bits.
    Returns:
        (12,) float64 stats (fractions, -1 where undefined) and the 12-line table.
    """
    lines = []

    def one(ap: int, iou_thr: float | None = None, area: str = "all", md: int = 100) -> float:
        aind = [i for i, lbl in enumerate(AREA_LBL) if lbl == area]
        mind = [i for i, m in enumerate(max_dets) if m == md]
        s = precision if ap == 1 else recall
        if iou_thr is not None:
            s = s[np.where(iou_thr == IOU_THRS)[0]]
        s = s[:, :, :, aind, mind] if ap == 1 else s[:, :, aind, mind]
        mean_s = -1 if len(s[s > -1]) == 0 else np.mean(s[s > -1])
        title, kind = ("Average Precision", "(AP)") if ap == 1 else ("Average Recall", "(AR)")
        iou_str = f"{IOU_THRS[0]:0.2f}:{IOU_THRS[-1]:0.2f}" if iou_thr is None else f"{iou_thr:0.2f}"
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou_str:<9} | area={area:>6s} | maxDets={md:>3d} ] = {mean_s:0.3f}"
        )
        return mean_s

    m0, m1, m2 = max_dets[0], max_dets[1], max_dets[2]
    stats = np.zeros((12,))
    stats[0] = one(1)
    stats[1] = one(1, iou_thr=0.5, md=m2)
    stats[2] = one(1, iou_thr=0.75, md=m2)
    stats[3] = one(1, area="small", md=m2)
    stats[4] = one(1, area="medium", md=m2)
    stats[5] = one(1, area="large", md=m2)
    stats[6] = one(0, md=m0)
    stats[7] = one(0, md=m1)
    stats[8] = one(0, md=m2)
    stats[9] = one(0, area="small", md=m2)
    stats[10] = one(0, area="medium", md=m2)
    stats[11] = one(0, area="large", md=m2)
    return stats, "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Backends: each returns (precision, recall, category ids in precision order)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Params:
    img_ids: list | None
    max_dets: list[int]
    use_cats: bool


def _run_pycocotools(gt: dict, dets: Detections, iou_type: str, p: _Params):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if len(dets):
            coco_dt = coco_gt.loadRes(dets.records(iou_type))
        else:
            # loadRes indexes anns[0]; an empty result set is still a valid (all-zero) evaluation
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]),
                               "annotations": []}  # fmt: skip
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if p.img_ids is not None:
            ev.params.imgIds = p.img_ids
        ev.params.maxDets = list(p.max_dets)
        ev.params.useCats = int(p.use_cats)
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"], ev.eval["recall"], ev.params.catIds


def _run_hotcoco(gt: dict, dets: Detections, iou_type: str, p: _Params):
    import hotcoco

    coco_gt = hotcoco.COCO(gt)
    if iou_type == "bbox":
        # the (N, 7) array form [image_id, x, y, w, h, score, category_id]: no dict per detection
        arr = np.empty((len(dets), 7), np.float64)
        arr[:, 0] = dets.image_ids
        arr[:, 1:5] = dets.boxes
        arr[:, 5] = dets.scores
        arr[:, 6] = dets.category_ids
        coco_dt = coco_gt.load_res(arr)
    elif (dets.areas is not None or dets.pending is not None) and len(dets):
        # the array form again, then the mask areas (load_res would take w * h of the array's box). hotcoco's
        # segm matching reads only the masks; the box columns carry pycocotools' toBbox when it was computed
        # and zeros otherwise (the property tests cover both).
        arr = np.zeros((len(dets), 7), np.float64)
        arr[:, 0] = dets.image_ids
        if dets.mask_boxes is not None:
            arr[:, 1:5] = dets.mask_boxes
        arr[:, 5] = dets.scores
        arr[:, 6] = dets.category_ids
        coco_dt = coco_gt.load_res(arr, segmentation=list(dets.rles or []))
        dets.resolve()  # the background RLE check ran alongside load_res
        coco_dt.update_anns(ids=np.arange(1, len(dets) + 1, dtype=np.int64), area=dets.areas)
    else:
        coco_dt = coco_gt.load_res(dets.records("segm"))
    ev = hotcoco.COCOeval(coco_gt, coco_dt, iou_type)
    params = ev.params
    if p.img_ids is not None:
        params.img_ids = p.img_ids
    params.max_dets = list(p.max_dets)
    params.use_cats = bool(p.use_cats)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
    e = ev.eval
    assert e is not None, "hotcoco's accumulate left no result"
    return np.asarray(e["precision"], np.float64), np.asarray(e["recall"], np.float64), ev.params.cat_ids


def _run_ultrafast(gt: dict, dets: Detections, iou_type: str, p: _Params):
    import ultrafast_pycocotools as uf

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = uf.COCO(gt, verbose=False)
        if len(dets):
            coco_dt = coco_gt.loadRes(dets.records(iou_type))
        else:
            coco_dt = uf.COCO({"images": list(gt["images"]), "categories": list(gt["categories"]),
                               "annotations": []}, verbose=False)  # fmt: skip
        ev = uf.COCOeval(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
        if p.img_ids is not None:
            ev.params.imgIds = p.img_ids
        ev.params.maxDets = list(p.max_dets)
        ev.params.useCats = int(p.use_cats)
        ev.evaluate()
        ev.accumulate()
    return np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"]), ev.params.catIds


def _results_coco(coco_cls: Any, gt: dict, dets: list[dict], iou_type: str, areas: np.ndarray | None) -> Any:
    """What ``COCO.loadRes`` builds for faster-coco-eval, without its per-record C calls.

    Same fields and values as loadRes: ``id`` = index + 1, ``iscrowd`` = 0, ``area`` = w * h for boxes or
    the mask pixel count for RLEs, a box polygon as ``segmentation`` for box results.
    """
    if iou_type == "bbox":
        for index, ann in enumerate(dets):
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
            ann["area"] = w * h
            ann["id"] = index + 1
            ann["iscrowd"] = 0
    else:
        # loadRes also stores toBbox(mask) as "bbox"; segm matching never reads it, so it is left out
        assert areas is not None, "segm results need mask areas"
        for index, ann in enumerate(dets):
            ann["area"] = areas[index]
            ann["id"] = index + 1
            ann["iscrowd"] = 0
    res = coco_cls(print_function=lambda *a, **k: None)
    res.dataset = {"info": gt.get("info", {}), "images": list(gt["images"]),
                   "categories": copy.deepcopy(gt["categories"]), "annotations": dets}  # fmt: skip
    res.createIndex()
    return res


def _unit_precision_fix(ev: Any, gt: dict) -> None:
    """Make faster-coco-eval's precision array bit-identical to pycocotools' (in place).

    pycocotools computes precision as ``tp / (fp + tp + eps)``. That equals 1.0 exactly whenever tp >= 2 and
    fp = 0, but at tp = 1, fp = 0 it is ``1 / (1 + eps) = 0.9999999999999998``; faster-coco-eval's C++ returns
    1.0 there. After the "max over the rest of the curve" interpolation this matters exactly in the cells whose
    recall threshold is <= 1/npig (the first true positive's recall) when no fp-free point with tp >= 2 exists,
    i.e. the first two non-ignored detections (in score order) are not both true positives.
    A second C++ accumulate with one recall threshold strictly between 1/npig and 2/npig per category/area
    tells us that: its interpolated precision there is 1.0 iff the tp = 2 point has fp = 0.
    """
    import faster_coco_eval.faster_eval_api_cpp as _C

    p = ev._paramsEval
    prec = ev.eval["precision"]  # (T, R, K, A, M)
    cat_ids = p.catIds if p.useCats else [None]
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    img_set = set(p.imgIds)
    area_rng = np.asarray(p.areaRng, dtype=np.float64)  # (A, 2)
    npig = np.zeros((len(cat_ids), len(area_rng)), dtype=np.int64)
    ks, areas = [], []
    for ann in gt["annotations"]:
        k = cat_index.get(ann["category_id"] if p.useCats else None)
        if k is None or ann["image_id"] not in img_set or ann.get("iscrowd", 0):
            continue
        ks.append(k)
        areas.append(ann["area"])
    if ks:
        areas_arr = np.asarray(areas, dtype=np.float64)[:, None]
        inside = (areas_arr >= area_rng[None, :, 0]) & (areas_arr <= area_rng[None, :, 1])  # (N, A)
        np.add.at(npig, np.asarray(ks), inside.astype(np.int64))
    with np.errstate(divide="ignore"):
        rc1 = np.where(npig > 0, 1.0 / np.maximum(npig, 1), -1.0)  # recall of the first TP, as pycocotools
    rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
    first_tp_cells = rec_thrs[:, None, None] <= rc1[None]  # (R, K, A)
    candidates = (prec == 1.0) & first_tp_cells[None, :, :, :, None]
    if not candidates.any():
        return
    probe_npig = np.unique(npig[npig >= 2])
    second_fp_free = np.zeros((prec.shape[0], *npig.shape, prec.shape[4]), dtype=bool)  # (T, K, A, M)
    if probe_npig.size:
        probes = np.unique(1.5 / probe_npig)  # strictly between 1/n and 2/n; ascending
        p2 = copy.deepcopy(p)
        p2.recThrs = probes
        prec2 = np.asarray(_C.COCOevalAccumulate(p2, ev._evalImgs_cpp)["precision"])  # (T, P, K, A, M)
        idx = np.searchsorted(probes, 1.5 / np.maximum(npig, 1))  # (K, A)
        idx = np.clip(idx, 0, len(probes) - 1)
        kk, aa = np.meshgrid(np.arange(npig.shape[0]), np.arange(npig.shape[1]), indexing="ij")
        vals = prec2[:, idx, kk, aa, :]  # (T, K, A, M)
        second_fp_free = (vals == 1.0) & (npig >= 2)[None, :, :, None]
    fix = candidates & ~second_fp_free[:, None]
    prec[fix] = 1.0 / (0.0 + 1.0 + np.spacing(1))


def _run_faster(gt: dict, dets: Detections, iou_type: str, p: _Params, exact: bool = True):
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt, print_function=lambda *a, **k: None)
    coco_dt = _results_coco(COCO, gt, dets.records(iou_type), iou_type, dets.areas)
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None, separate_eval=True)
    if p.img_ids is not None:
        ev.params.imgIds = p.img_ids
    ev.params.maxDets = list(p.max_dets)
    ev.params.useCats = int(p.use_cats)
    ev.evaluate()
    ev.accumulate()
    if exact:
        _unit_precision_fix(ev, gt)
    return np.asarray(ev.eval["precision"]), np.asarray(ev.eval["recall"]), ev.params.catIds


def _run_faster_raw(gt: dict, dets: Detections, iou_type: str, p: _Params):
    return _run_faster(gt, dets, iou_type, p, exact=False)


_RUNNERS = {
    "pycocotools": _run_pycocotools,
    "hotcoco": _run_hotcoco,
    "ultrafast": _run_ultrafast,
    "faster": _run_faster,
    "faster-raw": _run_faster_raw,
}


def _check_max_dets(max_dets: Any) -> list[int]:
    try:
        values = [int(m) for m in max_dets]
        ok = all(isinstance(m, numbers.Integral) and not isinstance(m, bool) for m in max_dets)
    except (TypeError, ValueError):
        ok = False
    if not ok or len(values) < 3 or any(m < 1 for m in values) or values != sorted(set(values)):
        raise EvaluationError(
            f"max_dets must be >= 3 increasing positive integers (e.g. (1, 10, 100)), got {max_dets!r}"
        )
    return values


def evaluate_instances(
    gt: PathLike | dict | Any,
    detections: PathLike | Sequence[dict],
    iou_type: str = "bbox",
    backend: str = "auto",
    img_ids: Iterable[int] | None = None,
    *,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    use_cats: bool = True,
) -> InstanceResult:
    """COCO AP/AR of instance detections, exactly as pycocotools' ``COCOeval`` computes them.

    Args:
        gt: COCO ground truth: json path, loaded dict, or a pycocotools / faster-coco-eval ``COCO``.
        detections: COCO results: json path or list of ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}``
            (bbox) / ``"segmentation"`` (segm: compressed or uncompressed RLE, polygons, or an (H, W) mask
            array). Inputs are not modified.
        iou_type: "bbox" or "segm".
        backend: "auto" (fastest installed of hotcoco, ultrafast, faster, pycocotools), "pycocotools",
            "hotcoco", "ultrafast", "faster" (faster-coco-eval corrected to pycocotools' numbers) or
            "faster-raw" (uncorrected). All but "faster-raw" give pycocotools' numbers bit for bit.
        img_ids: evaluate only these images (as detectron2 does for partial runs); default all GT images.
        max_dets: pycocotools' ``params.maxDets`` (the stats read entries 0, 1 and 2).
        use_cats: pycocotools' ``params.useCats`` (False: categories are ignored when matching).
    Returns:
        :class:`InstanceResult` with ``stats`` (AP, AP50, ..., ARl in percent), ``per_category`` AP, the
        precision / recall arrays and the backend that ran.
    Raises:
        EvaluationError: malformed files, unknown image/category ids, missing fields, malformed boxes, masks,
            RLEs or polygons (naming the annotation), bad arguments.
    """
    if iou_type not in IOU_TYPES:
        raise EvaluationError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    max_dets = _check_max_dets(max_dets)
    resolve_backend(backend)  # a bad name fails before any file is read
    data, name = load_ground_truth(gt)
    data = _prepared_ground_truth(data, name, iou_type)
    records, det_name = _load_records(detections)
    dets = prepare_detections(records, data, iou_type, det_name)
    return evaluate_prepared(
        data, name, dets, iou_type, backend, img_ids, max_dets=max_dets, use_cats=use_cats
    )


def evaluate_prepared(
    data: dict,
    name: str,
    dets: Detections,
    iou_type: str,
    backend: str = "auto",
    img_ids: Iterable[int] | None = None,
    *,
    max_dets: Sequence[int] = DEFAULT_MAX_DETS,
    use_cats: bool = True,
) -> InstanceResult:
    """:func:`evaluate_instances` on already validated inputs: ``data`` from ``prepare_ground_truth``,
    ``dets`` from :func:`prepare_detections` or built by a streaming evaluator from its own checked columns."""
    max_dets = _check_max_dets(max_dets)
    chosen = resolve_backend(backend)
    if img_ids is not None:
        known = {img["id"] for img in data["images"]}
        img_ids = sorted({int(i) for i in img_ids})
        unknown = [i for i in img_ids if i not in known]
        if unknown:
            raise EvaluationError(f"img_ids {unknown[:5]} are not images of the {name}")
    params = _Params(img_ids, max_dets, bool(use_cats))
    if chosen != "hotcoco":
        dets.resolve()
    precision, recall, cat_ids = _RUNNERS[chosen](data, dets, iou_type, params)
    dets.resolve()
    return _result(iou_type, chosen, precision, recall, cat_ids, params, data)


def _result(iou_type, backend, precision, recall, cat_ids, params: _Params, data: dict) -> InstanceResult:
    raw, summary = summarize(precision, recall, params.max_dets)
    stats = {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(STAT_NAMES, raw)}
    per_category = {}
    if params.use_cats:
        names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in data["categories"]}
        for k, cat_id in enumerate(cat_ids):
            # area "all", the last maxDets -- the same slice detectron2 uses for its per-category table
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            per_category[names[cat_id]] = float(np.mean(p)) * 100 if p.size else float("nan")
    return InstanceResult(iou_type, backend, stats, per_category, precision, summary, recall, raw)


# ---------------------------------------------------------------------------------------------------------
# Predictions -> COCO results json
# ---------------------------------------------------------------------------------------------------------


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Binary masks (K, H, W) -> COCO RLEs with ``counts`` as str (JSON-serialisable)."""
    from pycocotools import mask as mask_util

    masks = np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0))
    rles = mask_util.encode(masks) if masks.shape[2] else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def instances_to_coco_json(
    image_id: int,
    boxes: Any,
    scores: Any,
    category_ids: Any,
    masks: Any | None = None,
) -> list[dict]:
    """One image's predictions as COCO result records.

    Args:
        image_id: the dataset image id.
        boxes: (K, 4) xyxy absolute pixels (numpy or torch).
        scores: (K,) confidences.
        category_ids: (K,) dataset category ids (not contiguous indices).
        masks: optional (K, H, W) bool masks; encoded as RLE under "segmentation".
    Returns:
        K dicts ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"[, "segmentation"]}``.
    """
    b = to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    c = to_numpy(category_ids).reshape(-1)
    if not (len(b) == len(s) == len(c)):
        raise EvaluationError(f"image {image_id}: boxes ({len(b)}), scores ({len(s)}) and category_ids "
                              f"({len(c)}) differ in length")  # fmt: skip
    xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1) if len(b) else b
    rles = None
    if masks is not None:
        m = to_numpy(masks)
        if m.ndim != 3 or m.shape[0] != len(b):
            raise EvaluationError(f"image {image_id}: masks of shape {tuple(m.shape)} for {len(b)} boxes "
                                  "(expected (K, H, W))")  # fmt: skip
        rles = encode_masks(m.astype(bool))
    out = []
    for k in range(len(b)):
        rec = {
            "image_id": int(image_id),
            "category_id": int(c[k]),
            "bbox": xywh[k].tolist(),
            "score": float(s[k]),
        }
        if rles is not None:
            rec["segmentation"] = rles[k]
        out.append(rec)
    return out
