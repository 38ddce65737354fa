"""COCO box/mask AP (pycocotools-exact), panoptic PQ (panopticapi's algorithm) and semantic mIoU.

No torch at import time: torch is only looked up (never imported) to gather results under torch.distributed.
"""

from coco_eval.errors import EvaluationError
from coco_eval.evaluators import COCOInstanceEvaluator, COCOPanopticEvaluator
from coco_eval.instances import (
    STAT_NAMES,
    InstanceResult,
    available_backends,
    encode_masks,
    evaluate_instances,
    instances_to_coco_json,
)
from coco_eval.panoptic import pq_compute, pq_image, pq_single_image
from coco_eval.panoptic_io import id2rgb, read_panoptic_png, rgb2id, write_panoptic_png
from coco_eval.semantic import (
    SemSegEvaluator,
    confusion_from_folders,
    confusion_matrix,
    read_label_map,
    semantic_metrics,
)

__version__ = "0.2.0"

__all__ = [
    "STAT_NAMES",
    "COCOInstanceEvaluator",
    "COCOPanopticEvaluator",
    "EvaluationError",
    "InstanceResult",
    "SemSegEvaluator",
    "__version__",
    "available_backends",
    "confusion_from_folders",
    "confusion_matrix",
    "encode_masks",
    "evaluate_instances",
    "id2rgb",
    "instances_to_coco_json",
    "pq_compute",
    "pq_image",
    "pq_single_image",
    "read_label_map",
    "read_panoptic_png",
    "rgb2id",
    "semantic_metrics",
    "write_panoptic_png",
]
