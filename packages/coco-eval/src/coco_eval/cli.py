"""``coco-eval`` command line: instances, panoptic and semantic evaluation of files on disk.

Every argument is validated; bad input (a missing file, a malformed annotation, a nonsensical number) ends
with one line ``coco-eval: error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

from coco_eval.errors import EvaluationError


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        try:
            with open(path, "w", encoding="utf-8") as f:
                # NaN is not JSON: write null for "undefined"
                json.dump(_nan_to_none(payload), f, indent=2)
        except OSError as e:
            raise EvaluationError(f"cannot write --json-out {path!r}: {e.strerror or e}") from None


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {str(k): _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj


def _instances(args: argparse.Namespace) -> dict:
    from coco_eval.instances import evaluate_instances

    res = evaluate_instances(args.gt, args.dt, iou_type=args.iou_type, backend=args.backend,
                             max_dets=args.max_dets, use_cats=not args.no_cats)  # fmt: skip
    print(res.summary.rstrip())
    print(f"\n{args.iou_type} ({res.backend}): " + "  ".join(f"{k} {v:.3f}" for k, v in res.stats.items()))
    if res.per_category:
        print("\nper-category AP:")
        width = max(len(k) for k in res.per_category)
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

    res = pq_compute(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir, workers=args.workers,
                     progress=args.progress, backend=args.backend)  # fmt: skip
    print(format_pq_table(res))
    return res


def _semantic(args: argparse.Namespace) -> dict:
    from coco_eval.semantic import confusion_from_folders, semantic_metrics

    confusion, n = confusion_from_folders(args.gt_dir, args.pred_dir, args.num_classes, args.ignore,
                                          workers=args.workers, progress=args.progress)  # fmt: skip
    res = {f"sem_seg/{k}": v for k, v in semantic_metrics(confusion).items()}
    print(f"{n} label maps")
    for key in ("mIoU", "fwIoU", "mACC", "pACC"):
        print(f"{key:6s} {res['sem_seg/' + key]:7.3f}")
    return res


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{what} must be >= {low}, got {value}")
        return value

    return parse


def _workers(text: str) -> int:
    return _int_at_least(0, "--workers (0 = one per CPU)")(text)


def build_parser() -> argparse.ArgumentParser:
    """The ``coco-eval`` argument parser."""
    from coco_eval.instances import BACKENDS, DEFAULT_MAX_DETS
    from coco_eval.panoptic import PQ_BACKENDS

    p = argparse.ArgumentParser(prog="coco-eval", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("instances", help="COCO box / mask AP (pycocotools numbers)")
    s.add_argument("--gt", required=True, help="COCO instance annotations json")
    s.add_argument("--dt", required=True, help="COCO results json (list of detections)")
    s.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    s.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="auto = fastest installed exact backend (hotcoco, ultrafast, faster, pycocotools)")  # fmt: skip
    s.add_argument("--max-dets", type=_int_at_least(1, "--max-dets"), nargs=3, default=list(DEFAULT_MAX_DETS),
                   metavar=("M1", "M2", "M3"), help="pycocotools' maxDets (increasing)")  # fmt: skip
    s.add_argument(
        "--no-cats", action="store_true", help="useCats=0: match detections regardless of category"
    )
    s.add_argument("--json-out", help="write the metrics here")
    s.set_defaults(func=_instances)

    s = sub.add_parser("panoptic", help="panoptic quality (panopticapi algorithm)")
    s.add_argument("--gt-json", required=True)
    s.add_argument("--gt-dir", required=True)
    s.add_argument("--pred-json", required=True)
    s.add_argument("--pred-dir", required=True)
    s.add_argument("--workers", type=_workers, default=1, help="threads / processes (0 = one per CPU)")
    s.add_argument("--backend", choices=PQ_BACKENDS, default="auto")
    s.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")
    s.add_argument("--json-out")
    s.set_defaults(func=_panoptic)

    s = sub.add_parser("semantic", help="mIoU / fwIoU / mACC / pACC of PNG label maps with equal file names")
    s.add_argument("--gt-dir", required=True)
    s.add_argument("--pred-dir", required=True)
    s.add_argument("--num-classes", type=_int_at_least(1, "--num-classes"), required=True)
    s.add_argument("--ignore", type=int, default=255, help="GT label that is not scored (not a class index)")
    s.add_argument("--workers", type=_workers, default=1, help="processes (0 = one per CPU)")
    s.add_argument("--progress", action="store_true", help="progress bar (needs tqdm)")
    s.add_argument("--json-out")
    s.set_defaults(func=_semantic)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with the reason on stderr)."""
    args = build_parser().parse_args(argv)  # argparse itself exits 2 with a usage line for bad flags
    try:
        payload = args.func(args)
        _write_json(args.json_out, payload)
    except EvaluationError as e:
        print(f"coco-eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coco-eval: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
