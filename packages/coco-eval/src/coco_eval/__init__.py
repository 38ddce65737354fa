"""COCO box/mask AP (pycocotools-exact), panoptic PQ (panopticapi's algorithm) and semantic mIoU.

No torch at import time: torch is only looked up (never imported) to gather results under torch.distributed.
"""

from coco_eval.errors import EvaluationError
from coco_eval.evaluators import COCOInstanceEvaluator, COCOPanopticEvaluator
from coco_eval.instances import (
    STAT_NAMES,
    InstanceResult,
    encode_masks,
    evaluate_instances,
    instances_to_coco_json,
)
from coco_eval.panoptic import pq_compute, pq_single_image
from coco_eval.semantic import SemSegEvaluator, confusion_matrix, semantic_metrics

__all__ = [
    "STAT_NAMES",
    "COCOInstanceEvaluator",
    "COCOPanopticEvaluator",
    "EvaluationError",
    "InstanceResult",
    "SemSegEvaluator",
    "confusion_matrix",
    "encode_masks",
    "evaluate_instances",
    "instances_to_coco_json",
    "pq_compute",
    "pq_single_image",
    "semantic_metrics",
]
