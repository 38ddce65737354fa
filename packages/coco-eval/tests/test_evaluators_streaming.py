"""Streaming evaluators: bounded memory (no decoded mask is kept), results equal to the batch functions,
progress bars, and under torch.distributed (2 gloo ranks on CPU) the same numbers as one process."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from coco_eval import COCOInstanceEvaluator, COCOPanopticEvaluator, EvaluationError, evaluate_instances
from coco_eval.panoptic_io import write_panoptic_png


def make_instance_data(n_images=6, seed=0):
    """GT with RLE masks and per-image model-style outputs (xyxy boxes, scores, masks)."""
    from pycocotools import mask as mask_util

    r = np.random.default_rng(seed)
    h, w = 24, 32
    images = [{"id": 100 + i, "height": h, "width": w} for i in range(n_images)]
    anns, outputs = [], []
    for img in images:
        masks, boxes, cats = [], [], []
        for _ in range(int(r.integers(1, 4))):
            x0, y0 = int(r.integers(0, w - 8)), int(r.integers(0, h - 8))
            m = np.zeros((h, w), bool)
            m[y0 : y0 + int(r.integers(3, 8)), x0 : x0 + int(r.integers(3, 8))] = True
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            cat = int(r.integers(1, 4))
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "segmentation": rle,
                         "area": float(m.sum()), "iscrowd": 0,
                         "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})  # fmt: skip
            for _ in range(2):  # a near copy and a shifted one
                mm = np.roll(m, int(r.integers(-2, 3)), axis=1)
                ys, xs = np.nonzero(mm)
                masks.append(mm)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                cats.append(cat if r.random() < 0.8 else int(r.integers(1, 4)))
        outputs.append({"boxes": np.array(boxes, float), "scores": np.round(r.random(len(boxes)), 1),
                        "category_ids": np.array(cats), "masks": np.stack(masks)})  # fmt: skip
    gt = {
        "images": images,
        "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)],
        "annotations": anns,
    }
    return gt, outputs


def test_instance_evaluator_keeps_no_decoded_masks_and_matches_batch():
    gt, outputs = make_instance_data()
    ev = COCOInstanceEvaluator(gt, progress=True)
    for img, out in zip(gt["images"], outputs):
        ev.process([{"image_id": img["id"]}], [out])
    # what is kept: (K, 4) boxes, (K,) scores / ids / areas, RLE strings; never a (K, H, W) array
    for part in ev._parts:
        arrays = [x for x in part if isinstance(x, np.ndarray)]
        assert all(a.ndim == 1 or a.shape[1:] == (4,) for a in arrays)
        assert all(isinstance(c, str) for c in part[4])
    res = ev.evaluate()
    for iou_type in ("bbox", "segm"):
        direct = evaluate_instances(gt, ev.predictions, iou_type, backend="pycocotools")
        for k, v in direct.stats.items():
            assert res[f"{iou_type}/{k}"] == v or (np.isnan(v) and np.isnan(res[f"{iou_type}/{k}"]))
    assert res["segm/AP"] > 0


def test_instance_evaluator_input_errors():
    gt, outputs = make_instance_data(2)
    ev = COCOInstanceEvaluator(gt)
    with pytest.raises(EvaluationError, match=r"category ids \[7\] are not categories"):
        ev.process(
            [{"image_id": 100}], [dict(outputs[0], category_ids=np.full(len(outputs[0]["scores"]), 7))]
        )
    with pytest.raises(EvaluationError, match=r"masks are \[5, 5\] but the image is \[24, 32\]"):
        ev.process(
            [{"image_id": 100}], [dict(outputs[0], masks=np.zeros((len(outputs[0]["scores"]), 5, 5), bool))]
        )
    with pytest.raises(EvaluationError, match="boxes and scores must be finite"):
        ev.process([{"image_id": 100}], [dict(outputs[0], scores=np.full(len(outputs[0]["scores"]), np.nan))])
    with pytest.raises(EvaluationError, match="iou_types"):
        COCOInstanceEvaluator(gt, iou_types="bbox")
    with pytest.raises(EvaluationError, match="backend must be one of"):
        COCOInstanceEvaluator(gt, backend="nope")
    ev.process([{"image_id": 100}], [outputs[0]])
    ev.process([{"image_id": 101}], [dict(outputs[1], masks=None)])
    with pytest.raises(EvaluationError, match="segm: 1 of 2 processed images came without masks"):
        ev.evaluate()


def make_panoptic_data(root, n_images=6, seed=0):
    r = np.random.default_rng(seed)
    (root / "gt").mkdir(parents=True)
    cats = [{"id": 1, "isthing": 1}, {"id": 2, "isthing": 0}, {"id": 3, "isthing": 1}]
    anns, outputs = [], []
    for i in range(n_images):
        gt = np.zeros((20, 24), np.int64)
        for s in range(int(r.integers(2, 6))):
            y, x = int(r.integers(0, 15)), int(r.integers(0, 18))
            gt[y : y + int(r.integers(3, 10)), x : x + int(r.integers(3, 10))] = 10 + s
        info = [{"id": int(v), "category_id": int(r.integers(1, 4)), "iscrowd": int(r.random() < 0.2),
                 "area": int((gt == v).sum())} for v in np.unique(gt) if v]  # fmt: skip
        write_panoptic_png(root / "gt" / f"{i}.png", gt)
        anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": info})
        pred = np.roll(gt, int(r.integers(-2, 3)), axis=0)
        pinfo = [{"id": int(v), "category_id": next(s["category_id"] for s in info if s["id"] == v)}
                 for v in np.unique(pred) if v]  # fmt: skip
        outputs.append({"panoptic_seg": pred, "segments_info": pinfo})
    (root / "gt.json").write_text(json.dumps({"annotations": anns, "categories": cats}))
    return root / "gt.json", root / "gt", outputs


SCRIPT = textwrap.dedent(
    """
    import json, multiprocessing as mp, sys
    from pathlib import Path
    import numpy as np
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[3])
    from test_evaluators_streaming import make_instance_data, make_panoptic_data
    from coco_eval import COCOInstanceEvaluator, COCOPanopticEvaluator

    def run(rank, world, init_file, out, root):
        if world > 1:
            dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
        gt, outputs = make_instance_data(8)
        ev = COCOInstanceEvaluator(gt)
        pan_json, pan_dir, pan_out = make_panoptic_data(Path(root) / f"r{rank}w{world}", 8)
        pev = COCOPanopticEvaluator(pan_json, pan_dir)
        # rank r takes images r, r + world, ... (as a distributed sampler does), in reverse order
        for i in reversed(range(rank, 8, world)):
            ev.process([{"image_id": gt["images"][i]["id"]}], [outputs[i]])
            pev.process([{"image_id": i, "file_name": f"{i}.png"}], [pan_out[i]])
        res = {**ev.evaluate(), **pev.evaluate()}
        if rank == 0:
            Path(out).write_text(json.dumps(res))
        else:
            assert res == {}, res
        if world > 1:
            dist.destroy_process_group()

    if __name__ == "__main__":
        init, out, _, root, world = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
        ctx = mp.get_context("fork")
        procs = [ctx.Process(target=run, args=(r, world, init, out, root)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        sys.exit(max(p.exitcode or 0 for p in procs))
    """
)


def test_two_gloo_ranks_give_the_single_process_numbers(tmp_path):
    pytest.importorskip("torch.distributed")
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    results = []
    for world in (1, 2):
        out = tmp_path / f"res{world}.json"
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"init{world}"), str(out),
                               os.path.dirname(__file__), str(tmp_path), str(world)],
                              capture_output=True, text=True, timeout=180, env=env, check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]  # bit for bit: instance columns and PQ images are merged in GT order
    assert results[0]["segm/AP"] > 0 and results[0]["panoptic/PQ"] > 0


@pytest.mark.parametrize("compiled", [True, False])
def test_panoptic_evaluator_equals_pq_compute(tmp_path, monkeypatch, compiled):
    from coco_eval import panoptic, pq_compute

    gt_json, gt_dir, outputs = make_panoptic_data(tmp_path, 6)
    ev = COCOPanopticEvaluator(gt_json, gt_dir)
    if not compiled:  # GT PNGs through PIL and numpy instead of the compiled PNG counting
        monkeypatch.setattr(panoptic, "_speedups", None)
    for i in (3, 1, 5, 0, 2, 4):  # any order
        ev.process([{"image_id": i}], [outputs[i]])
    res = ev.evaluate()
    monkeypatch.undo()
    (tmp_path / "pred").mkdir()
    anns = []
    for i, out in enumerate(outputs):
        write_panoptic_png(tmp_path / "pred" / f"{i}.png", out["panoptic_seg"])
        anns.append({"image_id": i, "file_name": f"{i}.png", "segments_info": out["segments_info"]})
    (tmp_path / "pred.json").write_text(json.dumps({"annotations": anns}))
    ref = pq_compute(gt_json, gt_dir, tmp_path / "pred.json", tmp_path / "pred")
    assert res["panoptic/PQ"] == 100 * ref["All"]["pq"] and res["panoptic/SQ_st"] == 100 * ref["Stuff"]["sq"]
