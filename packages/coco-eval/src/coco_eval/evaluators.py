"""Streaming evaluators for training loops: ``reset()``, ``process(inputs, outputs)``, ``evaluate()``.

Each keeps only small per-image results (compact detection columns with masks as RLE strings, per-image PQ
matches and counts, a confusion matrix); under torch.distributed every rank's part is gathered to rank 0,
which returns the metrics (other ranks: {}). Every rank must call ``evaluate`` (it is a collective).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from coco_eval._io import PathLike, load_json, require, to_numpy
from coco_eval.distributed import gather_to_main
from coco_eval.errors import EvaluationError
from coco_eval.instances import (
    DEFAULT_MAX_DETS,
    IOU_TYPES,
    Detections,
    _check_max_dets,
    encode_masks,
    evaluate_prepared,
    load_ground_truth,
    prepare_ground_truth,
    resolve_backend,
)
from coco_eval.panoptic import CategoryStats, ImageStats, pq_average, pq_image_from_png
from coco_eval.semantic import SemSegEvaluator

__all__ = ["COCOInstanceEvaluator", "COCOPanopticEvaluator", "SemSegEvaluator"]


class COCOInstanceEvaluator:
    """COCO box/mask AP over the images seen by ``process``, with bounded memory.

    ``process`` keeps, per image, only compact columns: boxes (K, 4) float64, scores, category ids and, for
    masks, the compressed RLE string and pixel count of each (the (K, H, W) masks are encoded at once and
    never kept). ``evaluate`` hands these columns to the backend without rebuilding a dict per detection.

    Args:
        gt: COCO instance ground truth (json path, dict or ``COCO`` object).
        iou_types: subset of ("bbox", "segm"); "segm" is skipped when no output carried masks.
        backend: see :func:`coco_eval.evaluate_instances` ("auto": fastest exact backend installed).
        max_dets, use_cats: pycocotools' ``maxDets`` / ``useCats``.
        progress: a tqdm progress bar over the evaluation steps in ``evaluate`` (when tqdm is installed).
    """

    def __init__(
        self,
        gt: PathLike | dict | Any,
        iou_types: Sequence[str] = ("bbox", "segm"),
        backend: str = "auto",
        *,
        max_dets: Sequence[int] = DEFAULT_MAX_DETS,
        use_cats: bool = True,
        progress: bool = False,
    ):
        if isinstance(iou_types, str) or not iou_types:
            raise EvaluationError(f"iou_types must be a non-empty sequence of {IOU_TYPES}, got {iou_types!r}")
        for t in iou_types:
            if t not in IOU_TYPES:
                raise EvaluationError(f"iou_types: unknown type {t!r}, expected some of {IOU_TYPES}")
        resolve_backend(backend)
        self.max_dets = _check_max_dets(max_dets)
        self.gt, self._gt_name = load_ground_truth(gt)
        self._images = {}
        for i, img in enumerate(self.gt["images"]):
            self._images[require(img, "id", f"{self._gt_name}: images[{i}]")] = img
        self._cat_ids = np.array(
            sorted(c["id"] for c in self.gt["categories"] if type(c.get("id")) is int), np.int64
        )
        self._prepared: dict[str, dict] = {}  # validated GT per IoU type (the GT does not change)
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.use_cats = bool(use_cats)
        self.progress = progress
        self.reset()

    def reset(self) -> None:
        """Forget all processed predictions."""
        self._parts: list[
            tuple
        ] = []  # (image_id, boxes xywh, scores, category ids, rle counts | None, areas | None)
        self.image_ids: list[int] = []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Add a batch of predictions (masks are encoded to RLE here, per image).

        Args:
            inputs: ``[{"image_id": int}]``.
            outputs: ``[{"boxes": (K, 4) xyxy abs, "scores": (K,), "category_ids": (K,) dataset ids,
                "masks": (K, H, W) bool | None}]`` (numpy or torch).
        Raises:
            EvaluationError: an image id or category id unknown to the ground truth, lengths that differ,
                non-finite boxes or scores, masks of another size than the image.
        """
        if len(inputs) != len(outputs):
            raise EvaluationError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            image_id = require(inp, "image_id", "COCOInstanceEvaluator.process input")
            image_id = int(to_numpy(image_id))
            img = self._images.get(image_id)
            if img is None:
                raise EvaluationError(
                    f"COCOInstanceEvaluator.process: image_id {image_id} is not in the {self._gt_name}"
                )
            where = f"output for image {image_id}"
            b = to_numpy(require(out, "boxes", where)).astype(np.float64).reshape(-1, 4)
            scores = to_numpy(require(out, "scores", where)).astype(np.float64).reshape(-1)
            cats = to_numpy(require(out, "category_ids", where)).reshape(-1)
            if not (len(b) == len(scores) == len(cats)):
                raise EvaluationError(f"{where}: boxes ({len(b)}), scores ({len(scores)}) and category_ids "
                                      f"({len(cats)}) differ in length")  # fmt: skip
            if cats.dtype.kind not in "iu":
                raise EvaluationError(f"{where}: category_ids must be integers, got dtype {cats.dtype}")
            cats = cats.astype(np.int64)
            unknown = np.setdiff1d(cats, self._cat_ids)
            if unknown.size:
                raise EvaluationError(f"{where}: category ids {unknown[:5].tolist()} are not categories of the "
                                      f"{self._gt_name} (dataset ids, not contiguous indices)")  # fmt: skip
            if not (np.isfinite(b).all() and np.isfinite(scores).all()):
                raise EvaluationError(f"{where}: boxes and scores must be finite")
            xywh = np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1) if len(b) else b
            counts = areas = None
            masks = out.get("masks") if "segm" in self.iou_types else None
            if masks is not None:
                m = to_numpy(masks)
                if m.ndim != 3 or m.shape[0] != len(b):
                    raise EvaluationError(
                        f"{where}: masks of shape {tuple(m.shape)} for {len(b)} boxes (expected (K, H, W))"
                    )
                size = [img.get("height"), img.get("width")]
                if None not in size and list(m.shape[1:]) != size:
                    raise EvaluationError(
                        f"{where}: masks are {list(m.shape[1:])} but the image is {size} (H, W)"
                    )
                m = m.astype(bool)
                counts = [r["counts"] for r in encode_masks(m)]
                areas = m.reshape(len(m), -1).sum(axis=1).astype(np.float64)
            self._parts.append((image_id, xywh, scores, cats, counts, areas))
            self.image_ids.append(image_id)

    @property
    def predictions(self) -> list[dict]:
        """The processed predictions of this rank as COCO result records (built on demand)."""
        out = []
        for image_id, xywh, scores, cats, counts, _ in self._parts:
            img = self._images[image_id]
            for k in range(len(scores)):
                rec = {"image_id": image_id, "category_id": int(cats[k]), "bbox": xywh[k].tolist(),
                       "score": float(scores[k])}  # fmt: skip
                if counts is not None:
                    rec["segmentation"] = {"size": [img["height"], img["width"]], "counts": counts[k]}
                out.append(rec)
        return out

    def save_results(self, path: PathLike) -> None:
        """Write the processed predictions of this rank as a COCO results json."""
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(self.predictions, f)
        except OSError as e:
            raise EvaluationError(f"cannot write {str(path)!r}: {e.strerror or e}") from None

    def _detections(self, parts: list, iou_type: str) -> Detections:
        n = sum(len(p[2]) for p in parts)
        image_ids = (
            np.concatenate([np.full(len(p[2]), p[0], np.int64) for p in parts])
            if parts
            else np.zeros(0, np.int64)
        )
        scores = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0)
        cats = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, np.int64)
        if iou_type == "bbox":
            boxes = np.concatenate([p[1] for p in parts]).reshape(n, 4) if parts else np.zeros((0, 4))
            return Detections(image_ids, cats, scores, boxes=boxes)
        rles: list[dict] = []
        for p in parts:
            img = self._images[p[0]]
            size = [img["height"], img["width"]]
            rles.extend({"size": size, "counts": c} for c in p[4])
        areas = np.concatenate([p[5] for p in parts]) if parts else np.zeros(0)
        return Detections(image_ids, cats, scores, rles=rles, areas=areas)

    def evaluate(self) -> dict[str, float]:
        """``{"bbox/AP": ..., "bbox/AP-person": ..., "segm/AP": ...}`` (percent); {} on non-main ranks.

        Under torch.distributed every rank must call it (the compact columns are gathered to rank 0).
        """
        gathered = gather_to_main(self._parts)
        if gathered is None:
            return {}
        parts = [p for rank in gathered for p in rank]
        image_ids = sorted({p[0] for p in parts})
        if not image_ids:
            return {}
        with_masks = sum(p[4] is not None for p in parts)
        steps = [t for t in self.iou_types if t != "segm" or with_masks]
        if "segm" in steps and with_masks != len(parts):
            raise EvaluationError(
                f"segm: {len(parts) - with_masks} of {len(parts)} processed images came without masks"
            )
        bar = _progress(len(steps), "COCO eval") if self.progress else None
        results: dict[str, float] = {}
        try:
            for iou_type in steps:
                if iou_type not in self._prepared:
                    self._prepared[iou_type] = prepare_ground_truth(self.gt, self._gt_name, iou_type)
                res = evaluate_prepared(self._prepared[iou_type], self._gt_name, self._detections(parts, iou_type),
                                        iou_type, self.backend, img_ids=image_ids, max_dets=self.max_dets,
                                        use_cats=self.use_cats)  # fmt: skip
                results.update({f"{iou_type}/{k}": v for k, v in res.stats.items()})
                results.update({f"{iou_type}/AP-{k}": v for k, v in res.per_category.items()})
                self.last_backend = res.backend
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return results


