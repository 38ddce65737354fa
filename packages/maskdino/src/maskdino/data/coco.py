"""COCO-format instance segmentation data (COCO itself or any custom dataset in COCO format).

The loader turns a COCO instance json into plain per-image records (detectron2-style "dataset dicts") and
a :class:`DatasetMetadata` that maps the dataset's category ids to contiguous ids ``0..C-1`` (the class
indices the model predicts). :class:`InstanceDataset` reads one record, decodes the image (EXIF rotation
applied, grayscale/CMYK converted to RGB) and its masks (polygons or RLE, via ``pycocotools.mask``) and
applies an augmentation.

Record layout (all coordinates in original image pixels)::

    {"file_name": str, "image_id": int, "height": int, "width": int,
     "annotations": [{"id": int, "bbox": [x, y, w, h], "category_id": contiguous int,
                      "segmentation": polygons | RLE dict, "iscrowd": 0 | 1}]}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils
from torchvision import tv_tensors

from maskdino.data.errors import DataError

__all__ = [
    "DatasetMetadata",
    "InstanceDataset",
    "RecordDataset",
    "decode_segmentation",
    "iter_image_records",
    "load_coco_instances",
    "read_coco_json",
    "read_image",
    "read_image_and_map",
    "read_json",
]


@dataclass
class DatasetMetadata:
    """Class names and the mapping between contiguous class ids and the dataset's own category ids.

    ``dataset_ids[k]`` is the category id (as written in the json) of contiguous class ``k``.
    """

    names: list[str]
    dataset_ids: list[int]
    isthing: list[bool] = field(default_factory=list)
    colors: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.isthing:
            self.isthing = [True] * len(self.names)
        if not self.colors:
            self.colors = [_default_color(k) for k in range(len(self.names))]
        if not (len(self.names) == len(self.dataset_ids) == len(self.isthing) == len(self.colors)):
            raise DataError(
                "DatasetMetadata: names, dataset_ids, isthing and colors must have the same length"
            )

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def dataset_to_contiguous(self) -> dict[int, int]:
        return {cid: k for k, cid in enumerate(self.dataset_ids)}

    @property
    def thing_classes(self) -> list[int]:
        """Contiguous ids of the "thing" (countable) classes."""
        return [k for k, t in enumerate(self.isthing) if t]

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "dataset_ids": list(self.dataset_ids),
            "isthing": list(self.isthing),
            "colors": [list(c) for c in self.colors],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetMetadata:
        return cls(
            names=list(d["names"]),
            dataset_ids=[int(i) for i in d["dataset_ids"]],
            isthing=[bool(t) for t in d.get("isthing", [])],
            colors=[(int(c[0]), int(c[1]), int(c[2])) for c in d.get("colors", [])],
        )

    @classmethod
    def from_coco_categories(cls, categories: list[dict[str, Any]], source: str = "") -> DatasetMetadata:
        """Contiguous ids follow the order of increasing category id (as detectron2 does)."""
        seen: set[int] = set()
        for cat in categories:
            if "id" not in cat:
                raise DataError(f"{source}: category without an 'id': {cat}")
            if cat["id"] in seen:
                raise DataError(f"{source}: duplicate category id {cat['id']}")
            seen.add(int(cat["id"]))
        cats = sorted(categories, key=lambda c: int(c["id"]))
        return cls(
            names=[str(c.get("name", c["id"])) for c in cats],
            dataset_ids=[int(c["id"]) for c in cats],
            isthing=[bool(c.get("isthing", 1)) for c in cats],
            colors=[tuple(c["color"]) if "color" in c else _default_color(i) for i, c in enumerate(cats)],
        )


def _default_color(k: int) -> tuple[int, int, int]:
    # Deterministic, well-spread colours (golden-ratio hue steps) for classes without one.
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((k * 0.618033988749895) % 1.0, 0.75, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a json file; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid json ({e})") from e


def read_image(path: str | Path) -> torch.Tensor:
    """Read an image as an RGB uint8 tensor (3, H, W).

    EXIF orientation is applied first (phone pictures are stored sideways with a rotation tag; COCO's
    width/height refer to the displayed orientation), then any mode (L, P, CMYK, RGBA, I;16) is converted to RGB.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode == "I;16" or img.mode == "I":
                # 16-bit grayscale: scale to 8 bits instead of letting PIL clip.
                arr = np.asarray(img, dtype=np.float64)
                arr = (arr / max(float(arr.max()), 1.0) * 255.0).astype(np.uint8)
                img = Image.fromarray(arr, mode="L")
            rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot decode image ({e})") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_image_and_map(
    rec: dict[str, Any], map_key: str, read_map: Callable[[str], np.ndarray], what: str
) -> tuple[torch.Tensor, np.ndarray]:
    """Read ``rec["file_name"]`` and the per-pixel annotation map ``read_map(rec[map_key])``.

    Returns the image (3, H, W) uint8 and the map (H, W). Raises ValueError naming the map file (described
    as ``what``) when its size is not the image's: the two files do not belong together.
    """
    image = read_image(rec["file_name"])
    h, w = image.shape[-2:]
    pixel_map = read_map(rec[map_key])
    if pixel_map.shape != (h, w):
        raise DataError(f"{rec[map_key]}: {what} is {pixel_map.shape[::-1]} but the image is {(w, h)}")
    return image, pixel_map


