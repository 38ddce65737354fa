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

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from coco_eval._io import to_numpy
from coco_eval.distributed import gather_to_main
from coco_eval.errors import EvaluationError


def check_num_classes(num_classes: Any) -> int:
    """``num_classes`` as an int >= 1, else EvaluationError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise EvaluationError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return int(num_classes)


def check_ignore_label(ignore_label: Any, num_classes: int) -> int:
    """``ignore_label`` as an int outside [0, num_classes) (a class index cannot also mean "not scored")."""
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int | np.integer):
        raise EvaluationError(f"ignore_label must be an integer, got {ignore_label!r}")
    if 0 <= ignore_label < num_classes:
        raise EvaluationError(f"ignore_label={ignore_label} is a class index (num_classes={num_classes}); "
                              "use a value outside [0, num_classes), e.g. 255")  # fmt: skip
    return int(ignore_label)


def _label_array(x: Any, what: str) -> np.ndarray:
    a = to_numpy(x)
    if a.dtype == bool:
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.array_equal(a, np.round(a)) and np.isfinite(a).all():
            return a.astype(np.int64)  # integral floats (e.g. a label map read as float)
        raise EvaluationError(f"{what} labels must be integers, got dtype {a.dtype}")
    return a


def confusion_matrix(pred: Any, gt: Any, num_classes: int, ignore_label: int = 255) -> np.ndarray:
    """Pixel confusion matrix of one image (one ``bincount`` over ``gt * C + pred``).

    Args:
        pred: (H, W) integer predicted classes in [0, num_classes).
        gt: (H, W) integer GT classes in [0, num_classes) or ``ignore_label``.
        num_classes: C (>= 1).
        ignore_label: GT value whose pixels are skipped (not a class index).
    Returns:
        (C, C) int64, ``[gt, pred]``.
    Raises:
        EvaluationError: bad num_classes / ignore_label, shapes that differ or are not 2-D, non-integer
            labels, labels outside [0, C) (other than ignore_label in the GT).
    """
    num_classes = check_num_classes(num_classes)
    ignore_label = check_ignore_label(ignore_label, num_classes)
    pred = _label_array(pred, "predicted")
    gt = _label_array(gt, "ground-truth")
    if gt.ndim != 2:
        raise EvaluationError(f"ground-truth label map must be (H, W), got shape {gt.shape}")
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


def read_label_map(path: Any) -> np.ndarray:
    """A single-channel label PNG as (H, W) integers: modes L, I, I;16 and P (palette images: the indices,
    not the colours). RGB / RGBA and other multi-channel images are an EvaluationError naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise EvaluationError(f"label map {str(path)!r} has mode {im.mode} ({len(im.getbands())} channels); "
                                      "a label map must be single-channel (L, I or P mode)")  # fmt: skip
            arr = np.asarray(im)
    except FileNotFoundError:
        raise EvaluationError(f"label map {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise EvaluationError(f"label map {str(path)!r} is a directory") from None
    except OSError as e:
        raise EvaluationError(f"label map {str(path)!r} cannot be read: {e}") from None
    return arr.astype(np.int64) if arr.dtype == bool else arr


def _folder_chunk(names: list[str]) -> list[np.ndarray]:
    from coco_eval.panoptic import _CONTEXT

    gt_dir, pred_dir, num_classes, ignore_label = _CONTEXT  # type: ignore[misc]
    total = np.zeros((num_classes, num_classes), np.int64)
    for name in names:
        gt = read_label_map(os.path.join(gt_dir, name))
        pred_path = os.path.join(pred_dir, name)
        pred = read_label_map(pred_path)
        if gt.shape != pred.shape:
            raise EvaluationError(f"{pred_path!r}: size {pred.shape} differs from ground truth {gt.shape}")
        try:
            total += confusion_matrix(pred, gt, num_classes, ignore_label)
        except EvaluationError as e:
            raise EvaluationError(f"{name}: {e}") from None
    return [total]


def confusion_from_folders(gt_dir: Any, pred_dir: Any, num_classes: int, ignore_label: int = 255, workers: int = 1,
                           progress: bool = False) -> tuple[np.ndarray, int]:  # fmt: skip
    """Summed confusion matrix over PNG label maps with equal file names in two folders.

    Args:
        gt_dir, pred_dir: folders of single-channel PNGs (every GT file needs a prediction of the same name;
            predictions without a GT file are an error too, so that a wrong folder is noticed).
        num_classes, ignore_label: see :func:`confusion_matrix`.
        workers: processes (>= 1, 0 = one per CPU); the sum of integer counts does not depend on it.
        progress: tqdm progress bar when tqdm is installed.
    Returns:
        ((C, C) int64 ``[gt, pred]`` confusion, number of images).
    """
    from coco_eval.panoptic import check_workers, map_images

    num_classes = check_num_classes(num_classes)
    ignore_label = check_ignore_label(ignore_label, num_classes)
    workers = check_workers(workers)
    for what, d in (("ground-truth", gt_dir), ("prediction", pred_dir)):
        if not os.path.isdir(d):
            raise EvaluationError(f"{what} folder {str(d)!r} does not exist or is not a folder")
    gt_names = sorted(f for f in os.listdir(gt_dir) if f.lower().endswith(".png"))
    if not gt_names:
        raise EvaluationError(f"no .png label maps in {str(gt_dir)!r}")
    pred_names = {f for f in os.listdir(pred_dir) if f.lower().endswith(".png")}
    missing = [n for n in gt_names if n not in pred_names]
    if missing:
        raise EvaluationError(f"{len(missing)} ground-truth files have no prediction in {str(pred_dir)!r}, "
                              f"e.g. {missing[:5]}")  # fmt: skip
    extra = sorted(pred_names - set(gt_names))
    if extra:
        raise EvaluationError(f"{len(extra)} predictions in {str(pred_dir)!r} have no ground truth in "
                              f"{str(gt_dir)!r}, e.g. {extra[:5]}")  # fmt: skip
    parts = map_images(_folder_chunk, gt_names, workers, progress, "semantic",
                       (str(gt_dir), str(pred_dir), num_classes, ignore_label))  # fmt: skip
    return np.sum(parts, axis=0), len(gt_names)


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
        self.num_classes = check_num_classes(num_classes)
        self.ignore_label = check_ignore_label(ignore_label, self.num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise EvaluationError(f"{len(class_names)} class names for num_classes={self.num_classes}")
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
            gt_shape = tuple(np.shape(to_numpy(inp["sem_seg"])))
            if pred.ndim == 3:
                if pred.shape[0] != self.num_classes or pred.shape[1:] != gt_shape:
                    raise EvaluationError(
                        f"prediction of shape {pred.shape}: expected (H, W) labels or ({self.num_classes}, H, W) "
                        f"scores for a ground truth of shape {gt_shape}"
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
