"""COCO instance loader: polygons, RLE (compressed and not), crowd, empty images, odd image modes, malformed
files (errors name the file and the annotation id) and the real COCO sample."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from maskdino.data.coco import InstanceDataset, load_coco_instances, read_image
from maskdino.data.panoptic import read_panoptic_png

SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "coco-panoptic-sample"


def _write_image(path: Path, arr: np.ndarray, mode: str = "RGB", exif_orientation: int | None = None) -> None:
    img = Image.fromarray(arr)
    if mode != img.mode:
        img = img.convert(mode)
    kwargs = {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kwargs["exif"] = exif.tobytes()
    img.save(path, **kwargs)


def _make_dataset(tmp_path: Path) -> tuple[Path, dict]:
    """Three images: polygon + compressed RLE + crowd; uncompressed RLE on a grayscale image; no annotation."""
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    _write_image(tmp_path / "img" / "a.png", rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    _write_image(tmp_path / "img" / "b.png", rng.integers(0, 255, (30, 20), dtype=np.uint8), mode="L")
    _write_image(tmp_path / "img" / "c.png", rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    m = np.zeros((40, 60), dtype=np.uint8)
    m[5:15, 30:50] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    m2 = np.zeros((30, 20), dtype=np.uint8)
    m2[10:20, 2:8] = 1
    # uncompressed RLE: column-major run lengths starting with zeros
    flat = m2.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v == cur:
            n += 1
        else:
            runs.append(n)
            cur, n = v, 1
    runs.append(n)
    data = {
        "images": [
            {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
            {"id": 2, "file_name": "b.png", "height": 30, "width": 20},
            {"id": 3, "file_name": "c.png", "height": 16, "width": 16},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 10], "iscrowd": 0,
             "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]]},
            {"id": 11, "image_id": 1, "category_id": 9, "bbox": [30, 5, 20, 10], "iscrowd": 0,
             "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}},
            {"id": 12, "image_id": 1, "category_id": 9, "bbox": [0, 0, 5, 5], "iscrowd": 1,
             "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}},
            {"id": 13, "image_id": 2, "category_id": 9, "bbox": [2, 10, 6, 10], "iscrowd": 0,
             "segmentation": {"size": [30, 20], "counts": runs}},
        ],
        "categories": [{"id": 9, "name": "nine"}, {"id": 7, "name": "seven"}],
    }  # fmt: skip
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return path, data


def test_loader_polygon_rle_crowd_and_empty(tmp_path):
    path, _ = _make_dataset(tmp_path)
    recs, meta = load_coco_instances(path, tmp_path / "img")
    # contiguous ids follow increasing dataset ids
    assert meta.names == ["seven", "nine"] and meta.dataset_ids == [7, 9]
    assert [r["image_id"] for r in recs] == [1, 2, 3]
    ds = InstanceDataset(recs, meta)
    s = ds[0]
    inst = s["instances"]
    assert s["image"].shape == (3, 40, 60) and s["image"].dtype == torch.uint8
    # crowd annotation 12 is excluded from targets
    assert inst["labels"].tolist() == [0, 1]
    # the polygon (2,3)-(12,13) covers about 10x10 pixels; the RLE exactly the drawn block
    assert abs(int(inst["masks"][0].sum()) - 100) <= 21
    assert inst["masks"][1].sum() == 200 and inst["masks"][1][5:15, 30:50].all()
    assert inst["boxes"][1].tolist() == [30, 5, 50, 15]  # tight box of the mask, xyxy
    # grayscale image -> 3 channels, uncompressed RLE decoded
    s2 = ds[1]
    assert s2["image"].shape == (3, 30, 20)
    assert torch.equal(s2["image"][0], s2["image"][1])
    assert s2["instances"]["masks"][0][10:20, 2:8].all() and s2["instances"]["masks"][0].sum() == 60
    # image without annotations: empty targets of the right shapes
    s3 = ds[2]
    assert s3["instances"]["masks"].shape == (0, 16, 16) and s3["instances"]["boxes"].shape == (0, 4)
    # filter_empty drops images without a non-crowd annotation
    recs_f, _ = load_coco_instances(path, tmp_path / "img", filter_empty=True)
    assert [r["image_id"] for r in recs_f] == [1, 2]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["annotations"][1].pop("bbox"), "annotation id 11: missing 'bbox'"),
        (
            lambda d: d["annotations"][0].__setitem__("category_id", 99),
            "annotation id 10: unknown category id 99",
        ),
        (
            lambda d: d["annotations"][0].__setitem__("image_id", 42),
            "annotation id 10: refers to unknown image id 42",
        ),
        (
            lambda d: d["annotations"][3].__setitem__("bbox", [1, 2, -3, 4]),
            "annotation id 13: invalid 'bbox'",
        ),
        (
            lambda d: d["annotations"][0].__setitem__("segmentation", "oops"),
            "annotation id 10: unsupported segmentation",
        ),
        (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
    ],
)
def test_malformed_json_errors_name_file_and_annotation(tmp_path, mutate, message):
    path, data = _make_dataset(tmp_path)
    mutate(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as e:
        load_coco_instances(path, tmp_path / "img")
    assert str(path) in str(e.value) and message in str(e.value)


@pytest.mark.parametrize(
    "segm, message",
    [
        ([[1, 2, 3, 4]], "at least 3 (x, y) pairs"),
        ({"size": [10, 10], "counts": "abc"}, "RLE size [10, 10] differs"),
        ({"counts": "abc"}, "RLE must have 'counts' and 'size'"),
    ],
)
def test_malformed_segmentation_fails_when_read(tmp_path, segm, message):
    path, data = _make_dataset(tmp_path)
    data["annotations"][0]["segmentation"] = segm
    path.write_text(json.dumps(data))
    recs, meta = load_coco_instances(path, tmp_path / "img")
    with pytest.raises(ValueError) as e:
        InstanceDataset(recs, meta)[0]
    assert "annotation id 10" in str(e.value) and message in str(e.value) and "a.png" in str(e.value)


def test_invalid_json_and_missing_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not valid json"):
        load_coco_instances(bad, tmp_path)
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_coco_instances(tmp_path / "nothere.json", tmp_path)
    path, data = _make_dataset(tmp_path)
    data["images"][0]["width"] = 61
    path.write_text(json.dumps(data))
    recs, meta = load_coco_instances(path, tmp_path / "img")
    with pytest.raises(ValueError, match="a.png: image is 60x40 but the annotation file says 61x40"):
        InstanceDataset(recs, meta)[0]


def test_read_image_modes_exif_cmyk_palette(tmp_path):
    rgb = np.zeros((10, 20, 3), dtype=np.uint8)
    rgb[:, :5] = (255, 0, 0)  # a red left band
    # EXIF orientation 6 = the stored image must be rotated 90 degrees clockwise for display
    _write_image(tmp_path / "rot.jpg", rgb, exif_orientation=6)
    img = read_image(tmp_path / "rot.jpg")
    assert img.shape == (3, 20, 10)  # displayed orientation
    assert img[0, :5, :].float().mean() > 200 and img[0, -5:, :].float().mean() < 60  # red band now on top
    # CMYK JPEG -> RGB
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    img = read_image(tmp_path / "cmyk.jpg")
    assert (
        img.shape == (3, 10, 20) and img[0, :, :5].float().mean() > 200 and img[2, :, :5].float().mean() < 60
    )
    # palette and RGBA PNGs
    Image.fromarray(rgb).convert("P").save(tmp_path / "p.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    for name in ("p.png", "rgba.png"):
        assert read_image(tmp_path / name).shape == (3, 10, 20)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="junk.png: cannot decode image"):
        read_image(tmp_path / "junk.png")


def _sample_or_skip() -> Path:
    if not SAMPLE.is_dir():
        pytest.skip(f"real COCO sample not found at {SAMPLE} (shared/data is not part of a user's clone)")
    return SAMPLE


def test_real_coco_instances_rle_match_panoptic_png():
    """The sample's detection-format json (compressed RLE) and its panoptic PNGs describe the same segments:
    every decoded RLE mask must equal the PNG region of the segment with the same box and area."""
    root = _sample_or_skip()
    recs, meta = load_coco_instances(root / "panoptic_coco_detection_format.json", root / "input_images")
    assert meta.num_classes == 133 and len(recs) == 2
    pan = json.loads((root / "panoptic_examples.json").read_text())
    ds = InstanceDataset(recs, meta)
    checked = 0
    for i, rec in enumerate(recs):
        s = ds[i]
        assert s["image"].shape == (3, rec["height"], rec["width"])
        ann = next(a for a in pan["annotations"] if a["image_id"] == rec["image_id"])
        ids = read_panoptic_png(root / "panoptic_examples" / ann["file_name"])
        by_key = {(tuple(seg["bbox"]), seg["area"]): seg for seg in ann["segments_info"]}
        non_crowd = [a for a in rec["annotations"] if a["iscrowd"] == 0]
        assert len(non_crowd) == len(s["instances"]["labels"])
        raw = {
            a["id"]: a
            for a in json.loads((root / "panoptic_coco_detection_format.json").read_text())["annotations"]
        }
        for k, a in enumerate(non_crowd):
            src = raw[a["id"]]
            seg = by_key[(tuple(src["bbox"]), src["area"])]
            ref = torch.from_numpy(ids == seg["id"])
            assert torch.equal(s["instances"]["masks"][k], ref)
            assert meta.dataset_ids[int(s["instances"]["labels"][k])] == seg["category_id"]
            checked += 1
    assert checked >= 40
