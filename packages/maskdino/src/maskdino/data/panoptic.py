"""COCO panoptic data: json + PNGs with RGB-encoded segment ids (id = R + 256 G + 256^2 B).

Each segment (thing or stuff) becomes one training target (mask, box from the mask, contiguous class),
as in the official panoptic training; crowd segments are excluded from the targets. The semantic map
(contiguous class per pixel, 255 = void) is derived from the same PNG, crowd regions included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors

from coco_eval import EvaluationError, panoptic_io
from coco_eval.panoptic_io import id2rgb, rgb2id
from maskdino.data.coco import (
    DatasetMetadata,
    RecordDataset,
    iter_image_records,
    read_coco_json,
    read_image_and_map,
)
from maskdino.data.errors import DataError
from maskdino.data.transforms import SEM_SEG_IGNORE, masks_to_boxes

__all__ = ["PanopticDataset", "id2rgb", "load_coco_panoptic", "read_panoptic_png", "rgb2id"]


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """``(H, W)`` int64 segment ids of a COCO panoptic PNG (coco-eval's reader; its errors as :class:`DataError`).

    Raises:
        FileNotFoundError: no such file. DataError: not a readable RGB panoptic PNG (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"panoptic PNG not found: {path}")
    try:
        return panoptic_io.read_panoptic_png(path).astype(np.int64)
    except EvaluationError as e:
        raise DataError(str(e)) from None


def load_coco_panoptic(
    json_path: str | Path,
    png_dir: str | Path,
    image_root: str | Path,
    *,
    filter_empty: bool = False,
    metadata: DatasetMetadata | None = None,
) -> tuple[list[dict[str, Any]], DatasetMetadata]:
    """Parse a COCO panoptic json into records.

    Record: ``file_name`` (image), ``pan_seg_file_name`` (PNG), ``image_id``, ``height``, ``width``,
    ``segments_info`` (list of ``{"id", "category_id" (contiguous), "iscrowd", "isthing"}``).
    The image's ``file_name`` is the annotation's with the image extension of the ``images`` record.
    """
    json_path, png_dir, image_root = Path(json_path), Path(png_dir), Path(image_root)
    data, metadata = read_coco_json(json_path, metadata)
    to_contig = metadata.dataset_to_contiguous
    images = {int(img["id"]): img for img in iter_image_records(data, json_path)}
    records: list[dict[str, Any]] = []
    for ann in data["annotations"]:
        iid = ann.get("image_id", "?")
        where = f"{json_path}: annotation of image id {iid}"
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise DataError(f"{where}: missing '{key}'")
        img = images.get(int(ann["image_id"]))
        if img is None:
            raise DataError(f"{where}: refers to unknown image id")
        segs = []
        for s in ann["segments_info"]:
            sw = f"{where}: segment id {s.get('id', '?')}"
            for key in ("id", "category_id"):
                if key not in s:
                    raise DataError(f"{sw}: missing '{key}'")
            if int(s["category_id"]) not in to_contig:
                raise DataError(f"{sw}: unknown category id {s['category_id']}")
            k = to_contig[int(s["category_id"])]
            segs.append(
                {
                    "id": int(s["id"]),
                    "category_id": k,
                    "iscrowd": int(s.get("iscrowd", 0)),
                    "isthing": bool(metadata.isthing[k]),
                }
            )
        records.append(
            {
                "file_name": str(image_root / img["file_name"]),
                "pan_seg_file_name": str(png_dir / ann["file_name"]),
                "image_id": int(ann["image_id"]),
                "height": int(img["height"]),
                "width": int(img["width"]),
                "segments_info": segs,
            }
        )
    if filter_empty:
        records = [r for r in records if any(s["iscrowd"] == 0 for s in r["segments_info"])]
    return records, metadata


def panoptic_to_targets(
    ids: np.ndarray, segments_info: list[dict[str, Any]], where: str = ""
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segment-id map (H, W) -> (masks bool (n, H, W) of non-crowd segments, labels (n,), sem_seg uint8 (H, W)).

    Pixels of ids not listed in ``segments_info`` (0 = void) are 255 in the semantic map.
    A listed segment without any pixel is an error (the json and PNG do not belong together).
    """
    sem = np.full(ids.shape, SEM_SEG_IGNORE, dtype=np.uint8)
    masks, labels = [], []
    for s in segments_info:
        m = ids == s["id"]
        if not m.any():
            raise DataError(f"{where}: segment id {s['id']} has no pixels in the PNG")
        sem[m] = s["category_id"]
        if s["iscrowd"]:
            continue
        masks.append(m)
        labels.append(s["category_id"])
    h, w = ids.shape
    mask_arr = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return mask_arr, np.asarray(labels, dtype=np.int64), sem


class PanopticDataset(RecordDataset):
    """Samples like :class:`~maskdino.data.coco.InstanceDataset` plus ``sem_seg`` (int64 (H, W), 255 = void)
    and the record's ``pan_seg_file_name``/``segments_info`` (for panoptic evaluation)."""

    def __init__(self, records: list[dict[str, Any]], metadata: DatasetMetadata, transform=None) -> None:
        super().__init__(records, metadata, transform)
        if metadata.num_classes > 255:
            raise DataError("PanopticDataset: more than 255 classes do not fit the uint8 semantic map")

    def _load(self, rec: dict[str, Any]) -> dict[str, Any]:
        image, ids = read_image_and_map(rec, "pan_seg_file_name", read_panoptic_png, "PNG")
        h, w = ids.shape
        masks, labels, sem = panoptic_to_targets(ids, rec["segments_info"], rec["pan_seg_file_name"])
        masks_t = torch.from_numpy(masks)
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(masks_to_boxes(masks_t), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(masks_t),
            "labels": torch.from_numpy(labels),
            "sem_seg": tv_tensors.Mask(torch.from_numpy(sem)),
        }
