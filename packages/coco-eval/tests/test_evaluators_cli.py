"""Streaming instance evaluator, the CLI, and the no-torch-at-import rule."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from coco_eval import COCOInstanceEvaluator, EvaluationError, evaluate_instances
from coco_eval.cli import main


def _gt():
    masks = np.zeros((2, 40, 50), bool)
    masks[0, 5:25, 5:30] = True
    masks[1, 20:40, 30:50] = True
    from coco_eval import encode_masks

    rles = encode_masks(masks)
    anns = []
    for i, (rle, box) in enumerate(zip(rles, [[5, 5, 25, 20], [30, 20, 20, 20]])):
        anns.append({"id": i + 1, "image_id": 3, "category_id": 1 + i, "bbox": box, "segmentation": rle,
                     "area": int(masks[i].sum()), "iscrowd": 0})  # fmt: skip
    gt = {"images": [{"id": 3, "height": 40, "width": 50}],
          "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}], "annotations": anns}  # fmt: skip
    return gt, masks


def test_instance_evaluator_streaming_matches_batch():
    gt, masks = _gt()
    ev = COCOInstanceEvaluator(gt)
    boxes = np.array([[5, 5, 30, 25], [30, 20, 50, 40], [0, 0, 10, 10]], float)
    out = {"boxes": boxes, "scores": np.array([0.9, 0.8, 0.7]), "category_ids": np.array([1, 2, 2]),
           "masks": np.concatenate([masks, np.zeros((1, 40, 50), bool)])}  # fmt: skip
    ev.process([{"image_id": 3}], [out])
    res = ev.evaluate()
    assert res["bbox/AP"] == pytest.approx(100.0) and res["segm/AP"] == pytest.approx(100.0)
    assert res["bbox/AP-b"] == pytest.approx(100.0) and "segm/AR100" in res
    direct = evaluate_instances(gt, ev.predictions, "segm")
    assert res["segm/AP50"] == direct.stats["AP50"]
    with pytest.raises(EvaluationError, match="image_id 4"):
        ev.process([{"image_id": 4}], [out])
    ev.reset()
    assert ev.evaluate() == {}
    # box-only outputs: segm is skipped
    ev2 = COCOInstanceEvaluator(gt)
    ev2.process([{"image_id": 3}], [dict(out, masks=None)])
    assert "bbox/AP" in ev2.evaluate() and "segm/AP" not in ev2.evaluate()


def test_cli_instances(tmp_path, capsys):
    gt, masks = _gt()
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    dets = [{"image_id": 3, "category_id": a["category_id"], "bbox": a["bbox"], "segmentation": a["segmentation"],
             "score": 0.5} for a in gt["annotations"]]  # fmt: skip
    (tmp_path / "dt.json").write_text(json.dumps(dets))
    out = tmp_path / "m.json"
    rc = main(["instances", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"),
               "--iou-type", "segm", "--json-out", str(out)])  # fmt: skip
    assert rc == 0
    assert "Average Precision" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["stats"]["AP"] == pytest.approx(100.0) and saved["stats"]["APl"] is None  # NaN -> null
    (tmp_path / "bad.json").write_text(json.dumps([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 1, 1],
                                                    "score": 1}]))  # fmt: skip
    assert main(["instances", "--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "bad.json")]) == 2
    assert "image_id 9" in capsys.readouterr().err


def test_cli_semantic_and_panoptic_subprocess(tmp_path):
    for d in ("gt", "pred"):
        (tmp_path / d).mkdir()
    gt = np.array([[0, 1], [1, 255]], np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt" / "a.png")
    Image.fromarray(np.array([[0, 1], [0, 0]], np.uint8)).save(tmp_path / "pred" / "a.png")
    proc = subprocess.run(
        [sys.executable, "-m", "coco_eval.cli", "semantic", "--gt-dir", str(tmp_path / "gt"), "--pred-dir",
         str(tmp_path / "pred"), "--num-classes", "2", "--json-out", str(tmp_path / "s.json")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    res = json.loads((tmp_path / "s.json").read_text())
    assert res["sem_seg/IoU-0"] == pytest.approx(50.0) and res["sem_seg/IoU-1"] == pytest.approx(50.0)
    assert "mIoU" in proc.stdout

    from coco_eval._io import id2rgb

    ids = np.array([[1, 1], [2, 0]])
    (tmp_path / "pan").mkdir()
    Image.fromarray(id2rgb(ids)).save(tmp_path / "pan" / "x.png")
    pan = {"annotations": [{"image_id": 1, "file_name": "x.png", "segments_info": [
        {"id": 1, "category_id": 1, "iscrowd": 0}, {"id": 2, "category_id": 2, "iscrowd": 0}]}],
        "categories": [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}]}  # fmt: skip
    (tmp_path / "pan.json").write_text(json.dumps(pan))
    args = ["panoptic", "--gt-json", str(tmp_path / "pan.json"), "--gt-dir", str(tmp_path / "pan"),
            "--pred-json", str(tmp_path / "pan.json"), "--pred-dir", str(tmp_path / "pan"),
            "--json-out", str(tmp_path / "p.json")]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "p.json").read_text())["All"]["pq"] == 1.0
    assert main(args[:7] + ["--pred-dir", str(tmp_path / "nope")]) == 2


def test_import_does_not_load_torch():
    code = "import sys, coco_eval, coco_eval.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_instance_evaluator_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    gt, masks = _gt()
    ev = COCOInstanceEvaluator(gt)
    ev.process([{"image_id": torch.tensor(3)}],
               [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 25.0]]), "scores": torch.tensor([0.9]),
                 "category_ids": torch.tensor([1]), "masks": torch.from_numpy(masks[:1])}])  # fmt: skip
    res = ev.evaluate()
    assert res["bbox/AP-a"] == pytest.approx(100.0) and res["segm/AP-a"] == pytest.approx(100.0)
    assert res["bbox/AP-b"] == 0.0  # a GT category without detections scores 0, not NaN