def decode_segmentation(segm: Any, height: int, width: int, where: str = "") -> np.ndarray:
    """Decode a COCO segmentation (polygon list, uncompressed or compressed RLE) into a bool (H, W) mask.

    ``where`` is prepended to error messages (file and annotation id).
    """
    try:
        if isinstance(segm, list):
            polys = [p for p in segm if len(p) > 0]
            if not polys:
                raise DataError("empty polygon list")
            for p in polys:
                if not isinstance(p, list) or len(p) < 6 or len(p) % 2 != 0:
                    raise DataError(
                        "polygon must be a flat list of at least 3 (x, y) pairs, got "
                        f"{len(p) if isinstance(p, list) else type(p).__name__} values"
                    )
            rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polys], height, width)
            rle = mask_utils.merge(rles)
        elif isinstance(segm, dict):
            if "counts" not in segm or "size" not in segm:
                raise DataError("RLE must have 'counts' and 'size'")
            h, w = (int(v) for v in segm["size"])
            if (h, w) != (height, width):
                raise DataError(f"RLE size {[h, w]} differs from the image size {[height, width]}")
            if isinstance(segm["counts"], list):
                rle = mask_utils.frPyObjects(segm, h, w)
            else:
                counts = segm["counts"]
                rle = {
                    "size": [h, w],
                    "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
                }
        else:
            raise DataError(f"unsupported segmentation type {type(segm).__name__}")
        m = mask_utils.decode(rle)
    except ValueError as e:
        raise DataError(f"{where}: {e}") from None
    except Exception as e:  # pycocotools raises bare Exceptions/TypeErrors on corrupt RLE strings
        raise DataError(f"{where}: cannot decode segmentation ({type(e).__name__}: {e})") from None
    if m.ndim == 3:
        m = m.any(axis=2)
    return m.astype(bool)


def _check_bbox(bbox: Any, where: str) -> list[float]:
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise DataError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'bbox' has non-numeric values {bbox!r}") from None
    if not all(np.isfinite([x, y, w, h])) or w < 0 or h < 0:
        raise DataError(f"{where}: invalid 'bbox' {bbox!r} (negative or non-finite size)")
    return [x, y, w, h]


def read_coco_json(
    json_path: Path, metadata: DatasetMetadata | None = None
) -> tuple[dict[str, Any], DatasetMetadata]:
    """Read a COCO (instance or panoptic) json, check its top-level keys, and get the class mapping.

    Returns the parsed json and ``metadata``, or, when that is None, the metadata of the json's categories.
    """
    data = read_json(json_path)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DataError(f"{json_path}: missing top-level key '{key}'")
    if metadata is None:
        metadata = DatasetMetadata.from_coco_categories(data["categories"], str(json_path))
    return data, metadata


