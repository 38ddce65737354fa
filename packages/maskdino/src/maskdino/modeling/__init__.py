"""The Mask DINO model, one module per concept of the paper.

==========================  =======================================================================
module                      what
==========================  =======================================================================
``model``                   :class:`MaskDINO` (pre-processing, stages, losses, inference), ``build_model``
``backbone``                ResNet (detr-core) and Swin backbones behind the ``Backbone`` protocol
``pixel_decoder``           multi-scale deformable encoder + 1/4-resolution mask features
``predictor``               the decoder head, stage by stage (memory, selection, denoising, decoding)
``query_selection``         unified query selection: top-k tokens and mask-enhanced anchor boxes
``denoising``               unified denoising: noised boxes/labels that reconstruct boxes, labels and masks
``matcher``                 hybrid matching: class + box + mask costs in one Hungarian assignment
``criterion``               the losses and their official weights
``postprocess``             per-image instance / panoptic / semantic outputs
==========================  =======================================================================
"""

from .model import TASKS, MaskDINO, build_model
from .pixel_decoder import MaskDINOPixelDecoder
from .postprocess import MaskDINOPostProcessor
from .predictor import MaskDINOPredictor

__all__ = [
    "TASKS",
    "MaskDINO",
    "MaskDINOPixelDecoder",
    "MaskDINOPostProcessor",
    "MaskDINOPredictor",
    "build_model",
]
