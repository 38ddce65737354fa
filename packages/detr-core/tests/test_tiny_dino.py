"""Proof of reuse: a tiny DINO-style detector built only from detr-core parts overfits a few synthetic images."""

import contextlib
import importlib.util
import io
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_dino.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("tiny_dino", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _coco_ap(targets, predictions, size):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, dets = [], [], []
    for i, (t, p) in enumerate(zip(targets, predictions)):
        images.append({"id": i + 1, "height": size, "width": size})
        for box, label in zip(t["boxes_xyxy"].tolist(), t["labels"].tolist()):
            w, h = box[2] - box[0], box[3] - box[1]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(p["boxes"].tolist(), p["scores"].tolist(), p["labels"].tolist()):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": label + 1,
                    "score": score,
                    "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]],
                }
            )
    gt = COCO()
    gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": 1}, {"id": 2}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dets), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_tiny_dino_overfits_to_near_perfect_ap():
    tiny = _load_example()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threading only adds overhead (and CI runs tests in parallel)
    try:
        images, targets = tiny.make_dataset(num_images=4, size=64, seed=0)
        model = tiny.TinyDINO()
        history = tiny.train(model, images, targets, steps=150)
        predictions = model.predict(images, top_k=10)
    finally:
        torch.set_num_threads(threads)
    assert history[-1] < history[0] / 4
    stats = _coco_ap(targets, predictions, 64)
    assert stats[1] > 0.95, f"AP50 {stats[1]:.3f} (AP {stats[0]:.3f})"
    assert stats[0] > 0.6, f"AP {stats[0]:.3f}"