def iter_image_records(data: dict[str, Any], json_path: Path) -> Iterator[dict[str, Any]]:
    """The json's ``images`` entries, each checked for ``id``, ``file_name``, ``height`` and ``width``.

    Lazy, so that a caller's own per-image checks (e.g. duplicate ids) keep their order with these.
    """
    for img in data["images"]:
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise DataError(f"{json_path}: image record {img.get('id', '?')} has no '{key}'")
        yield img


def load_coco_instances(
    json_path: str | Path,
    image_root: str | Path,
    *,
    filter_empty: bool = False,
    metadata: DatasetMetadata | None = None,
) -> tuple[list[dict[str, Any]], DatasetMetadata]:
    """Parse a COCO instance json into per-image records with contiguous category ids.

    Args:
        json_path: the annotation file.
        image_root: folder the ``file_name`` of each image is relative to.
        filter_empty: drop images that have no non-crowd annotation (as detectron2 does for training).
        metadata: use this class mapping instead of the one derived from the json's categories.

    Raises:
        ValueError naming the file and the annotation id for malformed annotations (missing keys, unknown
        image or category, bad bbox, bad segmentation type).
    """
    json_path = Path(json_path)
    image_root = Path(image_root)
    data, metadata = read_coco_json(json_path, metadata)
    to_contig = metadata.dataset_to_contiguous

    records: dict[int, dict[str, Any]] = {}
    for img in iter_image_records(data, json_path):
        iid = int(img["id"])
        if iid in records:
            raise DataError(f"{json_path}: duplicate image id {iid}")
        records[iid] = {
            "file_name": str(image_root / img["file_name"]),
            "image_id": iid,
            "height": int(img["height"]),
            "width": int(img["width"]),
            "annotations": [],
        }

    seen_ann: set[int] = set()
    for ann in data["annotations"]:
        aid = ann.get("id", "?")
        where = f"{json_path}: annotation id {aid}"
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise DataError(f"{where}: missing '{key}'")
        if aid in seen_ann:
            raise DataError(f"{where}: duplicate annotation id")
        seen_ann.add(aid)
        rec = records.get(int(ann["image_id"]))
        if rec is None:
            raise DataError(f"{where}: refers to unknown image id {ann['image_id']}")
        if int(ann["category_id"]) not in to_contig:
            raise DataError(f"{where}: unknown category id {ann['category_id']}")
        bbox = _check_bbox(ann["bbox"], where)
        segm = ann.get("segmentation")
        if segm is not None and not isinstance(segm, list | dict):
            raise DataError(f"{where}: unsupported segmentation type {type(segm).__name__}")
        rec["annotations"].append(
            {
                "id": aid,
                "bbox": bbox,
                "category_id": to_contig[int(ann["category_id"])],
                "segmentation": segm,
                "iscrowd": int(ann.get("iscrowd", 0)),
            }
        )

    out = list(records.values())
    if filter_empty:
        out = [r for r in out if any(a["iscrowd"] == 0 for a in r["annotations"])]
    return out, metadata


