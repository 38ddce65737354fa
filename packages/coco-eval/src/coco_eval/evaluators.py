"""Streaming evaluators for training loops: ``reset()``, ``process(inputs, outputs)``, ``evaluate()``.

Each keeps only small per-image results (COCO result records, PQ counts, a confusion matrix); under
torch.distributed every rank's part is gathered to rank 0, which returns the metrics (other ranks: {}).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from coco_eval._io import PathLike, load_json, read_panoptic_png, require, to_numpy
from coco_eval.distributed import gather_to_main
from coco_eval.errors import EvaluationError
from coco_eval.instances import IOU_TYPES, evaluate_instances, instances_to_coco_json, load_ground_truth
from coco_eval.panoptic import CategoryStats, merge_stats, pq_average, pq_single_image
from coco_eval.semantic import SemSegEvaluator

__all__ = ["COCOInstanceEvaluator", "COCOPanopticEvaluator", "SemSegEvaluator"]


class COCOInstanceEvaluator:
    """COCO box/mask AP over the images seen by ``process``.

    Args:
        gt: COCO instance ground truth (json path, dict or ``COCO`` object).
        iou_types: subset of ("bbox", "segm"); "segm" is skipped when no output carried masks.
        backend: see :func:`coco_eval.evaluate_instances`.
    """

    def __init__(
        self, gt: PathLike | dict | Any, iou_types: Sequence[str] = ("bbox", "segm"), backend: str = "auto"
    ):
        for t in iou_types:
            if t not in IOU_TYPES:
                raise EvaluationError(f"iou_types: unknown type {t!r}, expected some of {IOU_TYPES}")
        self.gt, self._gt_name = load_ground_truth(gt)
        self._image_ids = {img["id"] for img in self.gt["images"]}
        self.iou_types = tuple(iou_types)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget all processed predictions."""
        self.predictions: list[dict] = []
        self.image_ids: list[int] = []

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Convert a batch of predictions to COCO result records.

        Args:
            inputs: ``[{"image_id": int}]``.
            outputs: ``[{"boxes": (K, 4) xyxy abs, "scores": (K,), "category_ids": (K,) dataset ids,
                "masks": (K, H, W) bool | None}]`` (numpy or torch).
        """
        if len(inputs) != len(outputs):
            raise EvaluationError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            image_id = require(inp, "image_id", "COCOInstanceEvaluator.process input")
            image_id = int(to_numpy(image_id))
            if image_id not in self._image_ids:
                raise EvaluationError(
                    f"COCOInstanceEvaluator.process: image_id {image_id} is not in the {self._gt_name}"
                )
            masks = out.get("masks") if "segm" in self.iou_types else None
            self.predictions.extend(
                instances_to_coco_json(
                    image_id,
                    require(out, "boxes", f"output for image {image_id}"),
                    require(out, "scores", f"output for image {image_id}"),
                    require(out, "category_ids", f"output for image {image_id}"),
                    masks,
                )
            )
            self.image_ids.append(image_id)

    def save_results(self, path: PathLike) -> None:
        """Write the processed predictions of this rank as a COCO results json."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.predictions, f)

    def evaluate(self) -> dict[str, float]:
        """``{"bbox/AP": ..., "bbox/AP-person": ..., "segm/AP": ...}`` (percent); {} on non-main ranks."""
        parts = gather_to_main((self.predictions, self.image_ids))
        if parts is None:
            return {}
        predictions = [p for preds, _ in parts for p in preds]
        image_ids = sorted({i for _, ids in parts for i in ids})
        if not image_ids:
            return {}
        results: dict[str, float] = {}
        for iou_type in self.iou_types:
            if iou_type == "segm" and not any("segmentation" in p for p in predictions):
                if predictions:  # outputs came without masks: nothing to score for segm
                    continue
            res = evaluate_instances(self.gt, predictions, iou_type, self.backend, img_ids=image_ids)
            results.update({f"{iou_type}/{k}": v for k, v in res.stats.items()})
            results.update({f"{iou_type}/AP-{k}": v for k, v in res.per_category.items()})
        return results


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
        self.reset()

    def reset(self) -> None:
        """Forget all processed images."""
        self.stats: CategoryStats = {}
        self.num_images = 0

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
            gt = read_panoptic_png(os.path.join(self.gt_dir, ann["file_name"]))
            pred = to_numpy(require(out, "panoptic_seg", "COCOPanopticEvaluator output"))
            segments = require(out, "segments_info", "COCOPanopticEvaluator output")
            segments = [{"id": int(s["id"]), "category_id": int(s["category_id"])} for s in segments]
            pq_single_image(gt, ann["segments_info"], pred, segments, self.categories,
                            f"image {ann['image_id']}", self.stats)  # fmt: skip
            self.num_images += 1

    def evaluate(self) -> dict[str, float]:
        """``{"panoptic/PQ", "panoptic/SQ", "panoptic/RQ", "panoptic/PQ_th", ..., "panoptic/RQ_st"}`` in percent."""
        parts = gather_to_main(self.stats)
        if parts is None:
            return {}
        res = pq_average(merge_stats(parts), self.categories)
        out = {}
        for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
            for key in ("pq", "sq", "rq"):
                out[f"panoptic/{key.upper()}{suffix}"] = 100 * res[group][key]
        return out
