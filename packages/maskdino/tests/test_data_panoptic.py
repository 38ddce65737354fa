"""COCO panoptic loader (PNG -> masks, semantic map), ADE-style semantic loader, and the synthetic generator."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from maskdino.data.ade import SemanticDataset, ade_label_to_contiguous, load_sem_seg
from maskdino.data.coco import InstanceDataset, load_coco_instances
from maskdino.data.panoptic import PanopticDataset, id2rgb, load_coco_panoptic, rgb2id
from maskdino.data.synthetic import generate_synthetic, synthetic_paths

SAMPLE = Path(__file__).resolve().parents[3] / ".." / "shared" / "data" / "coco-panoptic-sample"


def _make_panoptic(tmp_path: Path) -> Path:
    (tmp_path / "img").mkdir()
    (tmp_path / "pan").mkdir()
    Image.fromarray(np.full((20, 30, 3), 100, np.uint8)).save(tmp_path / "img" / "x.jpg")
    ids = np.zeros((20, 30), np.int64)
    ids[:10] = 5000  # stuff (cat 3) on the top half
    ids[12:18, 2:8] = 70001  # thing (cat 1)
    ids[12:18, 20:28] = 70002  # crowd thing
    Image.fromarray(id2rgb(ids)).save(tmp_path / "pan" / "x.png")
    data = {
        "images": [{"id": 4, "file_name": "x.jpg", "height": 20, "width": 30}],
        "annotations": [{"image_id": 4, "file_name": "x.png", "segments_info": [
            {"id": 5000, "category_id": 3, "iscrowd": 0},
            {"id": 70001, "category_id": 1, "iscrowd": 0},
            {"id": 70002, "category_id": 1, "iscrowd": 1},
        ]}],
        "categories": [{"id": 1, "name": "thing", "isthing": 1}, {"id": 3, "name": "stuff", "isthing": 0}],
    }  # fmt: skip
    path = tmp_path / "pan.json"
    path.write_text(json.dumps(data))
    return path


def test_rgb_id_roundtrip():
    ids = np.array([[0, 1, 255, 256], [65535, 65536, 16777215, 123456]])
    assert np.array_equal(rgb2id(id2rgb(ids)), ids)


def test_panoptic_loader_masks_and_semantic(tmp_path):
    path = _make_panoptic(tmp_path)
    recs, meta = load_coco_panoptic(path, tmp_path / "pan", tmp_path / "img")
    assert meta.isthing == [True, False] and meta.thing_classes == [0]
    s = PanopticDataset(recs, meta)[0]
    inst = s["instances"]
    assert inst["labels"].tolist() == [1, 0]  # stuff then thing; crowd excluded
    assert inst["masks"][0][:10].all() and inst["masks"][0].sum() == 300
    assert inst["boxes"].tolist() == [[0, 0, 30, 10], [2, 12, 8, 18]]
    sem = s["sem_seg"]
    assert sem.dtype == torch.int64
    assert (sem[:10] == 1).all() and (sem[12:18, 2:8] == 0).all()
    assert (sem[12:18, 20:28] == 0).all()  # crowd pixels keep their class in the semantic map
    assert (sem[10:12] == 255).all()  # void


def test_panoptic_malformed(tmp_path):
    path = _make_panoptic(tmp_path)
    data = json.loads(path.read_text())
    data["annotations"][0]["segments_info"][1]["category_id"] = 8
    path.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"pan.json: annotation of image id 4: segment id 70001: unknown category id 8"
    ):
        load_coco_panoptic(path, tmp_path / "pan", tmp_path / "img")
    data["annotations"][0]["segments_info"][1]["category_id"] = 1
    data["annotations"][0]["segments_info"].append({"id": 424242, "category_id": 1})
    path.write_text(json.dumps(data))
    recs, meta = load_coco_panoptic(path, tmp_path / "pan", tmp_path / "img")
    with pytest.raises(ValueError, match=r"x.png: segment id 424242 has no pixels"):
        PanopticDataset(recs, meta)[0]


def test_real_panoptic_sample_masks_and_semantic_vs_2ch_format():
    """Masks from the RGB-id PNGs; the derived semantic map is checked against the sample's independent
    2-channel PNGs (channel 0 = category id, 0 = void)."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real COCO sample not found at {SAMPLE} (shared/data is not part of a user's clone)")
    recs, meta = load_coco_panoptic(
        SAMPLE / "panoptic_examples.json", SAMPLE / "panoptic_examples", SAMPLE / "input_images"
    )
    ds = PanopticDataset(recs, meta)
    for i, rec in enumerate(recs):
        s = ds[i]
        n_noncrowd = sum(1 for seg in rec["segments_info"] if not seg["iscrowd"])
        assert len(s["instances"]["labels"]) == n_noncrowd
        masks = s["instances"]["masks"]
        assert masks.sum(0).max() <= 1  # segments do not overlap
        two = np.asarray(
            Image.open(SAMPLE / "panoptic_examples_2ch_format" / Path(rec["pan_seg_file_name"]).name)
        )
        cat = two[..., 0].astype(np.int64)
        lut = np.full(256, 255, np.int64)
        for k, cid in enumerate(meta.dataset_ids):
            lut[cid] = k
        expected = lut[cat]
        assert np.array_equal(s["sem_seg"].numpy(), expected)
        # stuff and things both present among the training targets
        flags = {meta.isthing[int(k)] for k in s["instances"]["labels"]}
        assert flags == {True, False}


