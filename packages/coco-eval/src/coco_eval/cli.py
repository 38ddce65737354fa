"""``coco-eval`` command line: instances, panoptic and semantic evaluation of files on disk."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence

import numpy as np

from coco_eval.errors import EvaluationError


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w", encoding="utf-8") as f:
            # NaN is not JSON: write null for "undefined"
            json.dump(_nan_to_none(payload), f, indent=2)


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _instances(args: argparse.Namespace) -> dict:
    from coco_eval.instances import evaluate_instances

    res = evaluate_instances(args.gt, args.dt, iou_type=args.iou_type, backend=args.backend)
    print(res.summary.rstrip())
    print(f"\n{args.iou_type} ({res.backend}): " + "  ".join(f"{k} {v:.3f}" for k, v in res.stats.items()))
    print("\nper-category AP:")
    width = max((len(k) for k in res.per_category), default=8)
    for name, ap in res.per_category.items():
        print(f"  {name:<{width}s} {ap:7.3f}")
    return {
        "iou_type": res.iou_type,
        "backend": res.backend,
        "stats": res.stats,
        "per_category": res.per_category,
    }


def _panoptic(args: argparse.Namespace) -> dict:
    from coco_eval.panoptic import format_pq_table, pq_compute

    res = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers)
    print(format_pq_table(res))
    return res


def _semantic(args: argparse.Namespace) -> dict:
    from PIL import Image

    from coco_eval.semantic import SemSegEvaluator

    ev = SemSegEvaluator(args.num_classes, ignore_label=args.ignore)
    names = sorted(f for f in os.listdir(args.gt_dir) if f.lower().endswith(".png"))
    if not names:
        raise EvaluationError(f"no .png label maps in {args.gt_dir!r}")
    for name in names:
        pred_path = os.path.join(args.pred_dir, name)
        if not os.path.exists(pred_path):
            raise EvaluationError(f"prediction {pred_path!r} for ground truth {name!r} does not exist")
        with Image.open(os.path.join(args.gt_dir, name)) as im:
            gt = np.asarray(im)
        with Image.open(pred_path) as im:
            pred = np.asarray(im)
        if gt.shape != pred.shape:
            raise EvaluationError(f"{pred_path!r}: size {pred.shape} differs from ground truth {gt.shape}")
        try:
            ev.process([{"sem_seg": gt}], [{"sem_seg": pred}])
        except EvaluationError as e:
            raise EvaluationError(f"{name}: {e}") from None
    res = ev.evaluate()
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        print(f"{key:6s} {res['sem_seg/' + key]:7.3f}")
    return res


def build_parser() -> argparse.ArgumentParser:
    """The ``coco-eval`` argument parser."""
    p = argparse.ArgumentParser(prog="coco-eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("instances", help="COCO box / mask AP (pycocotools numbers)")
    s.add_argument("--gt", required=True, help="COCO instance annotations json")
    s.add_argument("--dt", required=True, help="COCO results json (list of detections)")
    s.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    s.add_argument("--backend", choices=("auto", "pycocotools", "faster", "faster-raw"), default="auto")
    s.add_argument("--json-out", help="write the metrics here")
    s.set_defaults(func=_instances)

    s = sub.add_parser("panoptic", help="panoptic quality (panopticapi algorithm)")
    s.add_argument("--gt-json", required=True)
    s.add_argument("--gt-dir", required=True)
    s.add_argument("--pred-json", required=True)
    s.add_argument("--pred-dir", required=True)
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--json-out")
    s.set_defaults(func=_panoptic)

    s = sub.add_parser("semantic", help="mIoU / fwIoU / mACC / pACC of PNG label maps with equal file names")
    s.add_argument("--gt-dir", required=True)
    s.add_argument("--pred-dir", required=True)
    s.add_argument("--num-classes", type=int, required=True)
    s.add_argument("--ignore", type=int, default=255)
    s.add_argument("--json-out")
    s.set_defaults(func=_semantic)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        payload = args.func(args)
        _write_json(args.json_out, payload)
    except EvaluationError as e:
        print(f"coco-eval: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
