"""Semantic metrics: hand-worked confusion, ignore label, absent classes, the streaming evaluator."""

import math

import numpy as np
import pytest

from coco_eval import EvaluationError, SemSegEvaluator, confusion_matrix, semantic_metrics


def test_hand_computed_metrics_with_ignore():
    gt = np.array([[0, 0, 1, 1], [1, 255, 255, 2]])
    pred = np.array([[0, 1, 1, 1], [1, 0, 2, 2]])  # the two ignored pixels are not counted
    conf = confusion_matrix(pred, gt, num_classes=4)
    assert conf.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    m = semantic_metrics(conf)
    # IoU: c0 1/(2+1-1)=1/2, c1 3/(3+4-3)=3/4, c2 1/1, c3 absent from GT and prediction -> NaN, not averaged
    assert m["IoU-0"] == pytest.approx(50.0) and m["IoU-1"] == pytest.approx(75.0) and m["IoU-2"] == 100.0
    assert math.isnan(m["IoU-3"]) and math.isnan(m["ACC-3"])
    assert m["mIoU"] == pytest.approx(100 * (0.5 + 0.75 + 1) / 3)
    assert m["fwIoU"] == pytest.approx(100 * (2 * 0.5 + 3 * 0.75 + 1 * 1) / 6)
    assert m["mACC"] == pytest.approx(100 * (0.5 + 1 + 1) / 3)
    assert m["pACC"] == pytest.approx(100 * 5 / 6)


def test_predicted_only_class_counts_as_zero():
    gt = np.array([[0, 0, 0, 0]])
    pred = np.array([[0, 0, 0, 1]])
    m = semantic_metrics(confusion_matrix(pred, gt, 3))
    assert m["IoU-1"] == 0.0 and math.isnan(m["ACC-1"])
    assert m["mIoU"] == pytest.approx(100 * (0.75 + 0) / 2)  # detectron2 v0.6 rule
    assert semantic_metrics(confusion_matrix(pred, gt, 3), iou_needs_gt=True)["mIoU"] == pytest.approx(75.0)


def test_matches_detectron2_formula_on_random_maps():
    r = np.random.default_rng(0)
    c = 6
    conf = np.zeros((c, c), np.int64)
    d2 = np.zeros((c + 1, c + 1), np.int64)  # detectron2 layout: [pred, gt] with an ignore row/column
    for _ in range(5):
        gt = r.integers(0, c - 1, (8, 9))
        gt[r.random((8, 9)) < 0.1] = 255
        pred = r.integers(0, c, (8, 9))
        conf += confusion_matrix(pred, gt, c)
        g = np.where(gt == 255, c, gt)
        d2 += np.bincount((c + 1) * pred.ravel() + g.ravel(), minlength=(c + 1) ** 2).reshape(c + 1, c + 1)
    tp = d2.diagonal()[:-1].astype(float)
    pos_gt = d2[:-1, :-1].sum(0).astype(float)
    pos_pred = d2[:-1, :-1].sum(1).astype(float)
    acc_valid = pos_gt > 0
    iou_valid = (pos_gt + pos_pred) > 0
    iou = np.full(c, np.nan)
    iou[acc_valid] = tp[acc_valid] / (pos_gt + pos_pred - tp)[acc_valid]
    m = semantic_metrics(conf)
    assert m["mIoU"] == pytest.approx(100 * np.sum(iou[acc_valid]) / np.sum(iou_valid), rel=1e-12)
    assert m["pACC"] == pytest.approx(100 * tp.sum() / pos_gt.sum(), rel=1e-12)
    assert m["fwIoU"] == pytest.approx(
        100 * np.sum(iou[acc_valid] * pos_gt[acc_valid] / pos_gt.sum()), rel=1e-12
    )


def test_streaming_evaluator_scores_and_errors():
    ev = SemSegEvaluator(num_classes=3, class_names=["a", "b", "c"])
    gt = np.array([[0, 1], [2, 255]])
    scores = np.zeros((3, 2, 2))
    scores[0, 0, 0] = scores[1, 0, 1] = scores[1, 1, 0] = scores[2, 1, 1] = 1
    ev.process([{"sem_seg": gt}], [{"sem_seg": scores}])  # (C, H, W) -> argmax
    ev.process([{"sem_seg": gt}], [{"sem_seg": gt.clip(0, 2)}])
    res = ev.evaluate()
    assert res["sem_seg/IoU-a"] == 100.0 and res["sem_seg/IoU-c"] == pytest.approx(50.0)
    assert res["sem_seg/pACC"] == pytest.approx(100 * 5 / 6)
    with pytest.raises(EvaluationError, match=r"outside \[0, 3\)"):
        ev.process([{"sem_seg": np.array([[7]])}], [{"sem_seg": np.array([[0]])}])
    with pytest.raises(EvaluationError, match="size"):
        ev.process([{"sem_seg": gt}], [{"sem_seg": gt[:1]}])
    ev.reset()
    assert ev.confusion.sum() == 0


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    ev = SemSegEvaluator(num_classes=2)
    ev.process(
        [{"sem_seg": torch.tensor([[0, 1]])}], [{"sem_seg": torch.tensor([[[2.0, 0.0]], [[1.0, 3.0]]])}]
    )
    assert ev.evaluate()["sem_seg/mIoU"] == 100.0