def _progress(total: int, desc: str) -> Any:
    from coco_eval.panoptic import _progress as bar

    return bar(total, desc)


def _merge_in_gt_order(parts: Sequence[list[tuple[int, ImageStats]]]) -> CategoryStats:
    stats: CategoryStats = {}
    for _, image in sorted((item for part in parts for item in part), key=lambda item: item[0]):
        image.add_to(stats)
    return stats


class COCOPanopticEvaluator:
    """Panoptic quality computed image by image as predictions arrive (no PNGs are written).

    Args:
        gt_json: COCO panoptic GT json (path or dict).
        gt_dir: folder of GT PNGs.
    """

    def __init__(self, gt_json: PathLike | dict, gt_dir: PathLike):
        self.gt = gt_json if isinstance(gt_json, dict) else load_json(gt_json, "ground-truth panoptic json")
        self.gt_dir = str(gt_dir)
        self.categories = {c["id"]: c for c in require(self.gt, "categories", "ground-truth panoptic json")}
        self._by_image = {
            a["image_id"]: a for a in require(self.gt, "annotations", "ground-truth panoptic json")
        }
        self._by_file = {a["file_name"]: a for a in self.gt["annotations"]}
        self._order = {id(a): i for i, a in enumerate(self.gt["annotations"])}
        self.reset()

    def reset(self) -> None:
        """Forget all processed images."""
        self._per_image: list[
            tuple[int, ImageStats]
        ] = []  # (index of the GT annotation, its PQ contributions)
        self.num_images = 0

    @property
    def stats(self) -> CategoryStats:
        """This rank's {category id: [sum IoU, TP, FP, FN]}, images added in GT json order."""
        return _merge_in_gt_order([self._per_image])

    def _gt_annotation(self, inp: dict) -> dict:
        if "image_id" in inp:
            ann = self._by_image.get(int(to_numpy(inp["image_id"])))
            if ann is not None:
                return ann
        if "file_name" in inp:
            base = os.path.basename(str(inp["file_name"]))
            # the image's own file name (.jpg) also finds its PNG
            for name in (base, os.path.splitext(base)[0] + ".png"):
                ann = self._by_file.get(name)
                if ann is not None:
                    return ann
        raise EvaluationError(f"COCOPanopticEvaluator.process: no ground truth for input {dict(inp)!r}")

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Score a batch.

        Args:
            inputs: ``[{"image_id", "file_name"}]`` (``file_name`` of the GT PNG).
            outputs: ``[{"panoptic_seg": (H, W) int ids (0 = void), "segments_info": [{"id", "category_id" (dataset id),
                "isthing"}]}]``.
        """
        if len(inputs) != len(outputs):
            raise EvaluationError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            ann = self._gt_annotation(inp)
            pred = to_numpy(require(out, "panoptic_seg", "COCOPanopticEvaluator output"))
            segments = require(out, "segments_info", "COCOPanopticEvaluator output")
            segments = [{"id": int(s["id"]), "category_id": int(s["category_id"])} for s in segments]
            gt_path = os.path.join(self.gt_dir, ann["file_name"])
            where = f"image {ann['image_id']}"
            stats = pq_image_from_png(gt_path, ann["segments_info"], pred, segments, self.categories, where)
            self._per_image.append((self._order[id(ann)], stats))
            self.num_images += 1

    def evaluate(self) -> dict[str, float]:
        """``{"panoptic/PQ", "panoptic/SQ", "panoptic/RQ", "panoptic/PQ_th", ..., "panoptic/RQ_st"}`` in percent."""
        parts = gather_to_main(self._per_image)
        if parts is None:
            return {}
        # images in GT json order whatever the split over ranks: the numbers of pq_compute on those images
        res = pq_average(_merge_in_gt_order(parts), self.categories)
        out = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                out[f"panoptic/{key.upper()}{suffix}"] = 100 * res[group][key]
        return out
