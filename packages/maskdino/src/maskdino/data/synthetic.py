"""Synthetic shapes dataset: the default, download-free dataset of the demo and the tests.

Each image shows a "sky" region (smooth vertical gradient) above a "grass" region (green noise texture),
split by a wavy horizon, and 1-4 things: circles, squares and triangles of class-specific colour families,
possibly overlapping (a shape drawn later occludes earlier ones; placements that would hide more than
half of a shape are rejected). Everything is written in the real formats, so the demo runs through the
same loaders as COCO:

    OUT/annotations/instances_{split}.json   COCO instance json (things only, RLE masks)
    OUT/annotations/panoptic_{split}.json    COCO panoptic json (things + stuff)
    OUT/{split}/images/XXXXXX.png            RGB images
    OUT/{split}/panoptic/XXXXXX.png          RGB-encoded segment ids
    OUT/{split}/semantic/XXXXXX.png          ADE-style labels: 0 = void, else the category id (1..5)
    OUT/meta.json                            generation parameters and categories

Generation is deterministic: image ``i`` of a split depends only on ``(seed, split, i, size)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from maskdino.data.panoptic import id2rgb

__all__ = ["CATEGORIES", "generate_image", "generate_synthetic", "synthetic_paths"]

# Category ids 1..3 are things, 4..5 stuff (COCO-style: ids in the json, contiguous ids made by the loader).
CATEGORIES: list[dict[str, Any]] = [
    {"id": 1, "name": "circle", "isthing": 1, "color": [220, 60, 40], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [150, 60, 200], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [240, 200, 40], "supercategory": "shape"},
    {"id": 4, "name": "sky", "isthing": 0, "color": [110, 170, 230], "supercategory": "stuff"},
    {"id": 5, "name": "grass", "isthing": 0, "color": [60, 150, 60], "supercategory": "stuff"},
]
# Base colours of the things (RGB); each instance gets a jittered version.
_THING_COLORS = {1: (215, 55, 40), 2: (140, 50, 195), 3: (235, 195, 35)}
FORMAT_VERSION = 1


def synthetic_paths(root: str | Path, split: str) -> dict[str, Path]:
    root = Path(root)
    return {
        "instances_json": root / "annotations" / f"instances_{split}.json",
        "panoptic_json": root / "annotations" / f"panoptic_{split}.json",
        "images": root / split / "images",
        "panoptic": root / split / "panoptic",
        "semantic": root / split / "semantic",
    }


def _shape_mask(kind: int, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres
    if kind == 1:  # circle of radius r
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == 2:  # axis-aligned square of half side r
        return (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    # triangle: circumradius 1.15 r, rotated by `angle` (an upright triangle when 0)
    R = 1.15 * r
    inside = np.ones((size, size), dtype=bool)
    verts = [
        (cx + R * np.sin(angle + k * 2 * np.pi / 3), cy - R * np.cos(angle + k * 2 * np.pi / 3))
        for k in range(3)
    ]
    for k in range(3):
        (x0, y0), (x1, y1) = verts[k], verts[(k + 1) % 3]
        # Vertices go clockwise on screen (y down): inside is where the cross product is >= 0.
        inside &= (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0) >= 0
    return inside


def generate_image(rng: np.random.Generator, size: int = 128, max_things: int = 4) -> dict[str, Any]:
    """One sample: ``image`` uint8 (H, W, 3), ``segments`` list of (category_id, bool mask), stuff first."""
    s = size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    # Wavy horizon between 30% and 70% of the height.
    h0 = rng.uniform(0.3, 0.7) * s
    amp, freq, phase = rng.uniform(0, 0.06 * s), rng.uniform(0.5, 2.0), rng.uniform(0, 2 * np.pi)
    horizon = h0 + amp * np.sin(2 * np.pi * freq * xx[0] / s + phase)
    sky = yy < horizon[None, :]
    img = np.zeros((s, s, 3), dtype=np.float64)
    # Sky: vertical gradient from deep to pale blue, slightly varying per image.
    top = np.array([60.0, 110.0, 200.0]) + rng.uniform(-20, 20, 3)
    bottom = np.array([170.0, 205.0, 240.0]) + rng.uniform(-15, 15, 3)
    t = (yy / s)[..., None]
    img = np.where(sky[..., None], top * (1 - t) + bottom * t, img)
    # Grass: green with blocky multi-scale noise.
    base = np.array([55.0, 140.0, 50.0]) + rng.uniform(-15, 15, 3)
    noise = rng.normal(0, 18, (s, s))
    coarse = np.kron(rng.normal(0, 14, (s // 8 + 1, s // 8 + 1)), np.ones((8, 8)))[:s, :s]
    grass = base[None, None, :] + (noise + coarse)[..., None] * np.array([0.5, 1.0, 0.4])
    img = np.where(sky[..., None], img, grass)

    things: list[tuple[int, np.ndarray]] = []
    n_target = int(rng.integers(1, max_things + 1))
    attempts = 0
    while len(things) < n_target and attempts < 30:
        attempts += 1
        kind = int(rng.integers(1, 4))
        r = rng.uniform(0.08, 0.17) * s
        cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        m = _shape_mask(kind, cx, cy, r, rng.uniform(-0.3, 0.3), s)
        area = int(m.sum())
        if area < 0.002 * s * s:
            continue
        # Reject placements that would leave an earlier shape less than half visible.
        if any((old & ~m).sum() < 0.5 * old.sum() for _, old in things):
            continue
        things = [(k, old & ~m) for k, old in things]
        things.append((kind, m))
        color = np.clip(np.array(_THING_COLORS[kind]) + rng.uniform(-25, 25, 3), 0, 255)
        shade = 1.0 - 0.25 * ((yy - cy) / (2 * r))  # a little shading so that shapes are not flat colour
        img = np.where(m[..., None], color[None, None, :] * shade[..., None], img)

    occupied = np.zeros((s, s), dtype=bool)
    for _, m in things:
        occupied |= m
    segments = [(4, sky & ~occupied), (5, ~sky & ~occupied)]
    segments = [(k, m) for k, m in segments if m.any()] + things
    return {"image": np.clip(img, 0, 255).astype(np.uint8), "segments": segments}


def _bbox_xywh(m: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(m)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _generate_split(root: Path, split: str, split_index: int, n: int, seed: int, size: int) -> None:
    paths = synthetic_paths(root, split)
    for key in ("images", "panoptic", "semantic"):
        paths[key].mkdir(parents=True, exist_ok=True)
    images, inst_anns, pan_anns = [], [], []
    ann_id = 1
    for i in range(n):
        rng = np.random.default_rng([seed, split_index, i, size])
        sample = generate_image(rng, size)
        image_id = i + 1
        stem = f"{image_id:06d}"
        Image.fromarray(sample["image"]).save(paths["images"] / f"{stem}.png")
        ids = np.zeros((size, size), dtype=np.int64)
        sem = np.zeros((size, size), dtype=np.uint8)
        segments_info = []
        for j, (cat, m) in enumerate(sample["segments"]):
            seg_id = cat * 1000 + j + 1
            ids[m] = seg_id
            sem[m] = cat
            area = int(m.sum())
            bbox = _bbox_xywh(m)
            segments_info.append({"id": seg_id, "category_id": cat, "iscrowd": 0, "bbox": bbox, "area": area})
            if cat <= 3:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                inst_anns.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": cat,
                        "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                        "area": area,
                        "bbox": bbox,
                        "iscrowd": 0,
                    }
                )
                ann_id += 1
        Image.fromarray(id2rgb(ids)).save(paths["panoptic"] / f"{stem}.png")
        Image.fromarray(sem).save(paths["semantic"] / f"{stem}.png")
        images.append({"id": image_id, "file_name": f"{stem}.png", "height": size, "width": size})
        pan_anns.append({"image_id": image_id, "file_name": f"{stem}.png", "segments_info": segments_info})
    info = {
        "description": f"maskdino synthetic shapes, seed {seed}, split {split}",
        "version": str(FORMAT_VERSION),
    }
    things = [c for c in CATEGORIES if c["isthing"]]
    _write_json(
        paths["instances_json"],
        {"info": info, "images": images, "annotations": inst_anns, "categories": things},
    )
    _write_json(
        paths["panoptic_json"],
        {"info": info, "images": images, "annotations": pan_anns, "categories": CATEGORIES},
    )


def generate_synthetic(
    out_dir: str | Path, seed: int = 0, num_train: int = 200, num_val: int = 50, size: int = 128
) -> Path:
    """Write the synthetic dataset (both splits) under ``out_dir``; returns ``out_dir``.

    If ``out_dir/meta.json`` already describes the same parameters the call is a no-op (the demo calls
    this on every run).
    """
    out = Path(out_dir)
    meta = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "num_train": int(num_train),
        "num_val": int(num_val),
        "size": int(size),
        "categories": CATEGORIES,
    }
    meta_path = out / "meta.json"
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return out
        except json.JSONDecodeError:
            pass
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    _generate_split(out, "train", 0, num_train, seed, size)
    _generate_split(out, "val", 1, num_val, seed, size)
    # meta.json last: its presence marks a complete dataset.
    _write_json(meta_path, meta)
    return out