class RecordDataset(torch.utils.data.Dataset):
    """Base of the datasets over per-image records: ``self._load(record)`` reads the tv_tensors sample,
    the (optionally seeded) transform runs, then :meth:`_after_transform` and :func:`finalize_sample`.

    An index may be ``(index, seed)``: the transform then runs under ``torch.manual_seed(seed)`` so the
    augmentation of a sample depends only on the sampler's stream (exact resume, DDP equivalence).
    """

    #: target boxes = tight boxes of the transformed masks (see :func:`finalize_sample`).
    box_from_mask: bool = True

    def __init__(self, records: list[dict[str, Any]], metadata: DatasetMetadata, transform=None) -> None:
        self.records = records
        self.metadata = metadata
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def _load(self, rec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _after_transform(self, sample: dict[str, Any]) -> dict[str, Any]:
        """Hook for targets that must be derived after the geometric transform (default: none)."""
        return sample

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        from maskdino.data.transforms import apply_seeded

        seed = None
        if isinstance(index, tuple | list):
            position, seed = int(index[0]), int(index[1])
        else:
            position = int(index)
        rec = self.records[position]
        sample = self._after_transform(apply_seeded(self.transform, self._load(rec), seed))
        return finalize_sample(sample, rec, self.box_from_mask)


class InstanceDataset(RecordDataset):
    """Images and instance targets from records made by :func:`load_coco_instances`.

    ``__getitem__`` returns a dict with ``image`` (tv_tensors.Image uint8 (3, H, W), after the transform),
    ``image_id``, ``height``/``width`` (original size), ``file_name`` and ``instances``: ``labels`` int64 (n,),
    ``boxes`` float32 (n, 4) xyxy absolute pixels of the transformed image, ``masks`` bool (n, H, W).
    Crowd annotations are excluded from the targets (as the official training). The transform gets the
    image, boxes and masks as tv_tensors and must return them in the same structure.

    An index may be ``(index, seed)``: the transform then runs under ``torch.manual_seed(seed)`` so the
    augmentation of a sample depends only on the sampler's stream (exact resume, DDP equivalence).
    """

    def __init__(
        self,
        records: list[dict[str, Any]],
        metadata: DatasetMetadata,
        transform=None,
        box_from_mask: bool = True,
    ) -> None:
        super().__init__(records, metadata, transform)
        self.box_from_mask = box_from_mask

    def _load(self, rec: dict[str, Any]) -> dict[str, Any]:
        image = read_image(rec["file_name"])
        h, w = image.shape[-2:]
        if (h, w) != (rec["height"], rec["width"]):
            raise DataError(
                f"{rec['file_name']}: image is {w}x{h} but the annotation file says "
                f"{rec['width']}x{rec['height']} (image id {rec['image_id']})"
            )
        anns = [a for a in rec["annotations"] if a["iscrowd"] == 0]
        masks = np.zeros((len(anns), h, w), dtype=bool)
        boxes = np.zeros((len(anns), 4), dtype=np.float32)
        for i, a in enumerate(anns):
            x, y, bw, bh = a["bbox"]
            boxes[i] = [x, y, x + bw, y + bh]
            if a["segmentation"] is None:
                # Box-only annotation: the box region stands in for the mask.
                masks[i, int(y) : int(np.ceil(y + bh)), int(x) : int(np.ceil(x + bw))] = True
            else:
                masks[i] = decode_segmentation(
                    a["segmentation"], h, w, f"{rec['file_name']}: annotation id {a['id']}"
                )
        labels = torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)
        return {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": labels,
        }


def finalize_sample(
    sample: dict[str, Any], rec: dict[str, Any], box_from_mask: bool = True
) -> dict[str, Any]:
    """Drop instances that became empty (e.g. cropped away) and pack the output dict.

    With ``box_from_mask`` the target boxes are the tight boxes of the transformed masks (what the
    official dataset mappers do after augmentation); otherwise the v2-transformed annotation boxes.
    """
    from maskdino.data.transforms import masks_to_boxes

    masks = sample["masks"].as_subclass(torch.Tensor).bool()
    boxes = sample["boxes"].as_subclass(torch.Tensor).float()
    if box_from_mask and masks.shape[0] == boxes.shape[0]:
        boxes = masks_to_boxes(masks)
    labels = sample["labels"]
    keep = masks.flatten(1).any(1) if masks.numel() else torch.zeros(len(labels), dtype=torch.bool)
    if boxes.numel():
        keep &= (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    out = {
        "image": sample["image"],
        "image_id": rec["image_id"],
        "height": rec["height"],
        "width": rec["width"],
        "file_name": rec["file_name"],
        "instances": {"labels": labels[keep], "boxes": boxes[keep], "masks": masks[keep]},
    }
    if "sem_seg" in sample:
        out["sem_seg"] = sample["sem_seg"].as_subclass(torch.Tensor).long()
    for key in ("pan_seg_file_name", "segments_info", "sem_seg_file_name"):
        if key in rec:
            out[key] = rec[key]
    return out