def test_ade_mapping_and_loader(tmp_path):
    lab = np.array([[0, 1, 2], [150, 0, 3]])
    assert ade_label_to_contiguous(lab).tolist() == [[255, 0, 1], [149, 255, 2]]
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    Image.fromarray(np.zeros((8, 6, 3), np.uint8)).save(tmp_path / "images" / "a.jpg")
    label = np.zeros((8, 6), np.uint8)
    label[:4] = 2
    label[4:, :3] = 5
    Image.fromarray(label).save(tmp_path / "labels" / "a.png")
    recs, meta = load_sem_seg(tmp_path / "images", tmp_path / "labels", num_classes=5)
    s = SemanticDataset(recs, meta)[0]
    assert (
        s["sem_seg"][:4].eq(1).all()
        and s["sem_seg"][4:, :3].eq(4).all()
        and s["sem_seg"][4:, 3:].eq(255).all()
    )
    assert s["instances"]["labels"].tolist() == [1, 4]  # one target per class present
    assert s["instances"]["boxes"].tolist() == [[0, 0, 6, 4], [0, 4, 3, 8]]
    Image.fromarray(np.full((8, 6), 9, np.uint8)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(ValueError, match="a.png: label 9 exceeds the 5 classes"):
        SemanticDataset(recs, meta)[0]
    Image.fromarray(np.zeros((6, 8), np.uint8)).save(tmp_path / "labels" / "a.png")
    with pytest.raises(ValueError, match=r"a.png: label is \(8, 6\) but the image is \(6, 8\)"):
        SemanticDataset(recs, meta)[0]
    (tmp_path / "labels" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="no label PNG for image"):
        load_sem_seg(tmp_path / "images", tmp_path / "labels", num_classes=5)


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_deterministic_and_consistent(tmp_path):
    a = generate_synthetic(tmp_path / "a", seed=3, num_train=4, num_val=2, size=64)
    b = generate_synthetic(tmp_path / "b", seed=3, num_train=4, num_val=2, size=64)
    c = generate_synthetic(tmp_path / "c", seed=4, num_train=4, num_val=2, size=64)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)
    # a second call with the same parameters is a no-op; different parameters regenerate
    mtime = (a / "meta.json").stat().st_mtime_ns
    generate_synthetic(a, seed=3, num_train=4, num_val=2, size=64)
    assert (a / "meta.json").stat().st_mtime_ns == mtime
    for split in ("train", "val"):
        p = synthetic_paths(a, split)
        irecs, imeta = load_coco_instances(p["instances_json"], p["images"])
        precs, pmeta = load_coco_panoptic(p["panoptic_json"], p["panoptic"], p["images"])
        assert imeta.names == ["circle", "square", "triangle"]
        assert pmeta.names == ["circle", "square", "triangle", "sky", "grass"]
        ids = InstanceDataset(irecs, imeta)
        pds = PanopticDataset(precs, pmeta)
        srecs, smeta = load_sem_seg(p["images"], p["semantic"], num_classes=5)
        sds = SemanticDataset(srecs, smeta)
        for i in range(len(irecs)):
            si, sp, ss = ids[i], pds[i], sds[i]
            assert torch.equal(si["image"], sp["image"])
            things = sp["instances"]["labels"] < 3
            # the instance json's RLE masks == the panoptic PNG's thing segments
            assert torch.equal(si["instances"]["masks"], sp["instances"]["masks"][things])
            assert torch.equal(si["instances"]["labels"], sp["instances"]["labels"][things])
            # semantic PNGs == the semantic map derived from panoptic (no void pixels in the synthetic data)
            assert torch.equal(ss["sem_seg"], sp["sem_seg"]) and (ss["sem_seg"] != 255).all()
            assert len(si["instances"]["labels"]) >= 1


def test_panoptic_png_of_wrong_size_is_named(tmp_path):
    recs, meta = load_coco_panoptic(_make_panoptic(tmp_path), tmp_path / "pan", tmp_path / "img")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(tmp_path / "pan" / "x.png")
    with pytest.raises(ValueError, match=r"x.png: PNG is \(20, 30\) but the image is \(30, 20\)"):
        PanopticDataset(recs, meta)[0]
