"""ADE20K-style semantic segmentation: a folder of images and a folder of label PNGs with the same stems.

Label convention of ADE20K (SceneParsing, 150 classes): 0 = "other/unlabelled" (ignored), classes are
1..C; we map ``label - 1`` to contiguous ``0..C-1`` and 0 to 255 (ignore), as the official
``prepare_ade20k_sem_seg`` conversion. Training targets are one mask per class present (the
Mask2Former/Mask DINO semantic recipe), with boxes from the masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors

from maskdino.data.coco import DatasetMetadata, RecordDataset, read_image_and_map
from maskdino.data.errors import DataError
from maskdino.data.transforms import SEM_SEG_IGNORE, masks_to_boxes

__all__ = ["SemanticDataset", "ade_label_to_contiguous", "load_sem_seg", "read_label_png"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def ade_label_to_contiguous(label: np.ndarray) -> np.ndarray:
    """ADE label map (0 = ignore, classes 1..C) -> contiguous uint8 map (classes 0..C-1, 255 = ignore)."""
    label = label.astype(np.int64)
    out = label - 1
    out[label == 0] = SEM_SEG_IGNORE
    return out.astype(np.uint8)


def read_label_png(path: str | Path) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label PNG not found: {path}")
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise DataError(f"{path}: label PNG must be single-channel (mode L/P/I), got mode {img.mode}")
        return np.asarray(img).astype(np.int64)


def load_sem_seg(
    image_dir: str | Path, label_dir: str | Path, num_classes: int, names: list[str] | None = None
) -> tuple[list[dict[str, Any]], DatasetMetadata]:
    """Pair images and label PNGs by file stem. Image ids are the positions in the sorted list."""
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    if not label_dir.is_dir():
        raise FileNotFoundError(f"label folder not found: {label_dir}")
    images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    records = []
    for i, p in enumerate(images):
        lab = label_dir / (p.stem + ".png")
        if not lab.is_file():
            raise FileNotFoundError(f"no label PNG for image {p} (expected {lab})")
        with Image.open(p) as img:
            w, h = img.size
        records.append(
            {"file_name": str(p), "sem_seg_file_name": str(lab), "image_id": i, "height": h, "width": w}
        )
    if not records:
        raise DataError(f"no images found in {image_dir}")
    meta = DatasetMetadata(
        names=names or [f"class_{k}" for k in range(num_classes)],
        dataset_ids=list(range(1, num_classes + 1)),
        isthing=[False] * num_classes,
    )
    return records, meta


class SemanticDataset(RecordDataset):
    """Samples with ``sem_seg`` (int64 (H, W), 255 = ignore) and per-class ``instances``."""

    def _load(self, rec: dict[str, Any]) -> dict[str, Any]:
        image, raw = read_image_and_map(rec, "sem_seg_file_name", read_label_png, "label")
        h, w = raw.shape
        if raw.max(initial=0) > self.metadata.num_classes:
            raise DataError(
                f"{rec['sem_seg_file_name']}: label {int(raw.max())} exceeds the {self.metadata.num_classes} classes"
            )
        sem = torch.from_numpy(ade_label_to_contiguous(raw))
        return {
            "image": tv_tensors.Image(image),
            "sem_seg": tv_tensors.Mask(sem),
            # Placeholders; the per-class instances are made after the geometric transform (below).
            "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.zeros(0, h, w, dtype=torch.bool)),
            "labels": torch.zeros(0, dtype=torch.int64),
        }

    def _after_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """One target per class present in the transformed ``sem_seg`` (boxes from its mask)."""
        sem = sample["sem_seg"].as_subclass(torch.Tensor).long()
        classes = [int(c) for c in torch.unique(sem) if int(c) != SEM_SEG_IGNORE]
        masks = (
            torch.stack([sem == c for c in classes])
            if classes
            else torch.zeros((0, *sem.shape), dtype=torch.bool)
        )
        sample["masks"] = tv_tensors.Mask(masks)
        sample["labels"] = torch.tensor(classes, dtype=torch.int64)
        sample["boxes"] = tv_tensors.BoundingBoxes(
            masks_to_boxes(masks), format="XYXY", canvas_size=tuple(sem.shape)
        )
        return sample
