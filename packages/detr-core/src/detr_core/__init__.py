"""Reusable DETR-family building blocks (Deformable DETR, DAB-DETR, DN-DETR, DINO, Mask DINO).

Modules: ``padding`` (``PaddedBatch``, the padded-batch value object), ``backbone`` (the ``Backbone`` contract,
ResNets), ``outputs`` (typed head outputs), ``box_ops`` (geometry), ``position_encoding`` (sine embeddings),
``layers`` (MLP), ``neck`` (input projections), ``encoder`` / ``decoder`` (deformable transformer with iterative box refinement),
``query_selection`` (two-stage), ``denoising`` (DN queries), ``matcher`` (Hungarian), ``losses`` (focal, box, dice,
point sampling, SetCriterion), ``postprocess`` (top-k detections), ``checkpoint`` (safe files, key maps from official layouts, strict loading),
``distributed``. Tensors are batch-first ``(B, Q, C)``; boxes are cxcywh normalised to ``[0, 1]`` unless stated.
"""

from . import (
    backbone,
    box_ops,
    checkpoint,
    decoder,
    denoising,
    distributed,
    encoder,
    layers,
    losses,
    matcher,
    neck,
    outputs,
    padding,
    position_encoding,
    postprocess,
    query_selection,
)
from .backbone import Backbone, ResNetBackbone, ShapeSpec
from .decoder import DeformableDecoder, DeformableDecoderLayer, look_forward_twice
from .denoising import DenoisingMeta, DenoisingQueries, build_denoising_queries, split_denoising_outputs
from .encoder import DeformableEncoder, DeformableEncoderLayer
from .layers import MLP
from .losses import SetCriterion
from .matcher import HungarianMatcher
from .neck import InputProjection
from .outputs import DenoisingPredictions, DetectionOutputs, QueryPredictions, split_denoising
from .padding import PaddedBatch
from .position_encoding import PositionEmbeddingSine, sine_embedding
from .postprocess import Detections, topk_detections

__version__ = "0.2.0"

__all__ = [
    "MLP",
    "Backbone",
    "DenoisingPredictions",
    "DetectionOutputs",
    "Detections",
    "InputProjection",
    "PaddedBatch",
    "QueryPredictions",
    "ResNetBackbone",
    "ShapeSpec",
    "backbone",
    "checkpoint",
    "outputs",
    "padding",
    "split_denoising",
    "DeformableDecoder",
    "DeformableDecoderLayer",
    "DeformableEncoder",
    "DeformableEncoderLayer",
    "DenoisingMeta",
    "DenoisingQueries",
    "HungarianMatcher",
    "PositionEmbeddingSine",
    "SetCriterion",
    "box_ops",
    "build_denoising_queries",
    "decoder",
    "denoising",
    "distributed",
    "encoder",
    "layers",
    "look_forward_twice",
    "losses",
    "matcher",
    "neck",
    "position_encoding",
    "postprocess",
    "query_selection",
    "sine_embedding",
    "split_denoising_outputs",
    "topk_detections",
]
