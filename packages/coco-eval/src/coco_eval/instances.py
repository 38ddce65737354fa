"""COCO box and mask AP/AR, numerically identical to pycocotools' ``COCOeval``.

Backends:
- ``pycocotools``: the reference.
- ``faster``: faster-coco-eval's C++ evaluate/accumulate (several times faster) plus one correction that makes
  it bit-identical: its accumulate returns precision 1.0 where pycocotools computes ``1 / (1 + eps)``
  (= 0.9999999999999998, a category whose first true positive is followed by a false positive); see
  :func:`_unit_precision_fix`. Checked for bit equality of ``stats`` and the full precision array against
  pycocotools on random sets in the tests and on the 5,000-image benchmark set.
- ``faster-raw``: faster-coco-eval unmodified (differs in the 16th significant digit in such cases).
``backend="auto"`` uses ``faster`` when faster-coco-eval is importable, else ``pycocotools``.
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

from coco_eval._io import PathLike, describe, load_json, require, to_numpy
from coco_eval.errors import EvaluationError

#: Names of pycocotools' 12 summary numbers, in ``COCOeval.stats`` order.
STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
IOU_TYPES = ("bbox", "segm")
BACKENDS = ("auto", "pycocotools", "faster", "faster-raw")


@dataclass
class InstanceResult:
    """Result of one COCO instance evaluation.

    Attributes:
        iou_type: "bbox" or "segm".
        backend: the backend that ran ("pycocotools", "faster" or "faster-raw").
        stats: the 12 summary numbers (:data:`STAT_NAMES`) in percent (0-100); NaN where pycocotools gives -1
            (no ground truth in that area range), as detectron2 reports them.
        per_category: {category name: AP in percent}, NaN for categories without ground truth.
        precision: pycocotools' ``eval["precision"]`` array, shape (T=10 IoUs, R=101 recalls, K cats, A=4 areas, M=3 maxDets).
        summary: the 12-line text table pycocotools prints.
    """

    iou_type: str
    backend: str
    stats: dict[str, float]
    per_category: dict[str, float]
    precision: np.ndarray | None = field(default=None, repr=False)
    summary: str = field(default="", repr=False)


def faster_available() -> bool:
    """True when a faster-coco-eval with the pieces the exact correction uses (1.8 API) can be imported."""
    try:
        import inspect

        import faster_coco_eval.faster_eval_api_cpp as _C
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        return False
    return hasattr(_C, "COCOevalAccumulate") and "separate_eval" in inspect.signature(COCOeval_faster).parameters


def resolve_backend(backend: str) -> str:
    """Map "auto" to the fastest backend that is bit-exact with pycocotools; validate explicit names."""
    if backend not in BACKENDS:
        raise EvaluationError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "faster" if faster_available() else "pycocotools"
    if backend.startswith("faster") and not faster_available():
        raise EvaluationError(f"backend={backend!r} needs faster-coco-eval >= 1.8: pip install 'coco-eval[fast]'")
    return backend


# ---------------------------------------------------------------------------------------------------------
# Input loading and validation
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
    return data, name


def _prepared_ground_truth(data: dict, name: str, iou_type: str) -> dict:
    """Validated shallow copy of a COCO GT dict (both backends mutate annotation dicts in place)."""
    img_ids = set()
    for i, img in enumerate(data["images"]):
        img_ids.add(require(img, "id", f"{name}: images[{i}]"))
        if iou_type == "segm":  # masks are rasterised at the image size
            require(img, "height", f"{name}: images[{i}]")
            require(img, "width", f"{name}: images[{i}]")
    cat_ids = set()
    for i, cat in enumerate(data["categories"]):
        cat_ids.add(require(cat, "id", f"{name}: categories[{i}]"))
    anns = []
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    for i, ann in enumerate(data.get("annotations", [])):
        where = f"{name}: annotations[{i}]"
        if require(ann, "image_id", where) not in img_ids:
            raise EvaluationError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")
        if require(ann, "category_id", where) not in cat_ids:
            raise EvaluationError(f"{where}: category_id {ann['category_id']!r} is not in 'categories'")
        require(ann, "area", where)
        require(ann, geometry, where)
        ann = dict(ann)
        ann.setdefault("iscrowd", 0)  # pycocotools would raise KeyError; COCO files omit it for non-crowd
        # pycocotools stores the matched GT *id* and tests it for truth, so a GT with id 0 can never be
        # matched (and duplicate ids collide in its index). Ids play no other role in the metric (GT order
        # comes from the file order), so 1-based renumbering keeps every other result bit-identical.
        ann["id"] = i + 1
        anns.append(ann)
    out = dict(data)
    out["annotations"] = anns
    return out


def _check_number(value: Any, where: str, key: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise EvaluationError(f"{where}: field {key!r} must be a finite number, got {value!r}")


def _prepared_detections(
    detections: PathLike | Sequence[dict], gt: dict, iou_type: str
) -> list[dict]:
    """Validated copies of result records holding only what ``iou_type`` uses.

    For "segm" the box is dropped (as detectron2 does) so that pycocotools' ``loadRes`` takes the
    detection's area from the mask, not from the box.
    """
    if isinstance(detections, list | tuple):
        records, name = detections, "detections"
    else:
        name = f"detection file {describe(detections, '?')}"
        records = load_json(detections, "detection file")
        if not isinstance(records, list):
            raise EvaluationError(f"{name}: expected a JSON list of result objects")
    images = {img["id"]: img for img in gt["images"]}
    sizes = {i: [img["height"], img["width"]] for i, img in images.items() if "height" in img and "width" in img}
    cat_ids = {cat["id"] for cat in gt["categories"]}
    key = "bbox" if iou_type == "bbox" else "segmentation"
    finite = math.isfinite
    out = []
    for i, det in enumerate(records):
        # fast path (hundreds of thousands of records): plain lookups, the detailed diagnosis only on failure
        try:
            image_id, category_id, score, geom = det["image_id"], det["category_id"], det["score"], det[key]
        except (KeyError, TypeError):
            where = f"{name}: [{i}]"
            for field_name in ("image_id", "category_id", "score", key):
                require(det, field_name, where)
            raise
        if image_id not in images:
            raise EvaluationError(f"{name}: [{i}]: image_id {image_id!r} is not an image of the ground truth")
        if category_id not in cat_ids:
            raise EvaluationError(f"{name}: [{i}]: category_id {category_id!r} is not a ground-truth category")
        if type(score) not in (float, int) or not finite(score):
            _check_number(score, f"{name}: [{i}]", "score")
        if iou_type == "bbox":
            if not isinstance(geom, list | tuple) or len(geom) != 4:
                raise EvaluationError(f"{name}: [{i}]: field 'bbox' must be [x, y, w, h], got {geom!r}")
            for v in geom:
                if type(v) not in (float, int) or not finite(v):
                    _check_number(v, f"{name}: [{i}]", "bbox")
            out.append({"image_id": image_id, "category_id": category_id, "score": score, "bbox": list(geom)})
        else:
            if not isinstance(geom, dict) or "counts" not in geom or "size" not in geom:
                raise EvaluationError(f"{name}: [{i}]: field 'segmentation' must be an RLE {{'size', 'counts'}}")
            size = sizes.get(image_id)
            if size is not None and list(geom["size"]) != size:
                raise EvaluationError(
                    f"{name}: [{i}]: segmentation size {list(geom['size'])} differs from image {image_id} size {size}"
                )
            out.append({"image_id": image_id, "category_id": category_id, "score": score, "segmentation": geom})
    return out


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


def _run_pycocotools(gt: dict, dets: list[dict], iou_type: str, img_ids: list | None):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        if dets:
            coco_dt = coco_gt.loadRes(dets)
        else:
            # loadRes indexes anns[0]; an empty result set is still a valid (all-zero) evaluation
            coco_dt = COCO()
            coco_dt.dataset = {"images": list(gt["images"]), "categories": list(gt["categories"]),
                               "annotations": []}  # fmt: skip
            coco_dt.createIndex()
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if img_ids is not None:
            ev.params.imgIds = img_ids
        ev.evaluate()
        ev.accumulate()
        text.truncate(0)
        text.seek(0)
        ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64), ev.eval["precision"], ev.params.catIds, text.getvalue()


def _results_coco(coco_cls: Any, gt: dict, dets: list[dict], iou_type: str) -> Any:
    """What ``COCO.loadRes`` builds, with the per-record C calls batched (``dets`` are our own copies).

    Same fields and values as loadRes: ``id`` = index + 1, ``iscrowd`` = 0, ``area`` = w * h for boxes or
    the mask pixel count for RLEs, a box polygon as ``segmentation`` for box results.
    """
    from faster_coco_eval.core import mask as mask_util  # batched (pycocotools' batch area overflows)

    if iou_type == "bbox":
        for index, ann in enumerate(dets):
            x, y, w, h = ann["bbox"]
            ann["segmentation"] = [[x, y, x, y + h, x + w, y + h, x + w, y]]
            ann["area"] = w * h
            ann["id"] = index + 1
            ann["iscrowd"] = 0
    elif dets:
        rles = [ann["segmentation"] for ann in dets]
        areas = mask_util.area(rles)
        # loadRes also stores toBbox(mask) as "bbox"; segm matching never reads it, so it is left out
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
    cat_index = {c: k for k, c in enumerate(p.catIds)}
    img_set = set(p.imgIds)
    area_rng = np.asarray(p.areaRng, dtype=np.float64)  # (A, 2)
    npig = np.zeros((len(p.catIds), len(area_rng)), dtype=np.int64)
    ks, areas = [], []
    for ann in gt["annotations"]:
        k = cat_index.get(ann["category_id"])
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


def _run_faster(gt: dict, dets: list[dict], iou_type: str, img_ids: list | None, exact: bool = True):
    from faster_coco_eval import COCO, COCOeval_faster

    lines: list[str] = []

    def quiet(*args, **kwargs):  # faster-coco-eval logs through this; keep only the summary lines
        lines.append(" ".join(str(a) for a in args))

    coco_gt = COCO(gt, print_function=lambda *a, **k: None)
    coco_dt = _results_coco(COCO, gt, dets, iou_type)
    ev = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=quiet, separate_eval=True)
    if img_ids is not None:
        ev.params.imgIds = img_ids
    ev.evaluate()
    ev.accumulate()
    if exact:
        _unit_precision_fix(ev, gt)
    lines.clear()
    ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64), ev.eval["precision"], ev.params.catIds, "\n".join(lines)


def _run_faster_raw(gt: dict, dets: list[dict], iou_type: str, img_ids: list | None):
    return _run_faster(gt, dets, iou_type, img_ids, exact=False)


def evaluate_instances(
    gt: PathLike | dict | Any,
    detections: PathLike | Sequence[dict],
    iou_type: str = "bbox",
    backend: str = "auto",
    img_ids: Iterable[int] | None = None,
) -> InstanceResult:
    """COCO AP/AR of instance detections, exactly as pycocotools' ``COCOeval`` computes them.

    Args:
        gt: COCO ground truth: json path, loaded dict, or a pycocotools / faster-coco-eval ``COCO``.
        detections: COCO results: json path or list of ``{"image_id", "category_id", "score", "bbox": [x, y, w, h]}``
            (bbox) / ``"segmentation": RLE`` (segm). Inputs are not modified.
        iou_type: "bbox" or "segm".
        backend: "auto" ("faster" when faster-coco-eval is installed, else "pycocotools"), "pycocotools",
            "faster" (faster-coco-eval, corrected to pycocotools' exact numbers) or "faster-raw" (uncorrected).
        img_ids: evaluate only these images (as detectron2 does for partial runs); default all GT images.
    Returns:
        :class:`InstanceResult` with ``stats`` (AP, AP50, ..., ARl in percent) and ``per_category`` AP.
    Raises:
        EvaluationError: malformed files, unknown image/category ids, missing fields.
    """
    if iou_type not in IOU_TYPES:
        raise EvaluationError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    chosen = resolve_backend(backend)
    data, name = load_ground_truth(gt)
    data = _prepared_ground_truth(data, name, iou_type)
    dets = _prepared_detections(detections, data, iou_type)
    if img_ids is not None:
        known = {img["id"] for img in data["images"]}
        img_ids = sorted({int(i) for i in img_ids})
        unknown = [i for i in img_ids if i not in known]
        if unknown:
            raise EvaluationError(f"img_ids {unknown[:5]} are not images of the {name}")
    run = {"faster": _run_faster, "faster-raw": _run_faster_raw, "pycocotools": _run_pycocotools}[chosen]
    raw, precision, cat_ids, summary = run(data, dets, iou_type, img_ids)

    stats = {k: (float(v) * 100 if v >= 0 else float("nan")) for k, v in zip(STAT_NAMES, raw)}
    names = {cat["id"]: str(cat.get("name", cat["id"])) for cat in data["categories"]}
    per_category = {}
    for k, cat_id in enumerate(cat_ids):
        # area "all", maxDets 100 -- the same slice detectron2 uses for its per-category table
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_category[names[cat_id]] = float(np.mean(p)) * 100 if p.size else float("nan")
    return InstanceResult(iou_type, chosen, stats, per_category, precision, summary)


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
        if m.shape[0] != len(b):
            raise EvaluationError(f"image {image_id}: {m.shape[0]} masks for {len(b)} boxes")
        rles = encode_masks(m.astype(bool))
    out = []
    for k in range(len(b)):
        rec = {"image_id": int(image_id), "category_id": int(c[k]), "bbox": xywh[k].tolist(), "score": float(s[k])}
        if rles is not None:
            rec["segmentation"] = rles[k]
        out.append(rec)
    return out
