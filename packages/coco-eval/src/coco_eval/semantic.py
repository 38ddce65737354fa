"""Semantic segmentation metrics (mIoU, fwIoU, mACC, pACC) as detectron2's ``SemSegEvaluator`` defines them.

Convention here: ``confusion[gt, pred]`` counts pixels (rows = ground truth, columns = prediction;
detectron2 stores the transpose). Pixels whose label is ``ignore_label`` are not counted.

Per class c (tp = confusion[c, c], gt_c = row sum, pred_c = column sum):
ACC_c = tp / gt_c (NaN when gt_c = 0); IoU_c = tp / (gt_c + pred_c - tp) (NaN when the class is absent from
both GT and prediction). mACC, mIoU are means over the non-NaN classes, so a class that is only predicted
counts with IoU 0 (detectron2 <= v0.6, the version the Mask DINO numbers were produced with; detectron2
since July 2022 drops such classes too: ``semantic_metrics(..., iou_needs_gt=True)`` gives that rule).
fwIoU = sum_c IoU_c * gt_c / sum gt; pACC = sum tp / sum gt. Everything is reported in percent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coco_eval._io import to_numpy
from coco_eval.distributed import gather_to_main
from coco_eval.errors import EvaluationError


def confusion_matrix(pred: Any, gt: Any, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """Pixel confusion matrix of one image.

    Args:
        pred: (H, W) integer predicted classes in [0, num_classes).
        gt: (H, W) integer GT classes in [0, num_classes) or ``ignore_label``.
        num_classes: C.
        ignore_label: GT value whose pixels are skipped.
    Returns:
        (C, C) int64, ``[gt, pred]``.
    """
    pred = to_numpy(pred)
    gt = to_numpy(gt)
    if pred.shape != gt.shape:
        raise EvaluationError(f"prediction size {pred.shape} differs from ground truth size {gt.shape}")
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = gt != ignore_label
    gt, pred = gt[keep], pred[keep]
    if gt.size and (gt.min() < 0 or gt.max() >= num_classes):
        bad = np.unique(gt[(gt < 0) | (gt >= num_classes)])[:10].tolist()
        raise EvaluationError(
            f"ground-truth labels {bad} are outside [0, {num_classes}) and not ignore_label={ignore_label}"
        )
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
        bad = np.unique(pred[(pred < 0) | (pred >= num_classes)])[:10].tolist()
        raise EvaluationError(f"predicted labels {bad} are outside [0, {num_classes})")
    return np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def semantic_metrics(
    confusion: np.ndarray, class_names: Sequence[str] | None = None, iou_needs_gt: bool = False
) -> dict[str, float]:
    """mIoU, fwIoU, mACC, pACC and per-class IoU/ACC (percent) from a (C, C) ``[gt, pred]`` confusion matrix.

    Args:
        confusion: (C, C) pixel counts, rows ground truth, columns prediction.
        class_names: names for the per-class keys ``IoU-{name}``/``ACC-{name}`` (default the class index).
        iou_needs_gt: also drop predicted-only classes from the IoU means (detectron2 after July 2022).
    Returns:
        flat dict: ``mIoU``, ``fwIoU``, ``mACC``, ``pACC``, ``IoU-{name}``, ``ACC-{name}``; NaN per class where undefined.
    """
    conf = np.asarray(confusion, dtype=np.float64)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise EvaluationError(f"confusion matrix must be square (C, C), got shape {conf.shape}")
    num_classes = conf.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise EvaluationError(f"{len(names)} class names for {num_classes} classes")
    tp = np.diagonal(conf).copy()
    pos_gt = conf.sum(axis=1)
    pos_pred = conf.sum(axis=0)
    union = pos_gt + pos_pred - tp
    acc_valid = pos_gt > 0
    iou_valid = (union > 0) & acc_valid if iou_needs_gt else union > 0
    acc = np.full(num_classes, np.nan)
    iou = np.full(num_classes, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou[iou_valid] = tp[iou_valid] / union[iou_valid]
    total_gt = pos_gt.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        class_weights = pos_gt / total_gt
        res = {
            "mIoU": 100 * np.sum(iou[iou_valid]) / np.sum(iou_valid),
            "fwIoU": 100 * np.sum(iou[iou_valid] * class_weights[iou_valid]),
            "mACC": 100 * np.sum(acc[acc_valid]) / np.sum(acc_valid),
            "pACC": 100 * np.sum(tp) / total_gt,
        }
    out = {k: float(v) for k, v in res.items()}
    for i, name in enumerate(names):
        out[f"IoU-{name}"] = float(100 * iou[i])
    for i, name in enumerate(names):
        out[f"ACC-{name}"] = float(100 * acc[i])
    return out


class SemSegEvaluator:
    """Streaming semantic segmentation evaluator (detectron2-style ``reset/process/evaluate``).

    Args:
        num_classes: C.
        ignore_label: GT value that is not scored.
        class_names: optional names for the per-class keys.
        iou_needs_gt: see :func:`semantic_metrics`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: int = 255,
        class_names: Sequence[str] | None = None,
        iou_needs_gt: bool = False,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_label = int(ignore_label)
        self.class_names = class_names
        self.iou_needs_gt = iou_needs_gt
        self.reset()

    def reset(self) -> None:
        """Clear the accumulated confusion matrix."""
        self.confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def process(self, inputs: Sequence[dict], outputs: Sequence[dict]) -> None:
        """Add a batch.

        Args:
            inputs: ``[{"sem_seg": (H, W) int GT}]`` (numpy or torch).
            outputs: ``[{"sem_seg": (H, W) int prediction or (C, H, W) scores (argmax over C)}]``.
        """
        if len(inputs) != len(outputs):
            raise EvaluationError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "sem_seg" not in inp or "sem_seg" not in out:
                raise EvaluationError("SemSegEvaluator.process: inputs and outputs need a 'sem_seg' entry")
            pred = to_numpy(out["sem_seg"])
            if pred.ndim == 3:
                if pred.shape[0] != self.num_classes:
                    raise EvaluationError(
                        f"score map has {pred.shape[0]} channels for {self.num_classes} classes"
                    )
                pred = pred.argmax(axis=0)
            self.confusion += confusion_matrix(pred, inp["sem_seg"], self.num_classes, self.ignore_label)

    def evaluate(self) -> dict[str, float]:
        """Metrics over everything processed, keys ``sem_seg/mIoU`` ...; {} on non-main ranks."""
        parts = gather_to_main(self.confusion)
        if parts is None:
            return {}
        total = np.sum(parts, axis=0)
        return {
            f"sem_seg/{k}": v for k, v in semantic_metrics(total, self.class_names, self.iou_needs_gt).items()
        }
